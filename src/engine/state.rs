//! Incremental per-entity state of the window calls of `features.sql` (see [`super::windows`]).
//!
//! For every (window call, entity) a [`Series`] keeps the entity's rows sorted by event time, plus
//! a running aggregate over the frame ending at the newest event time seen (`head`). A row that
//! arrives in event-time order (the normal case) updates the running aggregate and reads its
//! result in O(1) amortised: this is how Flink evaluates OVER windows. A row older than `head`
//! (out of order) is inserted at its place and its frame is aggregated by a scan.
//!
//! History is kept for `range + allowed_lateness` behind `head`, so every row within the allowed
//! lateness sees exactly the rows its frame asks for; entities idle for longer than the longest
//! frame plus the lateness are evicted, and a budget bounds the number of entities kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Decimal128Array, Decimal128Builder, Float64Array, Float64Builder, Int64Array,
    Int64Builder, RecordBatch, StringArray, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::arrow::error::ArrowError;

use super::windows::{WindowCall, WindowFunc};

/// The kind of a call's argument values, decided from the pre query's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// No argument (`count(*)`).
    None,
    /// Integers (summed exactly).
    Int,
    /// Decimals of this scale (summed exactly as i128).
    Decimal(i8),
    /// Floats.
    Float,
    /// Timestamps in milliseconds.
    Time,
    /// Text (count distinct, lag).
    Text,
}

impl ArgKind {
    /// Kind of an Arrow type, or a message saying what is not supported.
    pub fn of(t: &DataType, func: WindowFunc) -> Result<Self, String> {
        let k = match t {
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => Self::Int,
            DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => Self::Int,
            DataType::Decimal128(_, s) if *s >= 0 => Self::Decimal(*s),
            DataType::Float32 | DataType::Float64 => Self::Float,
            DataType::Timestamp(_, _) => Self::Time,
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => Self::Text,
            DataType::Boolean => Self::Int,
            DataType::Null => Self::Int,
            other => {
                return Err(format!(
                    "argument type {other} is not supported in a window"
                ));
            }
        };
        match (func, k) {
            (WindowFunc::Sum | WindowFunc::Avg, Self::Time | Self::Text) => Err(format!(
                "{func:?} of {t} is not defined; sum/avg take numbers"
            )),
            (WindowFunc::Min | WindowFunc::Max, Self::Text) => {
                Err("min/max of text is not supported in a window".into())
            }
            _ => Ok(k),
        }
    }

    /// Arrow type of the pre query column to read (after a cast).
    fn read_type(self) -> DataType {
        match self {
            Self::None | Self::Int => DataType::Int64,
            Self::Decimal(s) => DataType::Decimal128(38, s),
            Self::Float => DataType::Float64,
            Self::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Self::Text => DataType::Utf8,
        }
    }
}

/// Output type of a call.
pub fn output_type(func: WindowFunc, kind: ArgKind) -> DataType {
    match func {
        WindowFunc::CountStar
        | WindowFunc::Count
        | WindowFunc::CountDistinct
        | WindowFunc::FraudLabels
        | WindowFunc::KnownLabels => DataType::Int64,
        WindowFunc::Avg => DataType::Float64,
        WindowFunc::Sum | WindowFunc::Min | WindowFunc::Max | WindowFunc::Lag => match kind {
            ArgKind::Int | ArgKind::None => DataType::Int64,
            ArgKind::Decimal(s) => DataType::Decimal128(38, s),
            ArgKind::Float => DataType::Float64,
            ArgKind::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            ArgKind::Text => DataType::Utf8,
        },
    }
}

/// One value of a row's argument.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    /// Integers, decimals (unscaled), timestamps (ms).
    I(i128),
    F(f64),
    /// Text: its hash (distinct counting) and, for lag, the text.
    S(u64, Option<Arc<str>>),
}

/// Running aggregate over the head frame.
#[derive(Debug, Clone)]
enum Running {
    /// Rows and non-null values in the frame, and their exact integer sum.
    Exact { rows: i64, values: i64, sum: i128 },
    /// Distinct value hashes with their multiplicity.
    Distinct(HashMap<u64, u32>),
    /// Nothing kept: computed by scanning (floats, min, max, lag).
    Scan,
}

/// One entity's rows for one call.
#[derive(Debug, Clone)]
struct Series {
    /// (event time, value), sorted by event time; equal times in arrival order.
    rows: VecDeque<(i64, Val)>,
    /// Index of the first row of the head frame.
    frame_start: usize,
    /// Newest event time seen.
    head: i64,
    running: Running,
}

