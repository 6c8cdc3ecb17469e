//! Sources: where messages come from, and the micro-batches they are cut into.
//!
//! Every input (Kafka partitions, the in-process simulator) sends [`Chunk`]s of raw messages into
//! one bounded channel; the [`Batcher`] cuts them into [`Batch`]es by row count or time, and records
//! for each partition the offset the batch starts from and the next offset after it: the sink stores
//! exactly that, in the same database transaction as the rows.

pub mod kafka;
pub mod simulator;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::decode::RawMessage;

/// Messages read from one partition of one source, in offset order.
#[derive(Debug)]
pub struct Chunk {
    /// Index of the source in the config.
    pub source: usize,
    /// Partition.
    pub partition: i32,
    /// The messages.
    pub messages: Vec<RawMessage>,
    /// The next offset to read after this chunk.
    pub next_offset: i64,
}

/// The offset movement of one partition within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommit {
    /// Source index.
    pub source: usize,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The stored offset the batch starts from (`None`: the partition has no stored offset yet).
    /// The sink refuses to commit when the store holds another value: another process has moved it.
    pub expected: Option<i64>,
    /// The next offset to read once this batch is committed.
    pub next: i64,
}

/// A micro-batch: messages grouped by source, and the offsets they advance.
#[derive(Debug, Default)]
pub struct Batch {
    /// Sequence number of the batch within this run.
    pub seq: u64,
    /// Messages per source index.
    pub messages: Vec<Vec<RawMessage>>,
    /// Offsets moved by this batch.
    pub offsets: Vec<OffsetCommit>,
    /// When the first message of the batch arrived.
    pub opened_at: Option<Instant>,
}

impl Batch {
    /// Number of messages.
    pub fn len(&self) -> usize {
        self.messages.iter().map(Vec::len).sum()
    }

    /// Whether the batch holds no message and moves no offset.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.offsets.is_empty()
    }
}

/// Cuts chunks into batches.
#[derive(Debug)]
pub struct Batcher {
    topics: Vec<String>,
    max_rows: usize,
    max_wait: Duration,
    /// Last position known stored (or about to be) per (source, partition).
    positions: HashMap<(usize, i32), Option<i64>>,
    seq: u64,
}

impl Batcher {
    /// `stored` holds the offsets the sink had at start, per (source, partition).
    pub fn new(
        topics: Vec<String>,
        max_rows: usize,
        max_wait: Duration,
        stored: HashMap<(usize, i32), i64>,
    ) -> Self {
        Self {
            topics,
            max_rows,
            max_wait,
            positions: stored.into_iter().map(|(k, v)| (k, Some(v))).collect(),
            seq: 0,
        }
    }

    fn new_batch(&self) -> Batch {
        Batch {
            seq: self.seq,
            messages: vec![Vec::new(); self.topics.len()],
            offsets: Vec::new(),
            opened_at: None,
        }
    }

    fn add(&mut self, batch: &mut Batch, chunk: Chunk) {
        if batch.opened_at.is_none() {
            batch.opened_at = Some(Instant::now());
        }
        let key = (chunk.source, chunk.partition);
        match batch
            .offsets
            .iter_mut()
            .find(|o| o.source == chunk.source && o.partition == chunk.partition)
        {
            Some(o) => o.next = chunk.next_offset,
            None => batch.offsets.push(OffsetCommit {
                source: chunk.source,
                topic: self.topics[chunk.source].clone(),
                partition: chunk.partition,
                expected: self.positions.get(&key).copied().flatten(),
                next: chunk.next_offset,
            }),
        }
        self.positions.insert(key, Some(chunk.next_offset));
        batch.messages[chunk.source].extend(chunk.messages);
    }

