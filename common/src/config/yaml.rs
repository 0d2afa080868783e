//! YAML to a JSON tree plus the source position of every node, so that any error found later
//! (by serde or by validation) can name the file and line it comes from.

use std::collections::HashMap;

use serde_json::{Map, Value as Json};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

/// Position of a node: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Path (in serde_path_to_error's notation: `devices[0].tags[1].id`) to position.
pub type Spans = HashMap<String, Pos>;

pub fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

pub fn index_path(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

enum Frame {
    Seq {
        items: Vec<Json>,
        path: String,
        anchor: usize,
    },
    Map {
        map: Map<String, Json>,
        path: String,
        pending_key: Option<String>,
        anchor: usize,
    },
}

struct Builder {
    stack: Vec<Frame>,
    root: Option<Json>,
    spans: Spans,
    anchors: HashMap<usize, Json>,
    error: Option<(String, Pos)>,
}

fn pos(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        col: m.col() + 1,
    }
}

fn scalar(value: String, style: TScalarStyle) -> Json {
    if style != TScalarStyle::Plain {
        return Json::String(value);
    }
    // A number only in the forms that the emitter of [`to_yaml`] quotes when they are text:
    // the parser alone also reads forms such as `++0` or `0o17` as numbers, which the emitter
    // writes unquoted, so text in them would not read back as text.
    let numeric = value.parse::<i64>().is_ok()
        || value.parse::<f64>().is_ok()
        || value.starts_with("0x")
        || value.starts_with('.');
    match Yaml::from_str(&value) {
        Yaml::Integer(_) | Yaml::Real(_) if !numeric => Json::String(value),
        Yaml::Integer(i) => Json::from(i),
        Yaml::Real(r) => match r.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            Some(n) => Json::Number(n),
            None => Json::String(value),
        },
        Yaml::Boolean(b) => Json::Bool(b),
        Yaml::Null => Json::Null,
        _ => Json::String(value),
    }
}

impl Builder {
    /// The path the next node gets, from the innermost open collection.
    fn next_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { items, path, .. }) => Some(index_path(path, items.len())),
            Some(Frame::Map {
                pending_key: Some(k),
                path,
                ..
            }) => Some(child_path(path, k)),
            // A key position: the node is a key, not a value.
            Some(Frame::Map {
                pending_key: None, ..
            }) => None,
        }
    }

    fn push_value(&mut self, v: Json, at: Pos) {
        match self.stack.last_mut() {
            None => self.root = Some(v),
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map {
                map,
                pending_key,
                path,
                ..
            }) => match pending_key.take() {
                Some(k) => {
                    map.insert(k, v);
                }
                None => {
                    // This node is a key.
                    let key = match v {
                        Json::String(s) => s,
                        Json::Number(n) => n.to_string(),
                        Json::Bool(b) => b.to_string(),
                        Json::Null => "null".into(),
                        _ => {
                            self.error
                                .get_or_insert(("a mapping key must be a scalar".into(), at));
                            String::new()
                        }
                    };
                    if map.contains_key(&key) {
                        self.error
                            .get_or_insert((format!("duplicate key {key:?}"), at));
                    }
                    let p = child_path(path, &key);
                    self.spans.insert(p, at);
                    *pending_key = Some(key);
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = pos(&mark);
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                if let Some(p) = self.next_path() {
                    self.spans.entry(p).or_insert(at);
                }
                let v = scalar(value, style);
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                self.push_value(v, at);
            }
            Event::Alias(id) => {
                let v = self.anchors.get(&id).cloned().unwrap_or(Json::Null);
                if let Some(p) = self.next_path() {
                    self.spans.entry(p).or_insert(at);
                }
                self.push_value(v, at);
            }
            Event::SequenceStart(anchor, _) => {
                let path = self.next_path().unwrap_or_default();
                self.spans.entry(path.clone()).or_insert(at);
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    path,
                    anchor,
                });
            }
            Event::MappingStart(anchor, _) => {
                let path = self.next_path().unwrap_or_default();
                self.spans.entry(path.clone()).or_insert(at);
                self.stack.push(Frame::Map {
                    map: Map::new(),
                    path,
                    pending_key: None,
                    anchor,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (v, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor, .. }) => (Json::Array(items), anchor),
                    Some(Frame::Map { map, anchor, .. }) => (Json::Object(map), anchor),
                    None => return,
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                self.push_value(v, at);
            }
            _ => {}
        }
    }
}