impl Series {
    fn new(func: WindowFunc, kind: ArgKind) -> Self {
        let running = match (func, kind) {
            (WindowFunc::CountDistinct, _) => Running::Distinct(HashMap::new()),
            (WindowFunc::CountStar | WindowFunc::Count, _) => Running::Exact {
                rows: 0,
                values: 0,
                sum: 0,
            },
            (WindowFunc::Sum | WindowFunc::Avg, ArgKind::Int | ArgKind::Decimal(_)) => {
                Running::Exact {
                    rows: 0,
                    values: 0,
                    sum: 0,
                }
            }
            _ => Running::Scan,
        };
        Self {
            rows: VecDeque::new(),
            frame_start: 0,
            head: i64::MIN,
            running,
        }
    }

    fn add(running: &mut Running, v: &Val) {
        match running {
            Running::Exact { rows, values, sum } => {
                *rows += 1;
                if let Val::I(x) = v {
                    *values += 1;
                    *sum += x;
                } else if let Val::F(_) | Val::S(..) = v {
                    *values += 1;
                }
            }
            Running::Distinct(m) => {
                if let Val::S(h, _) = v {
                    *m.entry(*h).or_insert(0) += 1;
                }
            }
            Running::Scan => {}
        }
    }

    fn remove(running: &mut Running, v: &Val) {
        match running {
            Running::Exact { rows, values, sum } => {
                *rows -= 1;
                if let Val::I(x) = v {
                    *values -= 1;
                    *sum -= x;
                } else if let Val::F(_) | Val::S(..) = v {
                    *values -= 1;
                }
            }
            Running::Distinct(m) => {
                if let Val::S(h, _) = v
                    && let Some(c) = m.get_mut(h)
                {
                    *c -= 1;
                    if *c == 0 {
                        m.remove(h);
                    }
                }
            }
            Running::Scan => {}
        }
    }

    /// Insert a row and compute its result (`want` false: only insert, the result is `Null`).
    fn push(&mut self, t: i64, v: Val, call: &WindowCall, keep_ms: i64, want: bool) -> Out {
        let range = call.range_ms;
        let pos;
        if t >= self.head {
            // In order: append, advance the frame.
            self.rows.push_back((t, v.clone()));
            pos = self.rows.len() - 1;
            Self::add(&mut self.running, &v);
            self.head = t;
            while self.frame_start < self.rows.len() && self.rows[self.frame_start].0 < t - range {
                let (_, old) = &self.rows[self.frame_start];
                Self::remove(&mut self.running, old);
                self.frame_start += 1;
            }
        } else {
            // Out of order: insert after the rows of equal or smaller time.
            pos = self.rows.partition_point(|(rt, _)| *rt <= t);
            self.rows.insert(pos, (t, v.clone()));
            if t >= self.head - range {
                Self::add(&mut self.running, &v);
            } else if pos <= self.frame_start {
                self.frame_start += 1;
            }
        }
        let out = if !want {
            Out::Null
        } else if t == self.head && !matches!(self.running, Running::Scan) {
            self.running_result(call.func)
        } else {
            self.scan(pos, t, call)
        };
        // Forget rows no row within the allowed lateness can need any more.
        let cutoff = self.head - range - keep_ms;
        while let Some((rt, _)) = self.rows.front() {
            if *rt >= cutoff || self.frame_start == 0 {
                break;
            }
            self.rows.pop_front();
            self.frame_start -= 1;
        }
        out
    }

    fn running_result(&self, func: WindowFunc) -> Out {
        match (&self.running, func) {
            (Running::Exact { rows, .. }, WindowFunc::CountStar) => Out::I(*rows as i128),
            (Running::Exact { values, .. }, WindowFunc::Count) => Out::I(*values as i128),
            (Running::Exact { values, sum, .. }, WindowFunc::Sum) => {
                if *values == 0 {
                    Out::Null
                } else {
                    Out::I(*sum)
                }
            }
            (Running::Exact { values, sum, .. }, WindowFunc::Avg) => {
                if *values == 0 {
                    Out::Null
                } else {
                    Out::Avg(*sum, *values)
                }
            }
            (Running::Distinct(m), _) => Out::I(m.len() as i128),
            _ => unreachable!("running aggregates exist only for these calls"),
        }
    }

