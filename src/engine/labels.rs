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
use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Hash maps keyed by ids and entity keys from the outside (randomly seeded foldhash).
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use datafusion::arrow::array::{
    Array, ArrayRef, Int64Builder, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;

use super::state::utf8;
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

/// Recent transactions indexed for label attribution, in chunks of [`CHUNK_ROWS`] rows (id,
/// event time, the label calls' keys: copied, whatever size the batches that brought them), and
/// a hash table from an id to its row. Indexing a row allocates nothing (amortised) and writes
/// one 16-byte slot; the oldest rows go a chunk at a time, and the slots they leave are swept
/// once they are as many as the live ones.
#[derive(Debug, Default)]
struct TxIndex {
    /// Full chunks, then the one being filled.
    chunks: VecDeque<Chunk>,
    /// Sequence number of the oldest live row (older rows of `chunks[0]` are gone).
    first: u64,
    /// Sequence number of the next row indexed.
    next: u64,
    table: HashTable<Slot>,
    hasher: foldhash::fast::RandomState,
}

/// Rows per chunk of the index.
const CHUNK_ROWS: usize = 4096;

/// Texts one after the other (NULL allowed), read back by row.
#[derive(Debug, Default)]
struct Texts {
    bytes: Vec<u8>,
    /// End of each row's text in `bytes`.
    ends: Vec<u32>,
    null: Vec<bool>,
}

impl Texts {
    /// Room for `rows` texts as long on average as those of `like` (plus one byte).
    fn like(rows: usize, like: &StringArray) -> Self {
        let o = like.value_offsets();
        let avg = (o[o.len() - 1] - o[0]) as usize / like.len().max(1) + 1;
        Self {
            bytes: Vec::with_capacity(rows * avg),
            ends: Vec::with_capacity(rows),
            null: Vec::with_capacity(rows),
        }
    }

    fn push(&mut self, v: Option<&str>) {
        self.bytes.extend_from_slice(v.unwrap_or("").as_bytes());
        self.ends
            .push(u32::try_from(self.bytes.len()).expect("a chunk holds under 4 GiB of text"));
        self.null.push(v.is_none());
    }

    fn get(&self, row: usize) -> Option<&str> {
        if self.null[row] {
            return None;
        }
        let start = row.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        let bytes = &self.bytes[start..self.ends[row] as usize];
        Some(std::str::from_utf8(bytes).expect("stored from text"))
    }
}

/// Rows `start`, `start + 1`, … of the index.
#[derive(Debug, Default)]
struct Chunk {
    start: u64,
    ids: Texts,
    time: Vec<i64>,
    /// The label calls' keys (`LabelStore::used_keys` order).
    keys: Vec<Texts>,
}

/// A table slot: the hash of a transaction id and the sequence number of its newest row.
#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u64,
    seq: u64,
}

/// An indexed transaction as [`TxIndex::get`] finds it.
struct Found<'a> {
    chunk: &'a Chunk,
    row: usize,
}

impl TxIndex {
    fn len(&self) -> usize {
        (self.next - self.first) as usize
    }

