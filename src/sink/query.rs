//! Reads for the HTTP API (alerts, one transaction) and label feedback writes, on both sinks:
//! PostgreSQL queries, or the memory store of the demo (which keeps only the latest batches).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::Row;

use super::{Sink, SinkError};
use crate::online::decided_json;

/// Most alerts in one page.
pub const MAX_LIMIT: usize = 1000;

/// Which alerts to list: newest first, `limit` at a time.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// Event time at or after.
    pub from: Option<DateTime<Utc>>,
    /// Event time before.
    pub to: Option<DateTime<Utc>>,
    /// `review` or `decline`.
    pub decision: Option<String>,
    /// Source name.
    pub source: Option<String>,
    /// Page size (1 ..= [`MAX_LIMIT`]).
    pub limit: usize,
    /// Continue after this position (from [`AlertPage::next_cursor`]).
    pub cursor: Option<Cursor>,
}

/// A position in the alert list: (event time in ms, transaction id) of the last alert seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// Event time, epoch ms.
    pub event_time_ms: i64,
    /// Transaction id.
    pub transaction_id: String,
}

impl Cursor {
    /// The opaque text form: `<ms>.<hex of the id>`.
    pub fn encode(&self) -> String {
        let hex: String = self
            .transaction_id
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{}.{hex}", self.event_time_ms)
    }

    /// Parse [`Cursor::encode`]'s form.
    pub fn decode(s: &str) -> Option<Self> {
        let (ms, hex) = s.split_once('.')?;
        let event_time_ms = ms.parse().ok()?;
        if hex.len() % 2 != 0 || !hex.is_ascii() {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        Some(Self {
            event_time_ms,
            transaction_id: String::from_utf8(bytes).ok()?,
        })
    }
}

/// One page of alerts.
#[derive(Debug, Clone, Default)]
pub struct AlertPage {
    /// The alerts (columns of the `alerts` table; amount as an exact decimal string).
    pub alerts: Vec<Value>,
    /// Where the next page starts; `None` at the end.
    pub next_cursor: Option<String>,
}

/// Confirmed fraud / genuine feedback about one transaction (a chargeback, a PIX MED report, an
/// analyst's verdict).
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// The labelled transaction.
    pub transaction_id: String,
    /// `true` for fraud, `false` for genuine.
    pub fraud: bool,
    /// chargeback, med, claim, analyst…
    pub report_type: Option<String>,
    /// When the label became known.
    pub reported_at: DateTime<Utc>,
    /// Source of the transaction (taken from the stored transaction when not given).
    pub source: Option<String>,
    /// Event time of the transaction (taken from the stored transaction when not given).
    pub transaction_time: Option<DateTime<Utc>>,
    /// Fraud scenario, when known.
    pub fraud_scenario: Option<String>,
}

impl Label {
    /// `fraud` or `genuine`.
    pub fn label(&self) -> &'static str {
        if self.fraud { "fraud" } else { "genuine" }
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "transaction_id": self.transaction_id,
            "label": self.label(),
            "report_type": self.report_type,
            "reported_at": rfc3339(&self.reported_at),
            "source": self.source,
            "transaction_time": self.transaction_time.as_ref().map(rfc3339),
            "fraud_scenario": self.fraud_scenario,
        })
    }
}

/// What storing a label did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelStored {
    /// False when the transaction was labelled before (the first report wins).
    pub stored: bool,
    /// Whether the transaction is known to the store.
    pub transaction_known: bool,
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

const TIME_JSON: &str = r#"to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#;

fn time_json(col: &str) -> String {
    TIME_JSON.replace("{}", col)
}

