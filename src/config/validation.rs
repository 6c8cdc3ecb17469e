//! Validation that reports every problem of a config file at once, each with its file, line and key,
//! in the manner of Vector's `validation.rs`: nothing starts until the whole file is right.
//!
//! Parsing is done repeatedly: each time serde stops at a problem (an unknown key, a wrong type), the
//! problem is recorded, the offending line is blanked out of a scratch copy, and parsing runs again, so
//! that one run of `payguard check` lists all of them. Semantic checks (ranges, files, types of
//! fields) then run on the parsed structs and point back at lines through [`KeyLines`].

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Config, InputKind, KeyLines, SinkKind};
use crate::decode::parse_field_type;

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `sources[0].topic` (empty for file-level problems).
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All problems found in a config file (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// A list of one.
    pub fn single(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

const MAX_PASSES: usize = 64;

/// Deserialize, recording each serde error and blanking its line until the rest parses. Returns
/// the config parsed from what is left (if anything parses) and the errors.
pub(super) fn parse_collecting(text: &str, file: &Path) -> (Option<Config>, Vec<ConfigError>) {
    let mut scratch: Vec<String> = text.lines().map(str::to_string).collect();
    let key_lines = KeyLines::scan(text);
    let mut errors = Vec::new();
    for _ in 0..MAX_PASSES {
        let current = scratch.join("\n");
        match toml::from_str::<Config>(&current) {
            Ok(config) => return (Some(config), errors),
            Err(e) => {
                let line = e.span().map(|s| line_of_offset(&current, s.start));
                let key = line
                    .and_then(|l| {
                        key_lines
                            .path_at(l)
                            .map(str::to_string)
                            .or_else(|| scratch.get(l - 1).map(|t| key_of_line(t)))
                    })
                    .unwrap_or_default();
                errors.push(ConfigError {
                    file: file.to_path_buf(),
                    line,
                    key,
                    message: clean_message(e.message()),
                });
                match line {
                    Some(l) if blank_out(&mut scratch, l - 1) => continue,
                    _ => break,
                }
            }
        }
    }
    (None, errors)
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn key_of_line(line: &str) -> String {
    let t = line.trim();
    if t.starts_with('[') {
        return t.trim_matches(['[', ']']).trim().to_string();
    }
    t.split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .unwrap_or_default()
}

fn clean_message(m: &str) -> String {
    m.trim().replace('\n', " ")
}

/// Comment out line `idx` (and, for a table header, the whole table). False when nothing changed.
fn blank_out(lines: &mut [String], idx: usize) -> bool {
    let Some(line) = lines.get(idx) else {
        return false;
    };
    if line.trim_start().starts_with('#') || line.trim().is_empty() {
        return false;
    }
    let is_header = line.trim_start().starts_with('[');
    lines[idx] = format!("# {line}");
    if is_header {
        for l in lines.iter_mut().skip(idx + 1) {
            if l.trim_start().starts_with('[') {
                break;
            }
            if !l.trim_start().starts_with('#') {
                *l = format!("# {l}");
            }
        }
    }
    true
}

/// Semantic checks on a parsed config. Checks only what can be known from the file and the
/// filesystem; SQL and model checks belong to the engine (`payguard check` runs both).
pub(super) fn validate(config: &Config, text: &str, file: &Path) -> Vec<ConfigError> {
    let lines = KeyLines::scan(text);
    let mut errors = Vec::new();
    let mut err = |key: String, message: String| {
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: lines.line_of(&key),
            key,
            message,
        });
    };

    let p = &config.pipeline;
    if p.name.trim().is_empty() || p.name.len() > 100 {
        err("pipeline.name".into(), "must be 1 to 100 characters".into());
    }
    if !(1..=1_000_000).contains(&p.batch_max_rows) {
        err(
            "pipeline.batch_max_rows".into(),
            format!("must be between 1 and 1000000, got {}", p.batch_max_rows),
        );
    }
    if !(1..=60_000).contains(&p.batch_max_wait_ms) {
        err(
            "pipeline.batch_max_wait_ms".into(),
            format!("must be between 1 and 60000, got {}", p.batch_max_wait_ms),
        );
    }
    if !(1..=64).contains(&p.queue_depth) {
        err(
            "pipeline.queue_depth".into(),
            format!("must be between 1 and 64, got {}", p.queue_depth),
        );
    }

    let k = &config.kafka;
    if p.input == InputKind::Kafka {
        if k.brokers.is_empty() {
            err(
                "kafka.brokers".into(),
                "needs at least one broker as \"host:port\" (or set PAYGUARD_KAFKA_BROKERS)".into(),
            );
        }
        for (i, b) in k.brokers.iter().enumerate() {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                err(
                    format!("kafka.brokers[{i}]"),
                    format!("\"{b}\" is not \"host:port\""),
                );
            }
        }
    }
    if !(1024..=256 * 1024 * 1024).contains(&k.fetch_max_bytes) {
        err(
            "kafka.fetch_max_bytes".into(),
            format!(
                "must be between 1024 and 268435456, got {}",
                k.fetch_max_bytes
            ),
        );
    }
    if !(1..=30_000).contains(&k.fetch_max_wait_ms) {
        err(
            "kafka.fetch_max_wait_ms".into(),
            format!("must be between 1 and 30000, got {}", k.fetch_max_wait_ms),
        );
    }
    if k.max_message_bytes == 0 {
        err(
            "kafka.max_message_bytes".into(),
            "must be greater than 0".into(),
        );
    }
    for (key, init, max) in [
        ("kafka", k.retry_initial_ms, k.retry_max_ms),
        (
            "postgres",
            config.postgres.retry_initial_ms,
            config.postgres.retry_max_ms,
        ),
    ] {
        if init == 0 || init > max {
            err(
                format!("{key}.retry_initial_ms"),
                format!("must be at least 1 and at most retry_max_ms ({max}), got {init}"),
            );
        }
    }

    let pg = &config.postgres;
    if p.sink == SinkKind::Postgres {
        if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
            err(
                "postgres.url".into(),
                "must start with postgres:// or postgresql:// (or set PAYGUARD_POSTGRES_URL)"
                    .into(),
            );
        }
        let dir = config.resolve(&pg.migrations);
        if !dir.is_dir() {
            err(
                "postgres.migrations".into(),
                format!("directory {} does not exist", dir.display()),
            );
        }
    }
    if !(1..=64).contains(&pg.max_connections) {
        err(
            "postgres.max_connections".into(),
            format!("must be between 1 and 64, got {}", pg.max_connections),
        );
    } else if pg.trail_aggregates && pg.max_connections < 2 {
        err(
            "postgres.max_connections".into(),
            "must be at least 2 with postgres.trail_aggregates = true (the rows and the aggregates \
             commit on two connections); raise it or set trail_aggregates = false"
                .into(),
        );
    }

    for (key, value) in [
        ("postgres.compress_after", &pg.compress_after),
        ("postgres.retention", &pg.retention),
    ] {
        if !value.trim().eq_ignore_ascii_case("off")
            && crate::engine::windows::parse_duration_ms(value).is_none_or(|ms| ms <= 0)
        {
            err(
                key.into(),
                format!("\"{value}\" is not \"off\" or a duration like \"7 days\", \"12 hours\""),
            );
        }
    }

    let e = &config.engine;
    for (key, value) in [
        ("engine.history", &e.history),
        ("engine.allowed_lateness", &e.allowed_lateness),
        ("engine.idle_partition_timeout", &e.idle_partition_timeout),
        ("engine.max_future", &e.max_future),
        ("labels.history", &config.labels.history),
    ] {
        if crate::engine::windows::parse_duration_ms(value).is_none_or(|ms| ms <= 0) {
            err(
                key.into(),
                format!(
                    "\"{value}\" is not a duration like \"10 minutes\", \"7 days\", \"30 seconds\""
                ),
            );
        }
    }
    for (key, path) in [("engine.features", &e.features), ("engine.rules", &e.rules)] {
        let f = config.resolve(path);
        if !f.is_file() {
            err(
                key.into(),
                format!("SQL file {} does not exist", f.display()),
            );
        }
    }
    let agg = config.resolve(&e.aggregates);
    if !agg.is_dir() {
        err(
            "engine.aggregates".into(),
            format!("directory {} does not exist", agg.display()),
        );
    }
    if config.labels.index_max == 0 {
        err("labels.index_max".into(), "must be at least 1".into());
    }
    if config.labels.enabled
        && config
            .sources
            .iter()
            .any(|s| s.topic == config.labels.topic)
    {
        err(
            "labels.topic".into(),
            format!(
                "topic \"{}\" is also a source's topic; labels need their own",
                config.labels.topic
            ),
        );
    }
    if e.max_entities == 0 {
        err("engine.max_entities".into(), "must be at least 1".into());
    }
    if e.warm_max_rows > 100_000_000 {
        err(
            "engine.warm_max_rows".into(),
            format!(
                "must be between 0 (off) and 100000000, got {}",
                e.warm_max_rows
            ),
        );
    }
    if !(0.0..=1.0).contains(&e.review_threshold)
        || !(0.0..=1.0).contains(&e.decline_threshold)
        || e.review_threshold > e.decline_threshold
    {
        err(
            "engine.review_threshold".into(),
            format!(
                "thresholds must satisfy 0 <= review_threshold ({}) <= decline_threshold ({}) <= 1",
                e.review_threshold, e.decline_threshold
            ),
        );
    }

    // The model file itself is checked by the engine (`payguard check` loads it).
    if let Some(m) = &config.model {
        if m.explain_top > 100 {
            err(
                "model.explain_top".into(),
                format!("must be between 0 and 100, got {}", m.explain_top),
            );
        }
        if !(1..=64).contains(&m.threads) {
            err(
                "model.threads".into(),
                format!("must be between 1 and 64, got {}", m.threads),
            );
        }
        if m.label_column.trim().is_empty() {
            err("model.label_column".into(), "must not be empty".into());
        }
    }

    if config.api.listen.parse::<std::net::SocketAddr>().is_err() {
        err(
            "api.listen".into(),
            format!("\"{}\" is not an ip:port address", config.api.listen),
        );
    }
    let a = &config.api;
    if !(1024..=268_435_456).contains(&a.max_body_bytes) {
        err(
            "api.max_body_bytes".into(),
            format!(
                "must be between 1024 and 268435456, got {}",
                a.max_body_bytes
            ),
        );
    }
    if !(1..=100_000).contains(&a.max_batch) {
        err(
            "api.max_batch".into(),
            format!("must be between 1 and 100000, got {}", a.max_batch),
        );
    }
    if !(1..=1_000_000).contains(&a.score_queue) {
        err(
            "api.score_queue".into(),
            format!("must be between 1 and 1000000, got {}", a.score_queue),
        );
    }
    if !(1..=600_000).contains(&a.score_timeout_ms) {
        err(
            "api.score_timeout_ms".into(),
            format!("must be between 1 and 600000, got {}", a.score_timeout_ms),
        );
    }
    if a.stream_slice_rows > 1_000_000 {
        err(
            "api.stream_slice_rows".into(),
            format!(
                "must be between 0 (whole batches) and 1000000, got {}",
                a.stream_slice_rows
            ),
        );
    }
    for (key, message) in cert_and_key(
        config,
        ("api.tls_cert_file", &a.tls_cert_file),
        ("api.tls_key_file", &a.tls_key_file),
        "HTTPS needs both api.tls_cert_file and api.tls_key_file (or neither: plain HTTP)",
    ) {
        err(key.into(), message);
    }
    if let Some(tls) = &config.kafka.tls {
        let ca = config.resolve(&tls.ca_file);
        if !ca.is_file() {
            err(
                "kafka.tls.ca_file".into(),
                format!("file {} does not exist", ca.display()),
            );
        }
        for (key, message) in cert_and_key(
            config,
            ("kafka.tls.cert_file", &tls.cert_file),
            ("kafka.tls.key_file", &tls.key_file),
            "a client certificate needs both cert_file and key_file",
        ) {
            err(key.into(), message);
        }
    }
    if a.api_keys.iter().any(|k| k.trim().len() < 16) {
        err(
            "api.api_keys".into(),
            "every key must have at least 16 characters".into(),
        );
    }

    let s = &config.simulator;
    if !(0.0..=0.5).contains(&s.fraud_rate) {
        err(
            "simulator.fraud_rate".into(),
            format!("must be between 0 and 0.5, got {}", s.fraud_rate),
        );
    }
    if s.customers == 0 || s.merchants == 0 {
        err(
            "simulator.customers".into(),
            "customers and merchants must be at least 1".into(),
        );
    }
    if chrono::DateTime::parse_from_rfc3339(&s.start_time).is_err() {
        err(
            "simulator.start_time".into(),
            format!(
                "\"{}\" is not an RFC 3339 time like 2026-11-01T00:00:00Z",
                s.start_time
            ),
        );
    }

    if config.sources.is_empty() {
        err(
            "sources".into(),
            "at least one [[sources]] entry is needed".into(),
        );
    }
    let mut names = HashSet::new();
    let mut topics = HashSet::new();
    for (i, src) in config.sources.iter().enumerate() {
        let at = |k: &str| format!("sources[{i}].{k}");
        if src.name.is_empty()
            || !src
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            err(
                at("name"),
                format!(
                    "\"{}\" must be non-empty and use only letters, digits, '_' and '-'",
                    src.name
                ),
            );
        }
        if !names.insert(src.name.clone()) {
            err(
                at("name"),
                format!("source name \"{}\" is used twice", src.name),
            );
        }
        if src.topic.is_empty()
            || src.topic.len() > 249
            || !src
                .topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            err(
                at("topic"),
                format!(
                    "\"{}\" is not a valid Kafka topic name (letters, digits, '.', '_', '-')",
                    src.topic
                ),
            );
        }
        if !topics.insert(src.topic.clone()) {
            err(
                at("topic"),
                format!("topic \"{}\" is used by two sources", src.topic),
            );
        }
        if !(1..=1000).contains(&src.partitions) {
            err(
                at("partitions"),
                format!("must be between 1 and 1000, got {}", src.partitions),
            );
        }
        if !src.simulator.is_empty()
            && !crate::source::simulator::SHAPES.contains(&src.simulator.as_str())
        {
            err(
                at("simulator"),
                format!(
                    "unknown simulator shape \"{}\"; known: {}",
                    src.simulator,
                    crate::source::simulator::SHAPES.join(", ")
                ),
            );
        }
        let mapping = config.resolve(&src.mapping);
        if !mapping.is_file() {
            err(
                at("mapping"),
                format!("SQL file {} does not exist", mapping.display()),
            );
        }
        if src.fields.is_empty() {
            err(at("fields"), "at least one field is needed".into());
        }
        let mut field_names = HashSet::new();
        for (j, f) in src.fields.iter().enumerate() {
            if f.name.is_empty() || !field_names.insert(f.name.clone()) {
                err(
                    format!("sources[{i}].fields[{j}].name"),
                    format!("field name \"{}\" is empty or used twice", f.name),
                );
            }
            if let Err(msg) = parse_field_type(&f.data_type) {
                err(format!("sources[{i}].fields[{j}].type"), msg);
            }
        }
    }

    let mut attribute_names = HashSet::new();
    for (i, a) in config.attributes.iter().enumerate() {
        let at = format!("attributes[{i}].name");
        let valid = a.name.len() <= 63
            && a.name.starts_with(|c: char| c.is_ascii_lowercase())
            && a.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            err(
                at,
                format!(
                    "\"{}\" must start with a lower case letter and use only a-z, 0-9 and '_' (at most 63)",
                    a.name
                ),
            );
        } else if let Some(why) = crate::engine::canonical::reserved(&a.name) {
            err(
                at,
                format!("\"{}\" {why}; name the attribute otherwise", a.name),
            );
        } else if !attribute_names.insert(a.name.clone()) {
            err(at, format!("attribute \"{}\" is declared twice", a.name));
        }
    }

    errors
}

