//! `isrctl config`: the effective configuration, key by key, and where each
//! value came from (default, a config file, an environment variable or an
//! option). [`entries`] names every configuration key; the example config
//! `docs/config.example.toml` is tested against it so neither can drift.
//!
//! Uses [`crate::context`] and [`crate::output`] (see
//! the layering in `main.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use isr::config::Config;

use crate::context::CommandContext;
use crate::output;

/// Every configuration key (dotted, as in the file) with its effective value
/// as text. Secrets are never shown: only whether they are set.
pub fn entries(config: &Config) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".into());
    let opt_bool = |v: Option<bool>| v.map_or("(unset)".into(), |b| b.to_string());
    let s3 = &config.s3;
    vec![
        ("store", config.store.clone()),
        (
            "read_url",
            config
                .read_url
                .clone()
                .unwrap_or_else(|| "(none: chunks are read from the store)".into()),
        ),
        ("state_dir", config.state_dir.display().to_string()),
        ("cache_dir", config.cache_dir.display().to_string()),
        ("runtime_dir", config.runtime_dir.display().to_string()),
        ("s3.endpoint", opt(&s3.endpoint)),
        ("s3.region", opt(&s3.region)),
        ("s3.access_key_id", opt(&s3.access_key_id)),
        (
            "s3.secret_access_key",
            if s3.secret_access_key.is_some() {
                "(set, not shown)".into()
            } else {
                "(unset)".into()
            },
        ),
        ("s3.allow_http", opt_bool(s3.allow_http)),
        ("s3.virtual_hosted_style", opt_bool(s3.virtual_hosted_style)),
        ("retry.attempts", config.retry.attempts.to_string()),
        (
            "retry.initial_backoff_ms",
            config.retry.initial_backoff_ms.to_string(),
        ),
        (
            "retry.max_backoff_ms",
            config.retry.max_backoff_ms.to_string(),
        ),
        (
            "retry.request_timeout_secs",
            config.retry.request_timeout_secs.to_string(),
        ),
        ("import.chunk_size", config.import.chunk_size.to_string()),
        ("import.zstd_level", config.import.zstd_level.to_string()),
        ("import.jobs", config.import.jobs.to_string()),
        ("import.uploads", config.import.uploads.to_string()),
        ("fetch.parallel", config.fetch.parallel.to_string()),
        (
            "fetch.reserved_for_demand",
            config.fetch.reserved_for_demand.to_string(),
        ),
        (
            "fetch.give_up_after_secs",
            config.fetch.give_up_after.as_secs().to_string(),
        ),
        ("fetch.prefetch", config.prefetch.to_string()),
        ("upload.trickle", config.upload.trickle.to_string()),
        (
            "upload.quiet_secs",
            config.upload.quiet.as_secs().to_string(),
        ),
        (
            "upload.rate_bytes_per_sec",
            config
                .upload
                .rate_bytes_per_sec
                .map_or("0 (half the observed rate of one upload)".into(), |r| {
                    r.to_string()
                }),
        ),
        ("upload.parallel", config.upload.parallel.to_string()),
        ("cache.max_bytes", config.cache_max_bytes.to_string()),
        ("kdf.memory_kib", config.kdf.memory_kib.to_string()),
        ("kdf.iterations", config.kdf.iterations.to_string()),
        ("kdf.parallelism", config.kdf.parallelism.to_string()),
        ("vmm.qemu", config.vmm.qemu.display().to_string()),
        ("vmm.accel", config.vmm.accel.clone()),
        ("vmm.libvirt_uri", config.vmm.libvirt_uri.clone()),
        ("gc.grace_secs", config.gc.grace_secs.to_string()),
    ]
}

/// The environment variables the S3 client falls back to for a key the
/// configuration leaves unset.
fn s3_variables(key: &str) -> &'static [&'static str] {
    match key {
        "s3.endpoint" => &["AWS_ENDPOINT_URL", "AWS_ENDPOINT"],
        "s3.region" => &["AWS_REGION", "AWS_DEFAULT_REGION"],
        "s3.access_key_id" => &["AWS_ACCESS_KEY_ID"],
        "s3.secret_access_key" => &["AWS_SECRET_ACCESS_KEY"],
        "s3.allow_http" => &["AWS_ALLOW_HTTP"],
        _ => &[],
    }
}