    /// Aggregate the frame `[t - range, t]` of the row at `pos` by scanning.
    fn scan(&self, pos: usize, t: i64, call: &WindowCall) -> Out {
        if call.func == WindowFunc::Lag {
            return match pos.checked_sub(1).and_then(|p| self.rows.get(p)) {
                Some((pt, v)) if *pt >= t - call.range_ms => Out::from_val(v),
                _ => Out::Null,
            };
        }
        let lo = self.rows.partition_point(|(rt, _)| *rt < t - call.range_ms);
        let frame = self.rows.range(lo..=pos);
        let mut rows = 0i64;
        let mut values = 0i64;
        let mut isum = 0i128;
        let mut fsum = 0f64;
        let mut min: Option<Val> = None;
        let mut max: Option<Val> = None;
        let mut distinct = HashSet::new();
        for (_, v) in frame {
            rows += 1;
            match v {
                Val::Null => continue,
                Val::I(x) => isum += x,
                Val::F(x) => fsum += x,
                Val::S(h, _) => {
                    distinct.insert(*h);
                }
            }
            values += 1;
            if min.as_ref().is_none_or(|m| val_lt(v, m)) {
                min = Some(v.clone());
            }
            if max.as_ref().is_none_or(|m| val_lt(m, v)) {
                max = Some(v.clone());
            }
        }
        let float = matches!(min, Some(Val::F(_)));
        match call.func {
            WindowFunc::CountStar => Out::I(rows as i128),
            WindowFunc::Count => Out::I(values as i128),
            WindowFunc::CountDistinct => Out::I(distinct.len() as i128),
            _ if values == 0 => Out::Null,
            WindowFunc::Sum if float => Out::F(fsum),
            WindowFunc::Sum => Out::I(isum),
            WindowFunc::Avg if float => Out::F(fsum / values as f64),
            WindowFunc::Avg => Out::Avg(isum, values),
            WindowFunc::Min => min.map_or(Out::Null, |v| Out::from_val(&v)),
            WindowFunc::Max => max.map_or(Out::Null, |v| Out::from_val(&v)),
            WindowFunc::Lag => unreachable!("handled above"),
            WindowFunc::FraudLabels | WindowFunc::KnownLabels => {
                unreachable!("label calls are evaluated by the label store")
            }
        }
    }
}

fn val_lt(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::I(x), Val::I(y)) => x < y,
        (Val::F(x), Val::F(y)) => x < y,
        _ => false,
    }
}

/// A result before it is written to its column.
#[derive(Debug, Clone)]
enum Out {
    Null,
    I(i128),
    F(f64),
    /// Exact sum and count of an average.
    Avg(i128, i64),
    S(Arc<str>),
}

impl Out {
    fn from_val(v: &Val) -> Self {
        match v {
            Val::Null => Self::Null,
            Val::I(x) => Self::I(*x),
            Val::F(x) => Self::F(*x),
            Val::S(_, Some(s)) => Self::S(s.clone()),
            Val::S(_, None) => Self::Null,
        }
    }
}

/// An entity's series, one per call of its key.
#[derive(Debug, Clone)]
struct Entity {
    series: Vec<Series>,
    /// Newest event time of the entity (over all its series).
    head: i64,
    /// Sequence number of the last row that touched it (for the budget's LRU eviction).
    last_seen: u64,
}

/// Per-key entity maps.
#[derive(Debug)]
struct KeyState {
    /// Calls (indices into `calls`) partitioned by this key.
    calls: Vec<usize>,
    entities: HashMap<Box<str>, Entity>,
}

/// Statistics of the state, for metrics and the memory benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Entities tracked, over all keys.
    pub entities: usize,
    /// Rows kept, over all series.
    pub rows: usize,
    /// Entities evicted for being idle.
    pub evicted_idle: u64,
    /// Entities evicted to stay within the budget.
    pub evicted_budget: u64,
}

/// The window operator's state.
#[derive(Debug)]
pub struct WindowState {
    calls: Vec<WindowCall>,
    kinds: Vec<ArgKind>,
    keys: Vec<KeyState>,
    keep_ms: i64,
    longest_ms: i64,
    max_entities: usize,
    seq: u64,
    evicted_idle: u64,
    evicted_budget: u64,
    rows_since_sweep: usize,
    /// When set, the next [`WindowState::process`] is a [`WindowState::peek`] with these groups.
    peek_groups: Option<Vec<u32>>,
}

/// Columns read by [`WindowState::process`].
pub struct WindowInput<'a> {
    /// Event times (ms).
    pub time: &'a TimestampMillisecondArray,
    /// Partition keys, one array per key.
    pub keys: Vec<ArrayRef>,
    /// Arguments, one per call (None for `count(*)`).
    pub args: Vec<Option<ArrayRef>>,
}

impl WindowState {
    /// State for `calls` (call `i` partitioned by key `call_key[i]`), keeping history for
    /// `allowed_lateness_ms` beyond each frame and at most `max_entities` entities per key.
    pub fn new(
        calls: Vec<WindowCall>,
        kinds: Vec<ArgKind>,
        call_key: &[usize],
        n_keys: usize,
        allowed_lateness_ms: i64,
        max_entities: usize,
    ) -> Self {
        let mut keys: Vec<KeyState> = (0..n_keys)
            .map(|_| KeyState {
                calls: Vec::new(),
                entities: HashMap::new(),
            })
            .collect();
        for (i, k) in call_key.iter().enumerate() {
            keys[*k].calls.push(i);
        }
        let longest_ms = calls.iter().map(|c| c.range_ms).max().unwrap_or(0);
        Self {
            calls,
            kinds,
            keys,
            keep_ms: allowed_lateness_ms,
            longest_ms,
            max_entities: max_entities.max(1),
            seq: 0,
            evicted_idle: 0,
            evicted_budget: 0,
            rows_since_sweep: 0,
            peek_groups: None,
        }
    }

