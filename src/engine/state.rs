//! Incremental per-entity state of the window calls of `features.sql` (see [`super::windows`]).
//!
//! The calls are grouped by their partition key. For every (key, entity) an [`Entity`] keeps the
//! entity's rows once, sorted by event time, with one value slot per distinct argument of the
//! key's calls (`sum(amount)` over 1 hour and over 24 hours share the `amount` slot). Per frame
//! length the entity keeps where its head frame starts (shared by the calls over that length:
//! `count(*)` is the frame's rows and keeps nothing else), and each running call an aggregate
//! over it (`head` is the newest event time seen). A row that arrives in event-time order (the
//! normal case) appends to the rows, enters each frame, pushes the rows now too old out of it,
//! and reads each result in O(1) amortised: this is how Flink evaluates OVER windows. A row
//! older than `head` (out of order) is inserted at its place and its frames are aggregated by a
//! scan.
//!
//! History is kept for the key's longest frame plus the allowed lateness behind `head` (and, for
//! `lag`, the last row before the lateness bound), so every row within the allowed lateness sees
//! exactly the rows its frame asks for; entities idle for longer than the longest frame plus the
//! lateness are evicted, and a budget bounds the number of entities kept. Keys are hashed with
//! foldhash (randomly seeded: entity ids come from the outside).

use std::collections::{HashMap, VecDeque};
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

/// One value of a row's argument, as read from its column or decoded from the rows kept.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    /// Integers, timestamps (ms) and unscaled decimals that fit 64 bits.
    I(i64),
    /// Unscaled decimals beyond 64 bits.
    Wide(i128),
    F(f64),
    /// Text, as its hash (distinct counting).
    H(u64),
    /// Text, kept (lag).
    S(Arc<Box<str>>),
}

impl Val {
    /// The exact integer of an integer, timestamp or decimal value.
    fn int(&self) -> Option<i128> {
        match self {
            Self::I(x) => Some(*x as i128),
            Self::Wide(x) => Some(*x),
            _ => None,
        }
    }

    /// The identity of a value for distinct counting (integers exactly, floats by their bits
    /// with -0 as 0, text by a fixed 64-bit hash).
    fn distinct_key(&self) -> Option<u64> {
        match self {
            Self::Null => None,
            Self::I(x) => Some(*x as u64),
            Self::Wide(x) => Some(text_hash_bytes(&x.to_le_bytes())),
            Self::F(x) => Some((*x + 0.0).to_bits()),
            Self::H(h) => Some(*h),
            Self::S(s) => Some(text_hash(s)),
        }
    }
}

/// Distinct values of a frame with their multiplicity: one value kept inline (the common case,
/// one merchant or device per card), a short list when there are more, and a hash map when it
/// grows.
#[derive(Debug, Clone)]
enum Distinct {
    One(u64, u32),
    Few(Vec<(u64, u32)>),
    // Boxed so that a state is 32 bytes, not 48: the map is rare, the states are not.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<u64, u32, foldhash::fast::FixedState>>),
}

impl Distinct {
    const FEW: usize = 24;

    fn add(&mut self, k: u64) {
        match self {
            Self::One(k0, c) if *k0 == k => *c += 1,
            Self::One(k0, c) => *self = Self::Few(vec![(*k0, *c), (k, 1)]),
            Self::Few(v) if v.is_empty() => *self = Self::One(k, 1),
            Self::Few(v) => {
                if let Some(e) = v.iter_mut().find(|e| e.0 == k) {
                    e.1 += 1;
                } else if v.len() < Self::FEW {
                    v.push((k, 1));
                } else {
                    let mut m: HashMap<u64, u32, _> =
                        HashMap::with_capacity_and_hasher(v.len() * 2, Default::default());
                    m.extend(v.iter().copied());
                    m.insert(k, 1);
                    *self = Self::Many(Box::new(m));
                }
            }
            Self::Many(m) => *m.entry(k).or_insert(0) += 1,
        }
    }

    fn remove(&mut self, k: u64) {
        match self {
            Self::One(k0, c) if *k0 == k => {
                *c -= 1;
                if *c == 0 {
                    *self = Self::Few(Vec::new());
                }
            }
            Self::One(..) => {}
            Self::Few(v) => {
                if let Some(i) = v.iter().position(|e| e.0 == k) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.swap_remove(i);
                    }
                }
            }
            Self::Many(m) => {
                if let Some(c) = m.get_mut(&k) {
                    *c -= 1;
                    if *c == 0 {
                        m.remove(&k);
                    }
                }
            }
        }
    }

    fn contains(&self, k: u64) -> bool {
        match self {
            Self::One(k0, _) => *k0 == k,
            Self::Few(v) => v.iter().any(|e| e.0 == k),
            Self::Many(m) => m.contains_key(&k),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::One(..) => 1,
            Self::Few(v) => v.len(),
            Self::Many(m) => m.len(),
        }
    }
}

/// An exact sum kept as two 64-bit halves: an `i128` field would align the states to 16
/// bytes and make them larger.
#[derive(Debug, Clone, Copy, Default)]
struct Sum {
    lo: u64,
    hi: i64,
}

impl Sum {
    fn get(self) -> i128 {
        ((self.hi as i128) << 64) | self.lo as i128
    }

    fn add(&mut self, x: i128) {
        let v = self.get() + x;
        *self = Self {
            lo: v as u64,
            hi: (v >> 64) as i64,
        };
    }
}

/// How a call is evaluated for a row that arrives in event-time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eval {
    /// `count(*)` over a frame: the rows from the frame's start (the entity's state `start`) on.
    Rows { start: usize },
    /// A running aggregate, the entity's state `state`.
    State { state: usize },
    /// By scanning the frame (float sums, min, max, lag).
    Scan,
}

/// The running calls of a key over one frame length: they share where the frame starts, so a
/// row entering or leaving it is handled once for all of them.
#[derive(Debug)]
struct FrameSpec {
    range_ms: i64,
    /// The entity's state holding the frame's first row ([`State::Start`]).
    start: usize,
    /// The running aggregates over the frame: their state and the slot of their argument.
    aggs: Vec<(usize, Option<usize>)>,
}

/// One of an entity's running states (their layout per key is [`KeySpec::init`]).
#[derive(Debug, Clone)]
enum State {
    /// Index of the first row of a head frame.
    Start(u32),
    /// Non-null values in the frame and their exact integer sum (`count(x)`, `sum`, `avg`).
    Exact { values: u32, sum: Sum },
    /// Distinct values of the frame with their multiplicity (`count(DISTINCT x)`).
    Distinct(Distinct),
}

