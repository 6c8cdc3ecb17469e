//! A SQL file compiled once into a DataFusion physical plan and re-executed for every micro-batch.
//!
//! The plan reads its input table from a [`BatchSlot`]: a `StreamingTable` whose single partition
//! hands out whatever batches were put into the slot just before execution. Planning (parsing,
//! logical optimisation, physical planning) happens once in [`CompiledQuery::compile`]; the hot path
//! is `put batches -> reset operator state -> execute -> collect`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::ColumnarValue;
use datafusion::physical_plan::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use datafusion::prelude::{SessionConfig, SessionContext};

/// Errors of compiling or running a SQL file.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The file could not be read.
    #[error("{file}: cannot read SQL file: {source}")]
    Read {
        /// SQL file.
        file: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Parsing or planning failed.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Plan {
        /// SQL file.
        file: PathBuf,
        /// 1-based line of the problem, when it can be told.
        line: Option<usize>,
        /// What is wrong.
        message: String,
        /// Underlying error.
        #[source]
        source: DataFusionError,
    },
    /// The result does not fit its contract (column names or types).
    #[error("{file}: {message}")]
    Contract {
        /// SQL file.
        file: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Execution failed on a batch.
    #[error("{file}: execution failed: {source}")]
    Execute {
        /// SQL file.
        file: PathBuf,
        /// Underlying error.
        #[source]
        source: DataFusionError,
    },
}

/// Shared slot from which the input table of a compiled query reads.
#[derive(Debug)]
pub struct BatchSlot {
    schema: SchemaRef,
    batches: Mutex<Vec<RecordBatch>>,
}

impl BatchSlot {
    fn put(&self, batches: Vec<RecordBatch>) {
        *self.batches.lock().expect("slot lock") = batches;
    }
}

impl PartitionStream for BatchSlot {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        // Cloned, not taken: a query may scan its input more than once (every branch of a
        // UNION ALL of rules, a self-join), and each scan must see the whole batch.
        let batches = self.batches.lock().expect("slot lock").clone();
        Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            futures::stream::iter(batches.into_iter().map(Ok)),
        ))
    }
}

/// A session configured for micro-batch execution: one partition per operator (the pipeline gets
/// its parallelism from its stages), large batches.
pub fn session() -> SessionContext {
    let config = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(64 * 1024)
        .with_information_schema(false);
    SessionContext::new_with_config(config)
}

/// A SQL file planned once against a named input table.
#[derive(Clone)]
pub struct CompiledQuery {
    file: PathBuf,
    /// The task context of every execution, made once (making one clones the session's state).
    task: Arc<TaskContext>,
    plan: Arc<dyn ExecutionPlan>,
    slot: Arc<BatchSlot>,
    /// The same plan as a tree of row-wise operators evaluated directly, when it is one.
    direct: Option<Arc<Direct>>,
}

/// A physical plan made only of row-wise operators over the input (projections, filters, unions
/// of those), evaluated by calling its physical expressions on the input
/// batches: the very expressions DataFusion's operators would evaluate, without building streams,
/// metrics and operator state for every execution. For a micro-batch of a few rows (an API
/// request) that set-up is most of the cost; for larger batches it is a fixed cost per batch.
/// Any other operator (aggregation, window, join, sort, limit...) leaves the plan to DataFusion.
#[derive(Debug)]
enum Direct {
    /// The input table, with the columns the scan projects (`None`: all).
    Input(Option<Vec<usize>>),
    /// Expressions over the child's rows.
    Projection {
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
        input: Box<Direct>,
    },
    /// The child's rows where the predicate is true, then the projected columns.
    Filter {
        predicate: Arc<dyn PhysicalExpr>,
        projection: Option<Vec<usize>>,
        input: Box<Direct>,
    },
    /// The children's rows, one child after the other.
    Union(Vec<Direct>),
}