/// Parse YAML text into a JSON tree and its spans. A syntax error gives its message and
/// position. An empty document is an empty mapping.
pub fn parse(text: &str) -> Result<(Json, Spans), (String, Pos)> {
    let mut b = Builder {
        stack: Vec::new(),
        root: None,
        spans: Spans::new(),
        anchors: HashMap::new(),
        error: None,
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, false) {
        let m = e.marker();
        return Err((
            e.info().to_owned(),
            Pos {
                line: m.line(),
                col: m.col() + 1,
            },
        ));
    }
    if let Some(err) = b.error {
        return Err(err);
    }
    let root = match b.root {
        None | Some(Json::Null) => Json::Object(Map::new()),
        Some(v) => v,
    };
    Ok((root, b.spans))
}

/// Parse one value given outside a file, e.g. an environment variable: a plain scalar that
/// YAML reads as a number, bool or null becomes one, `[..]`/`{..}` become collections, and
/// anything else stays the exact string (so `a: b` in a password is not a mapping).
pub fn parse_inline(text: &str) -> Json {
    let t = text.trim();
    if t.is_empty() {
        return Json::String(text.to_owned());
    }
    if t.starts_with('[') || t.starts_with('{') {
        if let Ok((v, _)) = parse(t) {
            return v;
        }
    }
    match scalar(t.to_owned(), TScalarStyle::Plain) {
        Json::String(_) => Json::String(text.to_owned()),
        v => v,
    }
}