    /// Kind of each call's argument.
    pub fn kinds(&self) -> &[ArgKind] {
        &self.kinds
    }

    /// One result builder per call.
    fn builders(&self, n: usize) -> Vec<Builder> {
        self.calls
            .iter()
            .zip(&self.kinds)
            .map(|(c, k)| Builder::new(output_type(c.func, *k), n))
            .collect()
    }

    /// The input's keys as text and its arguments in the types the readers take.
    #[allow(clippy::type_complexity)]
    fn read_columns(
        &self,
        input: &WindowInput<'_>,
    ) -> Result<(Vec<ArrayRef>, Vec<Option<ArrayRef>>), ArrowError> {
        let keys = input
            .keys
            .iter()
            .map(|k| {
                if k.data_type() == &DataType::Utf8 {
                    Ok(k.clone())
                } else {
                    cast(k, &DataType::Utf8)
                }
            })
            .collect::<Result<_, _>>()?;
        let args = input
            .args
            .iter()
            .zip(&self.kinds)
            .map(|(a, k)| match a {
                Some(a) if a.data_type() != &k.read_type() => cast(a, &k.read_type()).map(Some),
                other => Ok(other.clone()),
            })
            .collect::<Result<_, _>>()?;
        Ok((keys, args))
    }

    /// A reader per call over the columns of [`WindowState::read_columns`].
    fn readers<'a>(&self, args: &'a [Option<ArrayRef>]) -> Vec<Reader<'a>> {
        args.iter()
            .zip(&self.kinds)
            .zip(&self.calls)
            .map(|((a, k), c)| Reader::new(a.as_ref(), *k, c.func == WindowFunc::Lag))
            .collect()
    }

    /// Compute the window columns of a batch, row by row in batch order, updating the state.
    pub fn process(&mut self, input: &WindowInput<'_>) -> Result<Vec<ArrayRef>, ArrowError> {
        if let Some(groups) = &self.peek_groups {
            return self.peek(input, groups);
        }
        let mut builders = self.builders(input.time.len());
        self.update(input, Some(&mut builders))?;
        Ok(builders.into_iter().map(Builder::finish).collect())
    }

    /// Add a batch's rows to the state exactly as [`WindowState::process`] does, without
    /// computing their results (rebuilding the state from stored history at start). Never peeks.
    pub fn record(&mut self, input: &WindowInput<'_>) -> Result<(), ArrowError> {
        self.update(input, None)
    }

    /// The longest frame of the calls (`lag` reaches back `engine.history`), in milliseconds;
    /// 0 without calls. Rows older than this plus the allowed lateness behind the newest row
    /// cannot matter to any row still to come.
    pub fn longest_ms(&self) -> i64 {
        self.longest_ms
    }

    /// Add rows to the state in batch order; with `builders`, append each row's results.
    fn update(
        &mut self,
        input: &WindowInput<'_>,
        mut builders: Option<&mut Vec<Builder>>,
    ) -> Result<(), ArrowError> {
        let n = input.time.len();
        let want = builders.is_some();
        let (keys, args) = self.read_columns(input)?;
        let keys: Vec<&StringArray> = keys
            .iter()
            .map(|k| {
                k.as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8")
            })
            .collect();
        let readers = self.readers(&args);
        let hasher = FixedHasher;

        for row in 0..n {
            self.seq += 1;
            let t = if input.time.is_null(row) {
                None
            } else {
                Some(input.time.value(row))
            };
            for (g, ks) in self.keys.iter_mut().enumerate() {
                if ks.calls.is_empty() {
                    continue;
                }
                let key = keys[g];
                let (Some(t), false) = (t, key.is_null(row)) else {
                    if let Some(b) = builders.as_deref_mut() {
                        for &c in &ks.calls {
                            b[c].push_empty(self.calls[c].func);
                        }
                    }
                    continue;
                };
                let k = key.value(row);
                let entity = match ks.entities.get_mut(k) {
                    Some(e) => e,
                    None => ks.entities.entry(k.into()).or_insert_with(|| Entity {
                        series: ks
                            .calls
                            .iter()
                            .map(|&c| Series::new(self.calls[c].func, self.kinds[c]))
                            .collect(),
                        head: i64::MIN,
                        last_seen: 0,
                    }),
                };
                entity.last_seen = self.seq;
                entity.head = entity.head.max(t);
                for (local, &c) in ks.calls.iter().enumerate() {
                    let v = readers[c].get(row, &hasher);
                    let out = entity.series[local].push(t, v, &self.calls[c], self.keep_ms, want);
                    if let Some(b) = builders.as_deref_mut() {
                        b[c].push(out);
                    }
                }
            }
        }
        self.rows_since_sweep += n;
        Ok(())
    }

    /// Evict entities whose newest row is older than `watermark - longest frame - lateness`
    /// (no row within the allowed lateness can reach them), then the least recently seen ones
    /// beyond the budget. Cheap to call often: it scans only after enough rows went by.
    pub fn evict(&mut self, watermark_ms: i64) {
        let total: usize = self.keys.iter().map(|k| k.entities.len()).sum();
        if self.rows_since_sweep < total.max(1024) && total <= self.max_entities {
            return;
        }
        self.rows_since_sweep = 0;
        let cutoff = watermark_ms
            .saturating_sub(self.longest_ms)
            .saturating_sub(self.keep_ms);
        for ks in &mut self.keys {
            let before = ks.entities.len();
            ks.entities.retain(|_, e| e.head >= cutoff);
            self.evicted_idle += (before - ks.entities.len()) as u64;
            if ks.entities.len() > self.max_entities {
                let mut seen: Vec<u64> = ks.entities.values().map(|e| e.last_seen).collect();
                let target = self.max_entities * 9 / 10;
                let drop = ks.entities.len() - target;
                let (_, nth, _) = seen.select_nth_unstable(drop - 1);
                let limit = *nth;
                let before = ks.entities.len();
                ks.entities.retain(|_, e| e.last_seen > limit);
                self.evicted_budget += (before - ks.entities.len()) as u64;
            }
        }
    }

    /// Current statistics.
    pub fn stats(&self) -> StateStats {
        StateStats {
            entities: self.keys.iter().map(|k| k.entities.len()).sum(),
            rows: self
                .keys
                .iter()
                .flat_map(|k| k.entities.values())
                .map(|e| e.series.iter().map(|s| s.rows.len()).sum::<usize>())
                .sum(),
            evicted_idle: self.evicted_idle,
            evicted_budget: self.evicted_budget,
        }
    }
}

