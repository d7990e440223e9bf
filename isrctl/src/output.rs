//! Presentation: progress bars (only when stderr is a terminal), byte sizes,
//! tables and JSON.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use isr::progress::Progress;

static QUIET: AtomicBool = AtomicBool::new(false);

/// `-q`: no progress bars and no messages on stderr but errors and warnings.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether `-q` was given.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Whether progress may be drawn on stderr: a terminal, and no `-q`.
pub fn progress_visible() -> bool {
    !quiet() && std::io::stderr().is_terminal()
}

/// A progress message on stderr (`isrctl: ...`), unless `-q`.
pub fn note(message: &str) {
    if !quiet() {
        eprintln!("isrctl: {message}");
    }
}

/// A progress bar on stderr, or nothing when stderr is not a terminal.
#[derive(Debug)]
pub struct Bar {
    enabled: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    /// A bar that draws only if stderr is a terminal.
    pub fn new() -> Bar {
        Bar {
            enabled: progress_visible(),
            bar: Mutex::new(None),
        }
    }
}

impl Progress for Bar {
    fn start(&self, label: &str, total_bytes: u64) {
        if !self.enabled {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(label.to_owned());
        *self.bar.lock().expect("not poisoned") = Some(bar);
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").as_ref() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("not poisoned").take() {
            bar.finish_and_clear();
        }
    }
}

/// `1.50 GiB (1610612736 bytes)`-style sizes, binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Prints rows as an aligned table with a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    // Cells may hold text from the store (names, messages, lock holders).
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| isr::error::printable(cell)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// The name of the schema version field every `--json` document carries.
pub const SCHEMA_FIELD: &str = "schema";
/// The version of the `--json` documents: raised when a field changes
/// meaning or goes away (new fields do not raise it).
pub const SCHEMA_VERSION: u64 = 1;

/// `value` as a `--json` document: an object with the top-level schema
/// version field. The only way a document is made, so none lacks the field.
pub fn document<T: serde::Serialize>(value: &T) -> anyhow::Result<serde_json::Value> {
    let serde_json::Value::Object(fields) = serde_json::to_value(value)? else {
        anyhow::bail!(
            "internal error: a --json document must be an object (use output::json_list)"
        );
    };
    let mut document = serde_json::Map::new();
    document.insert(SCHEMA_FIELD.into(), SCHEMA_VERSION.into());
    document.extend(fields.into_iter().filter(|(k, _)| k != SCHEMA_FIELD));
    Ok(serde_json::Value::Object(document))
}

/// Prints an object as one pretty JSON document on stdout, with the schema
/// version field.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&document(value)?)?);
    Ok(())
}

/// Prints a list as one JSON document: `{"schema": 1, KEY: [...]}`.
pub fn json_list<T: serde::Serialize>(key: &str, items: &[T]) -> anyhow::Result<()> {
    json(&serde_json::json!({ key: items }))
}

/// Prints a command's outcome: `text` as a line on stdout, or with `--json`
/// the document `value`.
pub fn outcome<T: serde::Serialize>(
    json_output: bool,
    value: &T,
    text: &str,
) -> anyhow::Result<()> {
    if json_output {
        json(value)
    } else {
        println!("{text}");
        Ok(())
    }
}

/// The `--json` document of a failed command:
/// `{"schema": 1, "error": {"class", "message", "hint"}}`. The hint is what
/// the one-line message says to do next (after its last `; `), or what to
/// do next for the class.
pub fn error_document(class: isr::error::ErrorClass, message: &str) -> serde_json::Value {
    use isr::error::ErrorClass;
    let class_name = serde_json::to_value(class)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{class:?}").to_lowercase());
    let hint = match message.rsplit_once("; ") {
        Some((_, hint)) => hint.to_owned(),
        None => match class {
            ErrorClass::Invalid => "see `isrctl --help` or `isrctl COMMAND --help`",
            ErrorClass::WrongKey => {
                "give the right --passphrase-file, --key-file or ISR_PASSPHRASE"
            }
            ErrorClass::NotFound => "`isrctl ls` lists the parcels, `isrctl status` the sessions",
            ErrorClass::Conflict => "see who holds the parcel with `isrctl info NAME`",
            ErrorClass::Unreachable => "check the network and the store URL, then run it again",
            ErrorClass::Integrity => "`isrctl verify NAME` lists the damaged chunks",
            ErrorClass::Other => "run it again with -v for details",
        }
        .to_owned(),
    };
    serde_json::json!({
        SCHEMA_FIELD: SCHEMA_VERSION,
        "error": {
            "class": class_name,
            "exit_code": isr::exit::code(class),
            "message": message,
            "hint": hint,
        }
    })
}

/// The error and its causes on one line, each cause shown once: library errors
/// already include their cause in their own message.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if line.contains(&message) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&message);
    }
    // Messages may quote bytes from the store or a damaged file.
    isr::error::printable(&line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_shown_once() {
        let inner = std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(inner)
            .context("writing x: disk on fire")
            .context("exporting p@1");
        assert_eq!(one_line(&error), "exporting p@1: writing x: disk on fire");
    }

    #[test]
    fn documents_carry_the_schema_version() {
        let doc = document(&serde_json::json!({"a": 1, "schema": 9})).unwrap();
        assert_eq!(doc, serde_json::json!({"schema": SCHEMA_VERSION, "a": 1}));
        assert!(document(&[1, 2]).is_err());
        let error = error_document(isr::error::ErrorClass::NotFound, "no x; run y");
        assert_eq!(error["error"]["hint"], "run y");
        assert_eq!(error["error"]["exit_code"], 4);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(1 << 30), "1.00 GiB");
    }
}
