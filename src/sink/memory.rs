//! In-memory sink for `payguard demo` and tests: same commit semantics as PostgreSQL (offsets
//! guarded, duplicates stored once), bounded memory (only the latest rows are kept).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, RecordBatch, StringArray};

use super::{CommitOutcome, CommitStats, SinkBatch, SinkError, StoredOffsets};
use crate::decode::DeadLetter;

/// Rows kept for display.
const KEEP_BATCHES: usize = 64;
/// Dead letters kept for display.
const KEEP_DEAD: usize = 1000;
/// Transaction ids remembered for duplicate detection.
const KEEP_IDS: usize = 1_000_000;

#[derive(Debug, Default)]
struct Store {
    offsets: StoredOffsets,
    recent: VecDeque<RecordBatch>,
    dead: VecDeque<DeadLetter>,
    ids: HashSet<String>,
    id_order: VecDeque<String>,
    total_rows: u64,
    total_dead: u64,
    labels: std::collections::HashMap<String, super::query::Label>,
}

/// The memory sink (cheap to clone; clones share the store).
#[derive(Debug, Clone)]
pub struct MemorySink {
    pipeline: String,
    store: Arc<Mutex<Store>>,
}

impl MemorySink {
    /// An empty store.
    pub fn new(pipeline: &str) -> Self {
        Self {
            pipeline: pipeline.to_string(),
            store: Arc::default(),
        }
    }

    /// Stored offsets.
    pub fn load_offsets(&self) -> StoredOffsets {
        self.store.lock().expect("store lock").offsets.clone()
    }

    /// Commit a batch (all or nothing).
    pub fn commit(&self, batch: &SinkBatch) -> Result<CommitOutcome, SinkError> {
        let mut s = self.store.lock().expect("store lock");
        for o in &batch.offsets {
            let current = s.offsets.get(&(o.topic.clone(), o.partition)).copied();
            if current.is_some() && current != o.expected {
                return Err(SinkError::Fenced {
                    pipeline: self.pipeline.clone(),
                    topic: o.topic.clone(),
                    partition: o.partition,
                    expected: o.expected,
                });
            }
        }
        for o in &batch.offsets {
            s.offsets.insert((o.topic.clone(), o.partition), o.next);
        }
        let mut stats = CommitStats::default();
        for b in &batch.transactions {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("transaction_id is the first canonical column");
            let mut keep = Vec::with_capacity(ids.len());
            for i in 0..ids.len() {
                let id = ids.value(i).to_string();
                let fresh = s.ids.insert(id.clone());
                if fresh {
                    s.id_order.push_back(id);
                    if s.id_order.len() > KEEP_IDS
                        && let Some(old) = s.id_order.pop_front()
                    {
                        s.ids.remove(&old);
                    }
                    stats.inserted += 1;
                } else {
                    stats.duplicates += 1;
                }
                keep.push(fresh);
            }
            let filtered = datafusion::arrow::compute::filter_record_batch(
                b,
                &datafusion::arrow::array::BooleanArray::from(keep),
            )
            .expect("filter by a mask of the batch's length");
            s.recent.push_back(filtered);
            if s.recent.len() > KEEP_BATCHES {
                s.recent.pop_front();
            }
        }
        s.total_rows += stats.inserted;
        s.total_dead += batch.dead_letters.len() as u64;
        for d in &batch.dead_letters {
            s.dead.push_back(d.clone());
            if s.dead.len() > KEEP_DEAD {
                s.dead.pop_front();
            }
        }
        Ok(CommitOutcome::Committed(stats))
    }

    /// Total rows and dead letters stored.
    pub fn totals(&self) -> (u64, u64) {
        let s = self.store.lock().expect("store lock");
        (s.total_rows, s.total_dead)
    }

    /// The most recent batches of rows.
    pub fn recent(&self) -> Vec<RecordBatch> {
        self.store
            .lock()
            .expect("store lock")
            .recent
            .iter()
            .cloned()
            .collect()
    }

    /// The most recent dead letters.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.store
            .lock()
            .expect("store lock")
            .dead
            .iter()
            .cloned()
            .collect()
    }

    /// Store a label unless the transaction has one (the first report wins).
    pub fn insert_label(&self, label: super::query::Label) -> bool {
        let mut s = self.store.lock().expect("store lock");
        if s.labels.contains_key(&label.transaction_id) {
            return false;
        }
        s.labels.insert(label.transaction_id.clone(), label);
        true
    }

    /// The label of a transaction.
    pub fn label(&self, transaction_id: &str) -> Option<super::query::Label> {
        self.store
            .lock()
            .expect("store lock")
            .labels
            .get(transaction_id)
            .cloned()
    }
}
