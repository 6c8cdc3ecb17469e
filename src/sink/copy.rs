//! Encoding of Arrow batches into PostgreSQL's COPY text format: one line per row, tab-separated,
//! `\N` for NULL, backslash escapes for tab, newline, carriage return and backslash.
//!
//! Decimals are written from their integer value and scale (exact, never through a float);
//! timestamps as ISO 8601 with an explicit UTC offset.

use std::io::Write;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int32Array, Int64Array,
    RecordBatch, StringArray, TimestampMicrosecondArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, TimeUnit};

use crate::source::simulator::write_rfc3339_ms;

/// Errors of the encoder.
#[derive(Debug, thiserror::Error)]
#[error("column {column}: type {data_type} cannot be written with COPY")]
pub struct CopyError {
    /// Column name.
    pub column: String,
    /// Its type.
    pub data_type: DataType,
}

enum Col<'a> {
    Text(&'a StringArray),
    Millis(&'a TimestampMillisecondArray),
    Micros(&'a TimestampMicrosecondArray),
    Decimal(&'a Decimal128Array, i8),
    F64(&'a Float64Array),
    I64(&'a Int64Array),
    I32(&'a Int32Array),
    Bool(&'a BooleanArray),
}

fn typed<'a>(name: &str, a: &'a ArrayRef) -> Result<Col<'a>, CopyError> {
    let any = a.as_any();
    let err = || CopyError {
        column: name.to_string(),
        data_type: a.data_type().clone(),
    };
    Ok(match a.data_type() {
        DataType::Utf8 => Col::Text(any.downcast_ref().ok_or_else(err)?),
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            Col::Millis(any.downcast_ref().ok_or_else(err)?)
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            Col::Micros(any.downcast_ref().ok_or_else(err)?)
        }
        DataType::Decimal128(_, s) => Col::Decimal(any.downcast_ref().ok_or_else(err)?, *s),
        DataType::Float64 => Col::F64(any.downcast_ref().ok_or_else(err)?),
        DataType::Int64 => Col::I64(any.downcast_ref().ok_or_else(err)?),
        DataType::Int32 => Col::I32(any.downcast_ref().ok_or_else(err)?),
        DataType::Boolean => Col::Bool(any.downcast_ref().ok_or_else(err)?),
        _ => return Err(err()),
    })
}

/// Whether a column of this type can be written by [`encode`].
pub fn supported(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::Timestamp(_, _)
            | DataType::Decimal128(_, _)
            | DataType::Float64
            | DataType::Int64
            | DataType::Int32
            | DataType::Boolean
    )
}

/// Append the rows of `batch` to `out` in COPY text format.
pub fn encode(batch: &RecordBatch, out: &mut Vec<u8>) -> Result<(), CopyError> {
    let schema = batch.schema();
    let arrays = microsecond_timestamps(batch)?;
    let cols = arrays
        .iter()
        .zip(schema.fields())
        .map(|(a, f)| typed(f.name(), a))
        .collect::<Result<Vec<_>, _>>()?;
    for row in 0..batch.num_rows() {
        for (i, c) in cols.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            write_value(c, row, out);
        }
        out.push(b'\n');
    }
    Ok(())
}

/// The columns of `batch`, timestamps of other units (e.g. nanoseconds from `date_bin`) cast to
/// microseconds, PostgreSQL's own resolution.
fn microsecond_timestamps(batch: &RecordBatch) -> Result<Vec<ArrayRef>, CopyError> {
    let schema = batch.schema();
    batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(a, f)| match a.data_type() {
            DataType::Timestamp(TimeUnit::Nanosecond | TimeUnit::Second, tz) => {
                datafusion::arrow::compute::cast(
                    a,
                    &DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
                )
                .map_err(|_| CopyError {
                    column: f.name().clone(),
                    data_type: a.data_type().clone(),
                })
            }
            _ => Ok(a.clone()),
        })
        .collect()
}

fn is_null(c: &Col<'_>, row: usize) -> bool {
    match c {
        Col::Text(a) => a.is_null(row),
        Col::Millis(a) => a.is_null(row),
        Col::Micros(a) => a.is_null(row),
        Col::Decimal(a, _) => a.is_null(row),
        Col::F64(a) => a.is_null(row),
        Col::I64(a) => a.is_null(row),
        Col::I32(a) => a.is_null(row),
        Col::Bool(a) => a.is_null(row),
    }
}

fn write_value(c: &Col<'_>, row: usize, out: &mut Vec<u8>) {
    if is_null(c, row) {
        out.extend_from_slice(b"\\N");
        return;
    }
    match c {
        Col::Text(a) => escape_text(a.value(row), out),
        Col::Millis(a) => write_rfc3339_ms(out, a.value(row)),
        Col::Micros(a) => {
            let us = a.value(row);
            // Write milliseconds, then the remaining microseconds before the 'Z'.
            write_rfc3339_ms(out, us.div_euclid(1000));
            out.pop();
            let _ = write!(out, "{:03}Z", us.rem_euclid(1000));
        }
        Col::Decimal(a, scale) => write_decimal(a.value(row), *scale, out),
        Col::F64(a) => {
            let v = a.value(row);
            if v.is_finite() {
                let _ = write!(out, "{v}");
            } else if v.is_nan() {
                out.extend_from_slice(b"NaN");
            } else if v > 0.0 {
                out.extend_from_slice(b"Infinity");
            } else {
                out.extend_from_slice(b"-Infinity");
            }
        }
        Col::I64(a) => {
            let _ = write!(out, "{}", a.value(row));
        }
        Col::I32(a) => {
            let _ = write!(out, "{}", a.value(row));
        }
        Col::Bool(a) => out.push(if a.value(row) { b't' } else { b'f' }),
    }
}

/// Exact decimal text of an unscaled integer.
pub fn write_decimal(v: i128, scale: i8, out: &mut Vec<u8>) {
    if scale <= 0 {
        let _ = write!(out, "{v}");
        for _ in 0..(-scale) {
            out.push(b'0');
        }
        return;
    }
    let scale = scale as u32;
    let neg = v < 0;
    let abs = v.unsigned_abs();
    let div = 10u128.pow(scale);
    if neg {
        out.push(b'-');
    }
    let _ = write!(
        out,
        "{}.{:0width$}",
        abs / div,
        abs % div,
        width = scale as usize
    );
}

fn escape_text(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
    {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// A column type of the target table, as far as the binary COPY format is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgType {
    /// `text`, `varchar`, `bpchar`, `json`: the UTF-8 bytes.
    Text,
    /// `jsonb`: version byte 1, then the JSON text.
    Jsonb,
    /// `timestamptz` or `timestamp`: microseconds since 2000-01-01 00:00 UTC.
    Timestamp,
    /// `numeric`: base-10000 digits.
    Numeric,
    /// `float8`.
    Float8,
    /// `int8`.
    Int8,
    /// `int4`.
    Int4,
    /// `bool`.
    Bool,
}

impl PgType {
    /// The type of a column from its `pg_type.typname`; `None` for a type the binary encoder
    /// does not write (the table is then loaded in text format).
    pub fn from_typname(name: &str) -> Option<Self> {
        Some(match name {
            "text" | "varchar" | "bpchar" | "json" => PgType::Text,
            "jsonb" => PgType::Jsonb,
            "timestamptz" | "timestamp" => PgType::Timestamp,
            "numeric" => PgType::Numeric,
            "float8" => PgType::Float8,
            "int8" => PgType::Int8,
            "int4" => PgType::Int4,
            "bool" => PgType::Bool,
            _ => return None,
        })
    }

    /// Whether an Arrow column of type `t` can be written into a column of this type.
    pub fn accepts(self, t: &DataType) -> bool {
        matches!(
            (self, t),
            (PgType::Text | PgType::Jsonb, DataType::Utf8)
                | (PgType::Timestamp, DataType::Timestamp(_, _))
                | (PgType::Numeric, DataType::Decimal128(_, _))
                | (PgType::Float8, DataType::Float64)
                | (PgType::Int8, DataType::Int64 | DataType::Int32)
                | (PgType::Int4, DataType::Int32)
                | (PgType::Bool, DataType::Boolean)
        )
    }
}

/// Start of a binary COPY stream: signature, flags, header extension length.
pub const BINARY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End of a binary COPY stream: a tuple field count of -1.
pub const BINARY_TRAILER: &[u8] = &[0xff, 0xff];

/// Microseconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_US: i64 = 946_684_800_000_000;

/// Append the rows of `batch` to `out` as tuples of PostgreSQL's binary COPY format (without
/// [`BINARY_HEADER`] and [`BINARY_TRAILER`]), column `i` written as `types[i]`. The server then
/// parses no text: no number, timestamp or decimal conversion on its side. Check the types with
/// [`PgType::accepts`] first; a column they do not fit is an error.
pub fn encode_binary(
    batch: &RecordBatch,
    types: &[PgType],
    out: &mut Vec<u8>,
) -> Result<(), CopyError> {
    let schema = batch.schema();
    let arrays = microsecond_timestamps(batch)?;
    let mut cols = Vec::with_capacity(arrays.len());
    for ((a, f), t) in arrays.iter().zip(schema.fields()).zip(types) {
        if !t.accepts(a.data_type()) {
            return Err(CopyError {
                column: f.name().clone(),
                data_type: a.data_type().clone(),
            });
        }
        cols.push((typed(f.name(), a)?, *t));
    }
    if cols.len() != types.len() {
        return Err(CopyError {
            column: format!("({} columns for {} types)", cols.len(), types.len()),
            data_type: DataType::Null,
        });
    }
    let fields = (cols.len() as i16).to_be_bytes();
    for row in 0..batch.num_rows() {
        out.extend_from_slice(&fields);
        for (c, t) in &cols {
            write_binary(c, *t, row, out);
        }
    }
    Ok(())
}

fn write_binary(c: &Col<'_>, t: PgType, row: usize, out: &mut Vec<u8>) {
    if is_null(c, row) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return;
    }
    let len = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as i32).to_be_bytes());
    match c {
        Col::Text(a) => {
            let v = a.value(row).as_bytes();
            if t == PgType::Jsonb {
                len(out, v.len() + 1);
                out.push(1);
            } else {
                len(out, v.len());
            }
            out.extend_from_slice(v);
        }
        Col::Millis(a) => {
            len(out, 8);
            out.extend_from_slice(&(a.value(row).saturating_mul(1000) - PG_EPOCH_US).to_be_bytes());
        }
        Col::Micros(a) => {
            len(out, 8);
            out.extend_from_slice(&(a.value(row) - PG_EPOCH_US).to_be_bytes());
        }
        Col::Decimal(a, scale) => write_numeric(a.value(row), *scale, out),
        Col::F64(a) => {
            len(out, 8);
            out.extend_from_slice(&a.value(row).to_be_bytes());
        }
        Col::I64(a) => {
            len(out, 8);
            out.extend_from_slice(&a.value(row).to_be_bytes());
        }
        Col::I32(a) => {
            if t == PgType::Int8 {
                len(out, 8);
                out.extend_from_slice(&i64::from(a.value(row)).to_be_bytes());
            } else {
                len(out, 4);
                out.extend_from_slice(&a.value(row).to_be_bytes());
            }
        }
        Col::Bool(a) => {
            len(out, 1);
            out.push(u8::from(a.value(row)));
        }
    }
}