// States are what a row's frames touch: keep them two to a cache line.
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<State>() == 32);

impl State {
    /// How a call is kept: `None` when it is computed by scanning (floats, min, max, lag),
    /// `Some(None)` for `count(*)` (the frame's rows: no state of its own), otherwise its state.
    fn of(func: WindowFunc, kind: ArgKind) -> Option<Option<Self>> {
        match (func, kind) {
            (WindowFunc::CountStar, _) => Some(None),
            (WindowFunc::CountDistinct, _) => Some(Some(Self::Distinct(Distinct::Few(Vec::new())))),
            (WindowFunc::Count, _)
            | (WindowFunc::Sum | WindowFunc::Avg, ArgKind::Int | ArgKind::Decimal(_)) => {
                Some(Some(Self::Exact {
                    values: 0,
                    sum: Sum::default(),
                }))
            }
            _ => None,
        }
    }

    fn start(&self) -> u32 {
        match self {
            Self::Start(s) => *s,
            _ => unreachable!("a frame's start state"),
        }
    }

    fn start_mut(&mut self) -> &mut u32 {
        match self {
            Self::Start(s) => s,
            _ => unreachable!("a frame's start state"),
        }
    }

    /// Count the value of slot `slot` of row `i` into the aggregate (`add`) or out of it.
    #[inline]
    fn shift(&mut self, rows: &Rows, i: usize, slot: Option<usize>, spec: &KeySpec, add: bool) {
        let Some(s) = slot else { return };
        match self {
            Self::Exact { values, sum } => {
                if rows.is_null(i, s, spec) {
                    return;
                }
                *values = if add { *values + 1 } else { *values - 1 };
                if let Some(x) = rows.int(i, s, spec) {
                    sum.add(if add { x } else { -x });
                }
            }
            Self::Distinct(d) => {
                if let Some(k) = rows.distinct_key(i, s, spec) {
                    if add { d.add(k) } else { d.remove(k) }
                }
            }
            Self::Start(_) => unreachable!("a frame's start has no values"),
        }
    }

    fn result(&self, func: WindowFunc) -> Out {
        match (self, func) {
            (Self::Exact { values, .. }, WindowFunc::Count) => Out::I(*values as i128),
            (Self::Exact { values: 0, .. }, WindowFunc::Sum | WindowFunc::Avg) => Out::Null,
            (Self::Exact { sum, .. }, WindowFunc::Sum) => Out::I(sum.get()),
            (Self::Exact { values, sum }, WindowFunc::Avg) => Out::Avg(sum.get(), *values as i64),
            (Self::Distinct(d), _) => Out::I(d.len() as i128),
            _ => unreachable!("running aggregates exist only for these calls"),
        }
    }
}

/// How a slot's values are stored in their row word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Integers, timestamps (ms) and unscaled decimals that fit 64 bits (wider ones are boxed).
    Int,
    /// Floats, by their bits.
    Float,
    /// Text as its hash (distinct counting).
    Hash,
    /// Text kept (lag): always boxed.
    Text,
}

impl Stored {
    fn of(kind: ArgKind, keeps_text: bool) -> Self {
        match kind {
            ArgKind::Float => Self::Float,
            ArgKind::Text if keeps_text => Self::Text,
            ArgKind::Text => Self::Hash,
            ArgKind::None | ArgKind::Int | ArgKind::Decimal(_) | ArgKind::Time => Self::Int,
        }
    }
}

/// A value too wide for a row word.
#[derive(Debug, Clone)]
enum Boxed {
    Wide(i128),
    Text(Arc<Box<str>>),
}

/// An entity's boxed values, by number (numbered in the order they were stored, so sorted).
#[derive(Debug, Clone, Default)]
struct Boxes {
    next: u64,
    vals: VecDeque<(u64, Boxed)>,
}

/// An entity's rows, sorted by event time (equal times in arrival order), in one ring of 64-bit
/// words, [`KeySpec::stride`] words a row: its event time, the flag words (per slot a NULL bit,
/// and above them a bit saying the word is the number of a boxed value), then one word per slot.
/// A row of four slots takes 48 bytes, where an enum per value took 16 bytes a slot plus the
/// time: fewer cache lines to bring in per row, and more of the state fits in cache.
#[derive(Debug, Clone, Default)]
struct Rows {
    words: VecDeque<u64>,
    boxes: Option<Box<Boxes>>,
}

impl Rows {
    fn len(&self, spec: &KeySpec) -> usize {
        self.words.len() / spec.stride
    }

    fn time(&self, i: usize, spec: &KeySpec) -> i64 {
        self.words[i * spec.stride] as i64
    }

    /// The first row whose event time fails `pred` (true for a prefix of the rows).
    fn partition_point(&self, spec: &KeySpec, pred: impl Fn(i64) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len(spec));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.time(mid, spec)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The value of slot `slot` of row `i`.
    fn val(&self, i: usize, slot: usize, spec: &KeySpec) -> Val {
        let base = i * spec.stride;
        let flags = self.words[base + 1 + slot / 32] >> (slot % 32);
        if flags & 1 != 0 {
            return Val::Null;
        }
        let w = self.words[base + 1 + spec.flag_words + slot];
        if flags & (1 << 32) != 0 {
            let boxes = self.boxes.as_ref().expect("a boxed value has a box");
            let at = boxes.vals.partition_point(|e| e.0 < w);
            return match &boxes.vals[at].1 {
                Boxed::Wide(x) => Val::Wide(*x),
                Boxed::Text(s) => Val::S(s.clone()),
            };
        }
        match spec.stored[slot] {
            Stored::Int => Val::I(w as i64),
            Stored::Float => Val::F(f64::from_bits(w)),
            Stored::Hash => Val::H(w),
            Stored::Text => unreachable!("kept text is boxed"),
        }
    }

    /// Whether slot `slot` of row `i` is NULL.
    #[inline]
    fn is_null(&self, i: usize, slot: usize, spec: &KeySpec) -> bool {
        (self.words[i * spec.stride + 1 + slot / 32] >> (slot % 32)) & 1 != 0
    }