    /// The chunk and row of a live sequence number (every chunk but the last is full).
    fn at(chunks: &VecDeque<Chunk>, first: u64, seq: u64) -> Option<Found<'_>> {
        if seq < first {
            return None;
        }
        let c = (seq - chunks.front()?.start) as usize / CHUNK_ROWS;
        let chunk = chunks.get(c)?;
        let row = (seq - chunk.start) as usize;
        (row < chunk.time.len()).then_some(Found { chunk, row })
    }

    /// Whether `slot` is the live row of transaction `id` (of hash `hash`).
    fn is(chunks: &VecDeque<Chunk>, first: u64, slot: &Slot, hash: u64, id: &str) -> bool {
        slot.hash == hash
            && Self::at(chunks, first, slot.seq).is_some_and(|f| f.chunk.ids.get(f.row) == Some(id))
    }

    /// The newest indexed row of transaction `id`.
    fn get(&self, id: &str) -> Option<Found<'_>> {
        let hash = self.hasher.hash_one(id.as_bytes());
        let slot = self
            .table
            .find(hash, |s| Self::is(&self.chunks, self.first, s, hash, id))?;
        Self::at(&self.chunks, self.first, slot.seq)
    }

    fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Index rows (ids, event times, keys; rows with a NULL id or time are left out), then
    /// forget the oldest rows beyond `max`.
    fn push(
        &mut self,
        ids: &StringArray,
        time: &TimestampMillisecondArray,
        keys: &[StringArray],
        max: usize,
    ) {
        for r in 0..ids.len() {
            if ids.is_null(r) || time.is_null(r) {
                continue;
            }
            let id = ids.value(r);
            let hash = self.hasher.hash_one(id.as_bytes());
            let seq = self.next;
            let Self {
                chunks,
                first,
                table,
                ..
            } = self;
            // An id seen again (a producer retry) points at its newest row.
            let same = |s: &Slot| Self::is(chunks, *first, s, hash, id);
            match table.entry(hash, same, |s| s.hash) {
                hashbrown::hash_table::Entry::Occupied(mut o) => o.get_mut().seq = seq,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(Slot { hash, seq });
                }
            }
            if self
                .chunks
                .back()
                .is_none_or(|c| c.time.len() == CHUNK_ROWS)
            {
                // Sized at once: growing a chunk's vectors from nothing copies them many times.
                self.chunks.push_back(Chunk {
                    start: seq,
                    ids: Texts::like(CHUNK_ROWS, ids),
                    time: Vec::with_capacity(CHUNK_ROWS),
                    keys: keys.iter().map(|k| Texts::like(CHUNK_ROWS, k)).collect(),
                });
            }
            let chunk = self.chunks.back_mut().expect("a chunk to fill");
            chunk.ids.push(Some(id));
            chunk.time.push(time.value(r));
            for (k, col) in chunk.keys.iter_mut().zip(keys) {
                k.push((!col.is_null(r)).then(|| col.value(r)));
            }
            self.next += 1;
        }
        if self.len() > max {
            self.first = self.next - max as u64;
            while self
                .chunks
                .front()
                .is_some_and(|c| c.start + c.time.len() as u64 <= self.first)
            {
                self.chunks.pop_front();
            }
        }
        if self.table.len() > 2 * self.len() + 1024 {
            let first = self.first;
            self.table.retain(|s| s.seq >= first);
        }
    }
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
    index: TxIndex,
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
            index: TxIndex::default(),
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
            .filter(|p| !self.index.contains(&p.id) && !in_batch.contains(&*p.id))
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
        if !self.is_active() || ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<StringArray> = self
            .used_keys
            .iter()
            .map(|&k| utf8(&keys[k]))
            .collect::<Result<_, _>>()?;
        self.index.push(ids, time, &keys, self.index_max);
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
            let Some(Found { chunk, row }) = self.index.get(&p.id) else {
                self.stats.unresolved += 1;
                continue;
            };
            let tx_time = chunk.time[row];
            let entry = Entry {
                tx_time,
                reported_at: p.reported_at,
                fraud: p.fraud,
            };
            for (s, key) in chunk.keys.iter().enumerate() {
                let Some(key) = key.get(row) else { continue };
                let list = self.entities[s].entry(key.into()).or_default();
                let at = list.partition_point(|e| e.tx_time <= entry.tx_time);
                list.insert(at, entry);
            }
            self.labelled.insert(p.id, tx_time);
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
            let key = utf8(&keys[k])?;
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

    /// The index against a brute-force model: for any id, the newest of the last `max` rows
    /// with it (ids repeat, batches of every size, rows over several chunks, the sweep of stale
    /// slots runs many times).
    #[test]
    fn the_index_finds_the_newest_live_row_of_each_id() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        const IDS: u64 = 3000;
        for max in [1, 5, 64, 1000, 5000] {
            let mut index = TxIndex::default();
            let mut all: Vec<(String, i64)> = Vec::new();
            let mut sweeps = 0;
            for batch in 0..600 {
                let n = next(40) as usize;
                let rows: Vec<(String, i64)> = (0..n)
                    .map(|i| (format!("tx-{}", next(IDS)), (batch * 100 + i) as i64))
                    .collect();
                let ids = StringArray::from_iter_values(rows.iter().map(|r| r.0.as_str()));
                let time = ts(&rows.iter().map(|r| r.1).collect::<Vec<_>>());
                let slots = index.table.len();
                index.push(&ids, &time, &[], max);
                sweeps += usize::from(index.table.len() < slots);
                all.extend(rows);
                let live = &all[all.len().saturating_sub(max)..];
                assert_eq!(index.len(), live.len());
                assert!(index.table.len() <= 2 * live.len() + 1024 + n);
                let kept: usize = index.chunks.iter().map(|c| c.time.len()).sum();
                assert!(kept <= live.len() + CHUNK_ROWS, "{kept} rows kept");
                if batch % 20 == 19 {
                    for probe in 0..IDS {
                        let id = format!("tx-{probe}");
                        let want = live.iter().rev().find(|r| r.0 == id).map(|r| r.1);
                        let got = index.get(&id).map(|f| f.chunk.time[f.row]);
                        assert_eq!(got, want, "{id} after batch {batch}, max {max}");
                    }
                }
            }
            assert!(all.len() > 2 * CHUNK_ROWS);
            if max < 100 {
                assert!(sweeps > 0, "no sweep with max {max}");
            }
        }
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