/// Read the secrets the config points at, after [`validate`]: the database password
/// (`PAYGUARD_POSTGRES_PASSWORD`, else the first line of `postgres.password_file`) goes into
/// `postgres.url`, the keys of `api.api_keys_file` join `api.api_keys`. A file that cannot be read
/// or holds a short key is an error naming the file (never its content).
pub(super) fn read_secrets(
    config: &mut Config,
    text: &str,
    file: &Path,
    env: &super::EnvOverrides,
) -> Vec<ConfigError> {
    let lines = KeyLines::scan(text);
    let mut errors = Vec::new();
    let mut err = |key: &str, message: String| {
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: lines.line_of(key),
            key: key.to_string(),
            message,
        });
    };
    let password = secret(
        config,
        &env.postgres_password,
        &config.postgres.password_file,
    )
    .unwrap_or_else(|m| {
        err("postgres.password_file", m);
        None
    });
    if let Some(password) = password {
        match with_password(&config.postgres.url, &password) {
            Ok(url) => config.postgres.url = url,
            Err(m) => err("postgres.url", m),
        }
    }
    if let Some(sasl) = &config.kafka.sasl {
        match secret(config, &env.kafka_password, &sasl.password_file) {
            Ok(Some(p)) => {
                if let Some(sasl) = config.kafka.sasl.as_mut() {
                    sasl.password = p;
                }
            }
            Ok(None) => err(
                "kafka.sasl.password_file",
                "SASL needs a password: its file (first line) or PAYGUARD_KAFKA_PASSWORD".into(),
            ),
            Err(m) => err("kafka.sasl.password_file", m),
        }
    }
    if !config.api.api_keys_file.as_os_str().is_empty() {
        let path = config.resolve(&config.api.api_keys_file);
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                for (i, line) in t.lines().enumerate() {
                    let key = line.trim();
                    if key.is_empty() || key.starts_with('#') {
                        continue;
                    }
                    if key.len() < 16 {
                        err(
                            "api.api_keys_file",
                            format!(
                                "{}:{}: every key must have at least 16 characters",
                                path.display(),
                                i + 1
                            ),
                        );
                    } else {
                        config.api.api_keys.push(key.to_string());
                    }
                }
            }
            Err(e) => err(
                "api.api_keys_file",
                format!("cannot read {}: {e}", path.display()),
            ),
        }
    }
    errors
}

