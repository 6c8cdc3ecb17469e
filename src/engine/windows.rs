//! Planning of `features.sql`: the window functions of the query are taken out and evaluated
//! incrementally by [`super::state`]; the rest of the query runs in DataFusion.
//!
//! `features.sql` is one `SELECT … FROM transactions`. Every window function call in it, such as
//!
//! ```sql
//! count(*) OVER (PARTITION BY card_id ORDER BY event_time
//!                RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW)
//! ```
//!
//! is replaced by a column `__w<i>`. A *pre* query (`SELECT <partition keys>, <arguments> FROM
//! transactions`) evaluates the partition keys and arguments with DataFusion, the window operator
//! computes `__w<i>` per row against the per-entity history, and the rewritten *post* query (the
//! user's SELECT with `__w<i>` in place of the window calls) computes the final feature columns.
//!
//! Semantics (batch-boundary invariant): a row's window holds the rows of the same entity that
//! arrived before it, and itself, whose `event_time` lies in `[event_time - range, event_time]`.
//! A NULL partition key gives a NULL (or 0 for counts) result: an unknown entity has no history.
//! `lag(x)` is the value of the entity's previous row by event time within the kept history.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use datafusion::sql::sqlparser::ast::{
    DateTimeField, DuplicateTreatment, Expr, FunctionArg, FunctionArgExpr, FunctionArguments,
    Ident, SetExpr, Spanned, Statement, Value, WindowFrameBound, WindowFrameUnits, WindowType,
    visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

/// An aggregate the window operator evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowFunc {
    /// `count(*)`.
    CountStar,
    /// `count(x)`: non-null values.
    Count,
    /// `count(DISTINCT x)`.
    CountDistinct,
    /// `sum(x)`.
    Sum,
    /// `avg(x)`.
    Avg,
    /// `min(x)`.
    Min,
    /// `max(x)`.
    Max,
    /// `lag(x)`: the previous row's value.
    Lag,
    /// `fraud_labels(*)`: transactions of the entity in the frame known as fraud by the row's own
    /// event time (a label counts once its `reported_at` is at or before it). Evaluated from the
    /// label feedback ([`super::labels`]), not from the row history.
    FraudLabels,
    /// `known_labels(*)`: transactions of the entity in the frame with any label (fraud or
    /// genuine) known by the row's own event time.
    KnownLabels,
}

impl WindowFunc {
    /// Whether the call reads the label feedback rather than the row history.
    pub fn is_label(self) -> bool {
        matches!(self, Self::FraudLabels | Self::KnownLabels)
    }
}

/// One window function call of the query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowCall {
    /// The function.
    pub func: WindowFunc,
    /// Its argument as SQL (None for `count(*)`).
    pub arg: Option<String>,
    /// The `PARTITION BY` expression as SQL.
    pub partition: String,
    /// Frame length in milliseconds (`RANGE BETWEEN <range> PRECEDING AND CURRENT ROW`); for
    /// `lag` the kept history.
    pub range_ms: i64,
}

/// A planned `features.sql`.
#[derive(Debug, Clone)]
pub struct FeaturePlan {
    /// The file.
    pub file: PathBuf,
    /// Distinct window calls; call `i` becomes column `__w<i>`.
    pub calls: Vec<WindowCall>,
    /// Distinct partition expressions; key `j` becomes pre-query column `__k<j>`.
    pub keys: Vec<String>,
    /// For each call, the index of its key.
    pub call_key: Vec<usize>,
    /// The pre query: keys and arguments.
    pub pre_sql: String,
    /// The user's query with window calls replaced by `__w<i>` columns.
    pub post_sql: String,
    /// The longest frame of the row-history calls (ms).
    pub longest_range_ms: i64,
    /// The longest frame of the label calls (ms).
    pub longest_label_ms: i64,
}

/// A problem in `features.sql`, with its line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct WindowPlanError {
    /// The SQL file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub message: String,
}

/// Name of the event-time column windows are ordered by.
pub const ORDER_COLUMN: &str = "event_time";

