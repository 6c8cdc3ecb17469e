//! The canonical transaction: the contract every source mapping SQL must meet, and the one schema
//! every later stage (features, model, rules, sinks) reads.
//!
//! A mapping's result is checked against the contract once, at start: every required column must be
//! present, every column must have a type that converts to the contract's without loss, and no
//! unknown column may appear (a typo would otherwise silently become a missing value). The
//! conversions are decided then and applied per batch by [`Conformer`].

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{ArrayRef, RecordBatch, new_null_array};
use datafusion::arrow::compute::{CastOptions, cast_with_options};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;

/// Scale of canonical amounts (minor units of two decimal places).
pub const AMOUNT_SCALE: i8 = 2;
/// Precision of canonical amounts.
pub const AMOUNT_PRECISION: u8 = 18;

/// (name, type, required, meaning) of every canonical column, in order.
pub const COLUMNS: &[(&str, CanonicalType, bool, &str)] = &[
    (
        "transaction_id",
        CanonicalType::Text,
        true,
        "unique id of the payment (a producer retry repeats it)",
    ),
    (
        "event_time",
        CanonicalType::Time,
        true,
        "when the payment happened (event time, UTC)",
    ),
    (
        "source",
        CanonicalType::Text,
        true,
        "payment source name (card, pix, wallet, transfer...)",
    ),
    (
        "amount",
        CanonicalType::Money,
        true,
        "amount, exact decimal(18,2) in `currency`",
    ),
    (
        "currency",
        CanonicalType::Text,
        true,
        "ISO 4217 currency code",
    ),
    ("customer_id", CanonicalType::Text, false, "paying customer"),
    (
        "account_id",
        CanonicalType::Text,
        false,
        "paying account (transfers, PIX)",
    ),
    (
        "card_id",
        CanonicalType::Text,
        false,
        "card token (never a clear PAN)",
    ),
    (
        "merchant_id",
        CanonicalType::Text,
        false,
        "merchant or payee",
    ),
    (
        "terminal_id",
        CanonicalType::Text,
        false,
        "terminal (card present)",
    ),
    ("mcc", CanonicalType::Text, false, "merchant category code"),
    (
        "country",
        CanonicalType::Text,
        false,
        "ISO 3166 alpha-2 country of the transaction",
    ),
    (
        "channel",
        CanonicalType::Text,
        false,
        "pos, ecommerce, pix, wallet, transfer...",
    ),
    (
        "device_id",
        CanonicalType::Text,
        false,
        "device fingerprint",
    ),
    ("ip_address", CanonicalType::Text, false, "client IP"),
    (
        "latitude",
        CanonicalType::Coordinate,
        false,
        "latitude of the transaction (degrees)",
    ),
    (
        "longitude",
        CanonicalType::Coordinate,
        false,
        "longitude of the transaction (degrees)",
    ),
];

/// Kinds of canonical column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanonicalType {
    /// UTF-8 text.
    Text,
    /// Timestamp, milliseconds, UTC.
    Time,
    /// Exact money: decimal(18,2).
    Money,
    /// Float64 geographic coordinate.
    Coordinate,
}

impl CanonicalType {
    /// The Arrow type of this kind.
    pub fn data_type(self) -> DataType {
        match self {
            Self::Text => DataType::Utf8,
            Self::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Self::Money => DataType::Decimal128(AMOUNT_PRECISION, AMOUNT_SCALE),
            Self::Coordinate => DataType::Float64,
        }
    }

    /// Whether a mapping result of type `from` converts to this kind without loss.
    fn accepts(self, from: &DataType) -> bool {
        match self {
            Self::Text => matches!(
                from,
                DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 | DataType::Null
            ),
            Self::Time => matches!(from, DataType::Timestamp(_, _) | DataType::Null),
            Self::Money => match from {
                DataType::Decimal128(p, s) => {
                    *s >= 0
                        && *s <= AMOUNT_SCALE
                        && (*p as i16 - *s as i16)
                            <= (AMOUNT_PRECISION as i16 - AMOUNT_SCALE as i16)
                }
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => true,
                DataType::Null => true,
                _ => false,
            },
            Self::Coordinate => matches!(
                from,
                DataType::Float64
                    | DataType::Float32
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Null
            ),
        }
    }
}

