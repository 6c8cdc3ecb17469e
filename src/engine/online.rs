//! Online scoring: the transactions of `POST /v1/score`, evaluated by the engine task between two
//! micro-batches against the live window state of the stream ([`Engine::score_online`]).
//!
//! Several requests are evaluated together (one execution of each SQL stage for all of them), each
//! request in its own isolation group: with `record = false` nothing is changed and no request sees
//! another; with `record = true` the transactions enter the entity history in request order, like a
//! streamed micro-batch, and come back as a [`SinkBatch`] (no offsets) to be stored.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::compute::concat_batches;

use super::{Engine, EngineError, split_future};
use crate::decode::RawMessage;
use crate::sink::SinkBatch;

/// Event times before 1900 are refused (a typo, and out of the database's comfortable range).
const MIN_EVENT_TIME_MS: i64 = -2_208_988_800_000;

/// One request's transactions.
#[derive(Debug, Clone)]
pub enum OnlineInput {
    /// Rows already in the canonical schema.
    Canonical(RecordBatch),
    /// Raw messages of the source at this index, run through its decoder and mapping SQL.
    Source {
        /// Index of the source in `config.sources`.
        source: usize,
        /// The messages (offset = position in the request).
        messages: Vec<RawMessage>,
    },
}

/// Why a request's transactions were not scored: (position in the request when known, reason).
pub type Rejection = Vec<(Option<usize>, String)>;

/// The result of [`Engine::score_online`].
#[derive(Debug, Default)]
pub struct OnlineOutput {
    /// Per request, in order: its decided rows (canonical columns, features, score,
    /// model_version, decision, rule_hits), or why it was refused.
    pub results: Vec<Result<RecordBatch, Rejection>>,
    /// With `record`: the decided rows of every accepted request, to commit.
    pub sink: Option<SinkBatch>,
}

impl Engine {
    /// Score the transactions of several requests against the live window state. With `record`
    /// false the state (windows and watermark) is left exactly as it was; with `record` true the
    /// rows enter the history and [`OnlineOutput::sink`] holds them for the sink. A request whose
    /// input is invalid (decoding, mapping, a required NULL, too far in the future) or whose
    /// evaluation fails is refused on its own; this never fails the stream.
    pub async fn score_online(
        &mut self,
        requests: Vec<OnlineInput>,
        record: bool,
    ) -> Result<OnlineOutput, EngineError> {
        let now = Instant::now();
        let wall_ms = chrono::Utc::now().timestamp_millis();
        let saved_watermark = self.watermark.clone();
        let mut rows: Vec<Result<RecordBatch, Rejection>> = Vec::with_capacity(requests.len());
        for r in requests {
            rows.push(self.online_rows(r, wall_ms, now).await);
        }
        if !record {
            self.watermark = saved_watermark;
        }
        // Rule hits are joined to their rows by transaction id, so requests repeating an id of
        // an earlier request are evaluated in a later wave (in order; a wave at a time).
        let mut waves: Vec<Vec<usize>> = Vec::new();
        let mut wave_ids: HashSet<String> = HashSet::new();
        let mut current = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let Ok(b) = r else { continue };
            let ids = transaction_ids(b);
            if ids.iter().any(|id| wave_ids.contains(id)) {
                waves.push(std::mem::take(&mut current));
                wave_ids.clear();
            }
            wave_ids.extend(ids);
            current.push(i);
        }
        if !current.is_empty() {
            waves.push(current);
        }
        let mut results: Vec<Option<Result<RecordBatch, Rejection>>> = rows
            .iter()
            .map(|r| r.as_ref().err().map(|e| Err(e.clone())))
            .collect();
        let mut recorded = Vec::new();
        for wave in waves {
            let batches: Vec<&RecordBatch> = wave
                .iter()
                .map(|&i| rows[i].as_ref().expect("accepted"))
                .collect();
            let mut groups = Vec::new();
            for (&i, b) in wave.iter().zip(&batches) {
                groups.extend(std::iter::repeat_n(i as u32, b.num_rows()));
            }
            let all = concat_batches(&self.canonical.schema(), batches.iter().copied()).map_err(
                |source| EngineError::Arrow {
                    file: PathBuf::from("<online>"),
                    source,
                },
            )?;
            self.features.set_peek((!record).then_some(groups));
            let decided = self.decide(&all).await;
            self.features.set_peek(None);
            match decided {
                Ok(decided) => {
                    let mut at = 0;
                    for (&i, b) in wave.iter().zip(&batches) {
                        results[i] = Some(Ok(decided.slice(at, b.num_rows())));
                        at += b.num_rows();
                    }
                    if record {
                        recorded.push(decided);
                    }
                }
                Err(e) => {
                    let reason = format!("evaluation failed: {e}");
                    for &i in &wave {
                        results[i] = Some(Err(vec![(None, reason.clone())]));
                    }
                }
            }
        }
        let mut out = OnlineOutput {
            results: results
                .into_iter()
                .map(|r| r.expect("every request has a result"))
                .collect(),
            sink: None,
        };
        if !recorded.is_empty() {
            let mut sink = SinkBatch {
                seq: 0,
                messages: recorded.iter().map(RecordBatch::num_rows).sum(),
                transactions: recorded,
                aggregates: Vec::new(),
                aggregate_stages: Arc::clone(&self.aggregates),
                aggregates_pending: true,
                dead_letters: Vec::new(),
                labels: None,
                offsets: Vec::new(),
                opened_at: Some(tokio::time::Instant::from_std(now)),
            };
            // Deferred like a stream batch's ([`Engine::defer_aggregates`]).
            if !self.defer_aggregates {
                sink.compute_aggregates().await?;
            }
            out.sink = Some(sink);
        }
        Ok(out)
    }

    /// Canonical rows of one request, or why it is refused.
    async fn online_rows(
        &mut self,
        input: OnlineInput,
        wall_ms: i64,
        now: Instant,
    ) -> Result<RecordBatch, Rejection> {
        let rows = self.online_rows_unchecked(input, wall_ms, now).await?;
        let times = super::event_times(&rows);
        let old: Rejection = (0..rows.num_rows())
            .filter(|&i| times.is_null(i) || times.value(i) < MIN_EVENT_TIME_MS)
            .map(|i| (Some(i), "event_time before 1900-01-01".to_string()))
            .collect();
        if old.is_empty() { Ok(rows) } else { Err(old) }
    }

    async fn online_rows_unchecked(
        &mut self,
        input: OnlineInput,
        wall_ms: i64,
        now: Instant,
    ) -> Result<RecordBatch, Rejection> {
        let schema = self.canonical.schema();
        match input {
            OnlineInput::Canonical(b) => {
                if b.schema().fields() != schema.fields() {
                    return Err(vec![(None, "not canonical rows".into())]);
                }
                let ((rows, _), future) =
                    split_future(&b, wall_ms + self.max_future_ms, None, None)
                        .map_err(|e| vec![(None, e.to_string())])?;
                if !future.is_empty() {
                    return Err(future.into_iter().map(|f| (None, f.3)).collect());
                }
                Ok(rows)
            }
            OnlineInput::Source { source, messages } => {
                if source >= self.sources.len() {
                    return Err(vec![(None, format!("no source at index {source}"))]);
                }
                let (rows, dead) = self
                    .canonicalize(source, &messages, wall_ms, now)
                    .await
                    .map_err(|e| vec![(None, format!("mapping failed: {e}"))])?;
                if !dead.is_empty() {
                    return Err(dead
                        .into_iter()
                        .map(|d| (usize::try_from(d.offset).ok(), d.reason))
                        .collect());
                }
                let rows =
                    concat_batches(&schema, &rows).map_err(|e| vec![(None, e.to_string())])?;
                if rows.num_rows() != messages.len() {
                    return Err(vec![(
                        None,
                        format!(
                            "the mapping of source {} returned {} rows for {} messages",
                            self.sources[source].name,
                            rows.num_rows(),
                            messages.len()
                        ),
                    )]);
                }
                Ok(rows)
            }
        }
    }
}