    /// Run until the chunk channel closes or `stop` fires: emit batches into `out`, the last one
    /// holding whatever was pending. Chunks still queued when `stop` fires are not taken: they
    /// were never committed, so they are read again on the next start. Returns early when `out`
    /// is closed (the downstream stopped).
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Chunk>,
        out: mpsc::Sender<Batch>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut batch = self.new_batch();
        loop {
            let deadline = batch.opened_at.map(|t| t + self.max_wait);
            let next = match deadline {
                _ if stop.is_cancelled() => Some(None),
                Some(d) => tokio::select! {
                    c = input.recv() => Some(c),
                    _ = tokio::time::sleep_until(d) => None,
                    _ = stop.cancelled() => Some(None),
                },
                None => tokio::select! {
                    c = input.recv() => Some(c),
                    _ = stop.cancelled() => Some(None),
                },
            };
            match next {
                Some(Some(mut chunk)) => {
                    // Split a chunk that would overfill the batch, so batches hold at most
                    // `max_rows` messages.
                    while batch.len() + chunk.messages.len() > self.max_rows {
                        let k = self.max_rows - batch.len();
                        let rest = chunk.messages.split_off(k);
                        let head_messages = std::mem::replace(&mut chunk.messages, rest);
                        let head = Chunk {
                            source: chunk.source,
                            partition: chunk.partition,
                            messages: head_messages,
                            next_offset: chunk.messages[0].offset,
                        };
                        self.add(&mut batch, head);
                        self.seq += 1;
                        let full = std::mem::replace(&mut batch, self.new_batch());
                        if out.send(full).await.is_err() {
                            return;
                        }
                    }
                    self.add(&mut batch, chunk);
                    if batch.len() < self.max_rows {
                        continue;
                    }
                }
                Some(None) => {
                    if !batch.is_empty() && out.send(batch).await.is_err() {
                        tracing::warn!("pipeline stopped before the last batch was taken");
                    }
                    return;
                }
                None => {}
            }
            if batch.is_empty() {
                continue;
            }
            self.seq += 1;
            let full = std::mem::replace(&mut batch, self.new_batch());
            if out.send(full).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(source: usize, partition: i32, from: i64, n: i64) -> Chunk {
        Chunk {
            source,
            partition,
            messages: (from..from + n)
                .map(|o| RawMessage {
                    partition,
                    offset: o,
                    key: None,
                    value: Some(b"{}".to_vec()),
                    timestamp_ms: 0,
                })
                .collect(),
            next_offset: from + n,
        }
    }

    #[tokio::test]
    async fn cuts_by_rows_and_tracks_expected_offsets() {
        let stored = HashMap::from([((0, 0), 10)]);
        let b = Batcher::new(vec!["t".into()], 5, Duration::from_secs(60), stored);
        let (tx, rx) = mpsc::channel(16);
        let (otx, mut orx) = mpsc::channel(16);
        let h = tokio::spawn(b.run(rx, otx, Default::default()));
        tx.send(chunk(0, 0, 10, 3)).await.unwrap();
        tx.send(chunk(0, 1, 0, 3)).await.unwrap();
        tx.send(chunk(0, 0, 13, 1)).await.unwrap();
        drop(tx);
        let first = orx.recv().await.unwrap();
        assert_eq!(first.len(), 5);
        let moves = |b: &Batch| {
            b.offsets
                .iter()
                .map(|o| (o.partition, o.expected, o.next))
                .collect::<Vec<_>>()
        };
        assert_eq!(moves(&first), vec![(0, Some(10), 13), (1, None, 2)]);
        let last = orx.recv().await.unwrap();
        assert_eq!(last.len(), 2);
        assert_eq!(moves(&last), vec![(1, Some(2), 3), (0, Some(13), 14)]);
        assert!(orx.recv().await.is_none());
        h.await.unwrap();
    }

    #[tokio::test]
    async fn splits_chunks_so_batches_never_exceed_max_rows() {
        let b = Batcher::new(vec!["t".into()], 4, Duration::from_secs(60), HashMap::new());
        let (tx, rx) = mpsc::channel(16);
        let (otx, mut orx) = mpsc::channel(16);
        tokio::spawn(b.run(rx, otx, Default::default()));
        tx.send(chunk(0, 0, 0, 10)).await.unwrap();
        drop(tx);
        let mut got = Vec::new();
        while let Some(b) = orx.recv().await {
            let o = &b.offsets[0];
            got.push((b.len(), o.expected, o.next));
        }
        assert_eq!(got, vec![(4, None, 4), (4, Some(4), 8), (2, Some(8), 10)]);
    }

    #[tokio::test(start_paused = true)]
    async fn closes_a_batch_on_time() {
        let b = Batcher::new(
            vec!["t".into()],
            1000,
            Duration::from_millis(100),
            HashMap::new(),
        );
        let (tx, rx) = mpsc::channel(16);
        let (otx, mut orx) = mpsc::channel(16);
        tokio::spawn(b.run(rx, otx, Default::default()));
        tx.send(chunk(0, 0, 0, 2)).await.unwrap();
        let got = orx.recv().await.unwrap();
        assert_eq!(got.len(), 2);
        drop(tx);
        assert!(orx.recv().await.is_none());
    }
}
