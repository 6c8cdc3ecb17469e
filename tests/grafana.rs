//! The Grafana provisioning (`grafana/provisioning/`) executed the way Grafana would, without a
//! Grafana server: every dashboard panel query and every alert rule query is expanded with the
//! PostgreSQL datasource's macro semantics (Grafana's `pkg/tsdb/grafana-postgresql-datasource`
//! macros and the SQL engine's global substitutions, with and without TimescaleDB) and run against
//! the real PostgreSQL after a real pipeline run; PromQL queries run on the real Prometheus server
//! (Debian package `prometheus`, installed by `.ci/prometheus.sh`) scraping the real binary.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sqlx::{Column, PgConnection, Row, TypeInfo, ValueRef};

use common::{TestEnv, signal};

// ------------------------------------------------------------------------------------------------
// Grafana's query expansion.
// ------------------------------------------------------------------------------------------------

/// A dashboard or alert time range.
#[derive(Debug, Clone, Copy)]
struct TimeRange {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

/// Go's `time.RFC3339Nano` of a UTC time: fractional seconds without trailing zeros, `Z`.
fn rfc3339_nano(t: DateTime<Utc>) -> String {
    let base = t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return base;
    }
    let frac = format!("{nanos:09}");
    let frac = frac.trim_end_matches('0');
    format!("{}.{frac}Z", base.trim_end_matches('Z'))
}

