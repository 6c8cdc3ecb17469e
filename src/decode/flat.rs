//! One-pass decoding of flat JSON objects straight into Arrow builders: the decoder's fast path.
//!
//! Payment messages are flat objects of strings, numbers, booleans and nulls. arrow-json reads
//! each one twice (the exact fields as text, then the wire schema, see [`super::JsonDecoder`])
//! through a tape; this reads it once and builds the declared columns directly.
//!
//! It takes a message only when it is sure to produce what the arrow-json path produces, and
//! declines it otherwise: escapes, nested values, numbers outside plain JSON form (`+1`, `01`,
//! exponents in money or integers), numbers given as strings for integers, more decimals than the
//! declared scale (even zeros), timestamps other than `YYYY-MM-DDTHH:MM:SS[.fraction]Z`,
//! duplicate keys, a missing or null required field, a value of the wrong type, trailing bytes. A
//! declined message goes to the arrow-json path, which decodes it or explains why it is a dead
//! letter. A property test holds both paths to the same rows and dead letters.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMillisecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Schema, TimeUnit};

/// How a field's JSON value becomes its column.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Utf8,
    Int32,
    Int64,
    Float64,
    Boolean,
    /// Milliseconds, UTC.
    Timestamp,
    Decimal {
        precision: u8,
        scale: i8,
    },
}

/// The fields of a source as the fast path reads them.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    names: Vec<Box<[u8]>>,
    kinds: Vec<Kind>,
    nullable: Vec<bool>,
}

impl Plan {
    /// The plan of a source's JSON schema; `None` if a field has a type this path does not build.
    pub(super) fn new(schema: &Schema) -> Option<Self> {
        let mut plan = Self {
            names: Vec::new(),
            kinds: Vec::new(),
            nullable: Vec::new(),
        };
        for f in schema.fields() {
            let kind = match f.data_type() {
                DataType::Utf8 => Kind::Utf8,
                DataType::Int32 => Kind::Int32,
                DataType::Int64 => Kind::Int64,
                DataType::Float64 => Kind::Float64,
                DataType::Boolean => Kind::Boolean,
                DataType::Timestamp(TimeUnit::Millisecond, Some(tz)) if tz.as_ref() == "UTC" => {
                    Kind::Timestamp
                }
                DataType::Decimal128(precision, scale) if *scale >= 0 => Kind::Decimal {
                    precision: *precision,
                    scale: *scale,
                },
                _ => return None,
            };
            plan.names.push(f.name().as_bytes().into());
            plan.kinds.push(kind);
            plan.nullable.push(f.is_nullable());
        }
        Some(plan)
    }

    /// Index of the field named `key`; `hint` (the field after the previous key) first, since
    /// producers usually write the fields in one order.
    fn field(&self, key: &[u8], hint: usize) -> Option<usize> {
        if self.names.get(hint).is_some_and(|n| **n == *key) {
            return Some(hint);
        }
        self.names.iter().position(|n| **n == *key)
    }
}

/// A field's value in the message being read.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Value {
    Absent,
    Null,
    /// Byte range of a string's content in the message.
    Str(usize, usize),
    Int(i64),
    Float(f64),
    Bool(bool),
    Decimal(i128),
}

#[derive(Debug)]
enum Column {
    Utf8(StringBuilder),
    Int32(Int32Builder),
    Int64(Int64Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMillisecondBuilder),
    Decimal(Decimal128Builder),
}

/// Rows read by the fast path, column by column.
#[derive(Debug)]
pub(super) struct Rows<'p> {
    plan: &'p Plan,
    /// The values of the last message [`Rows::read`], not yet appended.
    values: Vec<Value>,
    columns: Vec<Column>,
    len: usize,
}

