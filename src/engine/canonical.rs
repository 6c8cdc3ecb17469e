//! The canonical transaction: the contract every source mapping SQL must meet, and the one schema
//! every later stage (features, model, rules, sinks) reads.
//!
//! The contract ([`Canonical`]) is the fixed columns ([`COLUMNS`]) followed by the source
//! attributes the config declares (`[[attributes]]`): the user's own typed signals, which a
//! mapping may select and which then travel with the transaction like any canonical column.
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

use crate::config::{AttributeConfig, AttributeKind, Config};

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
    /// Float64 number (a `number` attribute).
    Number,
    /// Int64 integer (an `integer` attribute).
    Integer,
    /// Boolean (a `boolean` attribute).
    Boolean,
}

impl CanonicalType {
    /// The Arrow type of this kind.
    pub fn data_type(self) -> DataType {
        match self {
            Self::Text => DataType::Utf8,
            Self::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Self::Money => DataType::Decimal128(AMOUNT_PRECISION, AMOUNT_SCALE),
            Self::Coordinate | Self::Number => DataType::Float64,
            Self::Integer => DataType::Int64,
            Self::Boolean => DataType::Boolean,
        }
    }

    /// The PostgreSQL type of its column in `transactions` (attributes are added by the sink).
    pub fn pg_type(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Time => "timestamptz",
            Self::Money => "numeric(18,2)",
            Self::Coordinate | Self::Number => "double precision",
            Self::Integer => "bigint",
            Self::Boolean => "boolean",
        }
    }

    /// The field type of the JSON decoder that reads this kind (the API's canonical objects).
    pub fn field_type(self) -> &'static str {
        match self {
            Self::Text => "string",
            Self::Time => "timestamp",
            Self::Money => "decimal(18,2)",
            Self::Coordinate | Self::Number => "float64",
            Self::Integer => "int64",
            Self::Boolean => "boolean",
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
            Self::Coordinate | Self::Number => matches!(
                from,
                DataType::Float64
                    | DataType::Float32
                    | DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::Null
            ),
            Self::Integer => matches!(
                from,
                DataType::Int8
                    | DataType::Int16
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt8
                    | DataType::UInt16
                    | DataType::UInt32
                    | DataType::Null
            ),
            Self::Boolean => matches!(from, DataType::Boolean | DataType::Null),
        }
    }
}

/// Columns of `transactions` Payguard writes beside the canonical ones, and the engine's own
/// columns of a decided row: no attribute may take these names.
const WRITTEN: &[&str] = &[
    "score",
    "model_version",
    "decision",
    "rule_hits",
    "explanation",
    "commit_seq",
    "processed_at",
    "features",
    "label",
    "fraud_scenario",
];

/// Why `name` cannot be an attribute's, or `None` when it can.
pub fn reserved(name: &str) -> Option<&'static str> {
    if COLUMNS.iter().any(|c| c.0 == name) {
        Some("is a canonical column")
    } else if WRITTEN.contains(&name) {
        Some("is a column Payguard writes itself")
    } else if name.starts_with('_') {
        Some("starts with '_', kept for provenance columns")
    } else {
        None
    }
}

/// One column of the contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalColumn {
    /// Column name.
    pub name: String,
    /// Its kind.
    pub kind: CanonicalType,
    /// A mapped row with NULL here is dead-lettered.
    pub required: bool,
    /// A declared source attribute (not one of [`COLUMNS`]).
    pub attribute: bool,
}

/// The contract of a configuration: [`COLUMNS`], then its declared attributes, in order.
#[derive(Debug, Clone)]
pub struct Canonical {
    columns: Vec<CanonicalColumn>,
    schema: SchemaRef,
}

