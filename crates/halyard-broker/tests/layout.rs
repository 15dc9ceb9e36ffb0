//! The crate's layout rules, checked on its source: modules import each other without a
//! cycle, the protocol files never read the clock (time is passed in), and no source file
//! grows past 800 lines (tests aside) without a reason written at its top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `src/`, with its text up to its first `#[cfg(test)]` module.
fn sources() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                let code = match text.find("#[cfg(test)]\nmod ") {
                    Some(i) => text[..i].to_string(),
                    None => text,
                };
                out.push((p, code));
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &mut out);
    assert!(out.len() > 20, "found {} files", out.len());
    out
}

/// The top-level module a file belongs to (`connection/inbound.rs` -> `connection`).
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

#[test]
fn modules_import_each_other_without_a_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in sources() {
        let m = module_of(&path);
        if m == "lib" || path.ends_with("tests.rs") {
            continue;
        }
        let deps = graph.entry(m.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != m && !name.is_empty() && name.chars().next().unwrap().is_lowercase() {
                deps.insert(name);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            panic!("import cycle: {} -> {m}", path[i..].join(" -> "));
        }
        path.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            if graph.contains_key(d) {
                visit(d, graph, path, done);
            }
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
    assert!(graph.len() >= 15, "{graph:?}");
}

#[test]
fn protocol_files_never_read_the_clock() {
    let protocol = [
        "connection/proto.rs",
        "connection/open.rs",
        "connection/inbound.rs",
        "connection/outbound.rs",
        "connection/guard.rs",
        "connection/sim.rs",
        "lifecycle.rs",
        "route.rs",
        "timers.rs",
    ];
    let mut seen = 0;
    for (path, code) in sources() {
        let rel = path
            .strip_prefix(src())
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if !protocol.contains(&rel.as_str()) {
            continue;
        }
        seen += 1;
        for clock in ["Instant::now", "SystemTime::now"] {
            assert!(
                !code.contains(clock),
                "{rel} reads the clock ({clock}); pass the time in"
            );
        }
    }
    assert_eq!(seen, protocol.len(), "a protocol file moved");
}

#[test]
fn no_source_file_over_800_lines_without_a_reason() {
    for (path, code) in sources() {
        let lines = code.lines().count();
        let reason = code.lines().take(12).any(|l| l.contains("Over 800 lines:"));
        assert!(
            lines <= 800 || reason,
            "{} has {lines} lines (tests aside): split it, or say why at its top",
            path.display()
        );
    }
}