/// Go's `time.ParseDuration` for the forms dashboards use (`500ms`, `10s`, `1m`, `1h30m`), plus
/// gtime's `d` and `w` units.
fn parse_interval(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Some(n) = s.strip_suffix('d').and_then(|n| n.parse::<u64>().ok()) {
        return Some(Duration::from_secs(n * 86_400));
    }
    if let Some(n) = s.strip_suffix('w').and_then(|n| n.parse::<u64>().ok()) {
        return Some(Duration::from_secs(n * 7 * 86_400));
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += num * factor;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// gtime.FormatInterval: the largest unit only, truncated.
fn format_interval(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    let (year, day, hour, minute, second) = (31_536_000_000, 86_400_000, 3_600_000, 60_000, 1000);
    if ms >= year {
        format!("{}y", ms / year)
    } else if ms >= day {
        format!("{}d", ms / day)
    } else if ms >= hour {
        format!("{}h", ms / hour)
    } else if ms >= minute {
        format!("{}m", ms / minute)
    } else if ms >= second {
        format!("{}s", ms / second)
    } else if ms >= 1 {
        format!("{ms}ms")
    } else {
        "1ms".into()
    }
}

/// Grafana's roundInterval: a rounder interval at or below the given one.
fn round_interval(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    let table: &[(u64, u64)] = &[
        (10, 1),
        (15, 10),
        (35, 20),
        (75, 50),
        (150, 100),
        (350, 200),
        (750, 500),
        (1_500, 1_000),
        (3_500, 2_000),
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, 60_000),
        (210_000, 120_000),
        (450_000, 300_000),
        (750_000, 600_000),
        (1_050_000, 900_000),
        (1_500_000, 1_200_000),
        (2_700_000, 1_800_000),
        (5_400_000, 3_600_000),
        (9_000_000, 7_200_000),
        (16_200_000, 10_800_000),
        (32_400_000, 21_600_000),
        (86_400_000, 43_200_000),
        (172_800_000, 86_400_000),
        (604_800_000, 86_400_000),
        (1_814_400_000, 604_800_000),
    ];
    for (limit, value) in table {
        if ms <= *limit {
            return Duration::from_millis(*value);
        }
    }
    if ms < 3_628_800_000 {
        Duration::from_millis(2_592_000_000)
    } else {
        Duration::from_millis(31_536_000_000)
    }
}

/// The panel's `$__interval`: the range over max data points, rounded, at least `min`.
fn calculate_interval(range: TimeRange, max_data_points: u64, min: Duration) -> Duration {
    let span = (range.to - range.from).to_std().unwrap();
    round_interval(span / max_data_points.max(1) as u32).max(min)
}

/// The SQL engine's global substitutions (sqleng.Interpolate), in Grafana's order.
fn interpolate_global(sql: &str, interval: Duration, range: TimeRange) -> String {
    sql.replace("$__interval_ms", &interval.as_millis().to_string())
        .replace("$__interval", &format_interval(interval))
        .replace("$__unixEpochFrom()", &range.from.timestamp().to_string())
        .replace("$__unixEpochTo()", &range.to.timestamp().to_string())
}

/// Go's `%v` of a float64 number of seconds (shortest form: `60`, `0.5`).
fn go_float(v: f64) -> String {
    format!("{v}")
}

fn evaluate_macro(
    name: &str,
    args: &[String],
    range: TimeRange,
    timescaledb: bool,
) -> Result<String, String> {
    let first = || {
        args.first()
            .filter(|a| !a.is_empty())
            .cloned()
            .ok_or_else(|| format!("missing time column argument for macro {name}"))
    };
    let group = |args: &[String]| -> Result<(String, Duration), String> {
        if args.len() < 2 {
            return Err(format!(
                "macro {name} needs time column and interval and optional fill value"
            ));
        }
        let interval = parse_interval(args[1].trim_matches('\''))
            .ok_or_else(|| format!("error parsing interval {}", args[1]))?;
        Ok((args[0].clone(), interval))
    };
    Ok(match name {
        "__time" => format!("{} AS \"time\"", first()?),
        "__timeEpoch" => format!("extract(epoch from {}) as \"time\"", first()?),
        "__timeFilter" => format!(
            "{} BETWEEN '{}' AND '{}'",
            first()?,
            rfc3339_nano(range.from),
            rfc3339_nano(range.to)
        ),
        "__timeFrom" => format!("'{}'", rfc3339_nano(range.from)),
        "__timeTo" => format!("'{}'", rfc3339_nano(range.to)),
        "__timeGroup" => {
            let (col, i) = group(args)?;
            if timescaledb {
                format!("time_bucket('{:.3}s',{col})", i.as_secs_f64())
            } else {
                let s = go_float(i.as_secs_f64());
                format!("floor(extract(epoch from {col})/{s})*{s}")
            }
        }
        "__timeGroupAlias" => {
            format!(
                "{} AS \"time\"",
                evaluate_macro("__timeGroup", args, range, timescaledb)?
            )
        }
        "__unixEpochFilter" => {
            let c = first()?;
            format!(
                "{c} >= {} AND {c} <= {}",
                range.from.timestamp(),
                range.to.timestamp()
            )
        }
        "__unixEpochGroup" => {
            let (col, i) = group(args)?;
            let s = go_float(i.as_secs_f64());
            format!("floor(({col})/{s})*{s}")
        }
        "__unixEpochGroupAlias" => format!(
            "{} AS \"time\"",
            evaluate_macro("__unixEpochGroup", args, range, timescaledb)?
        ),
        other => return Err(format!("unknown macro {other:?}")),
    })
}

/// The PostgreSQL macro engine: every `$name(args)` (regexp `\$([_a-zA-Z0-9]+)\(([^\)]*)\)`),
/// left to right; a `$__timeGroup(...)` directly followed by `,` is the pre-5.3 form and gets
/// the `AS "time"` alias.
fn interpolate_macros(sql: &str, range: TimeRange, timescaledb: bool) -> Result<String, String> {
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + 1;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        if j == i + 1 || j >= bytes.len() || bytes[j] != b'(' {
            i += 1;
            continue;
        }
        let Some(close) = sql[j + 1..].find(')') else {
            i += 1;
            continue;
        };
        let end = j + 1 + close + 1;
        let whole = &sql[start..end];
        let mut name = &sql[start + 1..j];
        if name == "__timeGroup" {
            // Grafana looks at the first occurrence of the same text in the query.
            let at = sql.find(whole).unwrap() + whole.len();
            if sql.as_bytes().get(at) == Some(&b',') {
                name = "__timeGroupAlias";
            }
        }
        let args: Vec<String> = sql[j + 1..end - 1]
            .split(',')
            .map(|a| a.trim().to_string())
            .collect();
        out.push_str(&sql[copied..start]);
        out.push_str(&evaluate_macro(name, &args, range, timescaledb)?);
        copied = end;
        i = end;
    }
    out.push_str(&sql[copied..]);
    Ok(out)
}

/// Template variables as Grafana's frontend formats them for SQL datasources: a multi-value or
/// include-all variable becomes its values quoted and comma-separated (`'a','b'`).
fn interpolate_variables(sql: &str, vars: &BTreeMap<String, Vec<String>>) -> String {
    let mut out = sql.to_string();
    // Longest names first, so `$source_x` is not cut by `$source`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let value = vars[name]
            .iter()
            .map(|v| format!("'{}'", v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(",");
        out = out.replace(&format!("${{{name}}}"), &value);
        out = out.replace(&format!("[[{name}]]"), &value);
        let pat = format!("${name}");
        let mut res = String::new();
        let mut rest = out.as_str();
        while let Some(p) = rest.find(&pat) {
            let after = rest[p + pat.len()..].chars().next();
            res.push_str(&rest[..p]);
            if after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                res.push_str(&pat);
            } else {
                res.push_str(&value);
            }
            rest = &rest[p + pat.len()..];
        }
        res.push_str(rest);
        out = res;
    }
    out
}

/// A dashboard's relative time (`now`, `now-6h`) at `now`.
fn relative_time(s: &str, now: DateTime<Utc>) -> DateTime<Utc> {
    if s == "now" {
        return now;
    }
    let d = s
        .strip_prefix("now-")
        .and_then(parse_interval)
        .unwrap_or_else(|| panic!("unsupported dashboard time {s:?}"));
    now - chrono::Duration::from_std(d).unwrap()
}