/// The transaction ids of canonical rows.
fn transaction_ids(b: &RecordBatch) -> Vec<String> {
    b.column(0)
        .as_any()
        .downcast_ref::<datafusion::arrow::array::StringArray>()
        .map(|a| {
            a.iter()
                .map(|v| v.unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::source::Batch;
    use std::path::Path;

    fn card(i: i64, minute: i64, merchant: &str) -> RawMessage {
        RawMessage {
            partition: 0,
            offset: i,
            key: None,
            value: Some(
                format!(
                    r#"{{"auth_id":"t{i}","ts":"2026-11-01T10:{minute:02}:00Z","pan_token":"tok_9","customer_ref":"cus_9","merchant_id":"{merchant}","amount":"1.{i}0","currency":"BRL","entry_mode":"ecommerce"}}"#
                )
                .into_bytes(),
            ),
            timestamp_ms: 0,
        }
    }

    #[tokio::test]
    async fn online_scoring_peeks_without_changing_state_and_records_like_the_stream() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = crate::config::load(&dir.join("config.toml")).unwrap();
        let mut engine = Engine::new(&config).await.unwrap();
        let metrics = Metrics::default();
        let history: Vec<RawMessage> = (0..3).map(|i| card(i, i, &format!("mer_{i}"))).collect();
        engine
            .process(
                Batch {
                    seq: 1,
                    messages: vec![history],
                    offsets: vec![],
                    opened_at: None,
                },
                &metrics,
            )
            .await
            .unwrap();
        let before = engine.state_stats();
        let watermark = engine.watermark();
        let probe = || OnlineInput::Source {
            source: 0,
            messages: vec![card(3, 3, "mer_3"), card(4, 4, "mer_4")],
        };
        let bad = OnlineInput::Source {
            source: 0,
            messages: vec![RawMessage {
                value: Some(br#"{"auth_id":"x"}"#.to_vec()),
                ..card(0, 0, "m")
            }],
        };
        let peeked = engine
            .score_online(vec![probe(), bad.clone(), probe()], false)
            .await
            .unwrap();
        assert!(peeked.sink.is_none());
        assert_eq!(
            engine.state_stats(),
            before,
            "peek changed the window state"
        );
        assert_eq!(engine.watermark(), watermark);
        let first = peeked.results[0].as_ref().unwrap();
        assert_eq!(first.num_rows(), 2);
        let rejected = peeked.results[1].as_ref().unwrap_err();
        assert_eq!(rejected[0].0, Some(0), "{rejected:?}");
        assert!(
            rejected[0].1.contains("missing required field"),
            "{rejected:?}"
        );
        // Two requests in one evaluation do not see each other.
        assert_eq!(peeked.results[2].as_ref().unwrap(), first);
        let count = first.column_by_name("card_tx_10m").unwrap();
        let count = count
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap();
        assert_eq!(
            count.values().to_vec(),
            vec![4, 5],
            "history plus the request's rows"
        );

        let recorded = engine.score_online(vec![probe()], true).await.unwrap();
        let rec = recorded.results[0].as_ref().unwrap();
        // What the peek gave, but for the explanations: those go with stored alerts only.
        let without_explanation = |b: &RecordBatch| {
            let keep: Vec<usize> = (0..b.num_columns())
                .filter(|&i| b.schema().field(i).name() != crate::engine::EXPLANATION)
                .collect();
            b.project(&keep).unwrap()
        };
        assert_eq!(
            without_explanation(rec),
            without_explanation(first),
            "a recorded evaluation gives what the peek gave"
        );
        let explanations = first.column_by_name(crate::engine::EXPLANATION).unwrap();
        assert_eq!(
            explanations.null_count(),
            first.num_rows(),
            "a peek explains nothing"
        );
        let sink = recorded.sink.expect("recorded rows go to the sink");
        assert!(sink.offsets.is_empty());
        assert_eq!(sink.rows(), 2);
        assert_ne!(engine.state_stats(), before);
        // Now the rows are history: peeking the same again counts them.
        let again = engine.score_online(vec![probe()], false).await.unwrap();
        let count = again.results[0]
            .as_ref()
            .unwrap()
            .column_by_name("card_tx_10m")
            .unwrap()
            .clone();
        let count = count
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap();
        // t3 (10:03) now also sees the recorded t3; t4 (10:04) sees both t3 and the recorded t4.
        assert_eq!(count.values().to_vec(), vec![5, 7]);
    }

    #[tokio::test]
    async fn labels_received_between_batches_count_at_once_even_for_a_peek() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut config = crate::config::load(&dir.join("config.toml")).unwrap();
        config.model = None;
        let mut engine = Engine::new(&config).await.unwrap();
        assert!(engine.reads_labels(), "the shipped features read labels");
        let metrics = Metrics::default();
        engine
            .process(
                Batch {
                    seq: 1,
                    messages: vec![vec![card(0, 0, "mer_0")]],
                    offsets: vec![],
                    opened_at: None,
                },
                &metrics,
            )
            .await
            .unwrap();
        let card_fraud = |out: OnlineOutput| {
            let b = out.results[0].as_ref().unwrap().clone();
            let c = b.column_by_name("card_fraud_labels_90d").unwrap().clone();
            c.as_any()
                .downcast_ref::<datafusion::arrow::array::Int64Array>()
                .unwrap()
                .value(0)
        };
        let probe = || OnlineInput::Source {
            source: 0,
            messages: vec![card(1, 5, "mer_1")],
        };
        let before = engine.score_online(vec![probe()], false).await.unwrap();
        assert_eq!(card_fraud(before), 0);
        let at = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().to_utc();
        let label = |id: &str, reported: &str| crate::sink::query::Label {
            transaction_id: id.into(),
            fraud: true,
            report_type: Some("analyst".into()),
            reported_at: at(reported),
            source: None,
            transaction_time: None,
            fraud_scenario: None,
        };
        // t0's fraud report at 10:02 (before the probe at 10:05), and one of an unknown id.
        let labels = crate::online::label_batch(&[
            label("t0", "2026-11-01T10:02:00Z"),
            label("nobody", "2026-11-01T10:02:00Z"),
        ]);
        engine.receive_labels(&labels).await.unwrap();
        let stats = engine.label_stats();
        assert_eq!((stats.applied, stats.unresolved), (1, 1), "{stats:?}");
        let after = engine.score_online(vec![probe()], false).await.unwrap();
        assert_eq!(
            card_fraud(after),
            1,
            "the label counts without a batch in between"
        );
        // Point in time still holds: a row before the report does not see it.
        let early = OnlineInput::Source {
            source: 0,
            messages: vec![card(2, 1, "mer_2")],
        };
        let early = engine.score_online(vec![early], false).await.unwrap();
        assert_eq!(card_fraud(early), 0);
    }
}