    /// The exact integer of slot `slot` of row `i` (an integer, timestamp or decimal slot),
    /// `None` when it is NULL or holds no integer. Reads the row word unless the value is boxed.
    #[inline]
    fn int(&self, i: usize, slot: usize, spec: &KeySpec) -> Option<i128> {
        let base = i * spec.stride;
        let flags = self.words[base + 1 + slot / 32] >> (slot % 32);
        match (flags & 1 != 0, flags & (1 << 32) != 0, spec.stored[slot]) {
            (true, _, _) => None,
            (false, false, Stored::Int) => {
                Some(self.words[base + 1 + spec.flag_words + slot] as i64 as i128)
            }
            (false, false, _) => None,
            (false, true, _) => self.val(i, slot, spec).int(),
        }
    }

    /// The identity of slot `slot` of row `i` for distinct counting ([`Val::distinct_key`]),
    /// `None` when it is NULL. Reads the row word unless the value is boxed.
    #[inline]
    fn distinct_key(&self, i: usize, slot: usize, spec: &KeySpec) -> Option<u64> {
        let base = i * spec.stride;
        let flags = self.words[base + 1 + slot / 32] >> (slot % 32);
        if flags & 1 != 0 {
            return None;
        }
        if flags & (1 << 32) != 0 {
            return self.val(i, slot, spec).distinct_key();
        }
        let w = self.words[base + 1 + spec.flag_words + slot];
        Some(match spec.stored[slot] {
            Stored::Int | Stored::Hash => w,
            Stored::Float => (f64::from_bits(w) + 0.0).to_bits(),
            Stored::Text => unreachable!("kept text is boxed"),
        })
    }

    /// The words of row `row` of the batch (event time `t`, its slot values read by `readers`)
    /// in `enc`; its boxed values are stored.
    fn encode(
        &mut self,
        t: i64,
        row: usize,
        readers: &[Reader<'_>],
        spec: &KeySpec,
        enc: &mut Vec<u64>,
    ) {
        enc.clear();
        enc.push(t as u64);
        enc.extend(std::iter::repeat_n(0, spec.flag_words));
        for (j, &c) in spec.slot_reader.iter().enumerate() {
            let (word, flag) = readers[c].word(row, self);
            enc[1 + j / 32] |= flag << (j % 32);
            enc.push(word);
        }
    }

    fn store(&mut self, b: Boxed) -> u64 {
        let boxes = self.boxes.get_or_insert_default();
        let id = boxes.next;
        boxes.next += 1;
        boxes.vals.push_back((id, b));
        id
    }

    /// Insert an encoded row before row `pos`.
    fn insert(&mut self, pos: usize, enc: &[u64], spec: &KeySpec) {
        self.words.extend(enc.iter().copied());
        self.words.make_contiguous()[pos * spec.stride..].rotate_right(enc.len());
    }

    /// Forget the oldest row, and its boxed values.
    fn pop_front(&mut self, spec: &KeySpec) {
        let Self { words, boxes } = self;
        if let Some(b) = boxes.as_deref_mut() {
            for f in 0..spec.flag_words {
                let mut boxed = words[1 + f] >> 32;
                while boxed != 0 {
                    let j = f * 32 + boxed.trailing_zeros() as usize;
                    boxed &= boxed - 1;
                    let id = words[1 + spec.flag_words + j];
                    if let Ok(at) = b.vals.binary_search_by_key(&id, |e| e.0) {
                        b.vals.remove(at);
                    }
                }
            }
        }
        words.drain(..spec.stride);
    }

    fn heap_bytes(&self) -> usize {
        self.words.capacity() * std::mem::size_of::<u64>()
            + self.boxes.as_ref().map_or(0, |b| {
                std::mem::size_of::<Boxes>()
                    + b.vals.capacity() * std::mem::size_of::<(u64, Boxed)>()
                    + b.vals
                        .iter()
                        .map(|(_, v)| match v {
                            Boxed::Wide(_) => 0,
                            Boxed::Text(s) => s.len(),
                        })
                        .sum::<usize>()
            })
    }
}

/// An entity of one key: its rows, shared by every call partitioned by that key, and its running
/// states (the key's frames and running aggregates, [`KeySpec::init`]). One cache line (its
/// last-seen sequence number is kept beside it, in [`KeyState::seen`]).
#[derive(Debug, Clone)]
#[repr(align(64))]
struct Entity {
    rows: Rows,
    states: Box<[State]>,
    /// Newest event time seen.
    head: i64,
}

#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Entity>() == 64);

impl Entity {
    fn new(spec: &KeySpec) -> Self {
        Self {
            rows: Rows::default(),
            states: spec.init.clone().into_boxed_slice(),
            head: i64::MIN,
        }
    }