#[test]
fn macros_expand_like_grafana() {
    let from = DateTime::parse_from_rfc3339("2018-04-12T18:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    let range = TimeRange {
        from,
        to: from + chrono::Duration::minutes(5),
    };
    let e = |sql: &str, ts: bool| interpolate_macros(sql, range, ts).unwrap();
    // The expansions of Grafana's macros_test.go.
    assert_eq!(
        e("select $__timeFilter(time_column)", false),
        "select time_column BETWEEN '2018-04-12T18:00:00Z' AND '2018-04-12T18:05:00Z'"
    );
    assert_eq!(
        e("SELECT $__timeGroup(time_column,'5m')", false),
        "SELECT floor(extract(epoch from time_column)/300)*300"
    );
    assert_eq!(
        e("SELECT $__timeGroup(time_column,'5m')", true),
        "SELECT time_bucket('300.000s',time_column)"
    );
    assert_eq!(
        e("SELECT $__timeGroupAlias(time_column,'5m')", false),
        "SELECT floor(extract(epoch from time_column)/300)*300 AS \"time\""
    );
    // Pre-5.3 form: followed by a comma, the alias is added.
    assert_eq!(
        e("SELECT $__timeGroup(time_column,'5m'), value", false),
        "SELECT floor(extract(epoch from time_column)/300)*300 AS \"time\", value"
    );
    assert_eq!(
        e("SELECT $__timeGroup(time_column, '1.5s')", false),
        "SELECT floor(extract(epoch from time_column)/1.5)*1.5"
    );
    assert_eq!(
        e("select $__timeFrom(), $__timeTo()", false),
        "select '2018-04-12T18:00:00Z', '2018-04-12T18:05:00Z'"
    );
    assert_eq!(
        e("select $__unixEpochFilter(time)", false),
        format!(
            "select time >= {} AND time <= {}",
            range.from.timestamp(),
            range.to.timestamp()
        )
    );
    assert!(interpolate_macros("select $__nope(x)", range, false).is_err());
    // A template variable is not a macro.
    assert_eq!(e("WHERE s IN ($source)", false), "WHERE s IN ($source)");

    // Global substitutions: $__interval_ms before $__interval.
    assert_eq!(
        interpolate_global(
            "$__interval_ms $__interval $__unixEpochFrom()",
            Duration::from_secs(30),
            range
        ),
        format!("30000 30s {}", range.from.timestamp())
    );
    assert_eq!(
        rfc3339_nano(from + chrono::Duration::milliseconds(500)),
        "2018-04-12T18:00:00.5Z"
    );
    // 6 hours over 500 points is 43.2 s: rounded to 30 s; 24 h / 500 = 172.8 s -> 2m.
    let six = TimeRange {
        from,
        to: from + chrono::Duration::hours(6),
    };
    assert_eq!(
        format_interval(calculate_interval(six, 500, Duration::from_secs(10))),
        "30s"
    );
    let day = TimeRange {
        from,
        to: from + chrono::Duration::hours(24),
    };
    assert_eq!(
        format_interval(calculate_interval(day, 500, Duration::from_secs(10))),
        "2m"
    );
    assert_eq!(
        calculate_interval(six, 100_000, Duration::from_secs(10)),
        Duration::from_secs(10)
    );
    let vars = BTreeMap::from([("source".to_string(), vec!["card".into(), "o'k".into()])]);
    assert_eq!(
        interpolate_variables("IN ($source) ${source} $sourcex", &vars),
        "IN ('card','o''k') 'card','o''k' $sourcex"
    );
}

// ------------------------------------------------------------------------------------------------
// The provisioning files.
// ------------------------------------------------------------------------------------------------

fn provisioning() -> PathBuf {
    common::repo().join("grafana/provisioning")
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Datasources by uid.
fn datasources() -> BTreeMap<String, Value> {
    let v = yaml(&provisioning().join("datasources/datasource.yml"));
    v["datasources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["uid"].as_str().unwrap().to_string(), d.clone()))
        .collect()
}

const PG_UID: &str = "payguard-postgres";
const PROM_UID: &str = "payguard-prometheus";

fn dashboards() -> Vec<(String, Value)> {
    let dir = provisioning().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().to_string(), v)
        })
        .collect()
}

