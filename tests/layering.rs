//! Keeps the library layered: every `crate::` path in `src/` must name a module
//! of a lower layer than the module it is written in (or the module itself).
//!
//! The order is the one docs/architecture.md draws. Modules of one layer are
//! independent of each other, so a layer cannot hide a circle. Test modules
//! (`#[cfg(test)]`) and comments are not read: tests may build fixtures with
//! higher modules, and doc links do not make a dependency.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, bottom up.
const LAYERS: &[&[&str]] = &[
    &["error", "progress", "private"],
    &["keys", "store"],
    &["chunk"],
    &["layout", "manifest", "trace"],
    &["parcel", "cache"],
    &["fetch", "export", "gc"],
    &["image", "import"],
    &["vmm"],
    &["session"],
    &["control", "maintenance", "config"],
    &["exit"],
    &["daemon"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level module a source file belongs to: `src/a.rs` and `src/a/**` are `a`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading src") {
        let path = entry.expect("reading src").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments, string literals and `#[cfg(test)]` items.
fn code_only(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let bytes = source.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |end| end + 2);
        } else if rest.starts_with("'\"'") || rest.starts_with("'\\\"'") {
            // A quote as a character literal.
            i += rest.find("\"'").expect("closing quote") + 2;
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += rest[body..]
                .find(&close)
                .map_or(rest.len(), |end| body + end + close.len());
            out.push_str("\"\"");
        } else if rest.starts_with('"') {
            // Skip a string literal, honouring escapes.
            let mut j = 1;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'\\' => j += 2,
                    b'"' => break,
                    _ => j += 1,
                }
            }
            i += j + 1;
            out.push_str("\"\"");
        } else if rest.starts_with("#[cfg(test)]") {
            // Skip the attribute and the item it guards: up to its `;` or its
            // matching closing brace.
            let mut j = "#[cfg(test)]".len();
            let mut depth = 0usize;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            j += 1;
                            break;
                        }
                    }
                    b';' if depth == 0 => {
                        j += 1;
                        break;
                    }
                    _ => {}
                }
                j += 1;
            }
            i += j;
        } else {
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `Some(number of #)` where a raw string literal (`r"…"`, `r#"…"#`) starts.
fn raw_string_start(text: &str) -> Option<usize> {
    let after_r = text.strip_prefix('r')?;
    let hashes = after_r.len() - after_r.trim_start_matches('#').len();
    after_r[hashes..].starts_with('"').then_some(hashes)
}

/// Every module named right after `crate::`, including inside `crate::{a, b::c}`.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `isr_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = matching_brace(group);
            for part in split_top_level(&group[..end]) {
                found.insert(first_ident(part));
            }
        } else {
            found.insert(first_ident(rest));
        }
    }
    found.retain(|name| !name.is_empty());
    found
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn first_ident(text: &str) -> String {
    text.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// `(file, imported module, why)` for every import that breaks the order.
fn violations(src: &Path) -> Vec<(PathBuf, String, String)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let Some(own) = layer_of(&module) else {
            bad.push((
                file,
                module.clone(),
                format!(
                    "module `{module}` has no layer: add it to LAYERS and docs/architecture.md"
                ),
            ));
            continue;
        };
        let source = std::fs::read_to_string(&file).expect("reading a source file");
        for imported in crate_imports(&code_only(&source)) {
            if imported == module {
                continue;
            }
            match layer_of(&imported) {
                Some(layer) if layer < own => {}
                Some(layer) if layer == own => bad.push((
                    file.clone(),
                    imported.clone(),
                    format!("`{module}` and `{imported}` share layer {own} and must not import each other"),
                )),
                Some(layer) => bad.push((
                    file.clone(),
                    imported.clone(),
                    format!("`{module}` (layer {own}) imports `{imported}` (layer {layer}) from above"),
                )),
                None => bad.push((
                    file.clone(),
                    imported.clone(),
                    format!("`crate::{imported}` is not a layered module"),
                )),
            }
        }
    }
    bad
}

#[test]
fn the_library_imports_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    let report: Vec<String> = bad
        .iter()
        .map(|(file, imported, why)| format!("{}: crate::{imported}: {why}", file.display()))
        .collect();
    assert!(
        report.is_empty(),
        "{} import(s) go against the layer order:\n{}",
        report.len(),
        report.join("\n")
    );
}

#[test]
fn an_upward_import_is_caught() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path();
    std::fs::create_dir(src.join("store")).expect("mkdir");
    std::fs::write(src.join("lib.rs"), "pub mod store;\npub mod session;\n").expect("write");
    std::fs::write(
        src.join("store/local.rs"),
        "// crate::session in a comment is fine\n\
         use crate::{error::Classify, session::{Session, take_lock}};\n\
         #[cfg(test)]\nmod tests { use crate::import::import; }\n",
    )
    .expect("write");
    std::fs::write(src.join("session.rs"), "use crate::store::StoreError;\n").expect("write");
    let bad = violations(src);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].0.ends_with("store/local.rs"), "{bad:?}");
    assert_eq!(bad[0].1, "session");
}

#[test]
fn a_module_without_a_layer_is_caught() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("brand_new.rs"),
        "use crate::error::ErrorClass;\n",
    )
    .expect("write");
    let bad = violations(dir.path());
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(bad[0].1, "brand_new");
}