/// A secret: the environment's value `env`, else the first line of `file` (resolved against the
/// config's directory), else `None` when no file is named. An unreadable or empty file is an
/// error naming the file, never its content.
fn secret(config: &Config, env: &Option<String>, file: &Path) -> Result<Option<String>, String> {
    if let Some(v) = env {
        return Ok(Some(v.clone()));
    }
    if file.as_os_str().is_empty() {
        return Ok(None);
    }
    let path = config.resolve(file);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match text.lines().next().map(str::trim_end) {
        Some(first) if !first.is_empty() => Ok(Some(first.to_string())),
        _ => Err(format!(
            "{} is empty: its first line is the password",
            path.display()
        )),
    }
}

/// The problems (key, message) of a PEM certificate and key pair of files: both or neither
/// (`both` is the message otherwise), and those named must exist.
fn cert_and_key(
    config: &Config,
    cert: (&'static str, &Path),
    key: (&'static str, &Path),
    both: &str,
) -> Vec<(&'static str, String)> {
    match (cert.1.as_os_str().is_empty(), key.1.as_os_str().is_empty()) {
        (true, true) => Vec::new(),
        (false, false) => [cert, key]
            .into_iter()
            .filter_map(|(k, p)| {
                let path = config.resolve(p);
                (!path.is_file()).then(|| (k, format!("file {} does not exist", path.display())))
            })
            .collect(),
        _ => vec![(cert.0, both.to_string())],
    }
}

/// `url` (`postgres://user[:old]@host...`) with its password replaced by `password`,
/// percent-encoded.
fn with_password(url: &str, password: &str) -> Result<String, String> {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return Err(
            "has no user (postgres://USER@host/db) to give the password of postgres.password_file or PAYGUARD_POSTGRES_PASSWORD to".into(),
        );
    };
    let user = rest[..at].split(':').next().unwrap_or("");
    let mut encoded = String::with_capacity(password.len());
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!(
        "{}{user}:{encoded}{}",
        &url[..scheme_end],
        &rest[at..]
    ))
}