/// Non-mutating evaluation, for online scoring (`POST /v1/score` with `record: false`).
impl WindowState {
    /// Whether [`WindowState::process`] only peeks (state left as it was).
    pub fn peeking(&self) -> bool {
        self.peek_groups.is_some()
    }

    /// Make the next [`WindowState::process`] calls evaluate without changing the state (see
    /// [`WindowState::peek`]), with `groups` as the rows' isolation groups; `None` goes back to
    /// recording.
    pub fn set_peek(&mut self, groups: Option<Vec<u32>>) {
        self.peek_groups = groups;
    }

    /// Compute the window columns of a batch exactly as [`WindowState::process`] would, without
    /// changing the state: every row is evaluated against a copy of its entity's series. Rows of
    /// the same group (consecutive equal values of `groups`, one per row; one request) see the
    /// earlier rows of their group as `process` would; rows of other groups never see each other.
    pub fn peek(
        &self,
        input: &WindowInput<'_>,
        groups: &[u32],
    ) -> Result<Vec<ArrayRef>, ArrowError> {
        let n = input.time.len();
        if groups.len() != n {
            return Err(ArrowError::InvalidArgumentError(format!(
                "peek: {} groups for {n} rows",
                groups.len()
            )));
        }
        let mut builders = self.builders(n);
        let (keys, args) = self.read_columns(input)?;
        let keys: Vec<&StringArray> = keys
            .iter()
            .map(|k| {
                k.as_any()
                    .downcast_ref::<StringArray>()
                    .expect("cast to Utf8")
            })
            .collect();
        let readers = self.readers(&args);
        let hasher = FixedHasher;
        // Copies of the entities the current group touched, per key.
        let mut scratch: Vec<HashMap<&str, Entity>> = vec![HashMap::new(); self.keys.len()];
        for row in 0..n {
            if row > 0 && groups[row] != groups[row - 1] {
                scratch.iter_mut().for_each(HashMap::clear);
            }
            let t = if input.time.is_null(row) {
                None
            } else {
                Some(input.time.value(row))
            };
            for (g, ks) in self.keys.iter().enumerate() {
                let key = keys[g];
                let (Some(t), false) = (t, key.is_null(row)) else {
                    for &c in &ks.calls {
                        builders[c].push_empty(self.calls[c].func);
                    }
                    continue;
                };
                let k = key.value(row);
                let entity = scratch[g]
                    .entry(k)
                    .or_insert_with(|| match ks.entities.get(k) {
                        Some(e) => e.clone(),
                        None => Entity {
                            series: ks
                                .calls
                                .iter()
                                .map(|&c| Series::new(self.calls[c].func, self.kinds[c]))
                                .collect(),
                            head: i64::MIN,
                            last_seen: 0,
                        },
                    });
                entity.head = entity.head.max(t);
                for (local, &c) in ks.calls.iter().enumerate() {
                    let v = readers[c].get(row, &hasher);
                    let out = entity.series[local].push(t, v, &self.calls[c], self.keep_ms, true);
                    builders[c].push(out);
                }
            }
        }
        Ok(builders.into_iter().map(Builder::finish).collect())
    }
}