impl Sink {
    /// A page of alerts, newest first.
    pub async fn alerts(&self, f: &AlertFilter) -> Result<AlertPage, SinkError> {
        let limit = f.limit.clamp(1, MAX_LIMIT);
        match self {
            Self::Postgres(pg) => {
                let sql = format!(
                    "SELECT (to_jsonb(a) || jsonb_build_object('amount', a.amount::text, \
                     'event_time', {et}, 'created_at', {ct}))::text, \
                     (extract(epoch FROM a.event_time) * 1000)::bigint, a.transaction_id \
                     FROM alerts a \
                     WHERE ($1::timestamptz IS NULL OR a.event_time >= $1) \
                       AND ($2::timestamptz IS NULL OR a.event_time < $2) \
                       AND ($3::text IS NULL OR a.decision = $3) \
                       AND ($4::text IS NULL OR a.source = $4) \
                       AND ($5::timestamptz IS NULL OR (a.event_time, a.transaction_id) < ($5, $6::text)) \
                     ORDER BY a.event_time DESC, a.transaction_id DESC LIMIT $7",
                    et = time_json("a.event_time"),
                    ct = time_json("a.created_at"),
                );
                let cursor_time = f
                    .cursor
                    .as_ref()
                    .and_then(|c| DateTime::<Utc>::from_timestamp_millis(c.event_time_ms));
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(f.from)
                    .bind(f.to)
                    .bind(&f.decision)
                    .bind(&f.source)
                    .bind(cursor_time)
                    .bind(f.cursor.as_ref().map(|c| c.transaction_id.clone()))
                    .bind(limit as i64 + 1)
                    .fetch_all(pg.pool())
                    .await?;
                let mut page = AlertPage::default();
                for (i, r) in rows.iter().enumerate() {
                    if i == limit {
                        let last = &rows[limit - 1];
                        page.next_cursor = Some(
                            Cursor {
                                event_time_ms: last.get(1),
                                transaction_id: last.get(2),
                            }
                            .encode(),
                        );
                        break;
                    }
                    let text: String = r.get(0);
                    page.alerts.push(parse_json(&text));
                }
                Ok(page)
            }
            Self::Memory(mem) => {
                let mut all: Vec<(i64, String, Value)> = Vec::new();
                for b in mem.recent() {
                    for row in decided_json(&b).map_err(SinkError::Internal)? {
                        if row.decision == "approve" {
                            continue;
                        }
                        let alert = row.alert();
                        let ms = alert["event_time"]
                            .as_str()
                            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                            .map_or(0, |t| t.timestamp_millis());
                        let id = alert["transaction_id"].as_str().unwrap_or("").to_string();
                        all.push((ms, id, alert));
                    }
                }
                all.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
                all.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
                let keep = |(ms, id, a): &(i64, String, Value)| {
                    f.from.is_none_or(|t| *ms >= t.timestamp_millis())
                        && f.to.is_none_or(|t| *ms < t.timestamp_millis())
                        && f.decision.as_deref().is_none_or(|d| a["decision"] == d)
                        && f.source.as_deref().is_none_or(|s| a["source"] == s)
                        && f.cursor.as_ref().is_none_or(|c| {
                            (*ms, id.as_str()) < (c.event_time_ms, c.transaction_id.as_str())
                        })
                };
                let mut selected: Vec<(i64, String, Value)> =
                    all.into_iter().filter(keep).take(limit + 1).collect();
                let mut page = AlertPage::default();
                if selected.len() > limit {
                    selected.truncate(limit);
                    let last = selected.last().expect("limit >= 1");
                    page.next_cursor = Some(
                        Cursor {
                            event_time_ms: last.0,
                            transaction_id: last.1.clone(),
                        }
                        .encode(),
                    );
                }
                page.alerts = selected.into_iter().map(|x| x.2).collect();
                Ok(page)
            }
        }
    }

