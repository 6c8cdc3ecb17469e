//! Decoding: raw message bytes of one source -> one Arrow [`RecordBatch`] (arrow-json decoder, schema
//! from the source's `fields`), and a [`DeadLetter`] for every message that cannot be decoded.
//!
//! Most messages take the fast path ([`flat`]): one pass over a flat object straight into the
//! columns. The messages it declines go to arrow-json, which decodes a run of them in one pass;
//! when that fails, the run is bisected until each bad one is isolated, so a single malformed
//! message costs O(log n) extra passes and never the rest of the batch. Every message ends either
//! as exactly one row or as exactly one dead letter, with its raw bytes, topic, partition, offset
//! and a reason.
//!
//! Two columns are appended to each decoded batch: `_partition` (Int32) and `_offset` (Int64), the
//! message's position, which mapping SQL may pass through.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::ReaderBuilder;

use crate::config::{FieldConfig, SourceConfig};

mod flat;

/// Name of the appended partition column.
pub const PARTITION_COLUMN: &str = "_partition";
/// Name of the appended offset column.
pub const OFFSET_COLUMN: &str = "_offset";

/// Errors of this module (bad data is not an error: it becomes a [`DeadLetter`]).
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The configured fields do not form a valid schema.
    #[error("source {source_name}: field {field}: {message}")]
    Schema {
        /// Source name.
        source_name: String,
        /// Field name.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// Arrow failed on data that had already been decoded (an internal error, not bad input).
    #[error("source {source_name}: {source}")]
    Arrow {
        /// Source name.
        source_name: String,
        /// Underlying error.
        #[source]
        source: ArrowError,
    },
}

/// One consumed message, as it came from the broker (or the simulator / a file).
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
    /// Record key, if any.
    pub key: Option<Vec<u8>>,
    /// Record value; `None` for a tombstone.
    pub value: Option<Vec<u8>>,
    /// Broker (or producer) timestamp, epoch milliseconds.
    pub timestamp_ms: i64,
}

/// A message that could not become a row, kept whole for the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Source name.
    pub source: String,
    /// Topic it was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The raw bytes (empty for a tombstone).
    pub raw: Vec<u8>,
    /// Why it was rejected.
    pub reason: String,
}

/// Parse a field type as written in the config (`string`, `decimal(18,2)`...).
pub fn parse_field_type(s: &str) -> Result<DataType, String> {
    let t = s.trim().to_ascii_lowercase();
    Ok(match t.as_str() {
        "string" | "utf8" | "text" => DataType::Utf8,
        "int32" | "int" => DataType::Int32,
        "int64" | "bigint" | "long" => DataType::Int64,
        "float64" | "double" => DataType::Float64,
        "boolean" | "bool" => DataType::Boolean,
        "timestamp" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        _ => {
            if let Some(args) = t.strip_prefix("decimal(").and_then(|r| r.strip_suffix(')')) {
                let (p, sc) = args.split_once(',').ok_or_else(|| {
                    format!("decimal type \"{s}\" needs precision and scale, e.g. decimal(18,2)")
                })?;
                let p: u8 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad decimal precision in \"{s}\""))?;
                let sc: i8 = sc
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad decimal scale in \"{s}\""))?;
                if !(1..=38).contains(&p) || sc < 0 || sc as u8 > p {
                    return Err(format!(
                        "decimal \"{s}\": precision must be 1..=38 and scale 0..=precision"
                    ));
                }
                DataType::Decimal128(p, sc)
            } else {
                return Err(format!(
                    "unknown type \"{s}\"; use string, int32, int64, float64, boolean, timestamp or decimal(P,S)"
                ));
            }
        }
    })
}