    /// Insert row `row` of the batch (event time `t`, its slot values read by `readers`; `enc`
    /// is scratch) and emit each call's result for it, in the key's call order.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        t: i64,
        row: usize,
        readers: &[Reader<'_>],
        enc: &mut Vec<u64>,
        spec: &KeySpec,
        calls: &[WindowCall],
        keep_ms: i64,
        mut emit: impl FnMut(usize, Out),
    ) {
        let Self { rows, states, head } = self;
        rows.encode(t, row, readers, spec, enc);
        if rows.words.capacity() == 0 {
            // Room for a few rows at once: growing a row at a time from nothing reallocates
            // (and copies) the rows of every new entity several times.
            rows.words.reserve_exact(4 * spec.stride);
        }
        let in_order = t >= *head;
        let pos = if in_order {
            rows.words.extend(enc.iter().copied());
            *head = t;
            rows.len(spec) - 1
        } else {
            let pos = rows.partition_point(spec, |rt| rt <= t);
            rows.insert(pos, enc, spec);
            pos
        };
        let head = *head;
        let n = rows.len(spec);
        // The frames: the row enters each head frame it falls in, and in order, the rows now
        // older than a frame leave it.
        for f in &spec.frames {
            let mut start = states[f.start].start() as usize;
            if in_order {
                for &(s, slot) in &f.aggs {
                    states[s].shift(rows, pos, slot, spec, true);
                }
                while start < n && rows.time(start, spec) < t - f.range_ms {
                    for &(s, slot) in &f.aggs {
                        states[s].shift(rows, start, slot, spec, false);
                    }
                    start += 1;
                }
            } else if t >= head - f.range_ms {
                for &(s, slot) in &f.aggs {
                    states[s].shift(rows, pos, slot, spec, true);
                }
            } else {
                // Before the head frame: it shifts the frame's first row by one.
                start += 1;
            }
            *states[f.start].start_mut() = start as u32;
        }
        for (local, &c) in spec.calls.iter().enumerate() {
            let call = &calls[c];
            let out = match spec.eval[local] {
                Eval::Rows { start } if t == head => {
                    Out::I((n - states[start].start() as usize) as i128)
                }
                Eval::State { state } if t == head => states[state].result(call.func),
                _ => {
                    let slot = spec.slot_of[local];
                    let value = |i: usize| slot.map_or(Val::Null, |s| rows.val(i, s, spec));
                    scan(rows, spec, pos, t, call, value)
                }
            };
            emit(local, out);
        }
        // Forget rows no row within the allowed lateness can need any more: older than every
        // frame (and, for lag, not the last row before the lateness bound).
        let cutoff = head - spec.frame_ms - keep_ms;
        let lag_bound = head - keep_ms;
        while rows.len(spec) > 0 {
            if rows.time(0, spec) >= cutoff
                || (spec.has_lag && (rows.len(spec) < 2 || rows.time(1, spec) > lag_bound))
                || spec.frames.iter().any(|f| states[f.start].start() == 0)
            {
                break;
            }
            rows.pop_front(spec);
            for f in &spec.frames {
                *states[f.start].start_mut() -= 1;
            }
        }
    }
}

/// Aggregate the frame `[t - range, t]` of the row at `pos` by scanning.
fn scan(
    rows: &Rows,
    spec: &KeySpec,
    pos: usize,
    t: i64,
    call: &WindowCall,
    value: impl Fn(usize) -> Val,
) -> Out {
    if call.func == WindowFunc::Lag {
        return match pos.checked_sub(1) {
            Some(p) if rows.time(p, spec) >= t - call.range_ms => Out::from_val(&value(p)),
            _ => Out::Null,
        };
    }
    let lo = rows.partition_point(spec, |rt| rt < t - call.range_ms);
    let mut count = 0i64;
    let mut values = 0i64;
    let mut isum = 0i128;
    let mut fsum = 0f64;
    let mut min: Option<Val> = None;
    let mut max: Option<Val> = None;
    let mut distinct = Distinct::Few(Vec::new());
    for i in lo..=pos {
        let v = value(i);
        count += 1;
        match &v {
            Val::Null => continue,
            Val::F(x) => fsum += x,
            other => {
                if let Some(x) = other.int() {
                    isum += x;
                }
            }
        }
        if call.func == WindowFunc::CountDistinct
            && let Some(k) = v.distinct_key()
            && !distinct.contains(k)
        {
            distinct.add(k);
        }
        values += 1;
        if min.as_ref().is_none_or(|m| val_lt(&v, m)) {
            min = Some(v.clone());
        }
        if max.as_ref().is_none_or(|m| val_lt(m, &v)) {
            max = Some(v);
        }
    }
    let float = matches!(min, Some(Val::F(_)));
    match call.func {
        WindowFunc::CountStar => Out::I(count as i128),
        WindowFunc::Count => Out::I(values as i128),
        WindowFunc::CountDistinct => Out::I(distinct.len() as i128),
        _ if values == 0 => Out::Null,
        WindowFunc::Sum if float => Out::F(fsum),
        WindowFunc::Sum => Out::I(isum),
        WindowFunc::Avg if float => Out::F(fsum / values as f64),
        WindowFunc::Avg => Out::Avg(isum, values),
        WindowFunc::Min => min.as_ref().map_or(Out::Null, Out::from_val),
        WindowFunc::Max => max.as_ref().map_or(Out::Null, Out::from_val),
        WindowFunc::Lag => unreachable!("handled above"),
        WindowFunc::FraudLabels | WindowFunc::KnownLabels => {
            unreachable!("label calls are evaluated by the label store")
        }
    }
}

fn val_lt(a: &Val, b: &Val) -> bool {
    match (a, b) {
        (Val::F(x), Val::F(y)) => x < y,
        _ => match (a.int(), b.int()) {
            (Some(x), Some(y)) => x < y,
            _ => false,
        },
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
    S(Arc<Box<str>>),
}

impl Out {
    fn from_val(v: &Val) -> Self {
        match v {
            Val::Null | Val::H(_) => Self::Null,
            Val::F(x) => Self::F(*x),
            Val::S(s) => Self::S(s.clone()),
            other => other.int().map_or(Self::Null, Self::I),
        }
    }
}

/// The calls partitioned by one key, and how their arguments share the key's row slots.
#[derive(Debug)]
struct KeySpec {
    /// Calls (indices into `calls`) partitioned by this key.
    calls: Vec<usize>,
    /// Per call of the key: the row slot holding its argument (None for `count(*)`).
    slot_of: Vec<Option<usize>>,
    /// Per slot: the call whose argument column fills it (calls with the same argument share).
    slot_reader: Vec<usize>,
    /// Per slot: how its values are stored.
    stored: Vec<Stored>,
    /// Per call of the key: how it is evaluated for a row in event-time order.
    eval: Vec<Eval>,
    /// The frames of the key's running calls, one per frame length.
    frames: Vec<FrameSpec>,
    /// The running states of a new entity: the frames' starts and the running aggregates.
    init: Vec<State>,
    /// Flag words of a row: one per 32 slots.
    flag_words: usize,
    /// Words of a row: its time, the flag words and the slots.
    stride: usize,
    /// Longest frame of the key's calls other than lag.
    frame_ms: i64,
    /// Whether a lag call reads the key's rows.
    has_lag: bool,
}

/// An id used as a map key, kept inline when at most `N` bytes long (entity ids are), so that
/// the map's probe compares it without following a pointer and storing it allocates nothing.
#[derive(Debug, Clone)]
enum InlineKey<const N: usize> {
    Inline { len: u8, bytes: [u8; N] },
    Heap(Box<[u8]>),
}

/// An entity id.
type EntityKey = InlineKey<22>;

impl<const N: usize> InlineKey<N> {
    fn new(k: &[u8]) -> Self {
        const { assert!(N <= u8::MAX as usize, "the inline length is a u8") };
        if k.len() <= N {
            let mut bytes = [0; N];
            bytes[..k.len()].copy_from_slice(k);
            Self::Inline {
                len: k.len() as u8,
                bytes,
            }
        } else {
            Self::Heap(k.into())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..*len as usize],
            Self::Heap(b) => b,
        }
    }

    /// Heap bytes it holds.
    fn heap_bytes(&self) -> usize {
        match self {
            Self::Heap(b) => b.len(),
            Self::Inline { .. } => 0,
        }
    }
}

impl<const N: usize> PartialEq for InlineKey<N> {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl<const N: usize> Eq for InlineKey<N> {}

/// Hashes as its bytes do, so that a map of them is probed with a `&[u8]`.
impl<const N: usize> std::hash::Hash for InlineKey<N> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state)
    }
}