/// The dotted keys a TOML text sets, each with its 1-based line.
pub fn keys_in_toml(text: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let document: toml::de::DeTable = toml::de::DeTable::parse(text)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
    let mut keys = BTreeMap::new();
    for (key, value) in &document {
        match value.get_ref() {
            toml::de::DeValue::Table(table) => {
                for (inner, _) in table {
                    keys.insert(
                        format!("{}.{}", key.get_ref(), inner.get_ref()),
                        line_of(inner.span().start),
                    );
                }
            }
            _ => {
                keys.insert(key.get_ref().to_string(), line_of(key.span().start));
            }
        }
    }
    Ok(keys)
}

/// The configuration files read, in order (later ones override earlier ones).
fn files_read(explicit: Option<&Path>) -> Vec<PathBuf> {
    match explicit {
        Some(path) => vec![path.to_owned()],
        None => isr::config::default_config_files()
            .into_iter()
            .filter(|p| p.exists())
            .collect(),
    }
}

/// `isrctl config`.
pub fn show(context: &CommandContext) -> anyhow::Result<ExitCode> {
    let files = files_read(context.global.config.as_deref());
    let mut from_files: BTreeMap<String, String> = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading config file {}", file.display()))?;
        let keys =
            keys_in_toml(&text).with_context(|| format!("config file {}", file.display()))?;
        for (key, line) in keys {
            from_files.insert(key, format!("config file {} (line {line})", file.display()));
        }
    }
    let overridden = context.global.overrides();
    let mut rows = Vec::new();
    for (key, value) in entries(&context.config) {
        let source = if let Some((_, source)) = overridden.iter().find(|(k, _)| *k == key) {
            source.clone()
        } else if let Some(source) = from_files.get(key) {
            source.clone()
        } else if let Some(variable) = s3_variables(key)
            .iter()
            .find(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
        {
            format!("env {variable}")
        } else {
            "default".into()
        };
        let value = match (key, value.as_str()) {
            ("s3.secret_access_key", _) => value,
            (_, "(unset)") => match s3_variables(key)
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()))
            {
                Some(_) if key == "s3.secret_access_key" => "(set, not shown)".into(),
                Some(from_env) => from_env,
                None => value,
            },
            _ => value,
        };
        rows.push((key.to_owned(), value, source));
    }
    let secret_from_env = context.config.s3.secret_access_key.is_none()
        && std::env::var_os("AWS_SECRET_ACCESS_KEY").is_some_and(|v| !v.is_empty());
    if secret_from_env {
        for row in rows.iter_mut().filter(|r| r.0 == "s3.secret_access_key") {
            row.1 = "(set, not shown)".into();
        }
    }
    let (credential, credential_source) = context.global.credential_source();
    rows.push(("credentials".into(), credential, credential_source));
    if context.global.json {
        let settings: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(key, value, source)| {
                (
                    key.clone(),
                    serde_json::json!({ "value": value, "source": source }),
                )
            })
            .collect();
        output::json(&serde_json::json!({ "config_files": files, "settings": settings }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if files.is_empty() {
        println!("config files: none (looked for {})", {
            isr::config::default_config_files()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
    } else {
        println!(
            "config files: {}",
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|(key, value, source)| vec![key, value, source])
        .collect();
    output::table(&["KEY", "VALUE", "FROM"], &rows);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/config.example.toml");

    /// The example config is a valid config (the real parser refuses
    /// unknown keys) and sets exactly the keys `isrctl config` knows: a key
    /// added to the code without the example, or the other way round, fails.
    #[test]
    fn the_example_config_documents_every_key() {
        Config::from_toml(EXAMPLE, Path::new("docs/config.example.toml"))
            .expect("the example config parses with the real config type");
        let in_example: Vec<String> = keys_in_toml(EXAMPLE).unwrap().into_keys().collect();
        let config = Config::from_toml("", Path::new("empty")).unwrap();
        let mut known: Vec<String> = entries(&config)
            .into_iter()
            .map(|(k, _)| k.to_owned())
            .collect();
        known.sort();
        assert_eq!(in_example, known);
    }

    #[test]
    fn keys_have_their_lines() {
        let keys = keys_in_toml("store = \"/x\"\n\n[s3]\nregion = \"r\"\n").unwrap();
        assert_eq!(keys["store"], 1);
        assert_eq!(keys["s3.region"], 4);
    }

    #[test]
    fn config_errors_name_the_file_and_line() {
        let error = Config::from_toml(
            "store = \"/x\"\n[import]\nbogus = 1\n",
            Path::new("/f.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/f.toml"), "{error}");
        assert!(error.contains("line 3"), "{error}");
    }
}