/// The position of `path` or of its nearest ancestor that has one.
pub fn locate(spans: &Spans, path: &str) -> Option<Pos> {
    let mut p = path;
    loop {
        if let Some(pos) = spans.get(p) {
            return Some(*pos);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

/// Keys written first, in this order, when a mapping has them (a device reads as one in
/// the examples: id, protocol, ... then the rest alphabetically).
const FIRST_KEYS: &[&str] = &[
    "id",
    "name",
    "protocol",
    "enabled",
    "uns_prefix",
    "poll_interval",
    "mode",
    "address",
    "data_type",
    "unit",
    "access",
    "connection",
    "tags",
];

/// A JSON tree as block YAML that [`parse`] reads back as the same tree.
pub fn to_yaml(v: &Json) -> String {
    fn convert(v: &Json) -> Yaml {
        match v {
            Json::Null => Yaml::Null,
            Json::Bool(b) => Yaml::Boolean(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            Json::String(s) => Yaml::String(s.clone()),
            Json::Array(a) => Yaml::Array(a.iter().map(convert).collect()),
            Json::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by_key(|k| {
                    (
                        FIRST_KEYS
                            .iter()
                            .position(|f| f == k)
                            .unwrap_or(FIRST_KEYS.len()),
                        k.as_str(),
                    )
                });
                let mut h = yaml_rust2::yaml::Hash::new();
                for k in keys {
                    h.insert(Yaml::String(k.clone()), convert(&m[k]));
                }
                Yaml::Hash(h)
            }
        }
    }
    let mut out = String::new();
    let mut e = yaml_rust2::YamlEmitter::new(&mut out);
    e.multiline_strings(false);
    // Writing to a String cannot fail.
    let _ = e.dump(&convert(v));
    let body = out.strip_prefix("---\n").unwrap_or(&out).to_owned();
    body + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_tree_with_positions() {
        let text = "a: 1\nb:\n  - x: true\n    y: \"2\"\n  - 3.5\nc: ~\n";
        let (v, spans) = parse(text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "b": [{"x": true, "y": "2"}, 3.5], "c": null})
        );
        assert_eq!(spans["a"].line, 1);
        assert_eq!(spans["b"].line, 2);
        assert_eq!(spans["b[0].x"].line, 3);
        assert_eq!(spans["b[0].y"].line, 4);
        assert_eq!(spans["b[1]"].line, 5);
        assert_eq!(locate(&spans, "b[0].y.deeper").map(|p| p.line), Some(4));
    }

    #[test]
    fn anchors_and_aliases() {
        let (v, _) = parse("base: &b {port: 1}\nother: *b\n").unwrap();
        assert_eq!(v["other"], serde_json::json!({"port": 1}));
    }

    #[test]
    fn errors_have_positions() {
        let (msg, pos) = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(!msg.is_empty());
        assert!(pos.line >= 1);
        let (msg, pos) = parse("a: 1\na: 2\n").unwrap_err();
        assert!(msg.contains("duplicate key \"a\""), "{msg}");
        assert_eq!(pos.line, 2);
    }

    #[test]
    fn written_yaml_reads_back_as_the_same_tree() {
        let v = serde_json::json!({
            "devices": [{
                "tags": [{"address": "HR:0", "id": "t", "data_type": "float32", "scale": 0.1}],
                "id": "plc-1",
                "protocol": "modbus",
                "connection": {"host": "10.0.0.5", "port": 502, "unit_id": 1, "timeout": "1s"},
                "enabled": false,
                "note": "true",
                "n": "007",
                "e": "",
                "multi": "line one\nline two: yes",
                "hash": "# not a comment",
                "neg": -12,
                "big": 1.5e300,
                "none": null
            }]
        });
        let text = to_yaml(&v);
        assert!(
            text.starts_with("devices:\n  - id: plc-1\n    protocol: modbus\n"),
            "{text}"
        );
        assert_eq!(parse(&text).unwrap().0, v, "{text}");
    }

    proptest::proptest! {
        /// Whatever text a client sends in a field, the devices file written with it reads
        /// back as that text.
        #[test]
        fn any_string_survives_the_round_trip(
            k in "\\PC{0,12}",
            s in "\\PC{0,40}|[ -~]{0,40}|[0-9.eE+-]{1,8}|[+-]{0,2}(0x|0o|0b)?[0-9a-fA-F]{1,4}|(true|false|null|yes|no|~)",
        ) {
            let v = serde_json::json!({"devices": [{"id": "x", k.clone(): s, "list": [s.clone()]}]});
            let text = to_yaml(&v);
            let back = parse(&text).map(|(v, _)| v).map_err(|e| format!("{e:?}\n{text}"));
            proptest::prop_assert_eq!(back, Ok(v), "{}", text);
        }
    }

    #[test]
    fn text_that_the_parser_alone_would_read_as_a_number_stays_text() {
        for t in ["++0", "+-5", "0o17", "+0x1F", "0b101"] {
            let v = serde_json::json!({"devices": [{"id": "x", "s": t}]});
            let text = to_yaml(&v);
            assert_eq!(parse(&text).unwrap().0, v, "{text}");
        }
        // Numbers still read as numbers, text that looks like one is quoted.
        let v = serde_json::json!({"a": 31, "b": "31", "c": -2.5, "d": "0x1F"});
        assert_eq!(parse(&to_yaml(&v)).unwrap().0, v);
        assert_eq!(
            parse("a: 0x1F\nb: +5\n").unwrap().0,
            serde_json::json!({"a": 31, "b": 5})
        );
    }

    #[test]
    fn inline_values() {
        assert_eq!(parse_inline("20"), serde_json::json!(20));
        assert_eq!(parse_inline("true"), serde_json::json!(true));
        assert_eq!(
            parse_inline("postgres://u:p@h/db"),
            serde_json::json!("postgres://u:p@h/db")
        );
        assert_eq!(parse_inline("[a, b]"), serde_json::json!(["a", "b"]));
        assert_eq!(parse_inline(""), serde_json::json!(""));
        assert_eq!(parse_inline("a: b"), serde_json::json!("a: b"));
    }
}