/// The Arrow schema of a source's JSON fields (without the position columns).
pub fn json_schema(fields: &[FieldConfig], source_name: &str) -> Result<SchemaRef, DecodeError> {
    let fields = fields
        .iter()
        .map(|f| {
            parse_field_type(&f.data_type)
                .map(|t| Field::new(&f.name, t, !f.required))
                .map_err(|message| DecodeError::Schema {
                    source_name: source_name.to_string(),
                    field: f.name.clone(),
                    message,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(Schema::new(fields)))
}

/// Most digits of an exact number (money, integers) in a message, leading and trailing zeros
/// included; a Decimal128 has at most 38 significant ones.
const MAX_NUMBER_DIGITS: usize = 100;
/// Digits of a Decimal128.
const MAX_DIGITS: i8 = 38;
/// Extra decimals of the wire type of an integer field (so that `3.5` is seen, not truncated).
const INT_WIRE_SCALE: i8 = 18;

/// The type arrow-json decodes a field into. Arrow's JSON decoder silently truncates: `"12.345"`
/// into `decimal(18,2)` gives 12.34, `3.5` into an integer gives 3. Money must never be rounded,
/// so exact numeric fields are decoded with more decimals than declared (a decimal(P,S) as
/// decimal(38, 38-(P-S)), keeping the P-S integer digits; an integer as decimal(38,18)) and
/// narrowed back by [`narrow`], which refuses any value that would lose a digit.
fn wire_type(t: &DataType) -> DataType {
    match t {
        DataType::Decimal128(p, s) => DataType::Decimal128(38, MAX_DIGITS - (*p as i8 - *s)),
        DataType::Int32 | DataType::Int64 => DataType::Decimal128(38, INT_WIRE_SCALE),
        other => other.clone(),
    }
}

/// Exact text of a wide decimal, trailing zeros of the fraction removed.
fn decimal_text(v: i128, scale: i8) -> String {
    let mut out = Vec::new();
    crate::sink::copy::write_decimal(v, scale, &mut out);
    let mut s = String::from_utf8(out).expect("ascii");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    s
}

/// Narrow a decoded column from its wire type to the declared type of `field`, or explain which
/// value does not fit exactly.
fn narrow(col: &ArrayRef, field: &Field) -> Result<ArrayRef, String> {
    use datafusion::arrow::array::{Array, Decimal128Array};
    let (DataType::Decimal128(_, wire_scale), target) = (col.data_type(), field.data_type()) else {
        return Ok(col.clone());
    };
    let wide = col
        .as_any()
        .downcast_ref::<Decimal128Array>()
        .expect("decimal wire column");
    let (drop, lo, hi, what) = match target {
        DataType::Decimal128(p, s) => (
            *wire_scale - *s,
            -(10i128.pow(*p as u32) - 1),
            10i128.pow(*p as u32) - 1,
            format!("decimal({p},{s})"),
        ),
        DataType::Int32 => (
            *wire_scale,
            i32::MIN as i128,
            i32::MAX as i128,
            "int32".into(),
        ),
        DataType::Int64 => (
            *wire_scale,
            i64::MIN as i128,
            i64::MAX as i128,
            "int64".into(),
        ),
        _ => return Ok(col.clone()),
    };
    let div = 10i128.pow(drop as u32);
    let mut values = Vec::with_capacity(wide.len());
    for i in 0..wide.len() {
        if wide.is_null(i) {
            values.push(None);
            continue;
        }
        let v = wide.value(i);
        let (q, r) = (v / div, v % div);
        if r != 0 {
            return Err(format!(
                "field {}: {} has more decimals than {what} holds (money is never rounded)",
                field.name(),
                decimal_text(v, *wire_scale)
            ));
        }
        if q < lo || q > hi {
            return Err(format!(
                "field {}: {} does not fit {what}",
                field.name(),
                decimal_text(v, *wire_scale)
            ));
        }
        values.push(Some(q));
    }
    let narrowed: ArrayRef = match target {
        DataType::Decimal128(p, s) => Arc::new(
            Decimal128Array::from(values)
                .with_precision_and_scale(*p, *s)
                .map_err(|e| e.to_string())?,
        ),
        DataType::Int32 => Arc::new(Int32Array::from(
            values
                .into_iter()
                .map(|v| v.map(|v| v as i32))
                .collect::<Vec<_>>(),
        )),
        _ => Arc::new(Int64Array::from(
            values
                .into_iter()
                .map(|v| v.map(|v| v as i64))
                .collect::<Vec<_>>(),
        )),
    };
    Ok(narrowed)
}

/// Whether `v` holds a byte below 0x20 (a control character, or tab, newline, CR) and whether it
/// holds a backslash. Bytes are OR-ed into two flags without a branch, so the loop vectorises.
fn rare_bytes(v: &[u8]) -> (bool, bool) {
    let (mut control, mut backslash) = (0u8, 0u8);
    for &b in v {
        control |= u8::from(b < 0x20);
        backslash |= u8::from(b == b'\\');
    }
    (control != 0, backslash != 0)
}

/// Position of a `\u0000` escape (a NUL character once decoded) in a JSON text, if any; a
/// `\\u0000` (an escaped backslash followed by text) is not one.
fn escaped_nul(v: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = v[from..]
        .windows(6)
        .position(|w| w.eq_ignore_ascii_case(b"\\u0000"))
    {
        let at = from + i;
        let backslashes = v[..=at].iter().rev().take_while(|b| **b == b'\\').count();
        if backslashes % 2 == 1 {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// Feed whole messages to an arrow-json decoder, one JSON value each.
fn feed(
    decoder: &mut datafusion::arrow::json::reader::Decoder,
    msgs: &[&RawMessage],
) -> Result<(), String> {
    for m in msgs {
        let v = m.value.as_deref().unwrap_or_default();
        let mut consumed = 0;
        while consumed < v.len() {
            let n = decoder.decode(&v[consumed..]).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("more than one JSON value in the message".into());
            }
            consumed += n;
        }
        // Close the value, so that a truncated message cannot run into the next one.
        decoder.decode(b"\n").map_err(|e| e.to_string())?;
        if decoder.has_partial_record() {
            return Err("truncated JSON value".into());
        }
    }
    Ok(())
}

/// A number as money and counts are written: `[+-]digits[.digits][(e|E)[+-]digits]`, at least one
/// digit before the exponent, at most four exponent digits.
fn is_number_text(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let mut digits = 0;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
        digits += 1;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
            digits += 1;
        }
    }
    if digits == 0 {
        return false;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        i += 1;
        if i < b.len() && matches!(b[i], b'+' | b'-') {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i - start > 4 {
            return false;
        }
    }
    i == b.len()
}

/// `_partition` and `_offset` of `msgs`.
fn position_columns(msgs: &[&RawMessage]) -> [ArrayRef; 2] {
    [
        Arc::new(Int32Array::from_iter_values(
            msgs.iter().map(|m| m.partition),
        )),
        Arc::new(Int64Array::from_iter_values(msgs.iter().map(|m| m.offset))),
    ]
}

/// Decoder of one source.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    source_name: String,
    topic: String,
    json_schema: SchemaRef,
    /// What arrow-json decodes into: `json_schema` with exact numeric fields widened (see
    /// [`wire_type`]), narrowed back without loss after decoding, or the message is refused.
    wire_schema: SchemaRef,
    output_schema: SchemaRef,
    required: Vec<String>,
    max_message_bytes: usize,
    /// The exact fields (decimals and integers) as text, checked before arrow parses them; `None`
    /// without such fields.
    text_schema: Option<SchemaRef>,
    /// The fast path's plan of `json_schema`; `None` sends every message through arrow-json.
    flat: Option<flat::Plan>,
}

/// Result of decoding a micro-batch of one source.
#[derive(Debug)]
pub struct Decoded {
    /// One row per decoded message, in message order, with `_partition` and `_offset` appended.
    pub batch: RecordBatch,
    /// One entry per rejected message.
    pub dead_letters: Vec<DeadLetter>,
}

impl JsonDecoder {
    /// Build the decoder of a configured source.
    pub fn new(source: &SourceConfig, max_message_bytes: usize) -> Result<Self, DecodeError> {
        let json_schema = json_schema(&source.fields, &source.name)?;
        let mut out: Vec<Field> = json_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        out.push(Field::new(PARTITION_COLUMN, DataType::Int32, false));
        out.push(Field::new(OFFSET_COLUMN, DataType::Int64, false));
        let wire_schema = Arc::new(Schema::new(
            json_schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_data_type(wire_type(f.data_type())))
                .collect::<Vec<_>>(),
        ));
        let exact: Vec<Field> = wire_schema
            .fields()
            .iter()
            .zip(json_schema.fields())
            .filter(|(w, f)| w.data_type() != f.data_type())
            .map(|(_, f)| Field::new(f.name(), DataType::Utf8, true))
            .collect();
        let text_schema = (!exact.is_empty()).then(|| Arc::new(Schema::new(exact)));
        Ok(Self {
            source_name: source.name.clone(),
            topic: source.topic.clone(),
            wire_schema,
            output_schema: Arc::new(Schema::new(out)),
            required: source
                .fields
                .iter()
                .filter(|f| f.required)
                .map(|f| f.name.clone())
                .collect(),
            max_message_bytes,
            text_schema,
            flat: flat::Plan::new(&json_schema),
            json_schema,
        })
    }

    /// Topic of the source.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Schema of the decoded batches (the `input` table of the mapping SQL).
    pub fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }

    /// Decode a micro-batch. Never fails on bad input: bad messages become dead letters.
    pub fn decode(&self, messages: &[RawMessage]) -> Result<Decoded, DecodeError> {
        let mut dead_letters = Vec::new();
        let mut parts = Vec::new();
        let mut rows = self
            .flat
            .as_ref()
            .map(|p| flat::Rows::new(p, messages.len()));
        // Messages of the rows read by the fast path, and the run declined since, in order.
        let (mut read, mut declined) = (Vec::new(), Vec::new());
        for m in messages {
            let plain = match self.precheck(m) {
                Ok(plain) => plain,
                Err(reason) => {
                    dead_letters.push(self.dead(m, reason));
                    continue;
                }
            };
            let value = m.value.as_deref().unwrap_or_default();
            if let Some(rows) = rows.as_mut().filter(|_| plain)
                && rows.push(value)
            {
                if !declined.is_empty() {
                    self.decode_bisect(&declined, &mut parts, &mut dead_letters);
                    declined.clear();
                }
                read.push(m);
            } else {
                self.flush_rows(rows.as_mut(), &mut read, &mut parts)?;
                declined.push(m);
            }
        }
        self.flush_rows(rows.as_mut(), &mut read, &mut parts)?;
        self.decode_bisect(&declined, &mut parts, &mut dead_letters);
        let batch = if parts.is_empty() {
            RecordBatch::new_empty(self.output_schema.clone())
        } else if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            concat_batches(&self.output_schema, &parts).map_err(|source| DecodeError::Arrow {
                source_name: self.source_name.clone(),
                source,
            })?
        };
        dead_letters.sort_by_key(|d| (d.partition, d.offset));
        Ok(Decoded {
            batch,
            dead_letters,
        })
    }

    fn dead(&self, m: &RawMessage, reason: String) -> DeadLetter {
        DeadLetter {
            source: self.source_name.clone(),
            topic: self.topic.clone(),
            partition: m.partition,
            offset: m.offset,
            raw: m.value.clone().unwrap_or_default(),
            reason,
        }
    }

    /// Append the rows the fast path has read (from the messages `read`), if any, to `parts` as
    /// one batch; both start over.
    fn flush_rows(
        &self,
        rows: Option<&mut flat::Rows>,
        read: &mut Vec<&RawMessage>,
        parts: &mut Vec<RecordBatch>,
    ) -> Result<(), DecodeError> {
        let Some(rows) = rows.filter(|r| r.len() > 0) else {
            return Ok(());
        };
        let mut columns = rows.finish();
        columns.extend(position_columns(read));
        read.clear();
        let batch =
            RecordBatch::try_new(self.output_schema.clone(), columns).map_err(|source| {
                DecodeError::Arrow {
                    source_name: self.source_name.clone(),
                    source,
                }
            })?;
        parts.push(batch);
        Ok(())
    }

    /// Refuse what no JSON decoding can take; `Ok(true)` if the fast path may read the message
    /// (it holds no backslash, so no escape).
    fn precheck(&self, m: &RawMessage) -> Result<bool, String> {
        let Some(v) = &m.value else {
            return Err("message has no value (tombstone)".into());
        };
        if v.len() > self.max_message_bytes {
            return Err(format!(
                "message of {} bytes exceeds kafka.max_message_bytes ({})",
                v.len(),
                self.max_message_bytes
            ));
        }
        if let Err(e) = std::str::from_utf8(v) {
            return Err(format!("invalid UTF-8 at byte {}", e.valid_up_to()));
        }
        if v.iter().all(u8::is_ascii_whitespace) {
            return Err("empty message".into());
        }
        // Most messages hold neither a control character nor a backslash: one branch-free pass
        // (it vectorises) tells, and only a message with either is searched byte by byte.
        let (control, backslash) = rare_bytes(v);
        if control
            && let Some(at) = v
                .iter()
                .position(|b| *b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
        {
            return Err(format!(
                "invalid JSON: control character 0x{:02x} at byte {at}",
                v[at]
            ));
        }
        if backslash && let Some(at) = escaped_nul(v) {
            return Err(format!(
                "NUL character (\\u0000) in a string at byte {at}: PostgreSQL text cannot hold it"
            ));
        }
        Ok(!backslash)
    }

    /// Decode all of `msgs` at once; on failure split in halves, down to single messages.
    fn decode_bisect(
        &self,
        msgs: &[&RawMessage],
        parts: &mut Vec<RecordBatch>,
        dead: &mut Vec<DeadLetter>,
    ) {
        if msgs.is_empty() {
            return;
        }
        match self.decode_all(msgs) {
            Ok(batch) => parts.push(batch),
            Err(e) if msgs.len() == 1 => {
                let m = msgs[0];
                dead.push(self.dead(m, self.explain(m, e)));
            }
            Err(_) => {
                let (a, b) = msgs.split_at(msgs.len() / 2);
                self.decode_bisect(a, parts, dead);
                self.decode_bisect(b, parts, dead);
            }
        }
    }

    fn decode_all(&self, msgs: &[&RawMessage]) -> Result<RecordBatch, String> {
        if let Some(text_schema) = &self.text_schema {
            // Exact fields first, as the text the message holds: arrow's decimal parser accepts
            // non-numbers ("1E0+0", "+.") and overflows on long exponents ("1e99999").
            let mut decoder = ReaderBuilder::new(text_schema.clone())
                .with_batch_size(msgs.len() + 1)
                .with_coerce_primitive(true)
                .build_decoder()
                .map_err(|e| e.to_string())?;
            feed(&mut decoder, msgs)?;
            if let Some(texts) = decoder.flush().map_err(|e| e.to_string())? {
                for (c, f) in texts.columns().iter().zip(text_schema.fields()) {
                    let c = c
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::StringArray>()
                        .expect("text column");
                    for t in c.iter().flatten() {
                        if !is_number_text(t) {
                            return Err(format!("field {}: {t:?} is not a number", f.name()));
                        }
                        // arrow-cast 59 counts a decimal's digits in a u8: past 255 the count
                        // wraps and the value with it (`parse_decimal`), so refuse first.
                        if t.bytes().filter(u8::is_ascii_digit).count() > MAX_NUMBER_DIGITS {
                            return Err(format!(
                                "field {}: a number of more than {MAX_NUMBER_DIGITS} digits",
                                f.name()
                            ));
                        }
                    }
                }
            }
        }
        let mut decoder = ReaderBuilder::new(self.wire_schema.clone())
            .with_batch_size(msgs.len() + 1)
            .build_decoder()
            .map_err(|e| e.to_string())?;
        feed(&mut decoder, msgs)?;
        let batch = decoder
            .flush()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| RecordBatch::new_empty(self.wire_schema.clone()));
        if batch.num_rows() != msgs.len() {
            return Err(format!(
                "expected exactly one JSON object per message, got {} rows from {} messages",
                batch.num_rows(),
                msgs.len()
            ));
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + 2);
        for (c, f) in batch.columns().iter().zip(self.json_schema.fields()) {
            columns.push(narrow(c, f)?);
        }
        columns.extend(position_columns(msgs));
        RecordBatch::try_new(self.output_schema.clone(), columns).map_err(|e| e.to_string())
    }

    /// A readable reason for a single message that failed to decode.
    fn explain(&self, m: &RawMessage, arrow_error: String) -> String {
        let v = m.value.as_deref().unwrap_or_default();
        match serde_json::from_slice::<serde_json::Value>(v) {
            Err(e) => format!("invalid JSON: {e}"),
            Ok(serde_json::Value::Object(obj)) => {
                let missing: Vec<&str> = self
                    .required
                    .iter()
                    .filter(|f| obj.get(*f).is_none_or(|v| v.is_null()))
                    .map(String::as_str)
                    .collect();
                if !missing.is_empty() {
                    format!("missing required field(s): {}", missing.join(", "))
                } else {
                    format!("wrong field type or value: {}", arrow_error.trim())
                }
            }
            Ok(other) => format!(
                "expected a JSON object, got {}",
                match other {
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::String(_) => "a string",
                    serde_json::Value::Number(_) => "a number",
                    serde_json::Value::Bool(_) => "a boolean",
                    _ => "null",
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use proptest::prelude::Strategy as _;
    use std::path::PathBuf;

    fn source() -> SourceConfig {
        let f = |name: &str, t: &str, required: bool| FieldConfig {
            name: name.into(),
            data_type: t.into(),
            required,
        };
        SourceConfig {
            name: "card".into(),
            simulator: String::new(),
            topic: "t".into(),
            partitions: 1,
            mapping: PathBuf::from("x.sql"),
            fields: vec![
                f("id", "string", true),
                f("amount", "decimal(18,2)", true),
                f("ts", "timestamp", true),
                f("note", "string", false),
            ],
        }
    }

    fn msg(offset: i64, v: &[u8]) -> RawMessage {
        RawMessage {
            partition: 2,
            offset,
            key: None,
            value: Some(v.to_vec()),
            timestamp_ms: 0,
        }
    }

    #[test]
    fn decodes_good_messages_and_dead_letters_each_bad_one() {
        let d = JsonDecoder::new(&source(), 200).unwrap();
        let msgs = vec![
            msg(
                0,
                br#"{"id":"a","amount":"10.05","ts":"2026-11-01T00:00:00Z"}"#,
            ),
            msg(1, b"{not json"),
            msg(
                2,
                br#"{"id":"b","amount":12.5,"ts":"2026-11-01T00:00:01Z","note":"x"}"#,
            ),
            msg(3, br#"{"id":"c","ts":"2026-11-01T00:00:02Z"}"#),
            msg(4, b"\xff\xfe"),
            msg(
                5,
                br#"{"id":"d","amount":"abc","ts":"2026-11-01T00:00:03Z"}"#,
            ),
            msg(6, &[b'x'; 300]),
            msg(7, b"[1,2]"),
            msg(
                8,
                br#"{"id":"e","amount":"1","ts":"2026-11-01T00:00:04Z"}{"id":"f","amount":"1","ts":"2026-11-01T00:00:04Z"}"#,
            ),
            msg(
                9,
                br#"{"id":"g","amount":"0.01","ts":"2026-11-01T00:00:05Z","extra":1}"#,
            ),
        ];
        let out = d.decode(&msgs).unwrap();
        let expected = [
            "+----+--------+----------------------+------+------------+---------+",
            "| id | amount | ts                   | note | _partition | _offset |",
            "+----+--------+----------------------+------+------------+---------+",
            "| a  | 10.05  | 2026-11-01T00:00:00Z |      | 2          | 0       |",
            "| b  | 12.50  | 2026-11-01T00:00:01Z | x    | 2          | 2       |",
            "| g  | 0.01   | 2026-11-01T00:00:05Z |      | 2          | 9       |",
            "+----+--------+----------------------+------+------------+---------+",
        ];
        datafusion::assert_batches_eq!(expected, &[out.batch]);
        let dead: Vec<(i64, &str)> = out
            .dead_letters
            .iter()
            .map(|d| (d.offset, d.reason.as_str()))
            .collect();
        assert_eq!(dead.len(), 7, "{dead:#?}");
        assert!(dead[0].1.starts_with("invalid JSON"), "{dead:?}");
        assert_eq!(dead[1].1, "missing required field(s): amount");
        assert!(dead[2].1.starts_with("invalid UTF-8"));
        assert!(
            dead[3].1.starts_with("wrong field type or value"),
            "{dead:?}"
        );
        assert!(dead[4].1.contains("exceeds kafka.max_message_bytes"));
        assert!(dead[5].1.starts_with("expected a JSON object"), "{dead:?}");
        assert_eq!(dead[6].0, 8);
        assert_eq!(out.dead_letters[0].raw, b"{not json");
        let _ = pretty_format_batches;
    }

    fn amount_msg(offset: i64, amount: &str) -> RawMessage {
        msg(
            offset,
            format!(r#"{{"id":"x{offset}","amount":{amount},"ts":"2026-11-01T00:00:00Z"}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn money_is_exact_or_dead_lettered_never_rounded() {
        let d = JsonDecoder::new(&source(), 1000).unwrap();
        let good = [
            (r#""10.05""#, "10.05"),
            ("12.5", "12.50"),
            (r#""1e3""#, "1000.00"),
            ("-0.10", "-0.10"),
            (r#""12.340""#, "12.34"),
            (r#""9999999999999999.99""#, "9999999999999999.99"),
        ];
        let bad = [
            (
                r#""12.345.6""#,
                "field amount: \"12.345.6\" is not a number",
            ),
            ("1e400", "invalid JSON"),
            (r#""1e400""#, "wrong field type or value"),
            (
                r#""12.345""#,
                "field amount: 12.345 has more decimals than decimal(18,2)",
            ),
            ("12.345", "field amount: 12.345 has more decimals"),
            (r#""-0.001""#, "field amount: -0.001 has more decimals"),
            (r#""99999999999999999.00""#, "wrong field type or value"),
            (r#""NaN""#, "is not a number"),
            (r#""1e99999""#, "field amount: \"1e99999\" is not a number"),
            ("1e-70000", "field amount: \"1e-70000\" is not a number"),
            (r#""1E0+0""#, "is not a number"),
            ("true", "wrong field type or value"),
            (r#""""#, "is not a number"),
        ];
        let mut msgs = Vec::new();
        for (i, (a, _)) in good.iter().chain(bad.iter()).enumerate() {
            msgs.push(amount_msg(i as i64, a));
        }
        let out = d.decode(&msgs).unwrap();
        assert_eq!(out.batch.num_rows(), good.len());
        for (i, (_, want)) in good.iter().enumerate() {
            let got =
                datafusion::arrow::util::display::array_value_to_string(out.batch.column(1), i)
                    .unwrap();
            assert_eq!(&got, want);
        }
        assert_eq!(out.dead_letters.len(), bad.len());
        for (dl, (amount, reason)) in out.dead_letters.iter().zip(bad.iter()) {
            assert!(
                dl.reason.contains(reason),
                "{amount}: reason {:?} should contain {reason:?}",
                dl.reason
            );
        }
    }

    #[test]
    fn integers_are_exact_or_dead_lettered() {
        let mut src = source();
        src.fields.push(FieldConfig {
            name: "cents".into(),
            data_type: "int64".into(),
            required: false,
        });
        src.fields.push(FieldConfig {
            name: "n".into(),
            data_type: "int32".into(),
            required: false,
        });
        let d = JsonDecoder::new(&src, 1000).unwrap();
        let m = |o: i64, extra: &str| {
            msg(
                o,
                format!(r#"{{"id":"i{o}","amount":"1","ts":"2026-11-01T00:00:00Z",{extra}}}"#)
                    .as_bytes(),
            )
        };
        let msgs = vec![
            m(0, r#""cents":123456789012,"n":-7"#),
            m(1, r#""cents":"42","n":null"#),
            m(2, r#""cents":1234.5"#),
            m(3, r#""n":3000000000"#),
            m(4, r#""n":"x""#),
            m(5, r#""cents":9223372036854775807"#),
        ];
        let out = d.decode(&msgs).unwrap();
        let ok: Vec<i64> = out
            .batch
            .column(4)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .iter()
            .map(|v| v.unwrap_or(-1))
            .collect();
        assert_eq!(ok, vec![123456789012, 42, i64::MAX]);
        assert_eq!(out.batch.schema().field(5).data_type(), &DataType::Int32);
        let dead: Vec<(i64, &str)> = out
            .dead_letters
            .iter()
            .map(|d| (d.offset, d.reason.as_str()))
            .collect();
        assert_eq!(dead.len(), 3, "{dead:?}");
        assert!(
            dead[0]
                .1
                .contains("cents: 1234.5 has more decimals than int64")
        );
        assert!(dead[1].1.contains("n: 3000000000 does not fit int32"));
        assert!(dead[2].1.starts_with("wrong field type or value"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Arbitrary bytes, and JSON-looking mutations of a good message: the decoder never
        /// panics and every message ends as exactly one row or exactly one dead letter, in place.
        #[test]
        fn every_message_is_a_row_or_a_dead_letter(
            inputs in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
                    (0usize..70, proptest::prelude::any::<u8>(), 0usize..3).prop_map(|(at, b, op)| {
                        let mut v = br#"{"id":"a","amount":"10.05","ts":"2026-11-01T00:00:00Z","note":"n"}"#.to_vec();
                        let at = at.min(v.len() - 1);
                        match op {
                            0 => v[at] = b,
                            1 => { v.remove(at); }
                            _ => v.insert(at, b),
                        }
                        v
                    }),
                    "[0-9eE+.-]{0,12}".prop_map(|a| format!(
                        r#"{{"id":"p","amount":"{a}","ts":"2026-11-01T00:00:00Z"}}"#).into_bytes()),
                ],
                1..40,
            )
        ) {
            let d = JsonDecoder::new(&source(), 100).unwrap();
            let msgs: Vec<RawMessage> = inputs
                .iter()
                .enumerate()
                .map(|(i, v)| msg(i as i64, v))
                .collect();
            let out = d.decode(&msgs).unwrap();
            proptest::prop_assert_eq!(out.batch.num_rows() + out.dead_letters.len(), msgs.len());
            let rows: Vec<i64> = out
                .batch
                .column_by_name(OFFSET_COLUMN)
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .values()
                .to_vec();
            let mut all: Vec<i64> = rows.iter().copied().chain(out.dead_letters.iter().map(|x| x.offset)).collect();
            all.sort();
            proptest::prop_assert_eq!(all, (0..msgs.len() as i64).collect::<Vec<_>>());
            for dl in &out.dead_letters {
                proptest::prop_assert_eq!(&dl.raw, &inputs[dl.offset as usize]);
                proptest::prop_assert!(!dl.reason.is_empty());
            }
            // A row's amount is exactly what the message said (checked against serde_json).
            let amounts = out.batch.column(1).as_any().downcast_ref::<datafusion::arrow::array::Decimal128Array>().unwrap();
            for (i, off) in rows.iter().enumerate() {
                // arrow-json accepts a raw tab inside a string, serde_json does not.
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&inputs[*off as usize]) else { continue };
                let text = match &v["amount"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let parsed: f64 = text.parse().map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{text:?} decoded as {}: {e}", amounts.value(i))))?;
                proptest::prop_assert!((amounts.value(i) as f64 / 100.0 - parsed).abs() < 1e-6 * parsed.abs().max(1.0), "{} vs {}", amounts.value(i), text);
            }
        }
    }

    /// A source with a field of every type the config offers.
    fn every_type() -> SourceConfig {
        let mut src = source();
        for (name, t) in [
            ("n", "int32"),
            ("cents", "int64"),
            ("x", "float64"),
            ("ok", "boolean"),
            ("small", "decimal(5,3)"),
            ("at", "timestamp"),
        ] {
            src.fields.push(FieldConfig {
                name: name.into(),
                data_type: t.into(),
                required: false,
            });
        }
        src
    }

    /// JSON texts of values in the forms producers write, and in the forms the fast path
    /// declines or that are no JSON at all.
    fn json_value() -> impl proptest::prelude::Strategy<Value = String> {
        use proptest::prelude::*;
        let number = "-?(0|[1-9][0-9]{0,20})(\\.[0-9]{0,5})?([eE][+-]?[0-9]{1,3})?";
        let odd_number = "[+-]?[0-9.eE+-]{1,8}";
        prop_oneof![
            "\"[a-zA-Z0-9 _.:-]{0,10}\"",
            number,
            number.prop_map(|n| format!("\"{n}\"")),
            odd_number,
            odd_number.prop_map(|n| format!("\"{n}\"")),
            (
                -2_000_000_000_000i64..5_000_000_000_000,
                0usize..11,
                0usize..4
            )
                .prop_map(|(ms, digits, style)| {
                    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
                    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
                    if digits > 0 {
                        let f = format!("{:09}", t.timestamp_subsec_nanos());
                        s.push('.');
                        s.push_str(&f[..digits.min(9)]);
                        s.push_str(&"7".repeat(digits.saturating_sub(9)));
                    }
                    s.push_str(["Z", "Z", "+01:00", "z"][style]);
                    format!("\"{s}\"")
                }),
            "\"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,3})?Z?\"",
            (any::<i64>(), 0u32..4).prop_map(|(v, shift)| (v >> (shift * 16)).to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("tru".to_string()),
            Just("nullx".to_string()),
            Just("[1,2]".to_string()),
            Just("{\"a\":1}".to_string()),
            Just("\"a\tb\nc\"".to_string()),
            Just("\"é€😀\"".to_string()),
        ]
    }

    /// Members of [`every_type`] with values of their field's type (most in the forms the fast
    /// path takes, some at its edges), now and then any value, in any order.
    fn typed_members() -> impl proptest::prelude::Strategy<Value = Vec<(&'static str, String)>> {
        use proptest::prelude::*;
        let timestamp = prop_oneof![
            (-2_000_000_000_000i64..5_000_000_000_000, 0usize..10).prop_map(|(ms, digits)| {
                let t = chrono::DateTime::from_timestamp_millis(ms).unwrap();
                let f = format!("{:09}", t.timestamp_subsec_nanos() + (ms as u32 % 1000) * 7);
                let fraction = if digits == 0 {
                    String::new()
                } else {
                    format!(".{}", &f[..digits])
                };
                format!("\"{}{fraction}Z\"", t.format("%Y-%m-%dT%H:%M:%S"))
            }),
            (-2_000_000_000_000i64..5_000_000_000_000).prop_map(|ms| ms.to_string()),
        ];
        let field = |name: &'static str, value: BoxedStrategy<String>| {
            prop_oneof![
                12 => value.prop_map(move |v| Some((name, v))),
                1 => json_value().prop_map(move |v| Some((name, v))),
                1 => Just(None),
            ]
        };
        let text = "\"[a-zA-Z0-9 _.:\t-]{0,10}\"".boxed();
        let money = ("-?(0|[1-9][0-9]{0,15})(\\.[0-9]{1,2})?", any::<bool>())
            .prop_map(|(n, quoted)| if quoted { format!("\"{n}\"") } else { n })
            .boxed();
        let small = ("-?[0-9]{1,2}(\\.[0-9]{1,3})?", any::<bool>())
            .prop_map(|(n, quoted)| if quoted { format!("\"{n}\"") } else { n })
            .boxed();
        (
            field("id", text.clone()),
            field("amount", money),
            field("ts", timestamp.clone().boxed()),
            field("note", prop_oneof![text, Just("null".to_string())].boxed()),
            field("n", any::<i32>().prop_map(|v| v.to_string()).boxed()),
            field(
                "cents",
                (any::<i64>(), 4u32..60)
                    .prop_map(|(v, s)| (v >> s).to_string())
                    .boxed(),
            ),
            field(
                "x",
                (any::<f64>(), -30i32..30, any::<bool>())
                    .prop_map(|(v, e, sci)| {
                        let v = if v.is_finite() { v } else { 0.5 } * 10f64.powi(e);
                        if sci { format!("{v:e}") } else { v.to_string() }
                    })
                    .boxed(),
            ),
            field("ok", any::<bool>().prop_map(|b| b.to_string()).boxed()),
            field("small", small),
            field("at", timestamp.boxed()),
        )
            .prop_map(|(a, b, c, d, e, f, g, h, i, j)| {
                [a, b, c, d, e, f, g, h, i, j]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The fast path gives exactly the rows and dead letters of arrow-json alone, whatever
        /// the fields, their forms, order, whitespace, duplicates, unknown keys and trailing bytes.
        #[test]
        fn the_fast_path_decodes_as_arrow_json_does(
            messages in proptest::collection::vec(
                (
                    proptest::prop_oneof![
                        proptest::collection::vec(
                            (
                                proptest::sample::select(vec![
                                    "id", "amount", "ts", "note", "n", "cents", "x", "ok",
                                    "small", "at", "ID", "zz", "",
                                ]),
                                json_value(),
                            ),
                            0..14,
                        ),
                        typed_members(),
                    ],
                    proptest::sample::select(vec!["", " ", "\n", "\t ", "\r\n"]),
                    proptest::sample::select(vec!["", "", "", " ", "\n", "x", "{}", ","]),
                    proptest::prelude::any::<bool>(),
                ),
                1..30,
            )
        ) {
            let src = every_type();
            let fast = JsonDecoder::new(&src, 1000).unwrap();
            let mut arrow_only = fast.clone();
            arrow_only.flat = None;
            let msgs: Vec<RawMessage> = messages
                .iter()
                .enumerate()
                .map(|(i, (members, ws, tail, complete))| {
                    // Mostly the required fields with values of their type, so that rows come out.
                    let mut members = members.clone();
                    if *complete {
                        for (k, v) in [
                            ("ts", "\"2026-11-01T00:00:00.125Z\"".to_string()),
                            ("amount", "\"10.05\"".into()),
                            ("id", format!("\"m{i}\"")),
                        ] {
                            if !members.iter().any(|m| m.0 == k) {
                                members.insert(0, (k, v));
                            }
                        }
                    }
                    let body = members
                        .iter()
                        .map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    msg(i as i64, format!("{ws}{{{body}{ws}}}{tail}").as_bytes())
                })
                .collect();
            let got = fast.decode(&msgs).unwrap();
            let want = arrow_only.decode(&msgs).unwrap();
            proptest::prop_assert_eq!(&got.batch, &want.batch);
            proptest::prop_assert_eq!(&got.dead_letters, &want.dead_letters);
        }
    }

    #[test]
    fn producers_messages_take_the_fast_path() {
        let d = JsonDecoder::new(&every_type(), 1000).unwrap();
        let plan = d.flat.as_ref().unwrap();
        let mut rows = flat::Rows::new(plan, 4);
        for m in [
            &br#"{"id":"a","amount":"31.88","ts":"2026-11-01T00:00:01.668Z","x":-20.0104,"ok":false,"is_fraud":false,"fraud_scenario":null}"#[..],
            br#"{"ts":1793491219806,"amount":12189.96,"id":"b","cents":41431,"n":-7,"small":"12.5","at":null}"#,
            b" { \"id\" : \"c\" , \"amount\" : 0 , \"ts\" : \"2026-11-01T00:00:00Z\" }\n",
        ] {
            assert!(rows.push(m), "{}", String::from_utf8_lossy(m));
        }
        for m in [
            &br#"{"id":"a","amount":"1.234","ts":1}"#[..],
            br#"{"id":"a","amount":"1","ts":1,"nested":{"k":1}}"#,
            br#"{"id":"a","amount":"1","ts":1,"id":"b"}"#,
            br#"{"amount":"1","ts":1}"#,
        ] {
            assert!(!rows.push(m), "{}", String::from_utf8_lossy(m));
        }
        assert_eq!(rows.len(), 3);
    }

    proptest::proptest! {
        /// The branch-free scan that lets the precheck skip its byte-by-byte searches says the
        /// same as those searches' own conditions.
        #[test]
        fn rare_bytes_finds_what_the_searches_look_for(
            v in proptest::collection::vec(
                proptest::prop_oneof![proptest::prelude::any::<u8>(), 0x20u8..0x7f, 0x20u8..0x7f],
                0..300,
            )
        ) {
            let (control, backslash) = rare_bytes(&v);
            proptest::prop_assert_eq!(control, v.iter().any(|b| *b < 0x20));
            proptest::prop_assert_eq!(backslash, v.contains(&b'\\'));
        }
    }

    #[test]
    fn nul_characters_and_control_bytes_are_dead_lettered() {
        let d = JsonDecoder::new(&source(), 1000).unwrap();
        let msgs = vec![
            msg(
                0,
                br#"{"id":"a\u0000b","amount":"1","ts":"2026-11-01T00:00:00Z"}"#,
            ),
            msg(
                1,
                b"{\"id\":\"a\x01b\",\"amount\":\"1\",\"ts\":\"2026-11-01T00:00:00Z\"}",
            ),
            msg(
                2,
                br#"{"id":"a\\u0000b","amount":"1","ts":"2026-11-01T00:00:00Z"}"#,
            ),
        ];
        let out = d.decode(&msgs).unwrap();
        assert_eq!(
            out.batch.num_rows(),
            1,
            "an escaped backslash before u0000 is text"
        );
        assert!(out.dead_letters[0].reason.starts_with("NUL character"));
        assert!(
            out.dead_letters[1]
                .reason
                .contains("control character 0x01")
        );
    }

    #[test]
    fn field_types_parse_or_explain() {
        assert_eq!(
            parse_field_type("decimal(18, 2)").unwrap(),
            DataType::Decimal128(18, 2)
        );
        assert!(parse_field_type("decimal(3,5)").is_err());
        assert!(
            parse_field_type("float")
                .unwrap_err()
                .contains("unknown type")
        );
    }
}
