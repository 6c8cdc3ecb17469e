//! Decoding: raw message bytes of one source -> one Arrow [`RecordBatch`] (arrow-json decoder, schema
//! from the source's `fields`), and a [`DeadLetter`] for every message that cannot be decoded.
//!
//! The fast path decodes the whole micro-batch in one pass. When that fails, the messages are
//! bisected until each bad one is isolated, so a single malformed message costs O(log n) extra
//! passes and never the rest of the batch. Every message ends either as exactly one row or as exactly
//! one dead letter, with its raw bytes, topic, partition, offset and a reason.
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

/// Decoder of one source.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    source_name: String,
    topic: String,
    json_schema: SchemaRef,
    output_schema: SchemaRef,
    required: Vec<String>,
    max_message_bytes: usize,
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
        Ok(Self {
            source_name: source.name.clone(),
            topic: source.topic.clone(),
            json_schema,
            output_schema: Arc::new(Schema::new(out)),
            required: source
                .fields
                .iter()
                .filter(|f| f.required)
                .map(|f| f.name.clone())
                .collect(),
            max_message_bytes,
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
        let mut candidates: Vec<&RawMessage> = Vec::with_capacity(messages.len());
        for m in messages {
            match self.precheck(m) {
                Ok(()) => candidates.push(m),
                Err(reason) => dead_letters.push(self.dead(m, reason)),
            }
        }
        let mut parts = Vec::new();
        self.decode_bisect(&candidates, &mut parts, &mut dead_letters);
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

    fn precheck(&self, m: &RawMessage) -> Result<(), String> {
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
        Ok(())
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
        let mut decoder = ReaderBuilder::new(self.json_schema.clone())
            .with_batch_size(msgs.len() + 1)
            .build_decoder()
            .map_err(|e| e.to_string())?;
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
        let batch = decoder
            .flush()
            .map_err(|e| e.to_string())?
            .unwrap_or_else(|| RecordBatch::new_empty(self.json_schema.clone()));
        if batch.num_rows() != msgs.len() {
            return Err(format!(
                "expected exactly one JSON object per message, got {} rows from {} messages",
                batch.num_rows(),
                msgs.len()
            ));
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        columns.push(Arc::new(Int32Array::from_iter_values(
            msgs.iter().map(|m| m.partition),
        )));
        columns.push(Arc::new(Int64Array::from_iter_values(
            msgs.iter().map(|m| m.offset),
        )));
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
