//! Label feedback (chargebacks, PIX MED reports, fraud claims, analyst verdicts) as a second input
//! of `features.sql`, point-in-time correct.
//!
//! A label message names a transaction (`transaction_id`), says what it was (`label`: `fraud` or
//! `genuine`) and when that became known (`reported_at`). `features.sql` reads labels through two
//! window functions over an entity's recent transactions:
//!
//! ```sql
//! fraud_labels(*) OVER (PARTITION BY merchant_id ORDER BY event_time
//!                       RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW)
//! ```
//!
//! counts the entity's transactions whose event time lies in the frame and whose fraud label was
//! reported at or before the row's own event time (`known_labels(*)` counts any label). A row
//! never sees a label reported after it happened, however early the label message was processed:
//! that is the rule that keeps features (and so the training set `replay` writes) free of leakage.
//!
//! To attribute a label to entities, the store needs the labelled transaction's partition keys. It
//! keeps an index of recent transactions (id → event time and keys, bounded by
//! `labels.index_max`); a label whose transaction is older than the index is resolved by the
//! caller from the database ([`LabelStore::unresolved`], then [`LabelStore::index`] with the rows
//! found). The first label of a transaction wins, as in the `labels` table.

use std::collections::{HashMap, VecDeque};

/// Hash maps keyed by ids and entity keys from the outside (randomly seeded foldhash).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Builder, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;

use super::state::{EntityKey, InlineKey};
use super::windows::{WindowCall, WindowFunc};
use crate::config::{FieldConfig, SourceConfig};

/// Source name of label messages (dead letters of bad labels carry it).
pub const LABEL_SOURCE: &str = "labels";

/// (name, type, required) of the fields of a label message.
pub const LABEL_FIELDS: &[(&str, &str, bool)] = &[
    ("transaction_id", "string", true),
    ("label", "string", true),
    ("reported_at", "timestamp", true),
    ("source", "string", false),
    ("report_type", "string", false),
    ("fraud_scenario", "string", false),
    ("transaction_time", "timestamp", false),
];

/// The decoder configuration of label messages on `topic`.
pub fn label_source(topic: &str) -> SourceConfig {
    SourceConfig {
        name: LABEL_SOURCE.into(),
        simulator: String::new(),
        topic: topic.into(),
        partitions: 1,
        mapping: Default::default(),
        fields: LABEL_FIELDS
            .iter()
            .map(|(name, t, required)| FieldConfig {
                name: (*name).into(),
                data_type: (*t).into(),
                required: *required,
            })
            .collect(),
    }
}

/// Schema of decoded labels (as stored in the `labels` table).
pub fn label_schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    std::sync::Arc::new(Schema::new(
        LABEL_FIELDS
            .iter()
            .map(|(name, t, required)| {
                let dt = if *t == "timestamp" {
                    time.clone()
                } else {
                    DataType::Utf8
                };
                Field::new(*name, dt, !required)
            })
            .collect::<Vec<_>>(),
    ))
}

/// Whether `label` is a value the `labels` table accepts; `Some(true)` for fraud.
pub fn is_fraud(label: &str) -> Option<bool> {
    match label {
        "fraud" => Some(true),
        "genuine" => Some(false),
        _ => None,
    }
}

/// A label waiting for its transaction to be found.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    id: Box<str>,
    fraud: bool,
    reported_at: i64,
}

/// A label attributed to an entity.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    tx_time: i64,
    reported_at: i64,
    fraud: bool,
}

/// A transaction id in the index (inline up to 38 bytes: a UUID's 36 fit).
type TxKey = InlineKey<38>;

/// A recent transaction's event time and partition keys (of the keys label calls use).
#[derive(Debug)]
struct Indexed {
    time: i64,
    keys: Box<[Option<EntityKey>]>,
}

