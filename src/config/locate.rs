//! Map dotted key paths (`sources[1].topic`, `pipeline.batch_max_rows`) to the line that sets them,
//! so that semantic errors found after parsing can still point at a line.

use std::collections::HashMap;

/// Key path -> 1-based line number, read off the TOML text.
#[derive(Debug, Default, Clone)]
pub struct KeyLines {
    lines: HashMap<String, usize>,
    paths: HashMap<usize, String>,
}

impl KeyLines {
    /// Scan the text line by line. Understands `[table]`, `[a.b]`, `[[array]]` headers, `key = value`
    /// lines, and inline tables that open an element of a multi-line array (`fields = [` then one
    /// `{ ... }` per line).
    pub fn scan(text: &str) -> Self {
        let mut lines = HashMap::new();
        let mut prefix = String::new();
        let mut array_counts: HashMap<String, usize> = HashMap::new();
        // Open multi-line array: (path of the array, next element index).
        let mut open_array: Option<(String, usize)> = None;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = strip_comment(raw).trim();
            if line.is_empty() {
                continue;
            }
            if let Some((path, idx)) = open_array.as_mut() {
                if line.starts_with(']') {
                    open_array = None;
                    continue;
                }
                if line.starts_with('{') {
                    let elem = format!("{path}[{idx}]");
                    lines.entry(elem.clone()).or_insert(line_no);
                    for key in inline_keys(line) {
                        lines.entry(format!("{elem}.{key}")).or_insert(line_no);
                    }
                    *idx += 1;
                }
                if line.ends_with(']') && !line.starts_with('{') {
                    open_array = None;
                }
                continue;
            }
            if let Some(inner) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
                let name = inner.trim().to_string();
                let n = array_counts.entry(name.clone()).or_insert(0);
                prefix = format!("{name}[{n}]");
                *n += 1;
                lines.entry(prefix.clone()).or_insert(line_no);
                continue;
            }
            if let Some(inner) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let name = inner.trim();
                // `[sources.x]` inside an array of tables refers to the last element.
                prefix = match name.split_once('.') {
                    Some((head, rest)) if array_counts.contains_key(head) => {
                        format!("{head}[{}].{rest}", array_counts[head] - 1)
                    }
                    _ => name.to_string(),
                };
                lines.entry(prefix.clone()).or_insert(line_no);
                continue;
            }
            if let Some((key, value)) = line.split_once('=') {
                let key = key.trim().trim_matches('"');
                let path = if prefix.is_empty() {
                    key.to_string()
                } else {
                    format!("{prefix}.{key}")
                };
                lines.entry(path.clone()).or_insert(line_no);
                let value = value.trim();
                if value.starts_with('[') && !value.contains(']') {
                    open_array = Some((path, 0));
                } else if value.starts_with('[') {
                    // One-line array of inline tables.
                    for (idx, part) in value.split('{').skip(1).enumerate() {
                        let elem = format!("{path}[{idx}]");
                        lines.entry(elem.clone()).or_insert(line_no);
                        for key in inline_keys(&format!("{{{part}")) {
                            lines.entry(format!("{elem}.{key}")).or_insert(line_no);
                        }
                    }
                }
            }
        }
        let mut paths = HashMap::new();
        for (path, line) in &lines {
            // The longest path set on a line is the most precise one.
            let e = paths.entry(*line).or_insert_with(String::new);
            if path.len() > e.len() {
                *e = path.clone();
            }
        }
        Self { lines, paths }
    }

    /// The key path set on `line` (the most specific one), if any.
    pub fn path_at(&self, line: usize) -> Option<&str> {
        self.paths.get(&line).map(String::as_str)
    }

    /// Line of `path`, or of its nearest parent that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path.to_string();
        loop {
            if let Some(l) = self.lines.get(&p) {
                return Some(*l);
            }
            let cut = p.rfind(['.', '['])?;
            p.truncate(cut);
        }
    }
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

fn inline_keys(line: &str) -> Vec<String> {
    let body = line.trim_start_matches('{');
    let mut keys = Vec::new();
    let mut in_str = false;
    let mut start = 0;
    for (i, c) in body.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '=' if !in_str => {
                let seg = &body[start..i];
                let key = seg
                    .rsplit(',')
                    .next()
                    .unwrap_or(seg)
                    .trim()
                    .trim_matches('"');
                if !key.is_empty() {
                    keys.push(key.to_string());
                }
            }
            ',' if !in_str => start = i + 1,
            _ => {}
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lines_of_nested_keys() {
        let text = r#"
[pipeline]
batch_max_rows = 10 # comment

[[sources]]
name = "a"
fields = [
  { name = "x", type = "string" },
  { name = "y", type = "int64", required = true },
]

[[sources]]
name = "b"
fields = [{ name = "z", type = "bool" }]
"#;
        let k = KeyLines::scan(text);
        assert_eq!(k.line_of("pipeline.batch_max_rows"), Some(3));
        assert_eq!(k.line_of("sources[0].name"), Some(6));
        assert_eq!(k.line_of("sources[0].fields[1].type"), Some(9));
        assert_eq!(k.line_of("sources[1].name"), Some(13));
        assert_eq!(k.line_of("sources[1].fields[0].type"), Some(14));
        assert_eq!(k.line_of("sources[1].mapping"), Some(12));
        assert_eq!(k.line_of("nothing.here"), None);
    }
}