impl FeaturePlan {
    /// Plan `sql`. `history_ms` is the declared history (`engine.history`); a frame longer than it
    /// is an error, and `lag` looks back at most that far. Label calls (`fraud_labels(*)`,
    /// `known_labels(*)`) may reach back `label_history_ms` (`labels.history`).
    pub fn plan(
        file: &Path,
        sql: &str,
        history_ms: i64,
        label_history_ms: i64,
    ) -> Result<Self, WindowPlanError> {
        let err = |line: Option<usize>, message: String| WindowPlanError {
            file: file.to_path_buf(),
            line,
            message,
        };
        let mut statements = Parser::parse_sql(&GenericDialect {}, sql)
            .map_err(|e| err(parse_error_line(&e.to_string()), e.to_string()))?;
        if statements.len() != 1 {
            return Err(err(
                None,
                format!(
                    "must hold exactly one SELECT statement, found {}",
                    statements.len()
                ),
            ));
        }
        match &statements[0] {
            Statement::Query(q) if matches!(q.body.as_ref(), SetExpr::Select(_)) => {}
            _ => {
                return Err(err(
                    Some(1),
                    "must be a single SELECT … FROM transactions (no UNION, no other statement)"
                        .into(),
                ));
            }
        }

        let mut calls: BTreeMap<WindowCall, usize> = BTreeMap::new();
        let mut order: Vec<WindowCall> = Vec::new();
        let mut problem: Option<WindowPlanError> = None;
        let _ = visit_expressions_mut(&mut statements, |expr| {
            let Expr::Function(f) = expr else {
                return ControlFlow::Continue(());
            };
            let Some(over) = &f.over else {
                return ControlFlow::Continue(());
            };
            let line = Some(f.span().start.line as usize).filter(|l| *l > 0);
            let fail = |m: String| ControlFlow::Break(err(line, m));
            let spec = match over {
                WindowType::WindowSpec(s) => s,
                WindowType::NamedWindow(n) => {
                    return fail(format!(
                        "named window `{n}`: write the window inline as OVER (PARTITION BY … ORDER BY event_time RANGE BETWEEN INTERVAL '…' PRECEDING AND CURRENT ROW)"
                    ));
                }
            };
            let name = f.name.to_string().to_lowercase();
            let (distinct, args) = match &f.args {
                FunctionArguments::List(l) => (
                    matches!(l.duplicate_treatment, Some(DuplicateTreatment::Distinct)),
                    l.args.clone(),
                ),
                FunctionArguments::None => (false, vec![]),
                FunctionArguments::Subquery(_) => {
                    return fail(format!("{name}: a subquery argument is not supported"));
                }
            };
            if f.filter.is_some() {
                return fail(format!(
                    "{name}: FILTER (WHERE …) is not supported in a window; use CASE WHEN … THEN x END as the argument"
                ));
            }
            let arg = match args.as_slice() {
                [] => None,
                [FunctionArg::Unnamed(FunctionArgExpr::Wildcard)] => None,
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => Some(e.to_string()),
                _ => {
                    return fail(format!("{name}: exactly one argument is supported"));
                }
            };
            let func = match (name.as_str(), distinct, arg.is_some()) {
                ("count", false, false) => WindowFunc::CountStar,
                ("count", false, true) => WindowFunc::Count,
                ("count", true, true) => WindowFunc::CountDistinct,
                ("sum", false, true) => WindowFunc::Sum,
                ("avg", false, true) => WindowFunc::Avg,
                ("min", false, true) => WindowFunc::Min,
                ("max", false, true) => WindowFunc::Max,
                ("lag", false, true) => WindowFunc::Lag,
                ("fraud_labels", false, false) => WindowFunc::FraudLabels,
                ("known_labels", false, false) => WindowFunc::KnownLabels,
                ("fraud_labels" | "known_labels", _, _) => {
                    return fail(format!("{name} takes no argument: write {name}(*)"));
                }
                _ => {
                    return fail(format!(
                        "window function {name}{} is not supported; use count(*), count(x), count(DISTINCT x), sum, avg, min, max, lag(x), fraud_labels(*) or known_labels(*)",
                        if distinct { " DISTINCT" } else { "" }
                    ));
                }
            };
            let partition = match spec.partition_by.as_slice() {
                [p] => p.to_string(),
                [] => {
                    return fail(format!(
                        "{name}: needs PARTITION BY <entity> (card_id, customer_id, merchant_id…)"
                    ));
                }
                _ => {
                    return fail(format!(
                        "{name}: PARTITION BY one expression; combine several with concat(a, '|', b)"
                    ));
                }
            };
            let ordered_by_time = spec.order_by.len() == 1
                && spec.order_by[0].expr.to_string().eq_ignore_ascii_case(ORDER_COLUMN)
                && spec.order_by[0].options.asc != Some(false);
            if !ordered_by_time {
                return fail(format!("{name}: windows must be ORDER BY {ORDER_COLUMN} (ascending)"));
            }
            let range_ms = if func == WindowFunc::Lag {
                if spec.window_frame.is_some() {
                    return fail("lag takes no frame clause".into());
                }
                history_ms
            } else {
                let Some(frame) = &spec.window_frame else {
                    return fail(format!(
                        "{name}: give the frame: RANGE BETWEEN INTERVAL '…' PRECEDING AND CURRENT ROW"
                    ));
                };
                if frame.units != WindowFrameUnits::Range {
                    return fail(format!(
                        "{name}: only RANGE frames over event time are supported (not {})",
                        frame.units
                    ));
                }
                if !matches!(frame.end_bound, None | Some(WindowFrameBound::CurrentRow)) {
                    return fail(format!("{name}: the frame must end at CURRENT ROW"));
                }
                let ms = match &frame.start_bound {
                    WindowFrameBound::Preceding(Some(e)) => match interval_ms(e) {
                        Some(ms) if ms > 0 => ms,
                        _ => {
                            return fail(format!(
                                "{name}: frame start `{e}` is not a positive interval such as INTERVAL '10 minutes'"
                            ));
                        }
                    },
                    WindowFrameBound::Preceding(None) => {
                        return fail(format!(
                            "{name}: UNBOUNDED PRECEDING would keep history forever; give an interval (at most engine.history)"
                        ));
                    }
                    _ => return fail(format!("{name}: the frame must start at INTERVAL '…' PRECEDING")),
                };
                if func.is_label() && ms > label_history_ms {
                    return fail(format!(
                        "{name}: frame of {} exceeds the kept label history labels.history = {}; raise labels.history or shorten the frame",
                        human_ms(ms),
                        human_ms(label_history_ms)
                    ));
                }
                if !func.is_label() && ms > history_ms {
                    return fail(format!(
                        "{name}: frame of {} exceeds the kept history engine.history = {}; raise engine.history or shorten the frame",
                        human_ms(ms),
                        human_ms(history_ms)
                    ));
                }
                ms
            };
            let call = WindowCall {
                func,
                arg,
                partition,
                range_ms,
            };
            let next = calls.len();
            let idx = *calls.entry(call.clone()).or_insert_with(|| {
                order.push(call);
                next
            });
            *expr = Expr::Identifier(Ident::new(format!("__w{idx}")));
            ControlFlow::Continue(())
        })
        .map_break(|e| problem = Some(e));
        if let Some(p) = problem {
            return Err(p);
        }

        let mut keys: Vec<String> = Vec::new();
        let call_key = order
            .iter()
            .map(|c| {
                keys.iter()
                    .position(|k| k == &c.partition)
                    .unwrap_or_else(|| {
                        keys.push(c.partition.clone());
                        keys.len() - 1
                    })
            })
            .collect();
        let mut pre = vec![format!("{ORDER_COLUMN} AS __t")];
        for (j, k) in keys.iter().enumerate() {
            pre.push(format!("CAST({k} AS VARCHAR) AS __k{j}"));
        }
        for (i, c) in order.iter().enumerate() {
            if let Some(a) = c.arg.as_ref().filter(|_| !c.func.is_label()) {
                let a = if c.func == WindowFunc::CountDistinct {
                    format!("CAST({a} AS VARCHAR)")
                } else {
                    a.clone()
                };
                pre.push(format!("{a} AS __a{i}"));
            }
        }
        let pre_sql = format!("SELECT {} FROM transactions", pre.join(", "));
        let longest = |label: bool| {
            order
                .iter()
                .filter(|c| c.func.is_label() == label)
                .map(|c| c.range_ms)
                .max()
                .unwrap_or(0)
        };
        let (longest_range_ms, longest_label_ms) = (longest(false), longest(true));
        Ok(Self {
            file: file.to_path_buf(),
            calls: order,
            keys,
            call_key,
            pre_sql,
            post_sql: statements[0].to_string(),
            longest_range_ms,
            longest_label_ms,
        })
    }
}