impl Direct {
    fn of(plan: &Arc<dyn ExecutionPlan>) -> Option<Self> {
        use datafusion::physical_plan::coop::CooperativeExec;
        use datafusion::physical_plan::filter::FilterExec;
        use datafusion::physical_plan::projection::ProjectionExec;
        use datafusion::physical_plan::streaming::StreamingTableExec;
        use datafusion::physical_plan::union::UnionExec;
        let any = plan.as_ref();
        if let Some(p) = any.downcast_ref::<ProjectionExec>() {
            let input = p.input().schema();
            return Some(Direct::Projection {
                exprs: p
                    .expr()
                    .iter()
                    .map(|e| resolve_fields(e.expr.clone(), &input))
                    .collect::<Option<_>>()?,
                schema: p.schema(),
                input: Box::new(Self::of(p.input())?),
            });
        }
        if let Some(f) = any.downcast_ref::<FilterExec>() {
            return Some(Direct::Filter {
                predicate: resolve_fields(f.predicate().clone(), &f.input().schema())?,
                projection: f.projection().as_ref().map(|p| p.to_vec()),
                input: Box::new(Self::of(f.input())?),
            });
        }
        if let Some(u) = any.downcast_ref::<UnionExec>() {
            return u
                .inputs()
                .iter()
                .map(Self::of)
                .collect::<Option<_>>()
                .map(Direct::Union);
        }
        if let Some(c) = any.downcast_ref::<CooperativeExec>() {
            return Self::of(c.input());
        }
        if let Some(t) = any.downcast_ref::<StreamingTableExec>() {
            // Only the scan of the query's own input (one partition, the slot), unlimited.
            if t.partitions().len() != 1 || t.limit().is_some() {
                return None;
            }
            return Some(Direct::Input(t.projection().as_ref().map(|p| p.to_vec())));
        }
        None
    }

    /// How many expressions of the tree have their field resolved at planning ([`Resolved`]).
    #[cfg(test)]
    fn resolved(&self) -> usize {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let count = |e: &Arc<dyn PhysicalExpr>| {
            let mut n = 0;
            e.apply(|x| {
                n += usize::from(x.is::<Resolved>());
                Ok(TreeNodeRecursion::Continue)
            })
            .expect("counting never fails");
            n
        };
        match self {
            Direct::Input(_) => 0,
            Direct::Projection { exprs, input, .. } => {
                exprs.iter().map(count).sum::<usize>() + input.resolved()
            }
            Direct::Filter {
                predicate, input, ..
            } => count(predicate) + input.resolved(),
            Direct::Union(children) => children.iter().map(Direct::resolved).sum(),
        }
    }

    fn eval(&self, input: &[RecordBatch]) -> datafusion::error::Result<Vec<RecordBatch>> {
        use datafusion::arrow::array::RecordBatchOptions;
        use datafusion::arrow::compute::filter_record_batch;
        use datafusion::common::cast::as_boolean_array;
        Ok(match self {
            Direct::Input(None) => input.to_vec(),
            Direct::Input(Some(p)) => input
                .iter()
                .map(|b| b.project(p))
                .collect::<Result<_, _>>()?,
            Direct::Projection {
                exprs,
                schema,
                input: child,
            } => {
                let mut out = Vec::new();
                // Empty batches (a rule's filter that kept no row) are dropped: evaluating the
                // expressions of nothing still costs their set-up.
                for b in child.eval(input)?.into_iter().filter(|b| b.num_rows() > 0) {
                    let n = b.num_rows();
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&b).and_then(|v| v.into_array(n)))
                        .collect::<datafusion::error::Result<Vec<_>>>()?;
                    out.push(RecordBatch::try_new_with_options(
                        schema.clone(),
                        columns,
                        &RecordBatchOptions::new().with_row_count(Some(n)),
                    )?);
                }
                out
            }
            Direct::Filter {
                predicate,
                projection,
                input: child,
            } => {
                let mut out = Vec::new();
                for b in child.eval(input)?.into_iter().filter(|b| b.num_rows() > 0) {
                    let mask = predicate.evaluate(&b)?.into_array(b.num_rows())?;
                    let mask = as_boolean_array(&mask)?;
                    if mask.true_count() == 0 {
                        continue;
                    }
                    let b = match projection {
                        Some(p) => b.project(p)?,
                        None => b,
                    };
                    out.push(filter_record_batch(&b, mask)?);
                }
                out
            }
            Direct::Union(children) => {
                let mut out = Vec::new();
                for c in children {
                    out.extend(c.eval(input)?);
                }
                out
            }
        })
    }
}

