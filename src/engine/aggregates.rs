//! Windowed aggregates: each `sql/aggregates/<name>.sql` is a `SELECT … FROM decided GROUP BY …`
//! whose non-aggregate columns (typically a `date_bin` bucket and dimensions) are the key and whose
//! aggregate columns are `count`, `sum`, `min` or `max` calls. Each micro-batch yields a partial
//! aggregate that the sink merges into table `agg_<name>` (`+` for counts and sums, `LEAST` /
//! `GREATEST` for min / max) in the same database transaction as the offsets, so the tables stay
//! exactly-once. Aggregates that cannot be merged from partials (avg, median, count(DISTINCT …),
//! stddev…) are refused at start, saying what to store instead.

use std::path::{Path, PathBuf};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{
    DuplicateTreatment, Expr, FunctionArguments, SelectItem, SetExpr, Spanned, Statement,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::EngineError;
use super::sql::CompiledQuery;

/// How a measure merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// `count`, `sum`: added.
    Add,
    /// `min`: the smaller.
    Min,
    /// `max`: the larger.
    Max,
}

/// One aggregate file, compiled.
#[derive(Debug, Clone)]
pub struct AggregateStage {
    /// Name (file stem); the table is `agg_<name>`.
    pub name: String,
    /// The SQL file.
    pub file: PathBuf,
    query: CompiledQuery,
    /// Key columns (by output position).
    pub keys: Vec<usize>,
    /// Measure columns and how they merge.
    pub measures: Vec<(usize, Merge)>,
}

fn err(file: &Path, line: Option<usize>, message: String) -> EngineError {
    EngineError::Contract {
        file: file.to_path_buf(),
        message: match line {
            Some(l) => format!("line {l}: {message}"),
            None => message,
        },
    }
}

impl AggregateStage {
    /// Check a file's shape without compiling it (names, mergeable aggregates): what `check` can
    /// still say when the schema it would compile against is not known.
    pub fn lint(file: &Path) -> Result<(), EngineError> {
        Self::analyze(file).map(|_| ())
    }

    fn analyze(file: &Path) -> Result<(String, String, Vec<Option<Merge>>), EngineError> {
        let sql = std::fs::read_to_string(file).map_err(|source| {
            EngineError::Sql(super::sql::SqlError::Read {
                file: file.to_path_buf(),
                source,
            })
        })?;
        let name = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(
                file,
                None,
                "file name must use only letters, digits and _ (it names the table agg_<name>)"
                    .into(),
            ));
        }
        let statements = Parser::parse_sql(&GenericDialect {}, &sql)
            .map_err(|e| err(file, None, e.to_string()))?;
        let [Statement::Query(q)] = statements.as_slice() else {
            return Err(err(file, None, "must hold exactly one SELECT".into()));
        };
        let SetExpr::Select(select) = q.body.as_ref() else {
            return Err(err(
                file,
                None,
                "must be one SELECT … GROUP BY … (no UNION)".into(),
            ));
        };
        let mut kinds: Vec<Option<Merge>> = Vec::new();
        for item in &select.projection {
            let (expr, alias) = match item {
                SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
                SelectItem::UnnamedExpr(e) => (e, None),
                _ => {
                    return Err(err(
                        file,
                        None,
                        "`*` is not allowed; name every column".into(),
                    ));
                }
            };
            let line = Some(expr.span().start.line as usize).filter(|l| *l > 0);
            let is_plain_column = matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_));
            if alias.is_none() && !is_plain_column {
                return Err(err(
                    file,
                    line,
                    format!("`{expr}` needs an alias (AS name): it names a column of agg_{name}"),
                ));
            }
            kinds.push(classify(expr).map_err(|m| err(file, line, m))?);
        }
        Ok((name, sql, kinds))
    }

    /// Compile one aggregate file against the `decided` schema.
    pub async fn compile(file: &Path, decided: SchemaRef) -> Result<Self, EngineError> {
        let (name, sql, kinds) = Self::analyze(file)?;
        let mut query = CompiledQuery::compile(file, &sql, "decided", decided).await?;
        // A group's result does not depend on the order its rows come in.
        query.stream_input_through_cross_joins()?;
        let schema = query.schema();
        let keys: Vec<usize> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| k.is_none())
            .map(|(i, _)| i)
            .collect();
        let measures: Vec<(usize, Merge)> = kinds
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.map(|m| (i, m)))
            .collect();
        if keys.is_empty() {
            return Err(err(
                file,
                None,
                "needs at least one key column (e.g. a date_bin bucket)".into(),
            ));
        }
        if measures.is_empty() {
            return Err(err(
                file,
                None,
                "needs at least one count/sum/min/max column".into(),
            ));
        }
        for f in schema.fields() {
            if !crate::sink::copy::supported(f.data_type()) {
                return Err(err(
                    file,
                    None,
                    format!(
                        "column `{}` has type {}, which cannot be stored; CAST it to text, bigint, double, decimal or timestamp",
                        f.name(),
                        f.data_type()
                    ),
                ));
            }
        }
        for (i, _) in &measures {
            let t = schema.field(*i).data_type();
            if matches!(t, DataType::Utf8 | DataType::Boolean) {
                return Err(err(
                    file,
                    None,
                    format!(
                        "measure `{}` has type {t}; measures must be numbers or times",
                        schema.field(*i).name()
                    ),
                ));
            }
        }
        Ok(Self {
            name,
            file: file.to_path_buf(),
            query,
            keys,
            measures,
        })
    }

    /// Output schema (the table's columns).
    pub fn schema(&self) -> SchemaRef {
        self.query.schema()
    }

    /// The partial aggregate of one batch of decided rows.
    pub async fn partial(&self, decided: &[RecordBatch]) -> Result<Vec<RecordBatch>, EngineError> {
        let out = self.query.execute(decided.to_vec()).await?;
        Ok(out.into_iter().filter(|b| b.num_rows() > 0).collect())
    }
}

