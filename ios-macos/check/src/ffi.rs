//! The Swift code against the C header: every `ztna_*` / `ZTNA_*` name it uses is
//! declared there, and every call of a header function has the prototype's number of
//! arguments. The header is parsed with the tree-sitter C grammar (its prototypes,
//! typedefs, enumerators and macros), the Swift code with the Swift grammar, so
//! comments, strings and line breaks inside argument lists cannot fool either side.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tree_sitter::Node;

use crate::{CheckError, Problem};

/// What the header declares.
#[derive(Debug, Default)]
pub struct Header {
    /// Function name → number of parameters (`(void)` is 0).
    pub functions: BTreeMap<String, usize>,
    /// Every other name: types, struct fields, enumerators, macros.
    pub names: BTreeSet<String>,
}

impl Header {
    /// Parses a C header; its syntax errors are problems too (a header the grammar
    /// cannot read would make every later answer unreliable).
    pub fn parse(path: &Path, text: &str) -> Result<(Header, Vec<Problem>), CheckError> {
        let text = &as_c(text);
        let language: tree_sitter::Language = tree_sitter_c::LANGUAGE.into();
        let tree = crate::parse(language, "C", path, text)?;
        let problems = crate::syntax_problems_in(&tree, path, text);
        let mut header = Header::default();
        for node in crate::nodes(&tree) {
            match node.kind() {
                "function_declarator" => {
                    // A prototype names an identifier; a function-pointer typedef
                    // (`(*ztna_log_fn)(...)`) is a type, collected below.
                    let Some(name) = node
                        .child_by_field_name("declarator")
                        .filter(|n| n.kind() == "identifier")
                    else {
                        continue;
                    };
                    let Some(params) = node.child_by_field_name("parameters") else {
                        continue;
                    };
                    header
                        .functions
                        .insert(text[name.byte_range()].to_string(), arity(params, text));
                }
                "identifier" | "type_identifier" | "field_identifier" => {
                    header.names.insert(text[node.byte_range()].to_string());
                }
                _ => {}
            }
        }
        for f in header.functions.keys() {
            header.names.remove(f);
        }
        Ok((header, problems))
    }

    pub fn load(path: &Path) -> Result<(Header, Vec<Problem>), CheckError> {
        Header::parse(path, &crate::read(path)?)
    }
}

/// The header as a C (not C++) compiler reads it: `#ifdef __cplusplus` blocks
/// blanked (lines kept, so positions stay right). cbindgen wraps the prototypes in
/// `extern "C" {` and `}` inside two such blocks; a brace opened in one conditional
/// and closed in another is beyond a grammar that does not preprocess.
fn as_c(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize; // nesting of #if* inside a __cplusplus block
    for line in text.split_inclusive('\n') {
        let directive = line.trim_start();
        if depth == 0 {
            if directive.starts_with("#ifdef __cplusplus") {
                depth = 1;
                out.push('\n');
            } else {
                out.push_str(line);
            }
            continue;
        }
        if directive.starts_with("#if") {
            depth += 1;
        } else if directive.starts_with("#endif") {
            depth -= 1;
        }
        out.push('\n');
    }
    out
}

/// Parameters of a `parameter_list`: `(void)` and `()` are none.
fn arity(params: Node<'_>, text: &str) -> usize {
    let mut cursor = params.walk();
    let decls: Vec<Node<'_>> = params
        .named_children(&mut cursor)
        .filter(|n| matches!(n.kind(), "parameter_declaration" | "variadic_parameter"))
        .collect();
    if decls.len() == 1 && text[decls[0].byte_range()].trim() == "void" {
        0
    } else {
        decls.len()
    }
}

/// One use of a C name in Swift.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    pub name: String,
    pub point: tree_sitter::Point,
    /// The argument count when the name is called (`f(a, b)`), else `None`.
    pub arguments: Option<usize>,
}

/// Names that come from the C header: the library's prefix, either case.
fn is_c_name(name: &str) -> bool {
    name.starts_with("ztna_") || name.starts_with("ZTNA_")
}

/// Every use of a `ztna_*` / `ZTNA_*` name in a Swift file, with the argument count
/// where it is the callee of a call.
pub fn swift_uses(path: &Path, source: &str) -> Result<Vec<Use>, CheckError> {
    let tree = crate::swift::parse(path, source)?;
    let mut out = Vec::new();
    for node in crate::nodes(&tree) {
        if !matches!(node.kind(), "simple_identifier" | "type_identifier") {
            continue;
        }
        let name = &source[node.byte_range()];
        if !is_c_name(name) {
            continue;
        }
        out.push(Use {
            name: name.to_string(),
            point: node.start_position(),
            arguments: call_arguments(node),
        });
    }
    Ok(out)
}