/// The canonical Arrow schema.
pub fn schema() -> SchemaRef {
    static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
        Arc::new(Schema::new(
            COLUMNS
                .iter()
                .map(|(name, t, required, _)| Field::new(*name, t.data_type(), !required))
                .collect::<Vec<_>>(),
        ))
    });
    SCHEMA.clone()
}

/// How to turn one mapping result column into its canonical column.
#[derive(Debug, Clone)]
enum ColumnPlan {
    /// Take input column `i` as it is.
    Take(usize),
    /// Cast input column `i`.
    Cast(usize),
    /// Not produced by the mapping: all nulls.
    Null,
}

/// Converts mapping results to the canonical schema (decided once from the mapping's schema).
#[derive(Debug, Clone)]
pub struct Conformer {
    plans: Vec<ColumnPlan>,
    required: Vec<usize>,
    partition_col: Option<usize>,
    offset_col: Option<usize>,
}

impl Conformer {
    /// Check a mapping's result schema against the contract; the error lists every problem.
    pub fn new(mapped: &Schema) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut plans = Vec::with_capacity(COLUMNS.len());
        let mut required = Vec::new();
        for (idx, (name, kind, req, _)) in COLUMNS.iter().enumerate() {
            match mapped.index_of(name) {
                Ok(i) => {
                    let from = mapped.field(i).data_type();
                    let want = kind.data_type();
                    if from == &want {
                        plans.push(ColumnPlan::Take(i));
                    } else if kind.accepts(from) {
                        plans.push(ColumnPlan::Cast(i));
                    } else {
                        problems.push(format!(
                            "column `{name}` is {from}, which does not convert exactly to {want}; CAST it in the SELECT"
                        ));
                        plans.push(ColumnPlan::Null);
                    }
                    if *req {
                        required.push(idx);
                    }
                }
                Err(_) if *req => {
                    problems.push(format!("required column `{name}` is missing"));
                    plans.push(ColumnPlan::Null);
                }
                Err(_) => plans.push(ColumnPlan::Null),
            }
        }
        for f in mapped.fields() {
            let provenance = [
                crate::decode::PARTITION_COLUMN,
                crate::decode::OFFSET_COLUMN,
            ];
            if !COLUMNS.iter().any(|(n, ..)| n == f.name())
                && !provenance.contains(&f.name().as_str())
            {
                problems.push(format!(
                    "column `{}` is not a canonical column (known: {})",
                    f.name(),
                    COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        if problems.is_empty() {
            Ok(Self {
                plans,
                required,
                partition_col: mapped.index_of(crate::decode::PARTITION_COLUMN).ok(),
                offset_col: mapped.index_of(crate::decode::OFFSET_COLUMN).ok(),
            })
        } else {
            Err(problems.join("; "))
        }
    }

    /// Convert one batch. Rows with a null in a required column (the mapping computed nothing for
    /// it) are not returned as rows but as [`RejectedRow`]s, to be dead-lettered.
    pub fn conform(&self, batch: &RecordBatch) -> Result<Conformed, ArrowError> {
        let schema = schema();
        let columns = self
            .plans
            .iter()
            .zip(schema.fields())
            .map(|(plan, field)| -> Result<ArrayRef, ArrowError> {
                Ok(match plan {
                    ColumnPlan::Take(i) => batch.column(*i).clone(),
                    ColumnPlan::Cast(i) => cast_with_options(
                        batch.column(*i),
                        field.data_type(),
                        &CastOptions::default(),
                    )?,
                    ColumnPlan::Null => new_null_array(field.data_type(), batch.num_rows()),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.required.iter().all(|c| columns[*c].null_count() == 0) {
            return Ok(Conformed {
                rows: RecordBatch::try_new(schema, columns)?,
                rejected: Vec::new(),
                partitions: self.partition_col.map(|c| batch.column(c).clone()),
                offsets: self.offset_col.map(|c| batch.column(c).clone()),
            });
        }
        let mut keep = vec![true; batch.num_rows()];
        let mut rejected = Vec::new();
        for (row, kept) in keep.iter_mut().enumerate() {
            let missing: Vec<&str> = self
                .required
                .iter()
                .filter(|c| columns[**c].is_null(row))
                .map(|c| COLUMNS[*c].0)
                .collect();
            if !missing.is_empty() {
                *kept = false;
                rejected.push(RejectedRow {
                    partition: self.partition_col.and_then(|c| {
                        batch
                            .column(c)
                            .as_any()
                            .downcast_ref::<datafusion::arrow::array::Int32Array>()
                            .map(|a| a.value(row))
                    }),
                    offset: self.offset_col.and_then(|c| {
                        batch
                            .column(c)
                            .as_any()
                            .downcast_ref::<datafusion::arrow::array::Int64Array>()
                            .map(|a| a.value(row))
                    }),
                    reason: format!(
                        "mapping SQL produced NULL for required column(s): {}",
                        missing.join(", ")
                    ),
                    row: row_as_json(batch, row),
                });
            }
        }
        let mask = datafusion::arrow::array::BooleanArray::from(keep);
        let filtered = columns
            .iter()
            .map(|c| datafusion::arrow::compute::filter(c, &mask))
            .collect::<Result<Vec<_>, _>>()?;
        let partitions = self
            .partition_col
            .map(|c| datafusion::arrow::compute::filter(batch.column(c), &mask))
            .transpose()?;
        let offsets = self
            .offset_col
            .map(|c| datafusion::arrow::compute::filter(batch.column(c), &mask))
            .transpose()?;
        Ok(Conformed {
            rows: RecordBatch::try_new(schema, filtered)?,
            rejected,
            partitions,
            offsets,
        })
    }
}

/// The result of [`Conformer::conform`].
#[derive(Debug, Clone)]
pub struct Conformed {
    /// Canonical rows.
    pub rows: RecordBatch,
    /// Rows that could not be canonical.
    pub rejected: Vec<RejectedRow>,
    /// `_partition` of each canonical row, when the mapping passed it through.
    pub partitions: Option<ArrayRef>,
    /// `_offset` of each canonical row, when the mapping passed it through.
    pub offsets: Option<ArrayRef>,
}

/// A mapped row that could not become a canonical transaction.
#[derive(Debug, Clone)]
pub struct RejectedRow {
    /// `_partition` of the row, when the mapping passed it through.
    pub partition: Option<i32>,
    /// `_offset` of the row, when the mapping passed it through.
    pub offset: Option<i64>,
    /// Why it was rejected.
    pub reason: String,
    /// The mapped row rendered as JSON.
    pub row: Vec<u8>,
}

fn row_as_json(batch: &RecordBatch, row: usize) -> Vec<u8> {
    let one = batch.slice(row, 1);
    let mut w = datafusion::arrow::json::LineDelimitedWriter::new(Vec::new());
    if w.write(&one).is_err() || w.finish().is_err() {
        return Vec::new();
    }
    let mut v = w.into_inner();
    while v.last() == Some(&b'\n') {
        v.pop();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_problems_are_listed_together() {
        let mapped = Schema::new(vec![
            Field::new("transaction_id", DataType::Utf8View, false),
            Field::new("event_time", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, false),
            Field::new("currency", DataType::Utf8, false),
            Field::new("merchnat_id", DataType::Utf8, true),
        ]);
        let err = Conformer::new(&mapped).unwrap_err();
        assert!(err.contains("column `event_time` is Utf8"), "{err}");
        assert!(err.contains("required column `source` is missing"), "{err}");
        assert!(err.contains("column `amount` is Float64"), "{err}");
        assert!(
            err.contains("`merchnat_id` is not a canonical column"),
            "{err}"
        );
    }

    #[test]
    fn money_accepts_only_exact_decimals() {
        assert!(CanonicalType::Money.accepts(&DataType::Decimal128(10, 2)));
        assert!(CanonicalType::Money.accepts(&DataType::Decimal128(16, 0)));
        assert!(!CanonicalType::Money.accepts(&DataType::Decimal128(18, 3)));
        assert!(!CanonicalType::Money.accepts(&DataType::Decimal128(20, 2)));
        assert!(!CanonicalType::Money.accepts(&DataType::Float64));
    }
}
