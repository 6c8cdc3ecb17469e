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
    // Timestamps of other units (e.g. nanoseconds from date_bin) are written as microseconds,
    // PostgreSQL's own resolution.
    let arrays: Vec<ArrayRef> = batch
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
        .collect::<Result<_, _>>()?;
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

fn write_value(c: &Col<'_>, row: usize, out: &mut Vec<u8>) {
    let null = match c {
        Col::Text(a) => a.is_null(row),
        Col::Millis(a) => a.is_null(row),
        Col::Micros(a) => a.is_null(row),
        Col::Decimal(a, _) => a.is_null(row),
        Col::F64(a) => a.is_null(row),
        Col::I64(a) => a.is_null(row),
        Col::I32(a) => a.is_null(row),
        Col::Bool(a) => a.is_null(row),
    };
    if null {
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

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
