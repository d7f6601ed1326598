//! The Codable models of a Swift file, as far as decoding JSON needs them: for each
//! struct, its stored properties' declared types and its `CodingKeys` (case → JSON
//! key); for each enum with raw values, those values. `tests/status_json.rs`
//! compares them with the JSON the Rust engine emits.

use std::collections::BTreeMap;
use std::path::Path;

use tree_sitter::Node;

use crate::CheckError;

/// One struct or enum declaration.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Property name → declared type as written (`Double?`, `[ServiceStatus]`).
    pub properties: BTreeMap<String, String>,
    /// `CodingKeys` case → the JSON key (the raw value, else the case name).
    pub coding_keys: BTreeMap<String, String>,
    /// For an enum: case → raw value (else the case name).
    pub cases: BTreeMap<String, String>,
}

impl Model {
    /// The Swift type declared for a JSON key, through `CodingKeys`.
    pub fn type_of_key(&self, key: &str) -> Option<&str> {
        let case = self
            .coding_keys
            .iter()
            .find(|(_, k)| k.as_str() == key)
            .map(|(c, _)| c)?;
        self.properties.get(case).map(String::as_str)
    }
}

/// Every declaration in `source` by name (nested ones too, under their own name).
pub fn models(path: &Path, source: &str) -> Result<BTreeMap<String, Model>, CheckError> {
    let tree = crate::swift::parse(path, source)?;
    let mut out = BTreeMap::new();
    for node in crate::nodes(&tree) {
        if node.kind() != "class_declaration" {
            continue;
        }
        let Some(name) = node.child_by_field_name("name") else {
            continue;
        };
        let Some(body) = node.child_by_field_name("body") else {
            continue;
        };
        let mut model = Model::default();
        let mut cursor = body.walk();
        for member in body.named_children(&mut cursor) {
            match member.kind() {
                "property_declaration" => {
                    if let Some((n, t)) = property(member, source) {
                        model.properties.insert(n, t);
                    }
                }
                "enum_entry" => {
                    for (case, raw) in enum_entries(member, source) {
                        model.cases.insert(case, raw);
                    }
                }
                "class_declaration"
                    if member
                        .child_by_field_name("name")
                        .is_some_and(|n| &source[n.byte_range()] == "CodingKeys") =>
                {
                    if let Some(keys) = member.child_by_field_name("body") {
                        let mut c = keys.walk();
                        for entry in keys.named_children(&mut c) {
                            if entry.kind() == "enum_entry" {
                                model.coding_keys.extend(enum_entries(entry, source));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        out.insert(source[name.byte_range()].to_string(), model);
    }
    Ok(out)
}

/// A stored property's name and declared type; none for computed properties (they
/// are not decoded).
fn property(node: Node<'_>, source: &str) -> Option<(String, String)> {
    if (0..node.named_child_count())
        .filter_map(|i| node.named_child(i))
        .any(|c| c.kind() == "computed_property")
    {
        return None;
    }
    let pattern = node.child_by_field_name("name")?;
    let name = pattern
        .child_by_field_name("bound_identifier")
        .unwrap_or(pattern);
    let mut cursor = node.walk();
    let annotation = node
        .named_children(&mut cursor)
        .find(|c| c.kind() == "type_annotation")?;
    let ty = annotation.child_by_field_name("name")?;
    Some((
        source[name.byte_range()].to_string(),
        source[ty.byte_range()].to_string(),
    ))
}

/// `case a = "b"` → (a, b); `case a` → (a, a); `case a, b` → (a, a), (b, b).
fn enum_entries(entry: Node<'_>, source: &str) -> Vec<(String, String)> {
    let mut cursor = entry.walk();
    let names: Vec<String> = entry
        .children_by_field_name("name", &mut cursor)
        .map(|n| source[n.byte_range()].to_string())
        .collect();
    let raw = entry
        .child_by_field_name("raw_value")
        .map(|r| source[r.byte_range()].trim_matches('"').to_string());
    match (names.as_slice(), raw) {
        ([one], Some(raw)) => vec![(one.clone(), raw)],
        _ => names.into_iter().map(|n| (n.clone(), n)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_keys_and_enum_values() {
        let src = r#"
public struct Item: Codable {
    public var rttMs: Double?
    var names: [String]
    public var id: String { names[0] }
    enum CodingKeys: String, CodingKey {
        case rttMs = "rtt_ms"
        case names
    }
}
public enum Path: String, Codable {
    case direct
    case relayXdp = "relay-xdp"
    public var shown: String { rawValue }
}
"#;
        let m = models(Path::new("m.swift"), src).unwrap();
        let item = &m["Item"];
        assert_eq!(item.type_of_key("rtt_ms"), Some("Double?"));
        assert_eq!(item.type_of_key("names"), Some("[String]"));
        assert_eq!(item.type_of_key("rttMs"), None);
        assert!(!item.properties.contains_key("id"), "{item:?}");
        let cases: Vec<&str> = m["Path"].cases.values().map(String::as_str).collect();
        assert_eq!(cases, ["direct", "relay-xdp"]);
    }
}
