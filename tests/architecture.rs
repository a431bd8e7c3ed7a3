//! The shape of the code, checked: no import cycle between the modules of the actors
//! crate, no production file over ~500 lines and no function over ~80 (tests and the
//! metric table excepted), so the layout the README's code map describes stays true.
//!
//! Modules are files (`a/b.rs` is `a::b`, `a/mod.rs` is `a`); a module depends on
//! another when its non-test code names a path through it (`crate::a::b::Item`, or
//! `super::…`). A `mod.rs` only declares its children, so a folder's parts depend on
//! each other, never on the folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines a production file may have before its tests.
const MAX_FILE_LINES: usize = 520;

/// Lines a production function may have.
const MAX_FUNCTION_LINES: usize = 80;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's lines before its `#[cfg(test)] mod tests`.
fn production_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].trim() == "#[cfg(test)]" && w[1].trim_start().starts_with("mod "))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// `a/b.rs` → `["a", "b"]`; `a/mod.rs` → `["a"]`; `lib.rs` → `[]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// The module a path names: the longest prefix of it that is a module.
fn resolve(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|prefix| modules.contains(prefix))
}

/// Paths named through `crate::` or `super::`, as module segments from the crate root.
fn named_paths(module: &[String], is_mod_rs: bool, code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|seg| {
                seg.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|seg| !seg.is_empty())
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `anchorflow_actors::` in the binary
        }
        out.push(ident(&code[at + "crate::".len()..]));
    }
    for (at, _) in code.match_indices("super::") {
        if code[..at].ends_with("super::") {
            continue;
        }
        let mut base = module.to_vec();
        if !is_mod_rs {
            base.pop();
        }
        let mut rest = &code[at..];
        while let Some(tail) = rest.strip_prefix("super::") {
            base.pop();
            rest = tail;
        }
        base.extend(ident(rest));
        out.push(base);
    }
    out
}

fn without_comments(lines: &[&str]) -> String {
    lines
        .iter()
        .filter(|l| !l.trim_start().starts_with("//"))
        .copied()
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_actors_crate_has_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("actors/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code = without_comments(&production_lines(&text));
        let is_mod_rs = file
            .file_name()
            .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
        for path in named_paths(&module, is_mod_rs, &code) {
            if let Some(target) = resolve(&modules, &path) {
                if target != module {
                    edges.entry(module.clone()).or_default().insert(target);
                }
            }
        }
    }
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
        cycles: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = stack.iter().position(|n| n == node) {
            let cycle: Vec<String> = stack[at..]
                .iter()
                .chain(std::iter::once(node))
                .map(|m| m.join("::"))
                .collect();
            cycles.push(cycle.join(" -> "));
            return;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, stack, done, cycles);
        }
        stack.pop();
        done.insert(node.clone());
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for module in &modules {
        visit(module, &edges, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
    assert!(edges.len() > 10, "the scan found too few dependencies");
}

/// Production functions longer than the limit: (file, function, lines).
fn long_functions(file: &Path, lines: &[&str]) -> Vec<(String, String, usize)> {
    let mut out = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let signature = [
            "pub fn ",
            "fn ",
            "pub(crate) fn ",
            "async fn ",
            "pub async fn ",
        ]
        .iter()
        .find_map(|p| trimmed.strip_prefix(p));
        let Some(signature) = signature else {
            continue;
        };
        let name: String = signature
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        let Some(end) = lines[at + 1..]
            .iter()
            .position(|l| l.trim_end() == close || l.trim_end().starts_with(&format!("{close})")))
        else {
            continue;
        };
        let length = end + 2;
        if length > MAX_FUNCTION_LINES {
            out.push((file.display().to_string(), name, length));
        }
    }
    out
}

#[test]
fn production_files_and_functions_stay_short() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("actors/src"), &mut files);
    rust_files(&root.join("src"), &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines = production_lines(&text);
        if lines.len() > MAX_FILE_LINES {
            problems.push(format!("{}: {} lines", file.display(), lines.len()));
        }
        for (file, name, length) in long_functions(file, &lines) {
            problems.push(format!("{file}: fn {name} has {length} lines"));
        }
    }
    assert!(problems.is_empty(), "too long:\n{}", problems.join("\n"));
    assert!(files.len() > 20, "found only {} files", files.len());
}
