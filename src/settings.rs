//! Loading the configuration: built-in defaults, then the TOML file, then
//! `ANCHORFLOW_*` environment variables, then `--set` flags, each overriding the last.
//!
//! Environment variables use `__` between levels: `ANCHORFLOW_REDIS__URL`,
//! `ANCHORFLOW_PIPELINE__CHECKPOINT_INTERVAL_MS`. Under `[kafka]` the rest of the name
//! becomes a librdkafka property with `_` read as `.`:
//! `ANCHORFLOW_KAFKA__SASL_PASSWORD` sets `sasl.password`.
//!
//! Any error here is a [`ConfigError`] naming the field; `main` exits with
//! exit code 78 (`runtime/exit.rs`) so that systemd's `RestartPreventExitStatus=78` stops a restart loop.

use std::path::Path;

use anchorflow_actors::config::{Config, ConfigError};
use figment::providers::{Format, Serialized, Toml};
use figment::Figment;

/// Loads and validates the configuration.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    sets: &[String],
) -> Result<Config, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = path {
        if !path.exists() {
            return Err(ConfigError::new(
                "--config",
                format!("file {} does not exist", path.display()),
            ));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment.merge(Toml::string(&env_overrides(env)?));
    for set in sets {
        let (key, value) = set
            .split_once('=')
            .ok_or_else(|| ConfigError::new("--set", format!("`{set}` is not key=value")))?;
        figment = figment.merge(Toml::string(&assignment(key.trim(), value.trim())));
    }
    let mut config: Config = figment.extract().map_err(figment_error)?;
    if config.source.instance_id.is_empty() {
        config.source.instance_id = anchorflow_actors::config::host_instance_id();
    }
    config.validate()?;
    Ok(config)
}

/// Renders `ANCHORFLOW_*` variables as one TOML document.
fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> Result<String, ConfigError> {
    let mut doc = String::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("ANCHORFLOW_") else {
            continue;
        };
        let mut parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            // Not a config path (e.g. ANCHORFLOW_CONFIG, ANCHORFLOW_CACHE).
            continue;
        }
        if parts[0] == "kafka" {
            let property = parts[1..].join("_").replace('_', ".");
            parts = vec!["kafka".into(), property];
        }
        let key: Vec<String> = parts.iter().map(|p| toml_key(p)).collect();
        doc.push_str(&assignment(&key.join("."), &value));
    }
    Ok(doc)
}

fn toml_key(part: &str) -> String {
    if part
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        part.to_string()
    } else {
        format!("\"{}\"", part.replace('"', "\\\""))
    }
}

/// One `key = value` TOML line. A value that already parses as TOML (a number, a
/// boolean, a quoted string) is kept; anything else is taken as a string. Keys under
/// `kafka.` are librdkafka properties whose dots are part of the name.
fn assignment(key: &str, value: &str) -> String {
    let key = match key.strip_prefix("kafka.") {
        Some(property) if !property.starts_with('"') => format!("kafka.{}", toml_key(property)),
        _ => key.to_string(),
    };
    let is_kafka = key.starts_with("kafka.");
    // A value that is already a TOML literal (number, boolean, quoted string, array)
    // is kept; librdkafka properties are strings whatever they look like.
    let is_literal = format!("x = {value}").parse::<toml::Table>().is_ok();
    let literal = if !is_kafka && is_literal {
        value.to_string()
    } else {
        toml::Value::String(value.to_string()).to_string()
    };
    format!("{key} = {literal}\n")
}

fn figment_error(error: figment::Error) -> ConfigError {
    let field = if error.path.is_empty() {
        "(config)".to_string()
    } else {
        error.path.join(".")
    };
    let message = match &error.kind {
        figment::error::Kind::UnknownField(name, _) => {
            // figment's path already ends with the unknown name when it has one.
            let field = if error.path.last() == Some(name) {
                field
            } else {
                name.clone()
            };
            return ConfigError::new(field, "unknown field");
        }
        kind => kind.to_string(),
    };
    ConfigError::new(field, message)
}

/// The effective configuration as TOML, secrets redacted.
pub fn render_redacted(config: &Config) -> String {
    let mut shown = config.clone();
    shown.kafka.0 = config.kafka.redacted();
    shown.redis.url = config.redis.redacted_url();
    shown.warehouse.s3 = config.warehouse.s3.redacted();
    toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        for file in ["config/anchorflow.toml", "config/demo.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            load(Some(&path), Vec::new(), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }

    /// `config/anchorflow.toml` documents every field: each one of the configuration
    /// types appears there under its section.
    #[test]
    fn the_shipped_config_names_every_field() {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/anchorflow.toml"),
        )
        .unwrap();
        let shipped: toml::Table = toml::from_str(&shipped).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut missing = Vec::new();
        for (section, fields) in &defaults {
            let Some(fields) = fields.as_table() else {
                continue;
            };
            for (field, value) in fields {
                let written = shipped.get(section).and_then(|s| s.get(field));
                // Nested tables (warehouse.s3) are checked one level down.
                let nested_ok = value.as_table().is_some_and(|inner| {
                    inner
                        .keys()
                        .all(|k| written.and_then(|w| w.get(k)).is_some())
                });
                if written.is_none() || (value.is_table() && !nested_ok) {
                    missing.push(format!("{section}.{field}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "undocumented in config/anchorflow.toml: {missing:?}"
        );
    }

    #[test]
    fn env_and_flags_override_in_order() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/anchorflow.toml");
        let config = load(
            Some(&path),
            env(&[
                ("ANCHORFLOW_REDIS__URL", "redis://10.0.0.1:6380/2"),
                ("ANCHORFLOW_KAFKA__SASL_PASSWORD", "hunter2"),
                ("ANCHORFLOW_PIPELINE__CHECKPOINT_INTERVAL_MS", "250"),
                ("ANCHORFLOW_CONFIG", "ignored"),
            ]),
            &[
                "pipeline.checkpoint_interval_ms=500".into(),
                "kafka.bootstrap.servers=b:1".into(),
            ],
        )
        .unwrap();
        assert_eq!(config.redis.url, "redis://10.0.0.1:6380/2");
        assert_eq!(config.kafka.0["sasl.password"], "hunter2");
        assert_eq!(config.kafka.0["bootstrap.servers"], "b:1");
        assert_eq!(config.pipeline.checkpoint_interval_ms, 500);
        let shown = render_redacted(&config);
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn errors_name_the_field() {
        let bad = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            load(None, Vec::new(), &sets).unwrap_err()
        };
        let e = bad(&[
            "kafka.bootstrap.servers=x:1",
            "pipeline.checkpoint_interval_ms=\"soon\"",
        ]);
        assert_eq!(e.field, "pipeline.checkpoint_interval_ms", "{e}");
        let e = bad(&["kafka.bootstrap.servers=x:1", "redis.nope=1"]);
        assert_eq!(e.field, "redis.nope", "{e}");
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = bad(&["kafka.bootstrap.servers=x:1", "time.timezone=Nowhere/Land"]);
        assert_eq!(e.field, "time.timezone");
        let e = bad(&["kafka.bootstrap.servers=x:1", "pipeline.memory_budget_mb=8"]);
        assert_eq!(e.field, "pipeline.memory_budget_mb", "{e}");
        let e = bad(&[]);
        assert_eq!(e.field, "kafka.bootstrap.servers");
        let e = load(Some(Path::new("/nonexistent.toml")), Vec::new(), &[]).unwrap_err();
        assert_eq!(e.field, "--config");
    }
}