    /// One stored transaction (the newest, if a producer reused its id) with its decision, rule
    /// hits, features (alerts only, in PostgreSQL) and label, if any.
    pub async fn transaction(&self, id: &str) -> Result<Option<Value>, SinkError> {
        match self {
            Self::Postgres(pg) => {
                let sql = format!(
                    "SELECT (to_jsonb(t) || jsonb_build_object('amount', t.amount::text, \
                     'event_time', {et}, 'processed_at', {pt}, \
                     'features', (SELECT a.features FROM alerts a \
                        WHERE a.transaction_id = t.transaction_id AND a.event_time = t.event_time), \
                     'label', (SELECT jsonb_build_object('label', l.label, 'report_type', l.report_type, \
                        'reported_at', {rt}) FROM labels l WHERE l.transaction_id = t.transaction_id)))::text \
                     FROM transactions t WHERE t.transaction_id = $1 ORDER BY t.event_time DESC LIMIT 1",
                    et = time_json("t.event_time"),
                    pt = time_json("t.processed_at"),
                    rt = time_json("l.reported_at"),
                );
                let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(id)
                    .fetch_optional(pg.pool())
                    .await?;
                Ok(row.map(|r| parse_json(&r.get::<String, _>(0))))
            }
            Self::Memory(mem) => {
                for b in mem.recent().iter().rev() {
                    for row in decided_json(b).map_err(SinkError::Internal)? {
                        if row
                            .transaction
                            .get("transaction_id")
                            .and_then(Value::as_str)
                            == Some(id)
                        {
                            let mut t: Map<String, Value> = row.transaction.clone();
                            t.insert("score".into(), row.score.clone());
                            t.insert("model_version".into(), row.model_version.clone());
                            t.insert("decision".into(), Value::String(row.decision.clone()));
                            t.insert("rule_hits".into(), row.rule_hits.clone());
                            t.insert("features".into(), Value::Object(row.features.clone()));
                            let label = mem.label(id).map(|l| {
                                serde_json::json!({
                                    "label": l.label(),
                                    "report_type": l.report_type,
                                    "reported_at": rfc3339(&l.reported_at),
                                })
                            });
                            t.insert("label".into(), label.unwrap_or(Value::Null));
                            return Ok(Some(Value::Object(t)));
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// Store a label (the first report of a transaction wins). The transaction's source and event
    /// time are taken from the stored transaction when the label does not say.
    pub async fn store_label(&self, label: &Label) -> Result<LabelStored, SinkError> {
        match self {
            Self::Postgres(pg) => {
                let row = sqlx::query(
                    "WITH t AS (SELECT source, event_time FROM transactions \
                                WHERE transaction_id = $1 ORDER BY event_time DESC LIMIT 1), \
                          ins AS (INSERT INTO labels (transaction_id, source, label, report_type, \
                                    fraud_scenario, transaction_time, reported_at) \
                                  SELECT $1, COALESCE($2, (SELECT source FROM t)), $3, $4, $5, \
                                         COALESCE($6, (SELECT event_time FROM t)), $7 \
                                  ON CONFLICT (transaction_id) DO NOTHING RETURNING 1) \
                     SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM t)",
                )
                .bind(&label.transaction_id)
                .bind(&label.source)
                .bind(label.label())
                .bind(&label.report_type)
                .bind(&label.fraud_scenario)
                .bind(label.transaction_time)
                .bind(label.reported_at)
                .fetch_one(pg.pool())
                .await?;
                Ok(LabelStored {
                    stored: row.get::<i64, _>(0) > 0,
                    transaction_known: row.get::<i64, _>(1) > 0,
                })
            }
            Self::Memory(mem) => {
                let known = self.transaction(&label.transaction_id).await?.is_some();
                Ok(LabelStored {
                    stored: mem.insert_label(label.clone()),
                    transaction_known: known,
                })
            }
        }
    }

    /// Whether the store answers (a `SELECT 1` in PostgreSQL).
    pub async fn ping(&self) -> Result<(), SinkError> {
        match self {
            Self::Postgres(pg) => {
                sqlx::query("SELECT 1").execute(pg.pool()).await?;
                Ok(())
            }
            Self::Memory(_) => Ok(()),
        }
    }
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_any_id() {
        for id in ["a1", "", "é/?&=.x", "E12345678202611011200abcdefghijk"] {
            let c = Cursor {
                event_time_ms: 1_730_000_000_123,
                transaction_id: id.into(),
            };
            assert_eq!(Cursor::decode(&c.encode()), Some(c));
        }
        for bad in ["", "x", "12", "12.z", "12.abc", "-.00", "1.ff"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }
}