fn parse_error_line(message: &str) -> Option<usize> {
    let pos = message.find("Line: ")?;
    message[pos + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

/// Milliseconds of an `INTERVAL '10 minutes'` / `INTERVAL '1' HOUR` expression.
fn interval_ms(e: &Expr) -> Option<i64> {
    let Expr::Interval(iv) = e else { return None };
    let text = match iv.value.as_ref() {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => s.clone(),
            Value::Number(n, _) => n.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    if let Some(field) = &iv.leading_field {
        let n: f64 = text.trim().parse().ok()?;
        let unit = match field {
            DateTimeField::Second => 1_000.0,
            DateTimeField::Minute => 60_000.0,
            DateTimeField::Hour => 3_600_000.0,
            DateTimeField::Day => 86_400_000.0,
            DateTimeField::Week(_) => 604_800_000.0,
            _ => return None,
        };
        return Some((n * unit) as i64);
    }
    parse_duration_ms(&text)
}

/// Parse `"10 minutes"`, `"1 hour 30 minutes"`, `"7 days"`, `"500 milliseconds"`.
pub fn parse_duration_ms(text: &str) -> Option<i64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(2) {
        return None;
    }
    let mut total = 0f64;
    for pair in words.chunks(2) {
        let n: f64 = pair[0].parse().ok()?;
        let unit = match pair[1].to_lowercase().trim_end_matches('s') {
            "millisecond" | "m" => 1.0,
            "second" | "sec" => 1_000.0,
            "minute" | "min" => 60_000.0,
            "hour" | "h" => 3_600_000.0,
            "day" | "d" => 86_400_000.0,
            "week" | "w" => 604_800_000.0,
            _ => return None,
        };
        total += n * unit;
    }
    Some(total as i64)
}

/// `7d`, `10m`-style rendering for messages.
pub fn human_ms(ms: i64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.rem_euclid(size) == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEEK: i64 = 7 * 86_400_000;

    #[test]
    fn extracts_window_calls_and_rewrites_the_query() {
        let sql = "SELECT transaction_id,\n\
            count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n10,\n\
            amount / avg(amount) OVER (PARTITION BY customer_id ORDER BY event_time RANGE BETWEEN INTERVAL '7 days' PRECEDING AND CURRENT ROW) AS rel,\n\
            count(DISTINCT merchant_id) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '1' HOUR PRECEDING AND CURRENT ROW) AS m1h,\n\
            CAST(event_time AS BIGINT) - CAST(lag(event_time) OVER (PARTITION BY card_id ORDER BY event_time) AS BIGINT) AS gap,\n\
            count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) + 1 AS again\n\
            FROM transactions";
        let p = FeaturePlan::plan(Path::new("f.sql"), sql, WEEK, 4 * WEEK).unwrap();
        assert_eq!(p.calls.len(), 4, "the repeated call is planned once");
        assert_eq!(p.keys, vec!["card_id", "customer_id"]);
        assert_eq!(p.call_key, vec![0, 1, 0, 0]);
        assert_eq!(p.calls[0].range_ms, 600_000);
        assert_eq!(p.calls[2].func, WindowFunc::CountDistinct);
        assert_eq!(p.calls[2].range_ms, 3_600_000);
        assert_eq!(p.calls[3].func, WindowFunc::Lag);
        assert_eq!(p.calls[3].range_ms, WEEK);
        assert_eq!(p.longest_range_ms, WEEK);
        assert!(p.post_sql.contains("__w0 AS n10"), "{}", p.post_sql);
        assert!(p.post_sql.contains("__w0 + 1 AS again"), "{}", p.post_sql);
        assert!(!p.post_sql.contains("OVER"), "{}", p.post_sql);
        assert!(
            p.pre_sql.contains("CAST(merchant_id AS VARCHAR) AS __a2"),
            "{}",
            p.pre_sql
        );
    }

    #[test]
    fn unsupported_windows_are_refused_with_their_line() {
        let cases = [
            (
                "SELECT\n  sum(amount) OVER (PARTITION BY card_id ORDER BY event_time ROWS BETWEEN 3 PRECEDING AND CURRENT ROW)\nFROM transactions",
                2,
                "only RANGE frames",
            ),
            (
                "SELECT\n\n  median(amount) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW)\nFROM transactions",
                3,
                "not supported",
            ),
            (
                "SELECT count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN INTERVAL '30 days' PRECEDING AND CURRENT ROW) FROM transactions",
                1,
                "exceeds the kept history engine.history = 7d",
            ),
            (
                "SELECT count(*) OVER (PARTITION BY card_id ORDER BY amount RANGE BETWEEN INTERVAL '1 day' PRECEDING AND CURRENT ROW) FROM transactions",
                1,
                "ORDER BY event_time",
            ),
            (
                "SELECT count(*) OVER (ORDER BY event_time RANGE BETWEEN INTERVAL '1 day' PRECEDING AND CURRENT ROW) FROM transactions",
                1,
                "needs PARTITION BY",
            ),
            (
                "SELECT count(*) OVER (PARTITION BY card_id ORDER BY event_time RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) FROM transactions",
                1,
                "UNBOUNDED",
            ),
        ];
        for (sql, line, what) in cases {
            let e = FeaturePlan::plan(Path::new("f.sql"), sql, WEEK, 4 * WEEK).unwrap_err();
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains(what), "{e}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration_ms("10 minutes"), Some(600_000));
        assert_eq!(parse_duration_ms("1 hour 30 minutes"), Some(5_400_000));
        assert_eq!(parse_duration_ms("7 days"), Some(WEEK));
        assert_eq!(parse_duration_ms("ten minutes"), None);
        assert_eq!(human_ms(WEEK), "7d");
    }
}
