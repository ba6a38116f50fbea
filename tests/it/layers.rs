//! The module layers, checked: reads every `src/**/*.rs`, collects the `crate::X`
//! references between top-level modules, and fails on an import cycle or on a broken
//! layering rule, naming the edge and the file:line that makes it.
//!
//! Why a test and not a convention: the layers (DESIGN.md, `docs/architecture.md`) are
//! what keeps the library usable without the CLI and the server free of the client's
//! code, and a single stray `use` undoes them without any compiler complaint. Lines in
//! comments and in a file's `#[cfg(test)] mod tests` block are not counted: tests may
//! reach anywhere, and a doc link is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges tolerated against the rules below, with why. Empty: keep it so.
const KNOWN_UNTIL_MERGE: &[(&str, &str)] = &[];

/// The modules at the bottom that every other module may use; they use only each other.
const LEAVES: &[&str] = &["crypt", "digest", "epoch", "error", "memory"];

/// Shared pieces beside the layers: they may use the leaves and the protocol, nothing
/// that does a workflow.
const SIDE_LEAVES: &[&str] = &["shutdown", "transport"];

/// Modules that hold workflows or the sync: nothing below them may import them.
const HIGHER: &[&str] = &[
    "cli",
    "daemon",
    "subscribe",
    "client",
    "remote",
    "server",
    "merge",
    "meta",
    "store",
    "engine",
    "page",
    "history",
    "synclog",
];

/// One `crate::X` reference: from module, to module, where.
#[derive(Debug, Clone)]
struct Edge {
    from: String,
    to: String,
    at: String,
}

/// The top-level module a source file belongs to (`None` for `lib.rs`, which only
/// declares them; `main` and `bin` for the binaries).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a root-level name refers to: a module, or one of the error type's
/// re-exports at the crate root.
fn target(name: &str) -> Option<String> {
    match name {
        "Error" | "ErrorKind" | "Result" => Some("error".into()),
        n if n.starts_with(|c: char| c.is_ascii_lowercase()) && n != "self" => Some(n.into()),
        _ => None,
    }
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The code lines of a file that count: no comment lines, nothing from the unit-test
/// module on. Each with its 1-based line number.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .get(i + 1)
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push((i + 1, (*line).to_owned()));
    }
    out
}

/// Every reference to a top-level module in `text` (of module `from`, file `name`):
/// `crate::X…` paths and the names of `use crate::{X, Y::…}` groups, which may span
/// lines. `root` is how the file names the library: `crate`, or `sqlferry` in main.rs.
fn edges_in(from: &str, name: &str, text: &str, root: &str) -> Vec<Edge> {
    let lines = code_lines(text);
    let prefix = format!("{root}::");
    let mut edges = Vec::new();
    let mut push = |to: &str, line: usize| {
        if let Some(to) = target(to)
            && to != from
        {
            edges.push(Edge {
                from: from.to_owned(),
                to,
                at: format!("{name}:{line}"),
            });
        }
    };
    for (k, (line_no, line)) in lines.iter().enumerate() {
        let mut rest = line.as_str();
        while let Some(pos) = rest.find(&prefix) {
            let before = rest[..pos].chars().next_back();
            rest = &rest[pos + prefix.len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            if !rest.starts_with('{') {
                push(ident(rest), *line_no);
                continue;
            }
            // A group: its top-level names, to the matching brace, across lines.
            let mut depth = 0usize;
            let mut item_start = true;
            let (mut text, mut at, mut next_line) = (rest.to_owned(), *line_no, k + 1);
            let mut i = 0;
            loop {
                let Some(c) = text[i..].chars().next() else {
                    let Some((n, l)) = lines.get(next_line) else {
                        break;
                    };
                    text = l.clone();
                    at = *n;
                    next_line += 1;
                    i = 0;
                    continue;
                };
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if depth == 1 && item_start && (c.is_ascii_alphanumeric() || c == '_') => {
                        push(ident(&text[i..]), at);
                        item_start = false;
                    }
                    _ => {}
                }
                i += c.len_utf8();
            }
        }
    }
    edges
}

/// Every edge between top-level modules in `src`.
fn crate_edges(src: &Path) -> Vec<Edge> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut edges = Vec::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("a source file is readable");
        let name = file
            .strip_prefix(src.parent().expect("src has a parent"))
            .expect("under src");
        // The binaries reach the library by its name.
        let (module, root) = match module.as_str() {
            "main" | "bin" => ("main".to_owned(), "sqlferry"),
            _ => (module, "crate"),
        };
        edges.extend(edges_in(&module, &name.display().to_string(), &text, root));
    }
    edges
}