/// Statistics of the label store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelStats {
    /// Labels attributed to their transaction's entities.
    pub applied: u64,
    /// Labels of a transaction already labelled (the first one wins).
    pub repeated: u64,
    /// Labels whose transaction was found neither in the index nor in the database.
    pub unresolved: u64,
    /// Labels currently kept.
    pub kept: usize,
}

/// The label side of the feature state.
#[derive(Debug)]
pub struct LabelStore {
    /// (call index in the plan, key index, function, frame) of every label call.
    calls: Vec<(usize, usize, WindowFunc, i64)>,
    /// Key indices label calls use, in order; `slot[j]` is the position of key `j` in it.
    used_keys: Vec<usize>,
    slot: Vec<Option<usize>>,
    index: Map<TxKey, Indexed>,
    order: VecDeque<TxKey>,
    index_max: usize,
    pending: Vec<Pending>,
    /// Per used key: entity → its labels, sorted by transaction time.
    entities: Vec<Map<Box<str>, Vec<Entry>>>,
    /// Labelled transactions (first label wins) and their event time, for eviction.
    labelled: Map<Box<str>, i64>,
    keep_ms: i64,
    stats: LabelStats,
}

impl LabelStore {
    /// A store for the label calls among `calls` (call `i` partitioned by key `call_key[i]` of
    /// `n_keys`), indexing at most `index_max` recent transactions, keeping labels for the
    /// longest label frame plus `lateness_ms`.
    pub fn new(
        calls: &[WindowCall],
        call_key: &[usize],
        n_keys: usize,
        index_max: usize,
        lateness_ms: i64,
    ) -> Self {
        let mut used_keys = Vec::new();
        let mut slot = vec![None; n_keys];
        let mut label_calls = Vec::new();
        for (i, c) in calls.iter().enumerate() {
            if !c.func.is_label() {
                continue;
            }
            let k = call_key[i];
            if slot[k].is_none() {
                slot[k] = Some(used_keys.len());
                used_keys.push(k);
            }
            label_calls.push((i, k, c.func, c.range_ms));
        }
        let longest = label_calls.iter().map(|c| c.3).max().unwrap_or(0);
        Self {
            calls: label_calls,
            entities: used_keys.iter().map(|_| Map::default()).collect(),
            used_keys,
            slot,
            index: Map::default(),
            order: VecDeque::new(),
            index_max: index_max.max(1),
            pending: Vec::new(),
            labelled: Map::default(),
            keep_ms: longest.saturating_add(lateness_ms),
            stats: LabelStats::default(),
        }
    }

    /// Whether `features.sql` reads labels at all (otherwise nothing is kept).
    pub fn is_active(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Indices (in the plan) of the label calls.
    pub fn call_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.calls.iter().map(|c| c.0)
    }

    /// Statistics.
    pub fn stats(&self) -> LabelStats {
        LabelStats {
            kept: self.labelled.len(),
            ..self.stats
        }
    }