#[cfg(test)]
mod tests {
    use super::super::{EnvOverrides, load_str};
    use std::path::Path;

    fn errors_of(text: &str) -> Vec<String> {
        let dir = env!("CARGO_MANIFEST_DIR");
        match load_str(
            text,
            Path::new("test.toml"),
            Path::new(dir),
            &EnvOverrides::default(),
        ) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const SOURCE: &str = r#"
[[sources]]
name = "card"
topic = "t.cards"
mapping = "sql/sources/card.sql"
fields = [
  { name = "id", type = "string", required = true },
]
"#;

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../../config.toml");
        assert_eq!(errors_of(text), Vec::<String>::new());
    }

    #[test]
    fn reports_unknown_key_type_error_and_range_at_once() {
        let text = format!(
            "[pipeline]\nbatch_max_rows = 0\nbatch_max_wait = 5\nqueue_depth = \"four\"\n{SOURCE}"
        );
        let errs = errors_of(&text);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert!(errs[0].starts_with("test.toml:2: pipeline.batch_max_rows: must be between"));
        assert!(
            errs[1].starts_with("test.toml:3: pipeline.batch_max_wait: unknown field"),
            "{}",
            errs[1]
        );
        assert!(
            errs[2].starts_with("test.toml:4: pipeline.queue_depth: "),
            "{}",
            errs[2]
        );
    }