/// A decimal (unscaled `v`, `scale`) as a binary `numeric`, field length included: digit count,
/// weight (of the first digit, in powers of 10,000), sign, display scale, then base-10,000 digits,
/// with leading and trailing zero digits left out. Exact: integer arithmetic only.
pub fn write_numeric(v: i128, scale: i8, out: &mut Vec<u8>) {
    let mut abs = v.unsigned_abs();
    let mut s = u32::try_from(scale).unwrap_or(0);
    if scale < 0 {
        // A negative scale multiplies; Decimal128 has at most 38 digits, so this fits in u128
        // for every scale a SQL type can declare.
        abs = abs.saturating_mul(10u128.pow(u32::from(scale.unsigned_abs())));
        s = 0;
    }
    let div = 10u128.pow(s);
    let (mut int, frac) = (abs / div, abs % div);
    let frac_groups = s.div_ceil(4);
    let frac = frac * 10u128.pow(frac_groups * 4 - s);
    let mut digits: Vec<i16> = Vec::with_capacity(12);
    while int > 0 {
        digits.push((int % 10_000) as i16);
        int /= 10_000;
    }
    digits.reverse();
    let mut weight = digits.len() as i16 - 1;
    for k in (0..frac_groups).rev() {
        digits.push(((frac / 10u128.pow(4 * k)) % 10_000) as i16);
    }
    let lead = digits.iter().take_while(|d| **d == 0).count();
    let trail = digits[lead..].iter().rev().take_while(|d| **d == 0).count();
    let digits = &digits[lead..digits.len() - trail];
    weight -= lead as i16;
    if digits.is_empty() {
        weight = 0;
    }
    let sign: u16 = if v < 0 && !digits.is_empty() {
        0x4000
    } else {
        0
    };
    out.extend_from_slice(&((8 + 2 * digits.len()) as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(s as i16).to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn numeric(v: i128, scale: i8) -> Vec<i16> {
        let mut out = Vec::new();
        write_numeric(v, scale, &mut out);
        let len = i32::from_be_bytes(out[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        out[4..]
            .chunks(2)
            .map(|c| i16::from_be_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn numerics_are_base_10000_digits() {
        // ndigits, weight, sign, dscale, digits...
        assert_eq!(numeric(123_456, 2), vec![2, 0, 0, 2, 1234, 5600]);
        assert_eq!(numeric(-5, 2), vec![1, -1, 0x4000, 2, 500]);
        assert_eq!(numeric(0, 2), vec![0, 0, 0, 2]);
        assert_eq!(numeric(1_000_000, 2), vec![1, 1, 0, 2, 1]);
        assert_eq!(numeric(1, 6), vec![1, -2, 0, 6, 100]);
        assert_eq!(numeric(42, 0), vec![1, 0, 0, 0, 42]);
        assert_eq!(numeric(7, -3), vec![1, 0, 0, 0, 7000]);
    }

    #[test]
    fn encodes_rows_exactly() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("d", DataType::Decimal128(18, 2), false),
            Field::new("f", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![Some("a\tb\\c\nd"), None])),
                Arc::new(
                    TimestampMillisecondArray::from(vec![1_762_000_000_123, 0])
                        .with_timezone("UTC"),
                ),
                Arc::new(
                    Decimal128Array::from(vec![123_456, -5])
                        .with_precision_and_scale(18, 2)
                        .unwrap(),
                ),
                Arc::new(Float64Array::from(vec![Some(-23.5), None])),
            ],
        )
        .unwrap();
        let mut out = Vec::new();
        encode(&batch, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\tb\\\\c\\nd\t2025-11-01T12:26:40.123Z\t1234.56\t-23.5\n\\N\t1970-01-01T00:00:00.000Z\t-0.05\t\\N\n"
        );
    }
}