/// When `ident` is the callee of a call expression (`ident(...)`, `ident { }`), the
/// number of arguments: those in parentheses plus trailing closures.
fn call_arguments(ident: Node<'_>) -> Option<usize> {
    let call = ident.parent().filter(|p| p.kind() == "call_expression")?;
    if call.named_child(0)? != ident {
        return None;
    }
    let mut cursor = call.walk();
    let suffix = call
        .named_children(&mut cursor)
        .find(|n| n.kind() == "call_suffix")?;
    let mut count = 0;
    let mut cursor = suffix.walk();
    for part in suffix.named_children(&mut cursor) {
        match part.kind() {
            "value_arguments" => {
                let mut c = part.walk();
                count += part
                    .named_children(&mut c)
                    .filter(|a| a.kind() == "value_argument")
                    .count();
            }
            "lambda_literal" => count += 1,
            _ => {}
        }
    }
    Some(count)
}

/// Checks a Swift file's uses against the header.
pub fn check_uses(header: &Header, path: &Path, source: &str) -> Result<Vec<Problem>, CheckError> {
    let mut problems = Vec::new();
    for u in swift_uses(path, source)? {
        match (header.functions.get(&u.name), u.arguments) {
            (Some(&want), Some(got)) if want != got => problems.push(Problem::at(
                path,
                u.point,
                format!(
                    "{} takes {want} argument{} in the header, called with {got}",
                    u.name,
                    if want == 1 { "" } else { "s" }
                ),
            )),
            (Some(_), _) => {}
            // A struct's name called is its initializer (`ztna_sockaddr()`).
            (None, _) if header.names.contains(&u.name) => {}
            (None, _) => problems.push(Problem::at(
                path,
                u.point,
                format!("{} is not declared in the C header", u.name),
            )),
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = r#"
#include <stddef.h>
#define ZTNA_MAX 1350
typedef enum ztna_error { ZTNA_ERROR_OK = 0, ZTNA_ERROR_NOTHING = 1 } ztna_error;
typedef struct ztna_agent ztna_agent;
typedef void (*ztna_log_fn)(void *ctx, const char *message);
#ifdef __cplusplus
extern "C" {
#endif // __cplusplus
typedef struct ztna_sockaddr { uint8_t family; uint16_t port; uint8_t addr[16]; } ztna_sockaddr;
/* a comment mentioning ztna_not_a_function(a, b) */
enum ztna_error ztna_agent_poll_udp(struct ztna_agent *agent,
                                    uint8_t *out,
                                    size_t cap,
                                    size_t *out_len,
                                    struct ztna_sockaddr *to);
void ztna_agent_free(struct ztna_agent *agent);
const char *ztna_error_message(int32_t code);
#ifdef __cplusplus
}  // extern "C"
#endif
int ztna_version(void);
"#;

    fn header() -> Header {
        let (h, problems) = Header::parse(Path::new("h.h"), HEADER).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        h
    }

    #[test]
    fn header_functions_and_their_arities() {
        let h = header();
        let got: Vec<(&str, usize)> = h.functions.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            got,
            [
                ("ztna_agent_free", 1),
                ("ztna_agent_poll_udp", 5),
                ("ztna_error_message", 1),
                ("ztna_version", 0),
            ]
        );
        for n in [
            "ztna_sockaddr",
            "ZTNA_ERROR_NOTHING",
            "ZTNA_MAX",
            "ztna_agent",
        ] {
            assert!(h.names.contains(n), "{n} missing from {:?}", h.names);
        }
        assert!(!h.names.contains("ztna_not_a_function"));
    }

    #[test]
    fn matching_calls_pass() {
        let src = r#"
var len = 0
var to = ztna_sockaddr()
let r = ztna_agent_poll_udp(handle, buffer.baseAddress, buffer.count,
                            &len, &to)
if r == ZTNA_ERROR_OK { print(String(cString: ztna_error_message(Int32(r.rawValue)))) }
let size = Int(ZTNA_MAX)
ztna_agent_free(handle)
let v = ztna_version()
"#;
        let problems = check_uses(&header(), Path::new("ok.swift"), src).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn a_wrong_arity_is_reported_where_it_is() {
        let src = "let a = 1\nlet r = ztna_agent_poll_udp(handle, buf, cap, &len)\n";
        let problems = check_uses(&header(), Path::new("bad.swift"), src).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!((problems[0].line, problems[0].column), (2, 9));
        assert!(
            problems[0].message.contains("takes 5 arguments")
                && problems[0].message.contains("called with 4"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn a_trailing_closure_counts_as_an_argument() {
        let src = "ztna_agent_free(handle) { _ in }\n";
        let problems = check_uses(&header(), Path::new("bad.swift"), src).unwrap();
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn an_unknown_function_or_constant_is_reported() {
        let src = "ztna_agent_frobnicate(handle)\nlet x = ZTNA_ERROR_MAYBE\n";
        let problems = check_uses(&header(), Path::new("bad.swift"), src).unwrap();
        let messages: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "bad.swift:1:1: ztna_agent_frobnicate is not declared in the C header",
                "bad.swift:2:9: ZTNA_ERROR_MAYBE is not declared in the C header",
            ]
        );
    }

    #[test]
    fn names_in_comments_and_strings_are_not_uses() {
        let src = "// ztna_gone(1)\nlet s = \"ztna_gone(1, 2)\"\n";
        let uses = swift_uses(Path::new("x.swift"), src).unwrap();
        assert!(uses.is_empty(), "{uses:?}");
    }
}
