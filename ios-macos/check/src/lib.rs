//! Checks of the macOS app's sources (`ios-macos/`) that run on Linux, where there is
//! no Swift compiler and no Xcode:
//!
//! - [`swift::syntax_problems`]: every Swift file parses with the tree-sitter Swift
//!   grammar without an ERROR or MISSING node;
//! - [`ffi::check_uses`]: every `ztna_*` / `ZTNA_*` name the Swift code uses is
//!   declared in the committed C header, and every call of a header function passes
//!   as many arguments as the prototype has parameters;
//! - [`project::check`]: `project.yml` (XcodeGen) parses, has the app and the packet
//!   tunnel extension, their entitlement and Info.plist files exist and say what a
//!   packet tunnel needs, the C module map points at the header, and every Swift
//!   file is in some target's sources.
//!
//! Each check returns [`Problem`]s (`file:line:col: message`) rather than stopping at
//! the first; the tests in `tests/apple_sources.rs` run them on the real tree.

pub mod codable;
pub mod ffi;
pub mod project;
pub mod swift;

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a check could not run at all (as opposed to a [`Problem`] it found).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the {0} grammar into tree-sitter: {1}")]
    Grammar(&'static str, tree_sitter::LanguageError),
    #[error("tree-sitter returned no tree for {0}")]
    NoTree(PathBuf),
}

/// One finding, at a place in a file (line and column 1-based; 0 when the finding
/// is about the whole file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Problem {
    pub fn at(file: &Path, point: tree_sitter::Point, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: point.row + 1,
            column: point.column + 1,
            message: message.into(),
        }
    }

    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        Problem {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

/// `ios-macos/` of this checkout.
pub fn apple_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("check/ is inside ios-macos/")
        .to_path_buf()
}

/// The committed C header the Swift code imports.
pub fn header_path() -> PathBuf {
    apple_dir()
        .parent()
        .expect("ios-macos/ is inside the workspace")
        .join("agent-ffi/include/ztna_agent.h")
}

/// Directories under `ios-macos/` that hold no app sources: this crate and the
/// output of `build-rust.sh` and Xcode.
const NOT_APP_SOURCES: &[&str] = &["check", "build", "DerivedData"];

/// Every `.swift` file under `dir` (the app's tree), sorted, skipping
/// [`NOT_APP_SOURCES`] and hidden directories.
pub fn swift_files(dir: &Path) -> Result<Vec<PathBuf>, CheckError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| CheckError::Read {
            path: d.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| CheckError::Read {
                path: d.clone(),
                source,
            })?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                let skipped = name.starts_with('.')
                    || (d == dir && NOT_APP_SOURCES.contains(&name.as_str()))
                    || name.ends_with(".xcodeproj");
                if !skipped {
                    stack.push(path);
                }
            } else if name.ends_with(".swift") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn read(path: &Path) -> Result<String, CheckError> {
    std::fs::read_to_string(path).map_err(|source| CheckError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses `source` with `language`; `name` and `path` only label errors.
pub(crate) fn parse(
    language: tree_sitter::Language,
    name: &'static str,
    path: &Path,
    source: &str,
) -> Result<tree_sitter::Tree, CheckError> {
    let mut parser = tree_sitter::Parser::new();
    parser
        .set_language(&language)
        .map_err(|e| CheckError::Grammar(name, e))?;
    parser
        .parse(source, None)
        .ok_or_else(|| CheckError::NoTree(path.to_path_buf()))
}

/// Every node of `tree` in document order.
pub(crate) fn nodes(tree: &tree_sitter::Tree) -> Vec<tree_sitter::Node<'_>> {
    let mut out = Vec::new();
    let mut cursor = tree.walk();
    'walk: loop {
        out.push(cursor.node());
        if cursor.goto_first_child() {
            continue;
        }
        while !cursor.goto_next_sibling() {
            if !cursor.goto_parent() {
                break 'walk;
            }
        }
    }
    out
}

/// ERROR and MISSING nodes of a parsed file, as problems.
pub(crate) fn syntax_problems_in(
    tree: &tree_sitter::Tree,
    path: &Path,
    source: &str,
) -> Vec<Problem> {
    let mut out = Vec::new();
    for node in nodes(tree) {
        if node.is_missing() {
            out.push(Problem::at(
                path,
                node.start_position(),
                format!("syntax error: missing {}", node.kind()),
            ));
        } else if node.is_error() {
            let text = &source[node.byte_range()];
            let first_line = text.lines().next().unwrap_or("").trim();
            let shown: String = first_line.chars().take(60).collect();
            out.push(Problem::at(
                path,
                node.start_position(),
                format!("syntax error near `{shown}`"),
            ));
        }
    }
    out
}