impl<'p> Rows<'p> {
    /// Empty rows, room for `capacity` of them.
    pub(super) fn new(plan: &'p Plan, capacity: usize) -> Self {
        let columns = plan
            .kinds
            .iter()
            .map(|k| match *k {
                Kind::Utf8 => Column::Utf8(StringBuilder::with_capacity(capacity, capacity * 16)),
                Kind::Int32 => Column::Int32(Int32Builder::with_capacity(capacity)),
                Kind::Int64 => Column::Int64(Int64Builder::with_capacity(capacity)),
                Kind::Float64 => Column::Float64(Float64Builder::with_capacity(capacity)),
                Kind::Boolean => Column::Boolean(BooleanBuilder::with_capacity(capacity)),
                Kind::Timestamp => Column::Timestamp(
                    TimestampMillisecondBuilder::with_capacity(capacity).with_timezone("UTC"),
                ),
                Kind::Decimal { precision, scale } => Column::Decimal(
                    Decimal128Builder::with_capacity(capacity)
                        .with_precision_and_scale(precision, scale)
                        .expect("precision and scale of a valid decimal field"),
                ),
            })
            .collect();
        Self {
            plan,
            values: vec![Value::Absent; plan.kinds.len()],
            columns,
            len: 0,
        }
    }

    /// Rows appended so far.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Read `v` (valid UTF-8, no backslash) and append it as a row; false, with nothing
    /// appended, if the fast path declines it.
    pub(super) fn push(&mut self, v: &[u8]) -> bool {
        if !self.read(v) {
            return false;
        }
        let missing = |(value, nullable): (&Value, &bool)| {
            !nullable && matches!(value, Value::Absent | Value::Null)
        };
        if self.values.iter().zip(&self.plan.nullable).any(missing) {
            return false;
        }
        for (column, value) in self.columns.iter_mut().zip(&self.values) {
            append(column, *value, v);
        }
        self.len += 1;
        true
    }

    /// The columns of the rows appended, in schema order; the rows start over.
    pub(super) fn finish(&mut self) -> Vec<ArrayRef> {
        self.len = 0;
        self.columns
            .iter_mut()
            .map(|c| -> ArrayRef {
                match c {
                    Column::Utf8(b) => Arc::new(b.finish()),
                    Column::Int32(b) => Arc::new(b.finish()),
                    Column::Int64(b) => Arc::new(b.finish()),
                    Column::Float64(b) => Arc::new(b.finish()),
                    Column::Boolean(b) => Arc::new(b.finish()),
                    Column::Timestamp(b) => Arc::new(b.finish()),
                    Column::Decimal(b) => Arc::new(b.finish()),
                }
            })
            .collect()
    }

    /// Read one flat object into `self.values`; false if the fast path declines it.
    fn read(&mut self, v: &[u8]) -> bool {
        self.values.fill(Value::Absent);
        let mut c = Cursor { b: v, i: 0 };
        c.ws();
        if !c.eat(b'{') {
            return false;
        }
        c.ws();
        if !c.eat(b'}') {
            let mut hint = 0;
            loop {
                let Some((k0, k1)) = c.string() else {
                    return false;
                };
                c.ws();
                if !c.eat(b':') {
                    return false;
                }
                c.ws();
                match self.plan.field(&v[k0..k1], hint) {
                    Some(f) => {
                        if self.values[f] != Value::Absent {
                            return false;
                        }
                        let Some(value) = c.value(self.plan.kinds[f]) else {
                            return false;
                        };
                        self.values[f] = value;
                        hint = f + 1;
                    }
                    None => {
                        if !c.skip_scalar() {
                            return false;
                        }
                    }
                }
                c.ws();
                match c.next() {
                    Some(b',') => c.ws(),
                    Some(b'}') => break,
                    _ => return false,
                }
            }
        }
        c.ws();
        c.i == v.len()
    }
}