impl<const N: usize> std::borrow::Borrow<[u8]> for InlineKey<N> {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

/// One key's calls and entities. The entities live in one vector, found through `index` by
/// their id: a batch first finds the entity of each of its rows (independent probes the CPU
/// overlaps), then updates them in row order with the next rows' entities prefetched.
#[derive(Debug)]
struct KeyState {
    spec: KeySpec,
    index: HashMap<EntityKey, u32, foldhash::fast::RandomState>,
    entities: Vec<Entity>,
    /// Per entity: the sequence number of the last row that touched it (for the budget's LRU
    /// eviction). Apart from the entities, so that they fit a cache line and these stay in
    /// cache.
    seen: Vec<u64>,
}

/// A row without an entity (NULL key or NULL event time) in [`KeyState::locate`]'s output.
const NO_ENTITY: u32 = u32::MAX;

/// How many rows ahead [`WindowState::update`] prefetches an entity's record. Its buffers are
/// prefetched two thirds as far ahead (once the record is in cache), and what its states
/// point to one third as far ahead (once those are).
const PREFETCH_ROWS: usize = 12;

impl KeyState {
    /// The entity of each row of `key` (created when new), or [`NO_ENTITY`] where the key or
    /// the event time is NULL.
    fn locate(&mut self, key: &StringArray, time: &TimestampMillisecondArray, out: &mut Vec<u32>) {
        out.clear();
        out.extend((0..key.len()).map(|row| {
            if key.is_null(row) || time.is_null(row) {
                return NO_ENTITY;
            }
            let k = key.value(row).as_bytes();
            match self.index.get(k) {
                Some(&i) => i,
                None => {
                    let i = u32::try_from(self.entities.len()).expect("fewer than 2^32 entities");
                    self.entities.push(Entity::new(&self.spec));
                    self.seen.push(0);
                    self.index.insert(EntityKey::new(k), i);
                    i
                }
            }
        }));
    }

    /// Keep the entities `keep` says to keep (given each with its last-seen sequence number);
    /// returns how many went.
    fn retain(&mut self, keep: impl Fn(&Entity, u64) -> bool) -> usize {
        // Entities keep their order, so the new index of one is the number kept before it.
        let mut kept = 0;
        let moved: Vec<u32> = self
            .entities
            .iter()
            .zip(&self.seen)
            .map(|(e, &seen)| {
                if keep(e, seen) {
                    kept += 1;
                    kept - 1
                } else {
                    NO_ENTITY
                }
            })
            .collect();
        let gone = self.entities.len() - kept as usize;
        if gone == 0 {
            return 0;
        }
        let mut to = moved.iter();
        self.entities
            .retain(|_| *to.next().expect("one index per entity") != NO_ENTITY);
        let mut to = moved.iter();
        self.seen
            .retain(|_| *to.next().expect("one index per entity") != NO_ENTITY);
        self.index.retain(|_, i| {
            *i = moved[*i as usize];
            *i != NO_ENTITY
        });
        gone
    }

    fn get(&self, k: &str) -> Option<&Entity> {
        self.index
            .get(k.as_bytes())
            .map(|&i| &self.entities[i as usize])
    }
}

/// Ask the CPU to bring the cache line at `p` in (a hint: any address is fine, nothing is read).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and reads nothing into the program; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Entity {
    /// Prefetch the record of the entity itself.
    #[inline(always)]
    fn prefetch_record(this: *const Self) {
        prefetch(this);
    }

    /// Prefetch the buffers the next [`Entity::push`] reads first: the end of the rows (where
    /// the row goes) and its running states.
    #[inline(always)]
    fn prefetch_buffers(&self, spec: &KeySpec) {
        if let Some(w) = self.rows.words.back() {
            let w: *const u64 = w;
            prefetch(w);
            prefetch(w.wrapping_add(spec.stride));
        }
        let states = self.states.as_ptr().cast::<u8>();
        for line in (0..std::mem::size_of_val(&self.states[..])).step_by(64) {
            prefetch(states.wrapping_add(line));
        }
    }