fn alert_rules() -> Vec<Value> {
    let v = yaml(&provisioning().join("alerting/rules.yml"));
    v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

/// One query of a panel or rule.
#[derive(Debug, Clone)]
struct Query {
    /// "dashboard / panel" or "rule".
    what: String,
    /// Panel type (`timeseries`, `table`, ...) or `alert`.
    panel_type: String,
    datasource: String,
    /// SQL or PromQL.
    text: String,
    /// `time_series` or `table` for SQL.
    format: String,
    /// Time range relative to now: (from, to) back from now.
    range: (Duration, Duration),
    max_data_points: u64,
    /// Barchart x field.
    x_field: Option<String>,
}

fn uid_of(v: &Value) -> Option<String> {
    v.get("uid").and_then(Value::as_str).map(str::to_string)
}

fn panel_queries() -> Vec<Query> {
    let now = Utc::now();
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        let from = relative_time(d["time"]["from"].as_str().unwrap(), now);
        let to = relative_time(d["time"]["to"].as_str().unwrap(), now);
        for p in d["panels"].as_array().unwrap() {
            let panel_ds = uid_of(&p["datasource"]);
            for t in p["targets"].as_array().unwrap() {
                let ds = uid_of(&t["datasource"]).or(panel_ds.clone()).unwrap();
                let text = t
                    .get("rawSql")
                    .or_else(|| t.get("expr"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{file}: {}: query without text", p["title"]))
                    .to_string();
                out.push(Query {
                    what: format!("{file} / {}", p["title"].as_str().unwrap()),
                    panel_type: p["type"].as_str().unwrap().to_string(),
                    datasource: ds,
                    text,
                    format: t["format"].as_str().unwrap_or("time_series").to_string(),
                    range: ((now - from).to_std().unwrap(), (now - to).to_std().unwrap()),
                    max_data_points: p["maxDataPoints"].as_u64().unwrap_or(1000),
                    x_field: p["options"]["xField"].as_str().map(str::to_string),
                });
            }
        }
    }
    out
}

fn rule_queries() -> Vec<Query> {
    let mut out = Vec::new();
    for r in alert_rules() {
        for d in r["data"].as_array().unwrap() {
            let ds = d["datasourceUid"].as_str().unwrap().to_string();
            if ds == "__expr__" {
                continue;
            }
            let m = &d["model"];
            let text = m
                .get("rawSql")
                .or_else(|| m.get("expr"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string();
            let rt = &d["relativeTimeRange"];
            out.push(Query {
                what: format!("alert {}", r["title"].as_str().unwrap()),
                panel_type: "alert".into(),
                datasource: ds,
                text,
                format: m["format"].as_str().unwrap_or("time_series").to_string(),
                range: (
                    Duration::from_secs(rt["from"].as_u64().unwrap()),
                    Duration::from_secs(rt["to"].as_u64().unwrap()),
                ),
                // Grafana alerting's defaults.
                max_data_points: m["maxDataPoints"].as_u64().unwrap_or(43_200),
                x_field: None,
            });
        }
    }
    out
}

/// A SQL query as Grafana sends it: global substitutions, template variables, then the
/// PostgreSQL macros, over the query's time range ending now.
fn expand_sql(
    q: &Query,
    vars: &BTreeMap<String, Vec<String>>,
    min_interval: Duration,
    timescaledb: bool,
) -> Result<String, String> {
    let now = Utc::now();
    let range = TimeRange {
        from: now - chrono::Duration::from_std(q.range.0).unwrap(),
        to: now - chrono::Duration::from_std(q.range.1).unwrap(),
    };
    let interval = calculate_interval(range, q.max_data_points, min_interval);
    let text = interpolate_variables(&interpolate_global(&q.text, interval, range), vars);
    interpolate_macros(&text, range, timescaledb)
}

/// `payguard_*` metric names a PromQL expression uses.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(p) = rest.find("payguard_") {
        let tail = &rest[p..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// Grafana's Prometheus variables: `$__rate_interval` = max(`$__interval` + scrape interval,
/// 4 x scrape interval), the scrape interval being the datasource's `timeInterval`.
fn expand_promql(q: &Query, scrape: Duration) -> String {
    let now = Utc::now();
    let range = TimeRange {
        from: now - chrono::Duration::from_std(q.range.0).unwrap(),
        to: now - chrono::Duration::from_std(q.range.1).unwrap(),
    };
    let interval = calculate_interval(range, q.max_data_points, scrape);
    let rate = (interval + scrape).max(scrape * 4);
    q.text
        .replace("$__rate_interval", &format_interval(rate))
        .replace("$__interval", &format_interval(interval))
        .replace("$__range", &format_interval(q.range.0 - q.range.1))
}

fn scrape_interval() -> Duration {
    let ds = datasources();
    parse_interval(ds[PROM_UID]["jsonData"]["timeInterval"].as_str().unwrap()).unwrap()
}

#[test]
fn provisioning_is_consistent_and_every_promql_metric_is_exported() {
    let ds = datasources();
    let pg = &ds[PG_UID];
    assert_eq!(pg["type"], "grafana-postgresql-datasource");
    assert!(
        pg["jsonData"]["timescaledb"].is_boolean(),
        "the PostgreSQL datasource states its TimescaleDB flag"
    );
    let password = pg["secureJsonData"]["password"].as_str().unwrap();
    assert!(
        password.starts_with("${") && password.ends_with('}'),
        "the password comes from an environment variable, not the file: {password}"
    );
    assert_eq!(ds[PROM_UID]["type"], "prometheus");

    // The dashboard provider points at the folder the dashboards are in, once mounted.
    let provider = yaml(&provisioning().join("dashboards/dashboards.yml"));
    let path = provider["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(path, "/etc/grafana/provisioning/dashboards");

    // Three dashboards, unique uids, every panel with a query on a provisioned datasource.
    let dashes = dashboards();
    let uids: BTreeSet<String> = dashes.iter().map(|(_, d)| uid_of(d).unwrap()).collect();
    assert_eq!(
        uids,
        BTreeSet::from([
            "payguard-fraud-overview".to_string(),
            "payguard-model".into(),
            "payguard-operations".into()
        ])
    );
    for (file, d) in &dashes {
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{file}: panel ids");
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{file}: {} has no query",
                p["title"]
            );
            for v in [&p["datasource"]].into_iter().chain(
                p["targets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| &t["datasource"]),
            ) {
                let uid = uid_of(v).unwrap();
                assert!(
                    ds.contains_key(&uid),
                    "{file}: unknown datasource uid {uid}"
                );
                assert_eq!(
                    v["type"], ds[&uid]["type"],
                    "{file}: datasource type of {uid}"
                );
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            if let Some(uid) = uid_of(&v["datasource"]) {
                assert!(ds.contains_key(&uid), "{file}: variable datasource {uid}");
            }
        }
    }

    // Alert rules: datasources exist, conditions and expressions point at queries of the rule,
    // the receiver is a provisioned contact point.
    let contacts = yaml(&provisioning().join("alerting/contact-points.yml"));
    let receivers: BTreeSet<&str> = contacts["contactPoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        contacts["contactPoints"][0]["receivers"][0]["type"],
        "webhook"
    );
    let rules = alert_rules();
    let titles: Vec<&str> = rules.iter().map(|r| r["title"].as_str().unwrap()).collect();
    assert_eq!(titles.len(), 6, "{titles:?}");
    for r in &rules {
        let title = r["title"].as_str().unwrap();
        let refs: BTreeSet<&str> = r["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["refId"].as_str().unwrap())
            .collect();
        assert!(
            refs.contains(r["condition"].as_str().unwrap()),
            "{title}: condition"
        );
        for d in r["data"].as_array().unwrap() {
            let uid = d["datasourceUid"].as_str().unwrap();
            assert!(
                uid == "__expr__" || ds.contains_key(uid),
                "{title}: unknown datasource {uid}"
            );
            if uid == "__expr__" {
                let e = d["model"]["expression"].as_str().unwrap();
                assert!(refs.contains(e), "{title}: expression refers to {e}");
            }
        }
        let receiver = r["notification_settings"]["receiver"].as_str().unwrap();
        assert!(receivers.contains(receiver), "{title}: receiver {receiver}");
    }

    // Every query expands (no unknown macro) in both TimescaleDB modes.
    let queries: Vec<Query> = panel_queries().into_iter().chain(rule_queries()).collect();
    let vars = BTreeMap::from([("source".to_string(), vec!["card".to_string()])]);
    for q in queries.iter().filter(|q| q.datasource == PG_UID) {
        for ts in [false, true] {
            let sql = expand_sql(q, &vars, Duration::from_secs(10), ts)
                .unwrap_or_else(|e| panic!("{}: {e}", q.what));
            assert!(
                !sql.contains("$__"),
                "{}: unexpanded macro left: {sql}",
                q.what
            );
        }
    }

    // Every metric a PromQL query names is one the binary renders.
    let exported =
        payguard::metrics::exported_names(&payguard::metrics::Metrics::default().render());
    let mut used = BTreeSet::new();
    for q in queries.iter().filter(|q| q.datasource == PROM_UID) {
        let names = promql_metrics(&q.text);
        assert!(!names.is_empty(), "{}: no payguard metric", q.what);
        for n in names {
            assert!(
                exported.contains(&n),
                "{}: metric {n} is not exported by /metrics",
                q.what
            );
            used.insert(n);
        }
    }
    assert!(used.len() >= 10, "{used:?}");
}

// ------------------------------------------------------------------------------------------------
// Against the real services.
// ------------------------------------------------------------------------------------------------

/// Card messages with recent event times: `count` messages at a mean of 2 simulated transactions
/// per second, starting `count / 2 + 60` seconds ago. The simulated rate follows the time of day
/// (at night down to a fifteenth of its mean), so the stream may end hours from now: tests that
/// generate with this accept event times that far ahead ([`accept_future`]).
fn generate_recent(env: &TestEnv, count: u64, extra: &[&str]) -> String {
    let start = Utc::now() - chrono::Duration::seconds(count as i64 / 2 + 60);
    let start = start.to_rfc3339_opts(SecondsFormat::Secs, true);
    let mut args = vec![
        "--seed",
        "11",
        "--start-time",
        start.as_str(),
        "--simulated-tps",
        "2",
    ];
    args.extend_from_slice(extra);
    env.generate(count, &args);
    start
}

/// Configure the engine to accept the event times [`generate_recent`] may give.
fn accept_future(t: &mut toml::Table) {
    t["engine"]
        .as_table_mut()
        .unwrap()
        .insert("max_future".into(), "2 days".into());
}

const BAD_MESSAGES: [&[u8]; 3] = [
    b"not json at all",
    br#"{"auth_id":"grafana-missing-amount","ts":"2026-11-01T12:00:00Z","pan_token":"tok_x","merchant_id":"mer_1","currency":"BRL"}"#,
    b"\xff\xfe not utf-8",
];

fn is_numeric(type_name: &str) -> bool {
    matches!(
        type_name,
        "INT2" | "INT4" | "INT8" | "FLOAT4" | "FLOAT8" | "NUMERIC"
    )
}

fn is_time(type_name: &str) -> bool {
    matches!(type_name, "TIMESTAMPTZ" | "TIMESTAMP" | "DATE") || is_numeric(type_name)
}

/// Run `sql` with the simple query protocol, as Grafana's datasource does; returns
/// (column name, type name) and, per column, whether any row has a non-NULL value.
async fn run_sql(
    conn: &mut PgConnection,
    sql: &str,
) -> Result<(usize, Vec<(String, String, bool)>), sqlx::Error> {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_all(&mut *conn)
        .await?;
    let Some(first) = rows.first() else {
        return Ok((0, Vec::new()));
    };
    let cols = first
        .columns()
        .iter()
        .map(|c| {
            let any = rows
                .iter()
                .any(|r| !r.try_get_raw(c.ordinal()).unwrap().is_null());
            (c.name().to_string(), c.type_info().name().to_string(), any)
        })
        .collect();
    Ok((rows.len(), cols))
}

/// What a panel type needs from its query result.
fn check_shape(q: &Query, rows: usize, cols: &[(String, String, bool)]) {
    let what = &q.what;
    assert!(rows > 0, "{what}: no rows");
    let numeric_values: Vec<&(String, String, bool)> = cols
        .iter()
        .filter(|(n, t, _)| n != "time" && is_numeric(t))
        .collect();
    match q.panel_type.as_str() {
        "timeseries" => {
            assert_eq!(q.format, "time_series", "{what}: format");
            let time = cols
                .iter()
                .find(|(n, _, _)| n == "time")
                .unwrap_or_else(|| panic!("{what}: no time column in {cols:?}"));
            assert!(is_time(&time.1), "{what}: time column type {}", time.1);
            assert!(time.2, "{what}: time is NULL");
            assert!(
                !numeric_values.is_empty(),
                "{what}: no numeric value column in {cols:?}"
            );
            assert!(
                numeric_values.iter().any(|c| c.2),
                "{what}: every value is NULL in {cols:?}"
            );
            for (n, t, _) in cols {
                assert!(
                    n == "time" || n == "metric" || is_numeric(t),
                    "{what}: column {n} ({t}) is neither time, metric nor numeric"
                );
            }
        }
        "stat" | "gauge" | "piechart" | "bargauge" | "barchart" => {
            assert_eq!(q.format, "table", "{what}: format");
            assert!(
                numeric_values.iter().any(|c| c.2),
                "{what}: needs a non-NULL numeric column: {cols:?}"
            );
            if let Some(x) = &q.x_field {
                let c = cols
                    .iter()
                    .find(|(n, _, _)| n == x)
                    .unwrap_or_else(|| panic!("{what}: no x field {x}"));
                assert!(
                    c.1 == "TEXT" || is_time(&c.1),
                    "{what}: x field type {}",
                    c.1
                );
            }
        }
        "table" => assert_eq!(q.format, "table", "{what}: format"),
        "alert" => {
            // Server-side expressions take a table of one row with one numeric column as a number.
            assert_eq!(q.format, "table", "{what}: format");
            assert_eq!(rows, 1, "{what}: one row");
            assert_eq!(
                numeric_values.len(),
                1,
                "{what}: one numeric column: {cols:?}"
            );
            assert!(numeric_values[0].2, "{what}: value is NULL");
        }
        other => panic!("{what}: panel type {other} not checked by this test"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_and_alert_sql_query_runs_on_a_pipeline_database() {
    dashboard_and_alert_sql(&common::admin_url(), "grafana_sql", false).await;
}

/// The same on TimescaleDB: hypertables, the continuous aggregate `transactions_per_minute`, the
/// real `time_bucket`, and some chunks compressed before the queries run.
#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_and_alert_sql_query_runs_on_a_timescaledb_pipeline_database() {
    let Some(admin) = common::timescaledb_admin_url("Grafana SQL on TimescaleDB") else {
        return;
    };
    dashboard_and_alert_sql(&admin, "grafana_sql_ts", true).await;
}

/// Run a pipeline into a database on the server `admin`, then every dashboard and alert query;
/// `timescaledb`: the server has it, and the database must use it.
async fn dashboard_and_alert_sql(admin: &str, name: &str, timescaledb: bool) {
    // Label feedback on (its own topic), consumed by the pipeline into `labels`.
    let env = TestEnv::with_services(name, admin, &common::brokers(), |t| {
        t["labels"]
            .as_table_mut()
            .unwrap()
            .insert("enabled".into(), true.into());
        accept_future(t);
    })
    .await;
    let count = 8_000;
    // Reports within minutes of the fraud, so the short stream has label feedback.
    generate_recent(
        &env,
        count,
        &[
            "--labels",
            "--label-delay-min-days",
            "0",
            "--label-delay-max-days",
            "0.005",
        ],
    );
    env.kcat_produce(0, &BAD_MESSAGES);
    env.run_ok(&["run", "--stop-at-end"]);
    assert_eq!(env.transactions().await, count as i64);
    assert_eq!(
        env.scalar("SELECT count(*) FROM dead_letters").await,
        BAD_MESSAGES.len() as i64
    );
    assert!(
        env.scalar("SELECT count(*) FROM labels").await > 0,
        "label feedback was consumed"
    );
    let mut db = env.db().await;
    assert!(
        env.scalar(
            "SELECT count(*) FROM labels l JOIN transactions t USING (transaction_id) WHERE l.label = 'fraud'"
        )
        .await
            > 0,
        "labels match stored transactions"
    );
    assert!(
        env.scalar("SELECT count(*) FROM alerts").await > 0,
        "the rules raised alerts"
    );

    // TimescaleDB's time_bucket: the extension when the server has it; else a stand-in with its
    // semantics for timestamptz (buckets aligned on its default origin, Monday 2000-01-03 UTC),
    // so the TimescaleDB form of every query runs too.
    let has_timescale = env
        .scalar("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
        .await
        > 0;
    assert_eq!(has_timescale, timescaledb, "the database uses TimescaleDB");
    if has_timescale {
        // The oldest chunk of the stream compressed (the stream spans hours: with the default
        // chunk interval of 7 days that is all or most of it): the queries read compressed data.
        let compressed = env
            .scalar(
                "SELECT count(compress_chunk(c, if_not_compressed => true)) FROM \
                 (SELECT c FROM show_chunks('transactions') c ORDER BY 1 LIMIT 1) s",
            )
            .await;
        assert_eq!(compressed, 1, "a chunk of transactions compressed");
    } else {
        sqlx::raw_sql(
            "CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz) RETURNS timestamptz \
             LANGUAGE sql IMMUTABLE AS $$ SELECT date_bin(bucket_width, ts, TIMESTAMPTZ '2000-01-03 00:00:00+00') $$",
        )
        .execute(&mut db)
        .await
        .unwrap();
    }

    let ds = datasources();
    let min_interval = parse_interval(
        ds[PG_UID]["jsonData"]["timeInterval"]
            .as_str()
            .unwrap_or("1ms"),
    )
    .unwrap();
    // Template variables: run each variable's query; "All" is every value.
    let mut vars: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, d) in dashboards() {
        for v in d["templating"]["list"].as_array().unwrap() {
            let q = v["query"].as_str().unwrap();
            let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(q.to_string()))
                .fetch_all(&mut db)
                .await
                .unwrap();
            let values: Vec<String> = rows.iter().map(|r| r.get::<String, _>(0)).collect();
            assert!(!values.is_empty(), "variable {} has values", v["name"]);
            vars.insert(v["name"].as_str().unwrap().to_string(), values);
        }
    }
    assert_eq!(vars["source"], vec!["card".to_string()]);

    let queries: Vec<Query> = panel_queries()
        .into_iter()
        .chain(rule_queries())
        .filter(|q| q.datasource == PG_UID)
        .collect();
    assert!(queries.len() >= 25, "{} SQL queries", queries.len());
    for q in &queries {
        let mut shapes = Vec::new();
        for timescaledb in [false, true] {
            let sql = expand_sql(q, &vars, min_interval, timescaledb).unwrap();
            let (rows, cols) = run_sql(&mut db, &sql)
                .await
                .unwrap_or_else(|e| panic!("{} (timescaledb={timescaledb}): {e}\n{sql}", q.what));
            check_shape(q, rows, &cols);
            shapes.push((rows, cols.iter().map(|c| c.0.clone()).collect::<Vec<_>>()));
        }
        assert_eq!(
            shapes[0], shapes[1],
            "{}: same rows and columns with and without TimescaleDB",
            q.what
        );
    }
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Some((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Kills the Prometheus server when the test ends, however it ends.
struct Killer(Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> String {
    std::env::var("PAYGUARD_PROMETHEUS").unwrap_or_else(|_| {
        let out = Command::new("bash")
            .arg(common::repo().join(".ci/prometheus.sh"))
            .arg("path")
            .output()
            .unwrap();
        let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            !p.is_empty(),
            "Prometheus is not installed: run `bash .ci/prometheus.sh install`"
        );
        p
    })
}

/// An instant PromQL query: the result vector.
async fn prom_query(prom: &str, expr: &str) -> Result<Vec<Value>, String> {
    let path = format!("/api/v1/query?query={}", url_encode(expr));
    let (status, body) = http_get(prom, &path)
        .await
        .ok_or_else(|| "no answer".to_string())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_binary_and_the_operations_queries_return_data() {
    let env = TestEnv::new("grafana_prom", |t| {
        let p = t["pipeline"].as_table_mut().unwrap();
        p.insert("batch_max_rows".into(), 200.into());
        p.insert("batch_max_wait_ms".into(), 20.into());
        accept_future(t);
    })
    .await;
    // The topic exists before the pipeline starts.
    generate_recent(&env, 500, &[]);
    let run = env.spawn(&["run"]);
    let log_path =
        std::fs::read_to_string(env.dir.path().join(format!("pid-{}", run.id()))).unwrap();
    let mut addr = String::new();
    env.wait_for("the API address", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(a) = log
            .lines()
            .filter(|l| l.contains("HTTP API listening"))
            .find_map(|l| l.split("addr=").nth(1))
        {
            addr = a.split_whitespace().next().unwrap().to_string();
        }
        let found = !addr.is_empty();
        async move { found }
    })
    .await;

    // Prometheus on a free port, scraping the binary every second.
    let dir = env.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: payguard\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let prom = format!("127.0.0.1:{port}");
    let _server = Killer(
        Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus"),
    );
    env.wait_for("Prometheus ready", Duration::from_secs(60), || async {
        http_get(&prom, "/-/ready")
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;

    // Traffic while Prometheus watches: a steady stream, and a few bad messages.
    let producer = env.spawn(&[
        "generate", "--count", "20000", "--rate", "800", "--seed", "12", "-q",
    ]);
    env.kcat_produce(1, &BAD_MESSAGES);

    let scrape = scrape_interval();
    let ops: Vec<Query> = panel_queries()
        .into_iter()
        .filter(|q| q.what.starts_with("operations.json") && q.datasource == PROM_UID)
        .collect();
    assert!(ops.len() >= 10, "{} PromQL queries", ops.len());
    let throughput = ops
        .iter()
        .find(|q| q.text.contains("rate(payguard_messages_in_total"))
        .expect("the throughput query");
    let expr = expand_promql(throughput, scrape);
    env.wait_for(
        "a positive throughput in Prometheus",
        Duration::from_secs(90),
        || async {
            prom_query(&prom, &expr).await.is_ok_and(|r| {
                r.iter().any(|s| {
                    s["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 0.0)
                })
            })
        },
    )
    .await;
    env.wait_for(
        "the dead letters in Prometheus",
        Duration::from_secs(60),
        || async {
            prom_query(&prom, "payguard_dead_letters_total")
                .await
                .is_ok_and(|r| !r.is_empty())
        },
    )
    .await;

    // Every Operations query and every Prometheus alert query is valid PromQL and has data.
    let rules: Vec<Query> = rule_queries()
        .into_iter()
        .filter(|q| q.datasource == PROM_UID)
        .collect();
    assert!(!rules.is_empty());
    for q in ops.iter().chain(&rules) {
        let expr = expand_promql(q, scrape);
        let r = prom_query(&prom, &expr)
            .await
            .unwrap_or_else(|e| panic!("{}: {expr}: {e}", q.what));
        assert!(!r.is_empty(), "{}: no data for {expr}", q.what);
    }

    // The live binary exports every metric the dashboards and rules name.
    let (_, text) = http_get(&addr, "/metrics").await.unwrap();
    let exported = payguard::metrics::exported_names(&text);
    for q in ops.iter().chain(&rules) {
        for n in promql_metrics(&q.text) {
            assert!(exported.contains(&n), "{}: {n} not in /metrics", q.what);
        }
    }
    assert!(
        text.contains("payguard_consumer_lag{source=\"card\""),
        "{text}"
    );
    assert!(text.contains("payguard_fetch_seconds_count{source=\"card\"}"));
    assert!(text.contains("payguard_dead_letters_total{source=\"card\",reason=\"invalid_json\"}"));

    let (status, log) = env.wait(producer, Duration::from_secs(120));
    assert!(status.success(), "producer: {log}");
    signal(&run, "TERM");
    let (status, log) = env.wait(run, Duration::from_secs(60));
    assert!(status.success(), "run: {status}\n{log}");
}