/// `None` for a key expression, `Some(merge)` for a mergeable aggregate; an error for anything
/// that cannot be merged from per-batch partials.
fn classify(expr: &Expr) -> Result<Option<Merge>, String> {
    let Expr::Function(f) = expr else {
        if contains_aggregate(expr) {
            return Err(format!(
                "`{expr}` combines aggregates; store each (sum, count…) as its own column and combine them when querying agg tables"
            ));
        }
        return Ok(None);
    };
    let name = f.name.to_string().to_lowercase();
    let distinct = matches!(
        &f.args,
        FunctionArguments::List(l) if matches!(l.duplicate_treatment, Some(DuplicateTreatment::Distinct))
    );
    if f.over.is_some() {
        return Err(format!(
            "`{expr}`: window functions are not allowed in aggregates"
        ));
    }
    match (name.as_str(), distinct) {
        ("count", false) | ("sum", false) => Ok(Some(Merge::Add)),
        ("min", false) => Ok(Some(Merge::Min)),
        ("max", false) => Ok(Some(Merge::Max)),
        ("avg" | "mean", _) => Err(format!(
            "`{expr}` cannot be merged across micro-batches; store sum(x) and count(x) and divide when querying"
        )),
        (_, true) => Err(format!(
            "`{expr}`: a distinct count cannot be merged across micro-batches"
        )),
        (n, _) if AGGREGATES.contains(&n) => Err(format!(
            "`{expr}` ({n}) cannot be merged across micro-batches; use count, sum, min or max"
        )),
        _ => {
            if contains_aggregate(expr) {
                Err(format!(
                    "`{expr}` wraps an aggregate; store the aggregate itself as a column"
                ))
            } else {
                Ok(None)
            }
        }
    }
}

const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "mean",
    "median",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "approx_distinct",
    "approx_median",
    "approx_percentile_cont",
    "percentile_cont",
    "array_agg",
    "string_agg",
    "first_value",
    "last_value",
    "bool_and",
    "bool_or",
    "corr",
    "covar",
    "covar_pop",
    "covar_samp",
    "bit_and",
    "bit_or",
    "bit_xor",
    "nth_value",
    "mode",
];