    #[test]
    fn storage_policies_are_off_or_a_duration() {
        let ok = format!("[postgres]\ncompress_after = \"off\"\nretention = \"90 days\"\n{SOURCE}");
        assert_eq!(errors_of(&ok), Vec::<String>::new());
        let bad =
            format!("[postgres]\ncompress_after = \"soon\"\nretention = \"0 days\"\n{SOURCE}");
        let errs = errors_of(&bad);
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert!(errs[0].contains("postgres.compress_after"), "{}", errs[0]);
        assert!(errs[1].contains("postgres.retention"), "{}", errs[1]);
        let pg = crate::config::PostgresConfig {
            retention: "2 days".into(),
            ..Default::default()
        };
        assert_eq!(pg.retention_ms(), Some(2 * 86_400_000));
        assert_eq!(pg.compress_after_ms(), Some(7 * 86_400_000));
        assert_eq!(
            crate::config::PostgresConfig::default().retention_ms(),
            None
        );
    }

    #[test]
    fn trailing_aggregates_need_a_second_connection() {
        let one = format!("[postgres]\nmax_connections = 1\n{SOURCE}");
        let errs = errors_of(&one);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("test.toml:2: postgres.max_connections: must be at least 2"),
            "{}",
            errs[0]
        );
        let off = format!("[postgres]\nmax_connections = 1\ntrail_aggregates = false\n{SOURCE}");
        assert_eq!(errors_of(&off), Vec::<String>::new());
    }

    #[test]
    fn warm_max_rows_is_bounded_and_zero_turns_it_off() {
        let off = format!("[engine]\nwarm_max_rows = 0\n{SOURCE}");
        assert_eq!(errors_of(&off), Vec::<String>::new());
        let big = format!("[engine]\nwarm_max_rows = 100000001\n{SOURCE}");
        let errs = errors_of(&big);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("test.toml:2: engine.warm_max_rows: must be between 0"),
            "{}",
            errs[0]
        );
        let negative = format!("[engine]\nwarm_max_rows = -1\n{SOURCE}");
        assert_eq!(errors_of(&negative).len(), 1);
        assert_eq!(
            crate::config::EngineConfig::default().warm_max_rows,
            5_000_000
        );
    }

    #[test]
    fn reports_bad_field_type_with_its_line() {
        let text = SOURCE.replace("\"string\"", "\"strnig\"");
        let errs = errors_of(&text);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("test.toml:7: sources[0].fields[0].type: unknown type \"strnig\""),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn a_password_from_a_file_or_the_environment_replaces_the_urls_encoded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cr:t@/x\nignored\n").unwrap();
        std::fs::write(
            dir.path().join("keys"),
            "# ops\n0123456789abcdef0123\n\nshort\n",
        )
        .unwrap();
        let text = format!(
            "[postgres]\nurl = \"postgres://app:old@db:5432/x?sslmode=require\"\npassword_file = \"{}\"\n[api]\napi_keys_file = \"{}\"\n{SOURCE}",
            dir.path().join("pw").display(),
            dir.path().join("keys").display()
        );
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let load = |env: &EnvOverrides| load_str(&text, Path::new("c.toml"), repo, env);
        // The short key is the only problem, named with its file and line, never its text.
        let errs = load(&EnvOverrides::default()).unwrap_err().0;
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let keys = msgs
            .iter()
            .filter(|m| m.contains("api.api_keys_file"))
            .count();
        assert_eq!(keys, 1, "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.contains("keys:4: every key")),
            "{msgs:?}"
        );
        assert!(!msgs.iter().any(|m| m.contains("short")), "{msgs:?}");
        std::fs::write(dir.path().join("keys"), "0123456789abcdef0123\n").unwrap();
        let c = load(&EnvOverrides::default()).unwrap();
        assert_eq!(
            c.postgres.url,
            "postgres://app:s3cr%3At%40%2Fx@db:5432/x?sslmode=require"
        );
        assert_eq!(c.api.api_keys, ["0123456789abcdef0123"]);
        let env = EnvOverrides {
            postgres_password: Some("from-env".into()),
            ..EnvOverrides::default()
        };
        assert_eq!(
            load(&env).unwrap().postgres.url,
            "postgres://app:from-env@db:5432/x?sslmode=require"
        );
        // A missing file: its path, not a password.
        std::fs::remove_file(dir.path().join("pw")).unwrap();
        let errs = load(&EnvOverrides::default()).unwrap_err().0;
        assert!(
            errs[0]
                .to_string()
                .contains("c.toml:3: postgres.password_file: cannot read"),
            "{errs:?}"
        );
        assert!(
            super::with_password("postgres://db:5432/x", "p")
                .unwrap_err()
                .contains("has no user")
        );
    }

    #[test]
    fn kafka_sasl_needs_a_password_which_is_never_shown() {
        let text = format!(
            "[kafka.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"alice\"\n[kafka.tls]\nca_file = \"no-ca.crt\"\n{SOURCE}"
        );
        let errs = errors_of(&text);
        assert!(
            errs.iter()
                .any(|e| e.contains("kafka.sasl.password_file: SASL needs a password")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("kafka.tls.ca_file: file") && e.contains("no-ca.crt")),
            "{errs:?}"
        );
        let env = EnvOverrides {
            kafka_password: Some("from-the-environment".into()),
            ..EnvOverrides::default()
        };
        let text = format!("[kafka.sasl]\nmechanism = \"PLAIN\"\nusername = \"alice\"\n{SOURCE}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let c = load_str(&text, Path::new("t.toml"), dir, &env).unwrap();
        let sasl = c.kafka.sasl.as_ref().unwrap();
        assert_eq!(sasl.password, "from-the-environment");
        assert!(!format!("{c:?}").contains("from-the-environment"));
    }

    #[test]
    fn https_needs_both_files_and_they_must_exist() {
        let one = format!("[api]\ntls_cert_file = \"config.toml\"\n{SOURCE}");
        let errs = errors_of(&one);
        assert!(
            errs.iter()
                .any(|e| e.starts_with("test.toml:2: api.tls_cert_file: HTTPS needs both")),
            "{errs:?}"
        );
        let missing = format!(
            "[api]\ntls_cert_file = \"config.toml\"\ntls_key_file = \"no-such.key\"\n{SOURCE}"
        );
        let errs = errors_of(&missing);
        assert!(
            errs.iter().any(|e| e.contains("api.tls_key_file: file")
                && e.contains("no-such.key does not exist")),
            "{errs:?}"
        );
    }

    #[test]
    fn env_override_replaces_postgres_url() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let env = EnvOverrides {
            postgres_url: Some("postgres://u:p@db:5432/x".into()),
            kafka_brokers: Some("a:1, b:2".into()),
            ..EnvOverrides::default()
        };
        let c = load_str(SOURCE, Path::new("t.toml"), Path::new(dir), &env).unwrap();
        assert_eq!(c.postgres.url, "postgres://u:p@db:5432/x");
        assert_eq!(c.kafka.brokers, vec!["a:1", "b:2"]);
    }
}