fn append(column: &mut Column, value: Value, v: &[u8]) {
    match (column, value) {
        (Column::Utf8(b), Value::Str(s, e)) => {
            b.append_value(std::str::from_utf8(&v[s..e]).expect("checked UTF-8"))
        }
        (Column::Utf8(b), _) => b.append_null(),
        (Column::Int32(b), Value::Int(x)) => b.append_value(x as i32),
        (Column::Int32(b), _) => b.append_null(),
        (Column::Int64(b), Value::Int(x)) => b.append_value(x),
        (Column::Int64(b), _) => b.append_null(),
        (Column::Float64(b), Value::Float(x)) => b.append_value(x),
        (Column::Float64(b), _) => b.append_null(),
        (Column::Boolean(b), Value::Bool(x)) => b.append_value(x),
        (Column::Boolean(b), _) => b.append_null(),
        (Column::Timestamp(b), Value::Int(x)) => b.append_value(x),
        (Column::Timestamp(b), _) => b.append_null(),
        (Column::Decimal(b), Value::Decimal(x)) => b.append_value(x),
        (Column::Decimal(b), _) => b.append_null(),
    }
}

/// Most digits of an integer the fast path takes (beyond, arrow-json decides).
const MAX_INT_DIGITS: usize = 18;

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string (no escapes, the message has no backslash): the range of its content.
    fn string(&mut self) -> Option<(usize, usize)> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.i;
        let len = self.b[start..].iter().position(|c| *c == b'"')?;
        self.i = start + len + 1;
        Some((start, start + len))
    }

    /// A string that is a value: [`Cursor::string`], ending where a value ends.
    fn string_value(&mut self) -> Option<(usize, usize)> {
        let range = self.string()?;
        self.at_value_end().then_some(range)
    }

    /// A literal (`true`, `null`...), which must end where a value ends.
    fn literal(&mut self, word: &[u8]) -> bool {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            self.at_value_end()
        } else {
            false
        }
    }

    /// Whether the next byte may follow a value.
    fn at_value_end(&self) -> bool {
        matches!(
            self.peek(),
            None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
        )
    }

    /// A JSON number: its range, and whether it has a fraction or an exponent.
    fn number(&mut self) -> Option<(usize, usize, bool)> {
        let start = self.i;
        self.eat(b'-');
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut real = false;
        if self.eat(b'.') {
            real = true;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            real = true;
            self.i += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return None;
            }
            self.digits();
        }
        self.at_value_end().then_some((start, self.i, real))
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    /// Skip the value of a key that is not a field: a string, number, boolean or null.
    fn skip_scalar(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => self.string_value().is_some(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            _ => self.number().is_some(),
        }
    }

    /// The value of a field of `kind`.
    fn value(&mut self, kind: Kind) -> Option<Value> {
        if self.peek() == Some(b'n') {
            return self.literal(b"null").then_some(Value::Null);
        }
        match kind {
            Kind::Utf8 => self.string_value().map(|(s, e)| Value::Str(s, e)),
            Kind::Boolean => match self.peek()? {
                b't' => self.literal(b"true").then_some(Value::Bool(true)),
                b'f' => self.literal(b"false").then_some(Value::Bool(false)),
                _ => None,
            },
            Kind::Int32 | Kind::Int64 => {
                let x = self.integer()?;
                (matches!(kind, Kind::Int64) || i32::try_from(x).is_ok()).then_some(Value::Int(x))
            }
            Kind::Float64 => {
                let (s, e, _) = self.number()?;
                let text = std::str::from_utf8(&self.b[s..e]).ok()?;
                text.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .map(Value::Float)
            }
            Kind::Timestamp => {
                if self.peek() == Some(b'"') {
                    let (s, e) = self.string_value()?;
                    rfc3339_utc_ms(&self.b[s..e]).map(Value::Int)
                } else {
                    self.integer().map(Value::Int)
                }
            }
            Kind::Decimal { precision, scale } => {
                let (s, e) = if self.peek() == Some(b'"') {
                    self.string_value()?
                } else {
                    let (s, e, _) = self.number()?;
                    (s, e)
                };
                decimal(&self.b[s..e], precision, scale).map(Value::Decimal)
            }
        }
    }

    /// A JSON integer of at most [`MAX_INT_DIGITS`] digits.
    fn integer(&mut self) -> Option<i64> {
        let (s, e, real) = self.number()?;
        let text = &self.b[s..e];
        let digits = text.len() - usize::from(text[0] == b'-');
        if real || digits > MAX_INT_DIGITS {
            return None;
        }
        std::str::from_utf8(text).ok()?.parse().ok()
    }
}