impl Canonical {
    /// The contract with these attributes.
    pub fn new(attributes: &[AttributeConfig]) -> Arc<Self> {
        let mut columns: Vec<CanonicalColumn> = COLUMNS
            .iter()
            .map(|(name, kind, required, _)| CanonicalColumn {
                name: name.to_string(),
                kind: *kind,
                required: *required,
                attribute: false,
            })
            .collect();
        columns.extend(attributes.iter().map(|a| CanonicalColumn {
            name: a.name.clone(),
            kind: match a.kind {
                AttributeKind::Number => CanonicalType::Number,
                AttributeKind::Integer => CanonicalType::Integer,
                AttributeKind::Boolean => CanonicalType::Boolean,
                AttributeKind::Category => CanonicalType::Text,
            },
            required: false,
            attribute: true,
        }));
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.kind.data_type(), !c.required))
                .collect::<Vec<_>>(),
        ));
        Arc::new(Self { columns, schema })
    }

    /// The contract of `config` (its `[[attributes]]`).
    pub fn of(config: &Config) -> Arc<Self> {
        Self::new(&config.attributes)
    }

    /// The contract without attributes.
    pub fn fixed() -> Arc<Self> {
        static FIXED: LazyLock<Arc<Canonical>> = LazyLock::new(|| Canonical::new(&[]));
        FIXED.clone()
    }

    /// Its Arrow schema.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Its columns, in order.
    pub fn columns(&self) -> &[CanonicalColumn] {
        &self.columns
    }

    /// Number of columns (fixed and attributes): where the features begin in a decided row.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether it has no columns (never: the fixed ones are always there).
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The declared attributes.
    pub fn attributes(&self) -> impl Iterator<Item = &CanonicalColumn> {
        self.columns.iter().filter(|c| c.attribute)
    }

    /// Whether `name` is one of its columns.
    pub fn has(&self, name: &str) -> bool {
        self.columns.iter().any(|c| c.name == name)
    }

    /// Its column names, comma-separated (for error messages).
    pub fn names(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The canonical Arrow schema without attributes ([`Canonical::fixed`]).
pub fn schema() -> SchemaRef {
    Canonical::fixed().schema()
}

/// Schema metadata key of a decided row's schema: how many columns the canonical part has (the
/// fixed columns and the attributes; the features follow).
pub const WIDTH_KEY: &str = "payguard.canonical_columns";

/// `schema` marked with the width of its canonical part ([`width`]).
pub fn with_width(schema: Schema, width: usize) -> Schema {
    let mut metadata = schema.metadata().clone();
    metadata.insert(WIDTH_KEY.to_string(), width.to_string());
    schema.with_metadata(metadata)
}

/// How many leading columns of a decided schema are canonical (the fixed columns and the
/// attributes), as the engine marked it ([`with_width`]); the fixed columns when unmarked.
pub fn width(schema: &Schema) -> usize {
    schema
        .metadata()
        .get(WIDTH_KEY)
        .and_then(|w| w.parse().ok())
        .unwrap_or(COLUMNS.len())
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
    schema: SchemaRef,
    plans: Vec<ColumnPlan>,
    required: Vec<usize>,
    partition_col: Option<usize>,
    offset_col: Option<usize>,
}

impl Conformer {
    /// Check a mapping's result schema against the contract; the error lists every problem.
    pub fn new(contract: &Canonical, mapped: &Schema) -> Result<Self, String> {
        let mut problems = Vec::new();
        let mut plans = Vec::with_capacity(contract.len());
        let mut required = Vec::new();
        for (idx, col) in contract.columns().iter().enumerate() {
            let (name, kind, req) = (&col.name, &col.kind, &col.required);
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
            if !contract.has(f.name()) && !provenance.contains(&f.name().as_str()) {
                problems.push(format!(
                    "column `{}` is not a canonical column nor a declared attribute (known: {}; a source's own signal is declared in [[attributes]])",
                    f.name(),
                    contract.names()
                ));
            }
        }
        if problems.is_empty() {
            Ok(Self {
                schema: contract.schema(),
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
        let schema = self.schema.clone();
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
                .map(|c| schema.field(*c).name().as_str())
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
        let err = Conformer::new(&Canonical::fixed(), &mapped).unwrap_err();
        assert!(err.contains("column `event_time` is Utf8"), "{err}");
        assert!(err.contains("required column `source` is missing"), "{err}");
        assert!(err.contains("column `amount` is Float64"), "{err}");
        assert!(
            err.contains("`merchnat_id` is not a canonical column"),
            "{err}"
        );
    }

    fn attributes() -> Arc<Canonical> {
        use crate::config::{AttributeConfig, AttributeKind};
        let a = |name: &str, kind| AttributeConfig {
            name: name.into(),
            kind,
            doc: String::new(),
        };
        Canonical::new(&[
            a("cvv_result", AttributeKind::Category),
            a("risk_points", AttributeKind::Integer),
            a("v1", AttributeKind::Number),
            a("three_ds_ok", AttributeKind::Boolean),
        ])
    }

    /// A mapping result's required columns (an integer amount, converted exactly).
    fn required_fields() -> Vec<Field> {
        vec![
            Field::new("transaction_id", DataType::Utf8, false),
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("source", DataType::Utf8, false),
            Field::new("amount", DataType::Int64, false),
            Field::new("currency", DataType::Utf8, false),
        ]
    }

    #[test]
    fn declared_attributes_follow_the_canonical_columns_and_are_cast() {
        use datafusion::arrow::array::{Float64Array, Int32Array, StringArray};
        use datafusion::arrow::util::pretty::pretty_format_batches;
        let contract = attributes();
        assert_eq!(contract.len(), COLUMNS.len() + 4);
        assert_eq!(contract.schema().field(COLUMNS.len()).name(), "cvv_result");
        let mut fields = required_fields();
        fields.push(Field::new("v1", DataType::Int32, true));
        fields.push(Field::new("cvv_result", DataType::Utf8, true));
        let mapped = Arc::new(Schema::new(fields));
        let c = Conformer::new(&contract, &mapped).unwrap();
        let batch = RecordBatch::try_new(
            mapped,
            vec![
                Arc::new(StringArray::from(vec!["t1", "t2"])),
                Arc::new(
                    datafusion::arrow::array::TimestampMillisecondArray::from(vec![0, 1000])
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec!["card", "card"])),
                Arc::new(datafusion::arrow::array::Int64Array::from(vec![5, 7])),
                Arc::new(StringArray::from(vec!["EUR", "EUR"])),
                Arc::new(Int32Array::from(vec![Some(3), None])),
                Arc::new(StringArray::from(vec![Some("N"), Some("M")])),
            ],
        )
        .unwrap();
        let out = c.conform(&batch).unwrap().rows;
        assert_eq!(out.schema(), contract.schema());
        let tail = out.project(&[0, COLUMNS.len(), COLUMNS.len() + 1, COLUMNS.len() + 2]);
        let text = pretty_format_batches(&[tail.unwrap()]).unwrap().to_string();
        let want = "+----------------+------------+-------------+-----+\n\
                    | transaction_id | cvv_result | risk_points | v1  |\n\
                    +----------------+------------+-------------+-----+\n\
                    | t1             | N          |             | 3.0 |\n\
                    | t2             | M          |             |     |\n\
                    +----------------+------------+-------------+-----+";
        assert_eq!(text, want);
        let v1 = out.column(COLUMNS.len() + 2);
        assert!(v1.as_any().downcast_ref::<Float64Array>().is_some());
    }

    #[test]
    fn an_undeclared_or_mistyped_attribute_is_refused() {
        let contract = attributes();
        let mut fields = required_fields();
        fields.push(Field::new("cvv_reslt", DataType::Utf8, true));
        fields.push(Field::new("three_ds_ok", DataType::Utf8, true));
        let mapped = Schema::new(fields);
        let err = Conformer::new(&contract, &mapped).unwrap_err();
        assert!(
            err.contains("`cvv_reslt` is not a canonical column nor a declared attribute"),
            "{err}"
        );
        assert!(
            err.contains("cvv_result, risk_points, v1, three_ds_ok"),
            "{err}"
        );
        assert!(err.contains("column `three_ds_ok` is Utf8"), "{err}");
        // Without the declaration, the same column is unknown.
        let mapped = Schema::new(vec![
            Field::new("transaction_id", DataType::Utf8, false),
            Field::new("cvv_result", DataType::Utf8, true),
        ]);
        let err = Conformer::new(&Canonical::fixed(), &mapped).unwrap_err();
        assert!(
            err.contains("`cvv_result` is not a canonical column"),
            "{err}"
        );
    }

    #[test]
    fn attribute_names_may_not_shadow_written_columns() {
        assert!(reserved("amount").is_some());
        assert!(reserved("score").is_some());
        assert!(reserved("_offset").is_some());
        assert!(reserved("cvv_result").is_none());
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
