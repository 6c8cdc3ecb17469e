//! Rules and decisions.
//!
//! `rules.sql` is one query over the table `scored` (canonical columns, features, `score`,
//! `model_version`) yielding one row per rule hit: `transaction_id`, `rule`, `severity`
//! (`info`, `review` or `decline`) and `reason`. Rules are usually a `UNION ALL` of one SELECT each.
//!
//! The decision of a transaction is the strongest of: its rule hits' severities, `review` when the
//! model score is at or above `engine.review_threshold`, `decline` at or above
//! `engine.decline_threshold`. Otherwise `approve`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use super::EngineError;
use super::sql::CompiledQuery;

/// A decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Decision {
    /// Let it through.
    Approve,
    /// Let it through and queue for an analyst.
    Review,
    /// Block it.
    Decline,
}

impl Decision {
    /// Its name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Review => "review",
            Self::Decline => "decline",
        }
    }
}

/// Severity of a rule hit.
fn severity(s: &str) -> Option<Decision> {
    match s {
        "info" => Some(Decision::Approve),
        "review" => Some(Decision::Review),
        "decline" => Some(Decision::Decline),
        _ => None,
    }
}

/// The compiled rules.
#[derive(Debug)]
pub struct RuleStage {
    query: CompiledQuery,
    review: f64,
    decline: f64,
}

/// Decision columns for a batch, row-aligned.
#[derive(Debug, Clone)]
pub struct Decided {
    /// `decision` (Utf8).
    pub decision: ArrayRef,
    /// `rule_hits`: JSON array of `{rule, severity, reason}` (Utf8).
    pub rule_hits: ArrayRef,
}

impl RuleStage {
    /// Compile `file` against the `scored` schema.
    pub async fn compile(
        file: &Path,
        scored: SchemaRef,
        review: f64,
        decline: f64,
    ) -> Result<Self, EngineError> {
        let query = CompiledQuery::compile_file(file, "scored", scored).await?;
        let schema = query.schema();
        let want = ["transaction_id", "rule", "severity", "reason"];
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let text = |i: usize| {
            matches!(
                schema.field(i).data_type(),
                DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
            )
        };
        if names != want || !(0..4).all(text) {
            return Err(EngineError::Contract {
                file: file.to_path_buf(),
                message: format!(
                    "must yield the text columns transaction_id, rule, severity, reason (in that order); yields {}",
                    schema
                        .fields()
                        .iter()
                        .map(|f| format!("{} {}", f.name(), f.data_type()))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(Self {
            query,
            review,
            decline,
        })
    }

    /// The scored schema: canonical + features + score + model_version.
    pub fn scored_schema(canonical: &Schema, features: &Schema) -> SchemaRef {
        let mut fields: Vec<Field> = canonical
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.extend(features.fields().iter().map(|f| f.as_ref().clone()));
        fields.push(Field::new("score", DataType::Float64, true));
        fields.push(Field::new("model_version", DataType::Utf8, true));
        Arc::new(Schema::new(fields))
    }

    /// Evaluate the rules on a scored batch and decide each row.
    pub async fn decide(&self, scored: &RecordBatch) -> Result<Decided, EngineError> {
        let file = self.query.file().to_path_buf();
        let hits = self.query.execute(vec![scored.clone()]).await?;
        let mut by_id: HashMap<String, Vec<(String, Decision, String)>> = HashMap::new();
        for b in &hits {
            let col = |i: usize| -> Result<ArrayRef, EngineError> {
                datafusion::arrow::compute::cast(b.column(i), &DataType::Utf8).map_err(|source| {
                    EngineError::Arrow {
                        file: file.clone(),
                        source,
                    }
                })
            };
            let (ids, rules, sev, reasons) = (col(0)?, col(1)?, col(2)?, col(3)?);
            let s = |a: &ArrayRef| {
                a.as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .expect("Utf8")
            };
            let (ids, rules, sev, reasons) = (s(&ids), s(&rules), s(&sev), s(&reasons));
            for i in 0..b.num_rows() {
                if ids.is_null(i) {
                    continue;
                }
                let level = if sev.is_null(i) {
                    None
                } else {
                    severity(sev.value(i))
                };
                let Some(level) = level else {
                    return Err(EngineError::Contract {
                        file: file.clone(),
                        message: format!(
                            "rule {:?} yielded severity {:?}; use 'info', 'review' or 'decline'",
                            rules.value(i),
                            if sev.is_null(i) { "NULL" } else { sev.value(i) }
                        ),
                    });
                };
                by_id.entry(ids.value(i).to_string()).or_default().push((
                    if rules.is_null(i) {
                        "unnamed".into()
                    } else {
                        rules.value(i).to_string()
                    },
                    level,
                    if reasons.is_null(i) {
                        String::new()
                    } else {
                        reasons.value(i).to_string()
                    },
                ));
            }
        }
        let n = scored.num_rows();
        let ids = scored
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("transaction_id is Utf8");
        let score = scored
            .column_by_name("score")
            .and_then(|c| c.as_any().downcast_ref::<Float64Array>().cloned());
        let mut decision = StringBuilder::with_capacity(n, n * 7);
        let mut rule_hits = StringBuilder::with_capacity(n, n * 2);
        for i in 0..n {
            let mut d = Decision::Approve;
            if let Some(s) = score.as_ref().filter(|s| !s.is_null(i)).map(|s| s.value(i)) {
                if s >= self.decline {
                    d = Decision::Decline;
                } else if s >= self.review {
                    d = Decision::Review;
                }
            }
            match by_id.get(ids.value(i)) {
                Some(hits) => {
                    let mut json = String::from("[");
                    for (k, (rule, level, reason)) in hits.iter().enumerate() {
                        d = d.max(*level);
                        if k > 0 {
                            json.push(',');
                        }
                        let sev = match level {
                            Decision::Approve => "info",
                            other => other.as_str(),
                        };
                        json.push_str(
                            &serde_json::json!({"rule": rule, "severity": sev, "reason": reason})
                                .to_string(),
                        );
                    }
                    json.push(']');
                    rule_hits.append_value(json);
                }
                None => rule_hits.append_value("[]"),
            }
            decision.append_value(d.as_str());
        }
        Ok(Decided {
            decision: Arc::new(decision.finish()),
            rule_hits: Arc::new(rule_hits.finish()),
        })
    }
}