/// `expr` with the children of its function calls and CASE expressions wrapped in [`Resolved`];
/// `None` when a field cannot be resolved (the plan is then left to DataFusion).
///
/// On every evaluation a scalar function asks each argument for its output field, and a CASE
/// its branches for their type: for anything but a column or a literal that means type coercion
/// and formatting the expression's name, again and again for nested calls. For a batch of a few
/// rows (an API request) that was a good part of the cost of the features and rules.
fn resolve_fields(
    expr: Arc<dyn PhysicalExpr>,
    schema: &SchemaRef,
) -> Option<Arc<dyn PhysicalExpr>> {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    use datafusion::physical_expr::ScalarFunctionExpr;
    use datafusion::physical_expr::expressions::{CaseExpr, Column, Literal};
    expr.transform_up(|node| {
        if !(node.is::<ScalarFunctionExpr>() || node.is::<CaseExpr>()) {
            return Ok(Transformed::no(node));
        }
        let children = node
            .children()
            .into_iter()
            .map(|c| {
                if c.is::<Column>() || c.is::<Literal>() || c.is::<Resolved>() {
                    return Ok(Arc::clone(c));
                }
                Ok(Arc::new(Resolved {
                    field: c.return_field(schema)?,
                    expr: Arc::clone(c),
                }) as Arc<dyn PhysicalExpr>)
            })
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        Ok(Transformed::yes(
            Arc::clone(&node).with_new_children(children)?,
        ))
    })
    .map(|t| t.data)
    .ok()
}

/// An expression whose output field was resolved once, at planning, against the query's fixed
/// input schema; it evaluates as the expression it wraps.
#[derive(Debug, Eq)]
struct Resolved {
    expr: Arc<dyn PhysicalExpr>,
    field: FieldRef,
}

// By hand, like DataFusion's own expressions (rust-lang/rust#78808).
impl PartialEq for Resolved {
    fn eq(&self, other: &Self) -> bool {
        self.expr.eq(&other.expr) && self.field == other.field
    }
}

impl std::hash::Hash for Resolved {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.expr.hash(state);
        self.field.hash(state);
    }
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.expr.fmt(f)
    }
}

impl PhysicalExpr for Resolved {
    fn data_type(&self, _: &Schema) -> datafusion::error::Result<DataType> {
        Ok(self.field.data_type().clone())
    }

    fn nullable(&self, _: &Schema) -> datafusion::error::Result<bool> {
        Ok(self.field.is_nullable())
    }

    fn return_field(&self, _: &Schema) -> datafusion::error::Result<FieldRef> {
        Ok(Arc::clone(&self.field))
    }

    fn evaluate(&self, batch: &RecordBatch) -> datafusion::error::Result<ColumnarValue> {
        self.expr.evaluate(batch)
    }

    fn children(&self) -> Vec<&Arc<dyn PhysicalExpr>> {
        vec![&self.expr]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn PhysicalExpr>>,
    ) -> datafusion::error::Result<Arc<dyn PhysicalExpr>> {
        Ok(Arc::new(Resolved {
            expr: Arc::clone(&children[0]),
            field: Arc::clone(&self.field),
        }))
    }

    fn fmt_sql(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.expr.fmt_sql(f)
    }
}

impl std::fmt::Debug for CompiledQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledQuery")
            .field("file", &self.file)
            .field("schema", &self.plan.schema())
            .finish()
    }
}