fn contains_aggregate(expr: &Expr) -> bool {
    let mut found = false;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(expr, |e| {
        if let Expr::Function(f) = e
            && AGGREGATES.contains(&f.name.to_string().to_lowercase().as_str())
        {
            found = true;
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(e: &str) -> Expr {
        let sql = format!("SELECT {e}");
        let st = Parser::parse_sql(&GenericDialect {}, &sql).unwrap();
        let Statement::Query(q) = &st[0] else {
            panic!()
        };
        let SetExpr::Select(s) = q.body.as_ref() else {
            panic!()
        };
        match &s.projection[0] {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e.clone(),
            _ => panic!(),
        }
    }

    #[tokio::test]
    async fn a_hopping_window_streams_the_input_through_its_cross_join() {
        use datafusion::arrow::array::{
            ArrayRef, Decimal128Array, StringArray, TimestampMillisecondArray,
        };
        use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
        use std::sync::Arc;
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                false,
            ),
            Field::new("country", DataType::Utf8, true),
            Field::new("amount", DataType::Decimal128(18, 2), false),
            Field::new("decision", DataType::Utf8, false),
        ]));
        let n = 5_000i64;
        let cols: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMillisecondArray::from_iter_values(
                    (0..n).map(|i| 1_790_000_000_000 + i * 7_919 % 3_600_000),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(
                (0..n)
                    .map(|i| [Some("DE"), None, Some("BR")][i as usize % 3])
                    .collect::<StringArray>(),
            ),
            Arc::new(
                Decimal128Array::from_iter_values((0..n).map(|i| (i * 37 % 10_000) as i128))
                    .with_precision_and_scale(18, 2)
                    .unwrap(),
            ),
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| if i % 13 == 0 { "decline" } else { "approve" }),
            )),
        ];
        let input = RecordBatch::try_new(schema.clone(), cols).unwrap();
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/aggregates/country_15m_hop_5m.sql");
        let sql = std::fs::read_to_string(&file).unwrap();
        let as_planned = CompiledQuery::compile(&file, &sql, "decided", schema.clone())
            .await
            .unwrap();
        let mut swapped = as_planned.clone();
        assert_eq!(swapped.stream_input_through_cross_joins().unwrap(), 1);
        assert_eq!(swapped.schema(), as_planned.schema());
        // The stage compiles with it.
        let stage = AggregateStage::compile(&file, schema).await.unwrap();
        let rows = |b: Vec<RecordBatch>| {
            let mut v: Vec<String> = datafusion::arrow::util::pretty::pretty_format_batches(&b)
                .unwrap()
                .to_string()
                .lines()
                .map(str::to_string)
                .collect();
            v.sort();
            v
        };
        let want = rows(as_planned.execute(vec![input.clone()]).await.unwrap());
        assert!(want.len() > 20, "{want:?}");
        assert_eq!(
            rows(swapped.execute(vec![input.clone()]).await.unwrap()),
            want
        );
        assert_eq!(rows(stage.partial(&[input]).await.unwrap()), want);
    }

    #[test]
    fn only_mergeable_aggregates_are_accepted() {
        assert_eq!(classify(&parse("count(*)")).unwrap(), Some(Merge::Add));
        assert_eq!(classify(&parse("sum(amount)")).unwrap(), Some(Merge::Add));
        assert_eq!(classify(&parse("max(score)")).unwrap(), Some(Merge::Max));
        assert_eq!(
            classify(&parse("date_bin(INTERVAL '1 minute', event_time)")).unwrap(),
            None
        );
        assert!(
            classify(&parse("median(amount)"))
                .unwrap_err()
                .contains("cannot be merged")
        );
        assert!(
            classify(&parse("avg(amount)"))
                .unwrap_err()
                .contains("store sum(x) and count(x)")
        );
        assert!(
            classify(&parse("count(DISTINCT card_id)"))
                .unwrap_err()
                .contains("distinct")
        );
        assert!(
            classify(&parse("sum(amount) / count(*)"))
                .unwrap_err()
                .contains("combines aggregates")
        );
    }
}