    /// Prefetch what the running states point to: the first row of each head frame (which the
    /// next row may push out) and the distinct lists.
    #[inline(always)]
    fn prefetch_frames(&self, spec: &KeySpec) {
        let words = &self.rows.words;
        for st in &self.states {
            match st {
                State::Distinct(Distinct::Few(v)) => prefetch(v.as_ptr()),
                State::Start(start) => {
                    let first = *start as usize * spec.stride;
                    if let Some(w) = words.get(first) {
                        prefetch(w);
                    }
                    if let Some(w) = words.get(first + spec.stride - 1) {
                        prefetch(w);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Statistics of the state, for metrics and the memory benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Entities tracked, over all keys.
    pub entities: usize,
    /// Rows kept, over all entities (a row is kept once per key, for all the key's calls).
    pub rows: usize,
    /// Entities evicted for being idle.
    pub evicted_idle: u64,
    /// Entities evicted to stay within the budget.
    pub evicted_budget: u64,
    /// Heap bytes the state holds (rows, keys, running aggregates, maps), counted from their
    /// capacities.
    pub bytes: usize,
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
                spec: KeySpec {
                    calls: Vec::new(),
                    slot_of: Vec::new(),
                    slot_reader: Vec::new(),
                    stored: Vec::new(),
                    eval: Vec::new(),
                    frames: Vec::new(),
                    init: Vec::new(),
                    flag_words: 0,
                    stride: 1,
                    frame_ms: 0,
                    has_lag: false,
                },
                index: HashMap::default(),
                entities: Vec::new(),
                seen: Vec::new(),
            })
            .collect();
        for (i, k) in call_key.iter().enumerate() {
            let ks = &mut keys[*k].spec;
            let call = &calls[i];
            ks.calls.push(i);
            if call.func == WindowFunc::Lag {
                ks.has_lag = true;
            } else {
                ks.frame_ms = ks.frame_ms.max(call.range_ms);
            }
            // Calls of one key over the same argument (and the same way of keeping text) share
            // its slot.
            let keeps_text = |c: usize| calls[c].func == WindowFunc::Lag;
            let slot = match (&call.arg, kinds[i]) {
                (_, ArgKind::None) | (None, _) => None,
                (Some(arg), kind) => Some(
                    ks.slot_reader
                        .iter()
                        .position(|&r| {
                            calls[r].arg.as_ref() == Some(arg)
                                && kinds[r] == kind
                                && (kind != ArgKind::Text || keeps_text(r) == keeps_text(i))
                        })
                        .unwrap_or_else(|| {
                            ks.slot_reader.push(i);
                            ks.stored.push(Stored::of(kind, keeps_text(i)));
                            ks.slot_reader.len() - 1
                        }),
                ),
            };
            ks.slot_of.push(slot);
            let eval = match State::of(call.func, kinds[i]) {
                None => Eval::Scan,
                Some(state) => {
                    let f = match ks.frames.iter().position(|f| f.range_ms == call.range_ms) {
                        Some(f) => f,
                        None => {
                            ks.init.push(State::Start(0));
                            ks.frames.push(FrameSpec {
                                range_ms: call.range_ms,
                                start: ks.init.len() - 1,
                                aggs: Vec::new(),
                            });
                            ks.frames.len() - 1
                        }
                    };
                    match state {
                        None => Eval::Rows {
                            start: ks.frames[f].start,
                        },
                        Some(state) => {
                            ks.init.push(state);
                            ks.frames[f].aggs.push((ks.init.len() - 1, slot));
                            Eval::State {
                                state: ks.init.len() - 1,
                            }
                        }
                    }
                }
            };
            ks.eval.push(eval);
        }
        for k in &mut keys {
            let ks = &mut k.spec;
            ks.flag_words = ks.slot_reader.len().div_ceil(32);
            ks.stride = 1 + ks.flag_words + ks.slot_reader.len();
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

    /// Longest frame of the calls (lag: the kept history).
    pub fn longest_ms(&self) -> i64 {
        self.longest_ms
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
    /// keeping their results (rebuilding the state from stored history at start). Never peeks.
    pub fn record(&mut self, input: &WindowInput<'_>) -> Result<(), ArrowError> {
        self.update(input, None)
    }

    /// Add rows to the state in batch order; with `builders`, append each row's results.
    fn update(
        &mut self,
        input: &WindowInput<'_>,
        mut builders: Option<&mut Vec<Builder>>,
    ) -> Result<(), ArrowError> {
        let n = input.time.len();
        let (keys, args) = self.read_columns(input)?;
        let keys = utf8_keys(&keys);
        let readers = self.readers(&args);
        let mut enc: Vec<u64> = Vec::new();
        let mut located: Vec<u32> = Vec::with_capacity(n);
        // Keys are independent: each key's rows are processed in row order, key after key.
        let first_seq = self.seq + 1;
        self.seq += n as u64;
        for (g, ks) in self.keys.iter_mut().enumerate() {
            if ks.spec.calls.is_empty() {
                continue;
            }
            ks.locate(keys[g], input.time, &mut located);
            let KeyState {
                spec,
                entities,
                seen,
                ..
            } = ks;
            for row in 0..n {
                if let Some(&ahead) = located.get(row + PREFETCH_ROWS)
                    && ahead != NO_ENTITY
                {
                    Entity::prefetch_record(entities.as_ptr().wrapping_add(ahead as usize));
                }
                if let Some(&ahead) = located.get(row + PREFETCH_ROWS * 2 / 3)
                    && ahead != NO_ENTITY
                {
                    entities[ahead as usize].prefetch_buffers(spec);
                }
                if let Some(&ahead) = located.get(row + PREFETCH_ROWS / 3)
                    && ahead != NO_ENTITY
                {
                    entities[ahead as usize].prefetch_frames(spec);
                }
                let i = located[row];
                if i == NO_ENTITY {
                    if let Some(b) = builders.as_deref_mut() {
                        for &c in &spec.calls {
                            b[c].push_empty(self.calls[c].func);
                        }
                    }
                    continue;
                }
                seen[i as usize] = first_seq + row as u64;
                entities[i as usize].push(
                    input.time.value(row),
                    row,
                    &readers,
                    &mut enc,
                    spec,
                    &self.calls,
                    self.keep_ms,
                    |local, out| {
                        if let Some(b) = builders.as_deref_mut() {
                            b[spec.calls[local]].push(out)
                        }
                    },
                );
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
            self.evicted_idle += ks.retain(|e, _| e.head >= cutoff) as u64;
            if ks.entities.len() > self.max_entities {
                let mut seen = ks.seen.clone();
                let target = self.max_entities * 9 / 10;
                let drop = ks.entities.len() - target;
                let (_, nth, _) = seen.select_nth_unstable(drop - 1);
                let limit = *nth;
                self.evicted_budget += ks.retain(|_, seen| seen > limit) as u64;
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
                .flat_map(|k| k.entities.iter().map(|e| e.rows.len(&k.spec)))
                .sum(),
            evicted_idle: self.evicted_idle,
            evicted_budget: self.evicted_budget,
            bytes: self.keys.iter().map(KeyState::bytes).sum(),
        }
    }
}

impl KeyState {
    /// Heap bytes of the key's entities.
    fn bytes(&self) -> usize {
        use std::mem::size_of;
        let slot = size_of::<(EntityKey, u32)>() + 1;
        self.index.capacity() * slot
            + self.index.keys().map(EntityKey::heap_bytes).sum::<usize>()
            + self.entities.capacity() * size_of::<Entity>()
            + self.seen.capacity() * size_of::<u64>()
            + self
                .entities
                .iter()
                .map(|e| {
                    e.rows.heap_bytes()
                        + std::mem::size_of_val(&e.states[..])
                        + e.states
                            .iter()
                            .map(|c| match c {
                                State::Distinct(Distinct::Few(v)) => {
                                    v.capacity() * size_of::<(u64, u32)>()
                                }
                                State::Distinct(Distinct::Many(m)) => {
                                    size_of::<HashMap<u64, u32>>() + m.capacity() * 17
                                }
                                _ => 0,
                            })
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

/// The key columns as text arrays (after [`WindowState::read_columns`]).
fn utf8_keys(keys: &[ArrayRef]) -> Vec<&StringArray> {
    keys.iter()
        .map(|k| {
            k.as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8")
        })
        .collect()
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
    /// changing the state: every row is evaluated against a copy of its entity. Rows of the same
    /// group (consecutive equal values of `groups`, one per row; one request) see the earlier rows
    /// of their group as `process` would; rows of other groups never see each other.
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
        let keys = utf8_keys(&keys);
        let readers = self.readers(&args);
        let mut enc: Vec<u64> = Vec::new();
        // Copies of the entities the current group touched, per key.
        let mut scratch: Vec<HashMap<&str, Entity>> = vec![HashMap::new(); self.keys.len()];
        for row in 0..n {
            if row > 0 && groups[row] != groups[row - 1] {
                scratch.iter_mut().for_each(HashMap::clear);
            }
            let t = (!input.time.is_null(row)).then(|| input.time.value(row));
            for (g, ks) in self.keys.iter().enumerate() {
                let spec = &ks.spec;
                let key = keys[g];
                let (Some(t), false) = (t, key.is_null(row)) else {
                    for &c in &spec.calls {
                        builders[c].push_empty(self.calls[c].func);
                    }
                    continue;
                };
                let k = key.value(row);
                let e = scratch[g].entry(k).or_insert_with(|| match ks.get(k) {
                    Some(e) => e.clone(),
                    None => Entity::new(spec),
                });
                e.push(
                    t,
                    row,
                    &readers,
                    &mut enc,
                    spec,
                    &self.calls,
                    self.keep_ms,
                    |local, out| builders[spec.calls[local]].push(out),
                );
            }
        }
        Ok(builders.into_iter().map(Builder::finish).collect())
    }
}

/// `a` as a `Utf8` array: itself when it is one, a copy cast from its type otherwise.
pub(super) fn utf8(a: &ArrayRef) -> Result<StringArray, ArrowError> {
    if let Some(s) = a.as_any().downcast_ref::<StringArray>() {
        return Ok(s.clone());
    }
    let c = cast(a, &DataType::Utf8)?;
    Ok(c.as_any()
        .downcast_ref::<StringArray>()
        .expect("cast to Utf8")
        .clone())
}

/// A deterministic 64-bit hash of text for distinct counting: the same value hashes the same in
/// every batch and every run.
fn text_hash(s: &str) -> u64 {
    text_hash_bytes(s.as_bytes())
}

fn text_hash_bytes(b: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::quality::FixedState::with_seed(0x5041_5947_5541_5244).hash_one(b)
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

    /// The row word of row `row`'s value and its flag (1: NULL, `1 << 32`: the word numbers a
    /// value boxed in `rows`).
    #[inline]
    fn word(&self, row: usize, rows: &mut Rows) -> (u64, u64) {
        const NULL: (u64, u64) = (0, 1);
        match self {
            Self::None => NULL,
            Self::Int(a) if !a.is_null(row) => (a.value(row) as u64, 0),
            Self::Dec(a) if !a.is_null(row) => {
                let x = a.value(row);
                match i64::try_from(x) {
                    Ok(x) => (x as u64, 0),
                    Err(_) => (rows.store(Boxed::Wide(x)), 1 << 32),
                }
            }
            Self::F64(a) if !a.is_null(row) => (a.value(row).to_bits(), 0),
            Self::Time(a) if !a.is_null(row) => (a.value(row) as u64, 0),
            Self::Text(a, keep) if !a.is_null(row) => {
                let s = a.value(row);
                if *keep {
                    (rows.store(Boxed::Text(Arc::new(s.into()))), 1 << 32)
                } else {
                    (text_hash(s), 0)
                }
            }
            _ => NULL,
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
            (Self::Text(b), Out::S(s)) => b.append_value(&**s),
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
    super::with_columns(
        batch,
        columns.into_iter().enumerate().map(|(i, c)| {
            let field = datafusion::arrow::datatypes::Field::new(
                format!("__w{i}"),
                c.data_type().clone(),
                true,
            );
            (field, c)
        }),
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

    /// A distinct set, through its inline, list and map forms (more than [`Distinct::FEW`]
    /// values), counts what a multiset counts while values come and go.
    #[test]
    fn distinct_sets_count_as_a_multiset_in_every_form() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for spread in [1u64, 2, 3, 40] {
            let mut d = Distinct::Few(Vec::new());
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut forms = [false; 3];
            for _ in 0..4000 {
                let k = rng.random_range(0..spread);
                // Adds win while the set is small, so that every form is reached and left.
                if rng.random_bool(if model.len() < 30 { 0.6 } else { 0.4 }) {
                    d.add(k);
                    *model.entry(k).or_insert(0) += 1;
                } else if let Some(c) = model.get_mut(&k) {
                    d.remove(k);
                    *c -= 1;
                    if *c == 0 {
                        model.remove(&k);
                    }
                }
                forms[match d {
                    Distinct::One(..) => 0,
                    Distinct::Few(_) => 1,
                    Distinct::Many(_) => 2,
                }] = true;
                assert_eq!(d.len(), model.len());
                for probe in 0..spread {
                    assert_eq!(d.contains(probe), model.contains_key(&probe), "{probe}");
                }
            }
            assert!(forms[0] && forms[1], "spread {spread}: {forms:?}");
            assert!(spread < 40 || forms[2], "spread {spread}: {forms:?}");
        }
    }

    /// Rows whose values do not fit a word (decimals beyond 64 bits, kept text) or are NULL, in
    /// a key with more than 32 slots (two flag words), evaluated against a brute force while
    /// old rows (and their boxed values) are forgotten.
    #[test]
    fn boxed_null_and_many_slot_values_survive_their_neighbours_eviction() {
        const CALLS: usize = 34;
        let calls: Vec<WindowCall> = (0..CALLS)
            .map(|i| {
                let (func, range_ms) = match i % 3 {
                    0 => (WindowFunc::Sum, 10_000),
                    1 => (WindowFunc::Lag, 100_000),
                    _ => (WindowFunc::Count, 10_000),
                };
                WindowCall {
                    func,
                    arg: Some(format!("x{i}")),
                    partition: "k".into(),
                    range_ms,
                }
            })
            .collect();
        let kinds: Vec<ArgKind> = (0..CALLS)
            .map(|i| match i % 3 {
                0 => ArgKind::Decimal(2),
                1 => ArgKind::Text,
                _ => ArgKind::Int,
            })
            .collect();
        let mut st = WindowState::new(calls.clone(), kinds, &[0; CALLS], 1, 0, 1000);
        assert_eq!(st.keys[0].spec.flag_words, 2);
        // (key, time, row number): values are derived from the row number and the call.
        let mut rows: Vec<(&str, i64, usize)> = Vec::new();
        let mut t = 0;
        for r in 0..300 {
            t += [1_000, 4_000, 9_000, 30_000][r % 4];
            rows.push((["a", "b"][r % 3 % 2], t, r));
        }
        let dec = |r: usize, i: usize| match (r + i) % 4 {
            0 => None,
            1 => Some(i128::from(i64::MAX) * 3 + r as i128),
            _ => Some(r as i128 * 100 + i as i128),
        };
        let text = |r: usize, i: usize| (!(r + i).is_multiple_of(5)).then(|| format!("v{r}-{i}"));
        let int = |r: usize, i: usize| (!(r + i).is_multiple_of(3)).then_some(r as i64);
        for batch in rows.chunks(7) {
            let time =
                TimestampMillisecondArray::from(batch.iter().map(|r| r.1).collect::<Vec<_>>());
            let keys: ArrayRef = Arc::new(StringArray::from(
                batch.iter().map(|r| r.0).collect::<Vec<_>>(),
            ));
            let args: Vec<Option<ArrayRef>> = (0..CALLS)
                .map(|i| -> Option<ArrayRef> {
                    Some(match i % 3 {
                        0 => Arc::new(
                            Decimal128Array::from(
                                batch.iter().map(|r| dec(r.2, i)).collect::<Vec<_>>(),
                            )
                            .with_precision_and_scale(38, 2)
                            .unwrap(),
                        ),
                        1 => Arc::new(StringArray::from(
                            batch.iter().map(|r| text(r.2, i)).collect::<Vec<_>>(),
                        )),
                        _ => Arc::new(Int64Array::from(
                            batch.iter().map(|r| int(r.2, i)).collect::<Vec<_>>(),
                        )),
                    })
                })
                .collect();
            let out = st
                .process(&WindowInput {
                    time: &time,
                    keys: vec![keys],
                    args,
                })
                .unwrap();
            for (b, &(key, t, r)) in batch.iter().enumerate() {
                let before: Vec<&(&str, i64, usize)> =
                    rows[..=r].iter().filter(|x| x.0 == key).collect();
                for (i, c) in calls.iter().enumerate() {
                    let frame = before.iter().filter(|x| x.1 >= t - c.range_ms);
                    let col = &out[i];
                    match i % 3 {
                        0 => {
                            let vals: Vec<i128> = frame.filter_map(|x| dec(x.2, i)).collect();
                            let got = col.as_any().downcast_ref::<Decimal128Array>().unwrap();
                            let want = (!vals.is_empty()).then(|| vals.iter().sum::<i128>());
                            assert_eq!(
                                got.is_valid(b).then(|| got.value(b)),
                                want,
                                "sum {i} row {r}"
                            );
                        }
                        1 => {
                            let prev = before.len().checked_sub(2).map(|p| before[p]);
                            let want = prev
                                .filter(|x| x.1 >= t - c.range_ms)
                                .and_then(|x| text(x.2, i));
                            let got = col.as_any().downcast_ref::<StringArray>().unwrap();
                            assert_eq!(
                                got.is_valid(b).then(|| got.value(b).to_string()),
                                want,
                                "lag {i} row {r}"
                            );
                        }
                        _ => {
                            let want = frame.filter(|x| int(x.2, i).is_some()).count() as i64;
                            let got = col.as_any().downcast_ref::<Int64Array>().unwrap();
                            assert_eq!(got.value(b), want, "count {i} row {r}");
                        }
                    }
                }
            }
            st.evict(t);
        }
        // Rows were forgotten as they left every frame, with their boxed values.
        let kept = st.stats().rows;
        assert!(kept < 20, "{kept} rows kept");
        let boxes: usize = st.keys[0]
            .entities
            .iter()
            .map(|e| e.rows.boxes.as_ref().map_or(0, |b| b.vals.len()))
            .sum();
        assert!(
            boxes <= kept * CALLS,
            "{boxes} boxed values for {kept} rows"
        );
    }

    #[test]
    fn evicting_entities_leaves_the_others_as_they_were() {
        // Entities evicted from the middle of the store move the ones after them; those must
        // keep their own rows. `b` and `d` go idle, `a`, `c` and `e` stay.
        let (calls, kinds) = all_calls();
        let early = [
            ("a", 0, Some(1)),
            ("b", 1_000, Some(2)),
            ("c", 2_000, Some(3)),
            ("d", 3_000, Some(4)),
            ("e", 4_000, Some(5)),
            ("a_long_entity_id_beyond_the_inline_bytes", 4_500, Some(6)),
        ];
        let late = [
            ("a", 200_000, Some(10)),
            ("c", 201_000, Some(11)),
            ("e", 202_000, Some(12)),
            (
                "a_long_entity_id_beyond_the_inline_bytes",
                203_000,
                Some(13),
            ),
            ("a", 203_500, Some(14)),
        ];
        let kept: Vec<_> = early
            .iter()
            .filter(|r| r.0 != "b" && r.0 != "d")
            .copied()
            .collect();
        let mut st = WindowState::new(calls.clone(), kinds.clone(), &[0; 5], 1, 60_000, 1000);
        eval(&mut st, &early, None);
        // The longest frame (lag, 100 s) plus the lateness (60 s) is 160 s: at a watermark of
        // 190 s, entities whose newest row is older than 30 s go. Bring the others up to 150 s.
        let bump = [
            ("a", 150_000, Some(7)),
            ("c", 150_000, Some(8)),
            ("e", 150_000, Some(9)),
            ("a_long_entity_id_beyond_the_inline_bytes", 150_000, Some(1)),
        ];
        eval(&mut st, &bump, None);
        st.rows_since_sweep = usize::MAX / 2;
        st.evict(190_000);
        assert_eq!(st.stats().entities, 4);
        assert_eq!(st.stats().evicted_idle, 2);
        let mut fresh = WindowState::new(calls, kinds, &[0; 5], 1, 60_000, 1000);
        eval(&mut fresh, &kept, None);
        eval(&mut fresh, &bump, None);
        assert_eq!(eval(&mut st, &late, None), eval(&mut fresh, &late, None));
        assert_eq!(st.stats().rows, fresh.stats().rows);
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