/// A deterministic 64-bit hash (SipHash with fixed keys) for distinct counting: the same value
/// hashes the same in every batch and every run.
struct FixedHasher;

impl FixedHasher {
    fn hash(&self, s: &str) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        s.hash(&mut h);
        h.finish()
    }
}

enum Reader<'a> {
    None,
    Int(&'a Int64Array),
    Dec(&'a Decimal128Array),
    F64(&'a Float64Array),
    Time(&'a TimestampMillisecondArray),
    /// Text, and whether the text itself is kept (lag) or only its hash (distinct counts).
    Text(&'a StringArray, bool),
}

impl<'a> Reader<'a> {
    fn new(a: Option<&'a ArrayRef>, kind: ArgKind, keep_text: bool) -> Self {
        let Some(a) = a else { return Self::None };
        let any = a.as_any();
        match kind {
            ArgKind::None => Self::None,
            ArgKind::Int => Self::Int(any.downcast_ref().expect("cast to Int64")),
            ArgKind::Decimal(_) => Self::Dec(any.downcast_ref().expect("cast to Decimal128")),
            ArgKind::Float => Self::F64(any.downcast_ref().expect("cast to Float64")),
            ArgKind::Time => Self::Time(any.downcast_ref().expect("cast to Timestamp(ms)")),
            ArgKind::Text => Self::Text(any.downcast_ref().expect("cast to Utf8"), keep_text),
        }
    }

    fn get(&self, row: usize, hasher: &FixedHasher) -> Val {
        match self {
            Self::None => Val::Null,
            Self::Int(a) if !a.is_null(row) => Val::I(a.value(row) as i128),
            Self::Dec(a) if !a.is_null(row) => Val::I(a.value(row)),
            Self::F64(a) if !a.is_null(row) => Val::F(a.value(row)),
            Self::Time(a) if !a.is_null(row) => Val::I(a.value(row) as i128),
            Self::Text(a, keep) if !a.is_null(row) => {
                let s = a.value(row);
                Val::S(hasher.hash(s), keep.then(|| Arc::from(s)))
            }
            _ => Val::Null,
        }
    }
}

enum Builder {
    Int(Int64Builder),
    Dec(Decimal128Builder, u8, i8),
    F64(Float64Builder),
    Time(TimestampMillisecondBuilder),
    Text(datafusion::arrow::array::StringBuilder),
}

impl Builder {
    fn new(t: DataType, n: usize) -> Self {
        match t {
            DataType::Int64 => Self::Int(Int64Builder::with_capacity(n)),
            DataType::Decimal128(p, s) => Self::Dec(Decimal128Builder::with_capacity(n), p, s),
            DataType::Float64 => Self::F64(Float64Builder::with_capacity(n)),
            DataType::Timestamp(_, _) => Self::Time(TimestampMillisecondBuilder::with_capacity(n)),
            _ => Self::Text(datafusion::arrow::array::StringBuilder::with_capacity(
                n,
                n * 8,
            )),
        }
    }

    /// The result of a row without an entity: 0 for counts, NULL otherwise.
    fn push_empty(&mut self, func: WindowFunc) {
        match func {
            WindowFunc::CountStar | WindowFunc::Count | WindowFunc::CountDistinct => {
                self.push(Out::I(0))
            }
            _ => self.push(Out::Null),
        }
    }

    fn push(&mut self, out: Out) {
        match (self, out) {
            (Self::Int(b), Out::I(x)) => b.append_value(x as i64),
            (Self::Dec(b, _, _), Out::I(x)) => b.append_value(x),
            (Self::F64(b), Out::F(x)) => b.append_value(x),
            (Self::F64(b), Out::Avg(s, n)) => b.append_value(avg_of(s, n)),
            (Self::F64(b), Out::I(x)) => b.append_value(x as f64),
            (Self::Time(b), Out::I(x)) => b.append_value(x as i64),
            (Self::Text(b), Out::S(s)) => b.append_value(&*s),
            (Self::Int(b), _) => b.append_null(),
            (Self::Dec(b, _, _), _) => b.append_null(),
            (Self::F64(b), _) => b.append_null(),
            (Self::Time(b), _) => b.append_null(),
            (Self::Text(b), _) => b.append_null(),
        }
    }

    fn finish(self) -> ArrayRef {
        match self {
            Self::Int(mut b) => Arc::new(b.finish()),
            Self::Dec(mut b, p, s) => Arc::new(
                b.finish()
                    .with_precision_and_scale(p, s)
                    .expect("valid decimal type"),
            ),
            Self::F64(mut b) => Arc::new(b.finish()),
            Self::Time(mut b) => Arc::new(b.finish().with_timezone("UTC")),
            Self::Text(mut b) => Arc::new(b.finish()),
        }
    }
}

/// Average of an exact sum: the value's scale is applied by the caller's SQL (an average of a
/// decimal(18,2) column is returned in units, not cents; see [`avg_scale`]).
fn avg_of(sum: i128, n: i64) -> f64 {
    sum as f64 / n as f64
}

/// Divide an average computed on unscaled decimals by 10^scale.
pub fn avg_scale(v: f64, scale: i8) -> f64 {
    v / 10f64.powi(scale as i32)
}

/// Apply decimal scaling to average columns (the operator averages unscaled integers).
pub fn rescale_averages(
    columns: &mut [ArrayRef],
    calls: &[WindowCall],
    kinds: &[ArgKind],
) -> Result<(), ArrowError> {
    for ((col, call), kind) in columns.iter_mut().zip(calls).zip(kinds) {
        if let (WindowFunc::Avg, ArgKind::Decimal(s)) = (call.func, kind)
            && *s > 0
        {
            let a = col
                .as_any()
                .downcast_ref::<Float64Array>()
                .expect("averages are Float64");
            let scaled: Float64Array = a.iter().map(|v| v.map(|x| avg_scale(x, *s))).collect();
            *col = Arc::new(scaled);
        }
    }
    Ok(())
}

/// Append the window columns to a batch as `__w0`, `__w1`, ….
pub fn append_columns(
    batch: &RecordBatch,
    columns: Vec<ArrayRef>,
) -> Result<RecordBatch, ArrowError> {
    let mut fields: Vec<_> = batch.schema().fields().iter().cloned().collect();
    let mut cols = batch.columns().to_vec();
    for (i, c) in columns.into_iter().enumerate() {
        fields.push(Arc::new(datafusion::arrow::datatypes::Field::new(
            format!("__w{i}"),
            c.data_type().clone(),
            true,
        )));
        cols.push(c);
    }
    RecordBatch::try_new(
        Arc::new(datafusion::arrow::datatypes::Schema::new(fields)),
        cols,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(func: WindowFunc, range_ms: i64) -> WindowCall {
        WindowCall {
            func,
            arg: Some("x".into()),
            partition: "k".into(),
            range_ms,
        }
    }

    fn run(
        calls: Vec<WindowCall>,
        kinds: Vec<ArgKind>,
        rows: &[(&str, i64, Option<i64>)],
    ) -> Vec<ArrayRef> {
        let n_calls = calls.len();
        let mut st = WindowState::new(calls, kinds, &vec![0; n_calls], 1, 60_000, 1000);
        let time = TimestampMillisecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let keys: ArrayRef = Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ));
        let arg: ArrayRef = Arc::new(Int64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ));
        st.process(&WindowInput {
            time: &time,
            keys: vec![keys],
            args: vec![Some(arg); n_calls],
        })
        .unwrap()
    }

    #[test]
    fn counts_sums_and_lags_over_event_time_frames() {
        let rows = [
            ("a", 0, Some(1)),
            ("a", 5_000, Some(2)),
            ("b", 6_000, Some(10)),
            ("a", 10_000, None),
            ("a", 16_000, Some(4)),
            ("a", 4_000, Some(8)), // out of order: frame [-6s, 4s] holds rows at 0 and 4s
        ];
        let out = run(
            vec![
                call(WindowFunc::CountStar, 10_000),
                call(WindowFunc::Sum, 10_000),
                call(WindowFunc::Lag, 100_000),
                call(WindowFunc::Max, 10_000),
            ],
            vec![ArgKind::Int; 4],
            &rows,
        );
        let ints = |i: usize| {
            out[i]
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .iter()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ints(0),
            vec![Some(1), Some(2), Some(1), Some(3), Some(2), Some(2)]
        );
        assert_eq!(
            ints(1),
            vec![Some(1), Some(3), Some(10), Some(3), Some(4), Some(9)]
        );
        // lag: previous row by event time; the late row at 4s follows the row at 0.
        assert_eq!(ints(2), vec![None, Some(1), None, Some(2), None, Some(1)]);
        assert_eq!(
            ints(3),
            vec![Some(1), Some(2), Some(10), Some(2), Some(4), Some(8)]
        );
    }

    fn input_of(
        rows: &[(&str, i64, Option<i64>)],
    ) -> (TimestampMillisecondArray, ArrayRef, ArrayRef) {
        let time = TimestampMillisecondArray::from(rows.iter().map(|r| r.1).collect::<Vec<_>>());
        let keys: ArrayRef = Arc::new(StringArray::from(
            rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        ));
        let arg: ArrayRef = Arc::new(Int64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        ));
        (time, keys, arg)
    }

    fn all_calls() -> (Vec<WindowCall>, Vec<ArgKind>) {
        (
            vec![
                call(WindowFunc::CountStar, 10_000),
                call(WindowFunc::Sum, 10_000),
                call(WindowFunc::Lag, 100_000),
                call(WindowFunc::Max, 10_000),
                call(WindowFunc::CountDistinct, 10_000),
            ],
            vec![ArgKind::Int; 5],
        )
    }

    fn eval(
        st: &mut WindowState,
        rows: &[(&str, i64, Option<i64>)],
        peek: Option<&[u32]>,
    ) -> Vec<ArrayRef> {
        let (time, keys, arg) = input_of(rows);
        let input = WindowInput {
            time: &time,
            keys: vec![keys],
            args: vec![Some(arg); st.calls.len()],
        };
        match peek {
            Some(g) => st.peek(&input, g).unwrap(),
            None => st.process(&input).unwrap(),
        }
    }

    #[test]
    fn peek_leaves_the_state_unchanged_and_equals_a_recorded_evaluation() {
        let (calls, kinds) = all_calls();
        let mut st = WindowState::new(calls, kinds, &[0; 5], 1, 60_000, 1000);
        let history = [
            ("a", 0, Some(1)),
            ("a", 5_000, Some(2)),
            ("b", 6_000, Some(10)),
            ("a", 9_000, Some(7)),
        ];
        eval(&mut st, &history, None);
        let before = st.stats();
        // In order, out of order (late), a new entity, and a second row of the same entity.
        let probe = [
            ("a", 12_000, Some(5)),
            ("a", 3_000, Some(4)),
            ("c", 12_000, Some(3)),
            ("b", 14_000, Some(1)),
            ("b", 15_000, Some(1)),
        ];
        let one_group = [0u32; 5];
        let peeked = eval(&mut st, &probe, Some(&one_group));
        assert_eq!(st.stats(), before, "peek changed the state");
        // Peeking again gives the same (nothing was recorded the first time).
        assert_eq!(eval(&mut st, &probe, Some(&one_group)), peeked);
        // The switch through process() is the same evaluation.
        st.set_peek(Some(one_group.to_vec()));
        assert_eq!(eval(&mut st, &probe, None), peeked);
        st.set_peek(None);
        assert_eq!(st.stats(), before);
        // Recording the same rows gives the same results, and changes the state.
        let recorded = eval(&mut st, &probe, None);
        assert_eq!(recorded, peeked);
        assert_ne!(st.stats(), before);
    }

    #[test]
    fn record_then_process_equals_processing_everything() {
        let (calls, kinds) = all_calls();
        let rows = [
            ("a", 0, Some(1)),
            ("a", 5_000, Some(2)),
            ("b", 6_000, Some(10)),
            ("a", 9_000, Some(7)),
            ("a", 12_000, Some(5)),
            ("b", 14_000, None),
            ("a", 3_000, Some(4)),
        ];
        let mut all = WindowState::new(calls.clone(), kinds.clone(), &[0; 5], 1, 60_000, 1000);
        let expected = eval(&mut all, &rows, None);
        let mut warmed = WindowState::new(calls, kinds, &[0; 5], 1, 60_000, 1000);
        let (time, keys, arg) = input_of(&rows[..4]);
        warmed
            .record(&WindowInput {
                time: &time,
                keys: vec![keys],
                args: vec![Some(arg); 5],
            })
            .unwrap();
        let rest = eval(&mut warmed, &rows[4..], None);
        assert_eq!(warmed.stats(), all.stats());
        for (whole, tail) in expected.iter().zip(&rest) {
            assert_eq!(&whole.slice(4, 3), tail);
        }
        assert_eq!(warmed.longest_ms(), 100_000);
    }

    #[test]
    fn peek_groups_do_not_see_each_other() {
        let (calls, kinds) = all_calls();
        let mut st = WindowState::new(calls, kinds, &[0; 5], 1, 60_000, 1000);
        eval(&mut st, &[("a", 0, Some(1))], None);
        let rows = [("a", 1_000, Some(2)), ("a", 1_000, Some(2))];
        let separate = eval(&mut st, &rows, Some(&[0, 1]));
        let alone = eval(&mut st, &rows[..1], Some(&[0]));
        for (col, single) in separate.iter().zip(&alone) {
            assert_eq!(&col.slice(0, 1), single);
            assert_eq!(&col.slice(1, 1), single, "the second group saw the first");
        }
        let together = eval(&mut st, &rows, Some(&[0, 0]));
        let counts = together[0].as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(counts.values().to_vec(), vec![2, 3]);
    }
}