/// `[-]digits[.digits]` as a decimal of `scale`, if it has at most `precision - scale` integer
/// digits (leading zeros aside) and at most `scale` decimals.
fn decimal(text: &[u8], precision: u8, scale: i8) -> Option<i128> {
    let (negative, rest) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, text),
    };
    let (int, frac) = match rest.iter().position(|c| *c == b'.') {
        Some(dot) => (&rest[..dot], Some(&rest[dot + 1..])),
        None => (rest, None),
    };
    let scale = scale as usize;
    if int.is_empty()
        || !int.iter().all(u8::is_ascii_digit)
        || frac
            .is_some_and(|f| f.is_empty() || f.len() > scale || !f.iter().all(u8::is_ascii_digit))
    {
        return None;
    }
    let significant = &int[int.iter().position(|c| *c != b'0').unwrap_or(int.len())..];
    if significant.len() > precision as usize - scale {
        return None;
    }
    let frac = frac.unwrap_or_default();
    let mut x: i128 = 0;
    for c in significant.iter().chain(frac) {
        x = x * 10 + i128::from(c - b'0');
    }
    x *= 10i128.pow((scale - frac.len()) as u32);
    Some(if negative { -x } else { x })
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction]Z` as epoch milliseconds (the fraction truncated, as arrow does).
fn rfc3339_utc_ms(t: &[u8]) -> Option<i64> {
    if t.len() < 20 || t[t.len() - 1] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        t[r].iter().try_fold(0u32, |acc, c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    if t[4] != b'-' || t[7] != b'-' || t[10] != b'T' || t[13] != b':' || t[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let nanos = match &t[19..t.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            num(20..20 + fraction.len())? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let time = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?.and_hms_nano_opt(
        hour,
        minute,
        (second < 60).then_some(second)?,
        nanos,
    )?;
    Some(time.and_utc().timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_exact_or_declined() {
        assert_eq!(decimal(b"31.88", 18, 2), Some(3188));
        assert_eq!(decimal(b"-0.1", 18, 2), Some(-10));
        assert_eq!(decimal(b"007", 18, 2), Some(700));
        assert_eq!(
            decimal(b"9999999999999999.99", 18, 2),
            Some(999_999_999_999_999_999)
        );
        assert_eq!(decimal(b"99999999999999999", 18, 2), None);
        assert_eq!(decimal(b"1.234", 18, 2), None);
        assert_eq!(decimal(b"1.230", 18, 2), None);
        for bad in [
            &b""[..],
            b"-",
            b".5",
            b"5.",
            b"1e3",
            b"+1",
            b"1.2.3",
            b"--1",
            b"1 ",
        ] {
            assert_eq!(
                decimal(bad, 18, 2),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn timestamps_are_strict_rfc3339_utc() {
        assert_eq!(rfc3339_utc_ms(b"1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            rfc3339_utc_ms(b"2026-11-01T00:00:01.668Z"),
            Some(1_793_491_201_668)
        );
        assert_eq!(rfc3339_utc_ms(b"1969-12-31T23:59:59.9999Z"), Some(-1));
        for bad in [
            &b"2026-11-01T00:00:01"[..],
            b"2026-11-01 00:00:01Z",
            b"2026-11-01T00:00:01z",
            b"2026-02-30T00:00:00Z",
            b"2026-11-01T00:00:60Z",
            b"2026-11-01T00:00:01.Z",
            b"2026-11-01T00:00:01.1234567890Z",
            b"2026-11-01T00:00:01+00:00",
            b"+2026-11-01T00:00:01Z",
        ] {
            assert_eq!(
                rfc3339_utc_ms(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