/// What is wrong with `edges`: one line per broken rule or cycle, naming the edge and
/// where it is made. Edges in `known` are tolerated.
fn violations(edges: &[Edge], known: &[(&str, &str)]) -> Vec<String> {
    let edges: Vec<&Edge> = edges
        .iter()
        .filter(|e| !known.contains(&(e.from.as_str(), e.to.as_str())))
        .collect();
    let mut problems = Vec::new();
    let mut rule = |e: &Edge, why: &str| {
        problems.push(format!("{} -> {} ({}): {why}", e.from, e.to, e.at));
    };
    for e in &edges {
        let (from, to) = (e.from.as_str(), e.to.as_str());
        if to == "cli" && from != "main" {
            rule(e, "nothing but main.rs imports cli");
        }
        if (from, to) == ("server", "remote") || (from, to) == ("remote", "server") {
            rule(
                e,
                "server and remote never import each other (they share transport)",
            );
        }
        if from == "meta"
            && !["error", "digest", "epoch", "protocol", "backoff", "store"].contains(&to)
        {
            rule(
                e,
                "meta (the server's keys, notifications and versions index) imports only store (the interface it implements), protocol, backoff and the leaves",
            );
        }
        if from == "store" && to == "meta" {
            rule(
                e,
                "store never imports meta: it knows the versions index only through its own VersionIndex",
            );
        }
        if from == "protocol" && !["error", "digest"].contains(&to) {
            rule(e, "protocol imports nothing but error and digest");
        }
        if from == "page"
            && ["engine", "store", "remote", "server", "client", "subscribe"].contains(&to)
        {
            rule(e, "page is below engine, store and everything above them");
        }
        if LEAVES.contains(&from) && !LEAVES.contains(&to) {
            rule(e, "a leaf (digest, epoch, error) imports only other leaves");
        }
        if SIDE_LEAVES.contains(&from) && HIGHER.contains(&to) {
            rule(
                e,
                "shutdown and transport import no module above the protocol",
            );
        }
    }
    // Cycles: one report per edge that lies on one, with the way back.
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &edges {
        graph.entry(&e.from).or_default().insert(&e.to);
    }
    let path_back = |from: &str, to: &str| -> Option<Vec<String>> {
        // Breadth-first from `to` back to `from`.
        let mut seen = BTreeMap::from([(to, to)]);
        let mut queue = std::collections::VecDeque::from([to]);
        while let Some(m) = queue.pop_front() {
            if m == from {
                let mut path = vec![from.to_owned()];
                let mut at = from;
                while at != to {
                    at = seen[at];
                    path.push(at.to_owned());
                }
                path.reverse();
                return Some(path);
            }
            for &next in graph.get(m).into_iter().flatten() {
                if !seen.contains_key(next) {
                    seen.insert(next, m);
                    queue.push_back(next);
                }
            }
        }
        None
    };
    let mut reported = BTreeSet::new();
    for e in &edges {
        if !reported.insert((e.from.clone(), e.to.clone())) {
            continue;
        }
        if let Some(back) = path_back(&e.from, &e.to) {
            rule(
                e,
                &format!("import cycle: {} -> {}", e.from, back.join(" -> ")),
            );
        }
    }
    problems
}

#[test]
fn modules_keep_their_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = crate_edges(&src);
    assert!(
        edges.iter().any(|e| e.from == "engine" && e.to == "page"),
        "the scan found no engine -> page edge: it is not reading the sources"
    );
    let problems = violations(&edges, KNOWN_UNTIL_MERGE);
    assert!(
        problems.is_empty(),
        "layering broken (see docs/architecture.md):\n{}",
        problems.join("\n")
    );
    // A tolerated edge that no longer exists should leave the list.
    for (from, to) in KNOWN_UNTIL_MERGE {
        if !edges.iter().any(|e| e.from == *from && e.to == *to) {
            eprintln!("KNOWN_UNTIL_MERGE: {from} -> {to} is gone; remove it from the list");
        }
    }
}

#[test]
fn a_new_violation_is_named_with_its_place() {
    let text = "//! page docs mention crate::engine::Link, which does not count\n\
                use crate::{\n    digest::Hash,\n    engine::{PageSource, ScanFn},\n};\n\
                fn f() -> crate::Result<()> { Ok(()) }\n\
                #[cfg(test)]\nmod tests {\n    use crate::store::Store;\n}\n";
    let edges = edges_in("page", "src/page/x.rs", text, "crate");
    let found: Vec<(&str, &str)> = edges
        .iter()
        .map(|e| (e.to.as_str(), e.at.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("digest", "src/page/x.rs:3"),
            ("engine", "src/page/x.rs:4"),
            ("error", "src/page/x.rs:6")
        ]
    );
    let problems = violations(&edges, &[]);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("page -> engine (src/page/x.rs:4)"),
        "{problems:?}"
    );

    // A cycle is named with its way back.
    let cycle = [
        edges_in("store", "src/store.rs", "use crate::engine::X;", "crate"),
        edges_in("engine", "src/engine.rs", "use crate::store::Y;", "crate"),
    ]
    .concat();
    let problems = violations(&cycle, &[]);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("import cycle: store -> engine -> store")),
        "{problems:?}"
    );
    // A known edge is tolerated, until the list is emptied.
    assert!(violations(&cycle, &[("engine", "store")]).is_empty());
}