    /// Queue decoded labels (schema [`label_schema`]); they are attributed by the next
    /// [`LabelStore::resolve`]. Rows with an unknown label value are skipped (the engine
    /// dead-letters them before).
    pub fn queue(&mut self, labels: &RecordBatch) -> Result<(), ArrowError> {
        if !self.is_active() || labels.num_rows() == 0 {
            return Ok(());
        }
        let col = |name: &str| {
            labels
                .column_by_name(name)
                .ok_or_else(|| ArrowError::SchemaError(format!("label column {name} missing")))
        };
        let ids = col("transaction_id")?;
        let ids = ids
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::SchemaError("transaction_id is not text".into()))?;
        let kinds = col("label")?;
        let kinds = kinds
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| ArrowError::SchemaError("label is not text".into()))?;
        let reported = col("reported_at")?;
        let reported = reported
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .ok_or_else(|| ArrowError::SchemaError("reported_at is not a timestamp".into()))?;
        for r in 0..labels.num_rows() {
            if ids.is_null(r) || kinds.is_null(r) || reported.is_null(r) {
                continue;
            }
            let Some(fraud) = is_fraud(kinds.value(r)) else {
                continue;
            };
            self.pending.push(Pending {
                id: ids.value(r).into(),
                fraud,
                reported_at: reported.value(r),
            });
        }
        Ok(())
    }

    /// Ids of queued labels whose transaction is not indexed (and not in `batch_ids`): the
    /// caller looks them up in the database and indexes what it finds.
    pub fn unresolved(&self, batch_ids: Option<&StringArray>) -> Vec<String> {
        if self.pending.is_empty() {
            return Vec::new();
        }
        let in_batch: std::collections::HashSet<&str> = batch_ids
            .map(|a| a.iter().flatten().collect())
            .unwrap_or_default();
        self.pending
            .iter()
            .filter(|p| !self.index.contains_key(p.id.as_bytes()) && !in_batch.contains(&*p.id))
            .filter(|p| !self.labelled.contains_key(&p.id))
            .map(|p| p.id.to_string())
            .collect()
    }

    /// Index transactions: `ids`, event times, and the plan's key columns (all of them, as the
    /// pre query yields them).
    pub fn index(
        &mut self,
        ids: &StringArray,
        time: &TimestampMillisecondArray,
        keys: &[ArrayRef],
    ) -> Result<(), ArrowError> {
        if !self.is_active() {
            return Ok(());
        }
        let used: Vec<ArrayRef> = self
            .used_keys
            .iter()
            .map(|&k| cast(&keys[k], &DataType::Utf8))
            .collect::<Result<_, _>>()?;
        let used: Vec<&StringArray> = used
            .iter()
            .map(|a| a.as_any().downcast_ref().expect("cast to Utf8"))
            .collect();
        for r in 0..ids.len() {
            if ids.is_null(r) || time.is_null(r) {
                continue;
            }
            let id = TxKey::new(ids.value(r).as_bytes());
            let keys = used
                .iter()
                .map(|a| (!a.is_null(r)).then(|| EntityKey::new(a.value(r).as_bytes())))
                .collect();
            let fresh = self
                .index
                .insert(
                    id.clone(),
                    Indexed {
                        time: time.value(r),
                        keys,
                    },
                )
                .is_none();
            if fresh {
                self.order.push_back(id);
            }
        }
        while self.index.len() > self.index_max {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.index.remove(&old);
        }
        Ok(())
    }

    /// Attribute every queued label whose transaction is indexed; the others are counted as
    /// unresolved and dropped (the `labels` table still has them).
    pub fn resolve(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            if self.labelled.contains_key(&p.id) {
                self.stats.repeated += 1;
                continue;
            }
            let Some(tx) = self.index.get(p.id.as_bytes()) else {
                self.stats.unresolved += 1;
                continue;
            };
            let entry = Entry {
                tx_time: tx.time,
                reported_at: p.reported_at,
                fraud: p.fraud,
            };
            for (s, key) in tx.keys.iter().enumerate() {
                let Some(key) = key else { continue };
                let list = self.entities[s].entry(key.text().into()).or_default();
                let at = list.partition_point(|e| e.tx_time <= entry.tx_time);
                list.insert(at, entry);
            }
            self.labelled.insert(p.id, tx.time);
            self.stats.applied += 1;
        }
    }

    /// The label call results for rows (event times and the plan's key columns), one Int64
    /// column per label call in [`LabelStore::call_indices`] order.
    pub fn evaluate(
        &self,
        time: &TimestampMillisecondArray,
        keys: &[ArrayRef],
    ) -> Result<Vec<ArrayRef>, ArrowError> {
        let mut out = Vec::with_capacity(self.calls.len());
        for &(_, k, func, range) in &self.calls {
            let key = cast(&keys[k], &DataType::Utf8)?;
            let key: &StringArray = key.as_any().downcast_ref().expect("cast to Utf8");
            let labels = &self.entities[self.slot[k].expect("used key")];
            let mut b = Int64Builder::with_capacity(time.len());
            for r in 0..time.len() {
                if time.is_null(r) || key.is_null(r) {
                    b.append_value(0);
                    continue;
                }
                let t = time.value(r);
                let n = labels.get(key.value(r)).map_or(0, |list| {
                    let lo = list.partition_point(|e| e.tx_time < t.saturating_sub(range));
                    list[lo..]
                        .iter()
                        .take_while(|e| e.tx_time <= t)
                        .filter(|e| e.reported_at <= t)
                        .filter(|e| e.fraud || func == WindowFunc::KnownLabels)
                        .count()
                });
                b.append_value(n as i64);
            }
            out.push(std::sync::Arc::new(b.finish()) as ArrayRef);
        }
        Ok(out)
    }

    /// Forget labels of transactions no row within the allowed lateness can reach.
    pub fn evict(&mut self, watermark_ms: i64) {
        if !self.is_active() {
            return;
        }
        let cutoff = watermark_ms.saturating_sub(self.keep_ms);
        for m in &mut self.entities {
            m.retain(|_, list| {
                let drop = list.partition_point(|e| e.tx_time < cutoff);
                list.drain(..drop);
                !list.is_empty()
            });
        }
        self.labelled.retain(|_, t| *t >= cutoff);
    }

    /// Move the state of `previous` over when it serves the same label calls and keys.
    pub fn adopt(&mut self, previous: LabelStore) -> bool {
        if previous.calls == self.calls && previous.used_keys == self.used_keys {
            *self = previous;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn call(func: WindowFunc, range_ms: i64) -> WindowCall {
        WindowCall {
            func,
            arg: None,
            partition: "merchant_id".into(),
            range_ms,
        }
    }

    fn labels(rows: &[(&str, &str, i64)]) -> RecordBatch {
        let schema = label_schema();
        let n = rows.len();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.2))
                    .with_timezone("UTC"),
            ),
        ];
        for f in schema.fields().iter().skip(3) {
            cols.push(datafusion::arrow::array::new_null_array(f.data_type(), n));
        }
        RecordBatch::try_new(schema, cols).unwrap()
    }

    fn ts(v: &[i64]) -> TimestampMillisecondArray {
        TimestampMillisecondArray::from(v.to_vec()).with_timezone("UTC")
    }

    #[test]
    fn a_label_counts_only_from_its_report_time_and_within_the_frame() {
        let calls = [
            call(WindowFunc::FraudLabels, 100),
            call(WindowFunc::KnownLabels, 100),
        ];
        let mut st = LabelStore::new(&calls, &[0, 0], 1, 1000, 0);
        let ids = StringArray::from(vec!["a", "b", "c"]);
        let keys: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["m", "m", "n"]))];
        st.index(&ids, &ts(&[10, 20, 30]), &keys).unwrap();
        st.queue(&labels(&[
            ("a", "fraud", 50),
            ("b", "genuine", 40),
            ("a", "genuine", 45),
            ("zz", "fraud", 1),
        ]))
        .unwrap();
        assert_eq!(st.unresolved(None), vec!["zz".to_string()]);
        st.resolve();
        let s = st.stats();
        assert_eq!((s.applied, s.repeated, s.unresolved), (2, 1, 1));
        let probe: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["m"; 5]))];
        let out = st.evaluate(&ts(&[39, 40, 49, 50, 115]), &probe).unwrap();
        let fraud: Vec<i64> = out[0]
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap()
            .values()
            .to_vec();
        let known: Vec<i64> = out[1]
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .unwrap()
            .values()
            .to_vec();
        // At 39 nothing is reported yet; b's verdict arrives at 40, a's fraud report at 50; at 115
        // a (t=10) has left the 100 ms frame, b (t=20) is still in it.
        assert_eq!(fraud, vec![0, 0, 0, 1, 0]);
        assert_eq!(known, vec![0, 1, 1, 2, 1]);
        st.evict(1000);
        assert_eq!(st.stats().kept, 0);
    }
}
