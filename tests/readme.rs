//! The README's reference sections must stay true: every canonical column and every config key
//! shipped in `config.toml` is documented there.

use payguard::engine::canonical::COLUMNS;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_canonical_column_is_in_the_sql_contract_table() {
    let text = readme();
    for (name, _, required, _) in COLUMNS {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("README has no contract row for `{name}`"));
        let want = if *required { "| yes |" } else { "| no |" };
        assert!(
            row.contains(want),
            "README row for `{name}` should say {want}: {row}"
        );
    }
}

#[test]
fn every_shipped_config_key_is_in_the_reference() {
    let text = readme();
    let config: toml::Table = toml::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap(),
    )
    .unwrap();
    let mut missing = Vec::new();
    for (section, value) in &config {
        match value {
            toml::Value::Table(t) => {
                for key in t.keys() {
                    let k = format!("`{section}.{key}`");
                    if !text.contains(&k) {
                        missing.push(k);
                    }
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    for key in item.as_table().unwrap().keys() {
                        let k = format!("`{section}[].{key}`");
                        if !text.contains(&k) {
                            missing.push(k);
                        }
                    }
                }
            }
            _ => missing.push(section.clone()),
        }
    }
    missing.sort();
    missing.dedup();
    assert!(
        missing.is_empty(),
        "README config reference lacks: {missing:?}"
    );
}