impl CompiledQuery {
    /// Read and compile a SQL file.
    pub async fn compile_file(
        file: &Path,
        input_name: &str,
        input_schema: SchemaRef,
    ) -> Result<Self, SqlError> {
        let sql = std::fs::read_to_string(file).map_err(|source| SqlError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Self::compile(file, &sql, input_name, input_schema).await
    }

    /// Compile SQL text; `file` names it in errors.
    pub async fn compile(
        file: &Path,
        sql: &str,
        input_name: &str,
        input_schema: SchemaRef,
    ) -> Result<Self, SqlError> {
        let plan_err = |source: DataFusionError| {
            let message = source.to_string();
            SqlError::Plan {
                file: file.to_path_buf(),
                line: error_line(&message, sql),
                message: message.trim().to_string(),
                source,
            }
        };
        let ctx = session();
        let slot = Arc::new(BatchSlot {
            schema: input_schema.clone(),
            batches: Mutex::new(Vec::new()),
        });
        let table = StreamingTable::try_new(input_schema, vec![slot.clone()]).map_err(plan_err)?;
        ctx.register_table(input_name, Arc::new(table))
            .map_err(plan_err)?;
        let statements = sql
            .split(';')
            .filter(|s| !strip_sql_comments(s).trim().is_empty())
            .count();
        if statements != 1 {
            return Err(SqlError::Contract {
                file: file.to_path_buf(),
                message: format!("must hold exactly one SELECT statement, found {statements}"),
            });
        }
        let df = ctx.sql(sql).await.map_err(plan_err)?;
        let plan = df.create_physical_plan().await.map_err(plan_err)?;
        let direct = Direct::of(&plan).map(Arc::new);
        tracing::debug!(file = %file.display(), direct = direct.is_some(), "query compiled");
        Ok(Self {
            file: file.to_path_buf(),
            task: ctx.task_ctx(),
            plan,
            slot,
            direct,
        })
    }

    /// Let every cross join of the plan stream the input table instead of collecting it, when
    /// the other side does not read the input (a `CROSS JOIN (VALUES ...)` of window offsets).
    /// DataFusion's cross join collects its left side and emits one batch per left row: with the
    /// input on the left, a batch of 20,000 rows became 20,000 batches of 3 rows, each evaluated
    /// on its own (of the whole process's time end to end, 39% went to the hopping aggregate).
    /// Swapped, it emits one batch of the input's size per offset. The rows come out in another
    /// order, so only for queries whose result does not depend on it (aggregates).
    pub fn stream_input_through_cross_joins(&mut self) -> Result<usize, SqlError> {
        use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
        use datafusion::physical_plan::joins::CrossJoinExec;
        use datafusion::physical_plan::streaming::StreamingTableExec;
        fn reads_input(plan: &Arc<dyn ExecutionPlan>) -> bool {
            let mut found = false;
            let _ = plan.apply(|p| {
                found |= p.as_ref().is::<StreamingTableExec>();
                Ok(if found {
                    TreeNodeRecursion::Stop
                } else {
                    TreeNodeRecursion::Continue
                })
            });
            found
        }
        let mut swapped = 0;
        let plan = Arc::clone(&self.plan)
            .transform_up(|p| {
                if let Some(j) = p.as_ref().downcast_ref::<CrossJoinExec>()
                    && reads_input(j.left())
                    && !reads_input(j.right())
                {
                    swapped += 1;
                    return Ok(Transformed::yes(j.swap_inputs()?));
                }
                Ok(Transformed::no(p))
            })
            .map_err(|source| SqlError::Plan {
                file: self.file.clone(),
                line: None,
                message: source.to_string(),
                source,
            })?
            .data;
        self.plan = plan;
        Ok(swapped)
    }

    /// Schema of the result.
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// The file this query came from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Run the compiled plan over `input`.
    pub async fn execute(&self, input: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, SqlError> {
        let exec_err = |source| SqlError::Execute {
            file: self.file.clone(),
            source,
        };
        if let Some(direct) = &self.direct {
            return direct.eval(&input).map_err(exec_err);
        }
        self.execute_planned(input).await
    }

    /// Run the plan through DataFusion's operators, even when it could be evaluated directly.
    async fn execute_planned(&self, input: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, SqlError> {
        let exec_err = |source| SqlError::Execute {
            file: self.file.clone(),
            source,
        };
        self.slot.put(input);
        let plan = datafusion::physical_plan::execution_plan::reset_plan_states(self.plan.clone())
            .map_err(exec_err)?;
        let out = collect(plan, self.task.clone()).await.map_err(exec_err);
        self.slot.put(Vec::new());
        out
    }

    /// Whether the plan is evaluated directly (see [`Direct`]).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Remove `--` line comments and `/* */` block comments.
pub fn strip_sql_comments(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            out.push(c);
            if c == '\'' {
                in_str = false;
            }
            continue;
        }
        match (c, chars.peek()) {
            ('\'', _) => {
                in_str = true;
                out.push(c);
            }
            ('-', Some('-')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The line an error message points at: `Line: N` from the parser, or the first line that mentions
/// the identifier a planning error names.
fn error_line(message: &str, sql: &str) -> Option<usize> {
    if let Some(pos) = message.find("Line: ") {
        let digits: String = message[pos + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
    }
    if message.contains("found: EOF") {
        let code = strip_sql_comments(sql);
        return code
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, _)| i + 1)
            .last();
    }
    for marker in [
        "No field named ",
        "table '",
        "Invalid function '",
        "function '",
    ] {
        if let Some(pos) = message.find(marker) {
            let rest = &message[pos + marker.len()..];
            let ident: String = rest
                .trim_start_matches(['"', '\'', '`'])
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            let ident = ident.trim_end_matches('.');
            let ident = ident.rsplit('.').next().unwrap_or(ident).to_lowercase();
            if ident.is_empty() {
                continue;
            }
            let code = strip_sql_comments(sql);
            for (i, line) in code.lines().enumerate() {
                let line = line.to_lowercase();
                let is_word = |c: char| c.is_alphanumeric() || c == '_';
                if line.split(|c: char| !is_word(c)).any(|w| w == ident) {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
        ]))
    }

    fn batch(ids: &[&str], ns: &[i64]) -> RecordBatch {
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(Int64Array::from(ns.to_vec())),
            ],
        )
        .unwrap()
    }

    #[tokio::test]
    async fn plans_once_and_reexecutes_on_each_batch() {
        let q = CompiledQuery::compile(
            Path::new("q.sql"),
            "SELECT id, n * 2 AS n2 FROM input WHERE n > 1 ORDER BY n DESC",
            "input",
            schema(),
        )
        .await
        .unwrap();
        let out1 = q
            .execute(vec![batch(&["a", "b", "c"], &[1, 2, 3])])
            .await
            .unwrap();
        datafusion::assert_batches_eq!(
            [
                "+----+----+",
                "| id | n2 |",
                "+----+----+",
                "| c  | 6  |",
                "| b  | 4  |",
                "+----+----+"
            ],
            &out1
        );
        let out2 = q
            .execute(vec![batch(&["x"], &[10]), batch(&["y"], &[0])])
            .await
            .unwrap();
        datafusion::assert_batches_eq!(
            [
                "+----+----+",
                "| id | n2 |",
                "+----+----+",
                "| x  | 20 |",
                "+----+----+"
            ],
            &out2
        );
        let out3 = q.execute(vec![]).await.unwrap();
        assert_eq!(out3.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
    }

    #[tokio::test]
    async fn row_wise_plans_are_evaluated_directly_with_the_same_results() {
        let direct = [
            "SELECT id, n * 2 AS n2, CASE WHEN n > 2 THEN 'big' ELSE 'small' END AS size FROM input",
            "SELECT id FROM input WHERE n % 2 = 1 AND id <> 'c'",
            "SELECT id, 'odd' AS why FROM input WHERE n % 2 = 1 \
             UNION ALL SELECT id, 'big' AS why FROM input WHERE n > 2",
            "SELECT upper(id) AS id, coalesce(n, 0) + 1 AS m FROM input",
            // Nested calls and CASE branches computed per row (their fields resolved once).
            "SELECT id, round(sqrt(CAST(n AS DOUBLE) * 2.0 + power(CAST(n AS DOUBLE), 2)), 2) AS r, \
             CASE WHEN n > 2 THEN n * 10 ELSE n + 1 END AS c, \
             coalesce(CAST(n AS DOUBLE) / NULLIF(n - 2, 0), -1.0) AS q FROM input",
            // A branch whose filter keeps no row of a batch, or of any batch.
            "SELECT id, concat('n=', n * 2) AS why FROM input WHERE n > 100 \
             UNION ALL SELECT id, concat('small ', upper(id), ' ', round(n / 3.0, 1)) FROM input WHERE n < 3",
        ];
        let planned = [
            "SELECT id, n * 2 AS n2 FROM input ORDER BY n DESC",
            "SELECT id, count(*) AS c FROM input GROUP BY id",
            "SELECT id, sum(n) OVER (ORDER BY n) AS s FROM input",
        ];
        let input = vec![
            batch(&["a", "b", "c"], &[1, 2, 3]),
            batch(&[], &[]),
            batch(&["d", "e"], &[5, 0]),
        ];
        for (sql, expect_direct) in direct
            .iter()
            .map(|s| (s, true))
            .chain(planned.iter().map(|s| (s, false)))
        {
            let q = CompiledQuery::compile(Path::new("q.sql"), sql, "input", schema())
                .await
                .unwrap();
            assert_eq!(q.is_direct(), expect_direct, "{sql}");
            if sql.contains("sqrt(") {
                let resolved = q.direct.as_ref().map_or(0, |d| d.resolved());
                assert!(
                    resolved >= 3,
                    "{resolved} fields resolved at planning: {sql}"
                );
            }
            let a = q.execute(input.clone()).await.unwrap();
            let b = q.execute_planned(input.clone()).await.unwrap();
            let show = |x: &[RecordBatch]| {
                let mut lines: Vec<String> =
                    datafusion::arrow::util::pretty::pretty_format_batches(x)
                        .unwrap()
                        .to_string()
                        .lines()
                        .map(str::to_string)
                        .collect();
                lines.sort();
                lines
            };
            assert_eq!(show(&a), show(&b), "{sql}");
            assert!(a.iter().map(|b| b.num_rows()).sum::<usize>() > 0, "{sql}");
        }
    }

    #[tokio::test]
    async fn every_scan_of_the_input_sees_the_whole_batch() {
        let q = CompiledQuery::compile(
            Path::new("u.sql"),
            "SELECT id FROM input WHERE n = 1 UNION ALL SELECT id FROM input WHERE n = 2 \
             UNION ALL SELECT id FROM input WHERE n = 3",
            "input",
            schema(),
        )
        .await
        .unwrap();
        for _ in 0..20 {
            let out = q
                .execute(vec![batch(&["a", "b", "c"], &[1, 2, 3])])
                .await
                .unwrap();
            let n: usize = out.iter().map(|b| b.num_rows()).sum();
            assert_eq!(n, 3, "each UNION branch saw the batch");
        }
    }

    #[tokio::test]
    async fn errors_name_file_and_line() {
        let err = CompiledQuery::compile(
            Path::new("m.sql"),
            "SELECT id,\n  nope AS x\nFROM input",
            "input",
            schema(),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("m.sql:2: "), "{text}");
        let err = CompiledQuery::compile(
            Path::new("m.sql"),
            "SELECT id\nFROM input\nWHERE",
            "input",
            schema(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().starts_with("m.sql:3: "), "{err}");
        let err =
            CompiledQuery::compile(Path::new("m.sql"), "SELECT 1; SELECT 2", "input", schema())
                .await
                .unwrap_err();
        assert!(err.to_string().contains("exactly one SELECT"), "{err}");
    }
}
