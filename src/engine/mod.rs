//! The engine: per micro-batch, decode each source's messages, run its mapping SQL, conform the
//! result to the canonical transaction, and hand the sink one [`SinkBatch`].
//!
//! Everything is compiled once in [`Engine::new`]; [`Engine::process`] only executes.

pub mod canonical;
pub mod sql;

use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;

use crate::config::Config;
use crate::decode::{DeadLetter, DecodeError, JsonDecoder};
use crate::sink::SinkBatch;
use crate::source::Batch;
use canonical::Conformer;
use sql::{CompiledQuery, SqlError};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A source's decoder could not be built.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A SQL file failed to compile or run.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// A mapping's result breaks the canonical contract.
    #[error("{file}: result does not match the canonical transaction: {message}")]
    Contract {
        /// The mapping SQL file.
        file: PathBuf,
        /// Every problem found.
        message: String,
    },
    /// Arrow failed converting a result (internal error).
    #[error("{file}: converting the result failed: {source}")]
    Arrow {
        /// The mapping SQL file.
        file: PathBuf,
        /// Underlying error.
        #[source]
        source: datafusion::arrow::error::ArrowError,
    },
    /// Several problems found while compiling (all reported at once).
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Many(Vec<EngineError>),
}

#[derive(Debug)]
struct SourceStage {
    name: String,
    topic: String,
    decoder: JsonDecoder,
    mapping: CompiledQuery,
    conformer: Conformer,
}

/// The compiled per-source stages.
#[derive(Debug, Clone)]
pub struct Engine {
    sources: Arc<Vec<SourceStage>>,
}

impl Engine {
    /// Compile every source's decoder and mapping; all problems are reported together.
    pub async fn new(config: &Config) -> Result<Self, EngineError> {
        let mut stages = Vec::new();
        let mut errors = Vec::new();
        for src in &config.sources {
            let decoder = match JsonDecoder::new(src, config.kafka.max_message_bytes) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(e.into());
                    continue;
                }
            };
            let file = config.resolve(&src.mapping);
            let mapping =
                match CompiledQuery::compile_file(&file, "input", decoder.output_schema()).await {
                    Ok(q) => q,
                    Err(e) => {
                        errors.push(e.into());
                        continue;
                    }
                };
            let conformer = match Conformer::new(&mapping.schema()) {
                Ok(c) => c,
                Err(message) => {
                    errors.push(EngineError::Contract { file, message });
                    continue;
                }
            };
            stages.push(SourceStage {
                name: src.name.clone(),
                topic: src.topic.clone(),
                decoder,
                mapping,
                conformer,
            });
        }
        match errors.len() {
            0 => Ok(Self {
                sources: Arc::new(stages),
            }),
            1 => Err(errors.pop().expect("one error")),
            _ => Err(EngineError::Many(errors)),
        }
    }

    /// Process one micro-batch.
    pub async fn process(&self, batch: Batch) -> Result<SinkBatch, EngineError> {
        let mut transactions: Vec<RecordBatch> = Vec::new();
        let mut dead_letters: Vec<DeadLetter> = Vec::new();
        let mut messages = 0;
        for (stage, msgs) in self.sources.iter().zip(batch.messages) {
            if msgs.is_empty() {
                continue;
            }
            messages += msgs.len();
            let decoded = stage.decoder.decode(&msgs)?;
            dead_letters.extend(decoded.dead_letters);
            if decoded.batch.num_rows() == 0 {
                continue;
            }
            let mapped = stage.mapping.execute(vec![decoded.batch]).await?;
            for b in mapped {
                if b.num_rows() == 0 {
                    continue;
                }
                let (rows, rejected) =
                    stage
                        .conformer
                        .conform(&b)
                        .map_err(|source| EngineError::Arrow {
                            file: stage.mapping.file().to_path_buf(),
                            source,
                        })?;
                for r in rejected {
                    // Keep the original bytes when the mapping passed the position through.
                    let raw = r
                        .partition
                        .zip(r.offset)
                        .and_then(|(p, o)| {
                            msgs.iter()
                                .find(|m| m.partition == p && m.offset == o)
                                .and_then(|m| m.value.clone())
                        })
                        .unwrap_or(r.row);
                    dead_letters.push(DeadLetter {
                        source: stage.name.clone(),
                        topic: stage.topic.clone(),
                        partition: r.partition.unwrap_or(-1),
                        offset: r.offset.unwrap_or(-1),
                        raw,
                        reason: r.reason,
                    });
                }
                if rows.num_rows() > 0 {
                    transactions.push(rows);
                }
            }
        }
        Ok(SinkBatch {
            seq: batch.seq,
            messages,
            transactions,
            dead_letters,
            offsets: batch.offsets,
            opened_at: batch.opened_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::RawMessage;
    use std::path::Path;

    #[tokio::test]
    async fn shipped_card_mapping_yields_canonical_rows() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = crate::config::load(&dir.join("config.toml")).unwrap();
        let engine = Engine::new(&config).await.unwrap();
        let msg = |offset: i64, v: &str| RawMessage {
            partition: 1,
            offset,
            key: None,
            value: Some(v.as_bytes().to_vec()),
            timestamp_ms: 0,
        };
        let batch = Batch {
            seq: 1,
            messages: vec![vec![
                msg(
                    0,
                    r#"{"auth_id":"a1","ts":"2026-11-01T10:00:00.250Z","pan_token":"tok_1","customer_ref":"cus_1","merchant_id":"mer_1","terminal_id":"ter_1_0","mcc":"5411","amount":"12.30","currency":"brl","country":"br","entry_mode":"chip","lat":-23.5,"lon":-46.6,"is_fraud":false}"#,
                ),
                msg(
                    1,
                    r#"{"auth_id":"a2","ts":"2026-11-01T10:00:01Z","pan_token":"tok_2","merchant_id":"mer_2","amount":7,"currency":"USD","entry_mode":"ecommerce"}"#,
                ),
                msg(2, r#"{"auth_id":"a3""#),
            ]],
            offsets: vec![],
            opened_at: None,
        };
        let out = engine.process(batch).await.unwrap();
        assert_eq!(out.messages, 3);
        datafusion::assert_batches_eq!(
            [
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
                "| transaction_id | event_time               | source | amount | currency | customer_id | account_id | card_id | merchant_id | terminal_id | mcc  | country | channel   | device_id | ip_address | latitude | longitude |",
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
                "| a1             | 2026-11-01T10:00:00.250Z | card   | 12.30  | BRL      | cus_1       |            | tok_1   | mer_1       | ter_1_0     | 5411 | BR      | pos       |           |            | -23.5    | -46.6     |",
                "| a2             | 2026-11-01T10:00:01Z     | card   | 7.00   | USD      |             |            | tok_2   | mer_2       |             |      |         | ecommerce |           |            |          |           |",
                "+----------------+--------------------------+--------+--------+----------+-------------+------------+---------+-------------+-------------+------+---------+-----------+-----------+------------+----------+-----------+",
            ],
            &out.transactions
        );
        assert_eq!(out.dead_letters.len(), 1);
        assert_eq!(out.dead_letters[0].offset, 2);
        assert_eq!(out.dead_letters[0].partition, 1);
    }
}
