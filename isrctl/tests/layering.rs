//! Keeps isrctl's modules in the layers `main.rs` documents: outside its tests,
//! a module names (`crate::…`) only modules of lower layers, so the commands
//! cannot import each other into a circle again.

/// isrctl's modules, bottom up; the modules of one layer are independent.
const LAYERS: &[&[&str]] = &[
    &["output", "credentials"],
    &["context"],
    &["daemon"],
    &[
        "parcels",
        "maintenance",
        "session",
        "checkin",
        "view",
        "watch",
        "settings",
    ],
    &["ui"],
    &["main"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The modules a source names after `crate::` (also in `crate::{a, b}`),
/// leaving out comments and everything from `#[cfg(test)]` on.
fn named_modules(source: &str) -> Vec<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        for (_, after) in line
            .match_indices("crate::")
            .map(|(at, m)| line.split_at(at + m.len()))
        {
            let names = match after.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .collect(),
                None => vec![after],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push(name);
                }
            }
        }
    }
    found
}

#[test]
fn modules_import_only_downward() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut upward = Vec::new();
    for entry in std::fs::read_dir(&src).expect("reading isrctl/src") {
        let path = entry.expect("reading isrctl/src").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue; // a module's assets (src/ui/: HTML, script, style)
        }
        let module = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        let source = std::fs::read_to_string(&path).expect("reading a source file");
        if module == "main" {
            continue; // the crate root, on top: it may use every module
        }
        let own = layer(module)
            .unwrap_or_else(|| panic!("isrctl/src/{module}.rs is in no layer of LAYERS"));
        for named in named_modules(&source) {
            // What is no module is an item of the crate root, `main.rs`.
            let theirs = layer(&named).unwrap_or(LAYERS.len() - 1);
            if named != module && theirs >= own {
                upward.push(format!("{module} uses crate::{named}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "not downward (see the layers in isrctl/src/main.rs): {upward:?}"
    );
}

#[test]
fn the_reader_finds_grouped_and_plain_paths() {
    let source =
        "use crate::a::B;\nuse crate::{c, d::E};\n// crate::f\n#[cfg(test)]\nuse crate::g;";
    assert_eq!(named_modules(source), ["a", "c", "d"]);
}
