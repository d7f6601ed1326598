//! Swift syntax, with the tree-sitter Swift grammar (alex-pinkus/tree-sitter-swift,
//! the grammar editors and GitHub use). It is not the Swift compiler: it finds
//! syntax errors, not type errors.

use std::path::Path;

use crate::{CheckError, Problem};

pub fn language() -> tree_sitter::Language {
    tree_sitter_swift::LANGUAGE.into()
}

/// Parses one Swift file.
pub fn parse(path: &Path, source: &str) -> Result<tree_sitter::Tree, CheckError> {
    crate::parse(language(), "Swift", path, source)
}

/// Every ERROR or MISSING node in `source`, at its line and column.
pub fn syntax_problems(path: &Path, source: &str) -> Result<Vec<Problem>, CheckError> {
    let tree = parse(path, source)?;
    Ok(crate::syntax_problems_in(&tree, path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_swift_has_no_problems() {
        let src = r#"
import Foundation

final class Box<T> {
    private(set) var value: T
    init(_ value: T) { self.value = value }
    func map<U>(_ f: (T) throws -> U) rethrows -> Box<U> { Box<U>(try f(value)) }
}

struct Item: Codable, Equatable {
    var name: String
    var rtt: Double?
    enum CodingKeys: String, CodingKey {
        case name
        case rtt = "rtt_ms"
    }
}

func describe(_ items: [Item]) -> String {
    items.map { item in
        guard let rtt = item.rtt else { return "\(item.name): -" }
        return String(format: "%@: %.1f ms", item.name, rtt)
    }.joined(separator: ", ")
}
"#;
        let problems = syntax_problems(Path::new("ok.swift"), src).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_broken_file_is_reported_at_its_line() {
        // An unclosed call and a stray brace on line 4.
        let src = "import Foundation\n\nfunc f() {\n    let x = g(1, \n}\n}\n";
        let problems = syntax_problems(Path::new("broken.swift"), src).unwrap();
        assert!(!problems.is_empty(), "the broken file passed");
        assert!(
            problems.iter().all(|p| p.file == Path::new("broken.swift")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| (4..=6).contains(&p.line)),
            "no problem on lines 4-6: {problems:?}"
        );
        let shown = problems[0].to_string();
        assert!(shown.starts_with("broken.swift:"), "{shown}");
    }

    #[test]
    fn a_missing_token_is_reported() {
        let src = "let values = [1, 2, 3\nprint(values)\n";
        let problems = syntax_problems(Path::new("missing.swift"), src).unwrap();
        assert!(!problems.is_empty(), "an unclosed array literal passed");
    }
}
