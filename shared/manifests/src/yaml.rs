//! A small YAML emitter for JSON values.
//!
//! Why not a YAML library's serializer: the output is committed to GitOps
//! directories and diffed, so its exact layout must not move when a dependency
//! is upgraded, and every string must come back as the *same string* — a YAML
//! 1.1 reader turns a plain `no` into `false` and `1e3` into a number. The rules
//! here are deliberately conservative:
//!
//! - mapping keys are sorted bytewise (independent of serde_json's
//!   `preserve_order` feature), so equal values give identical bytes;
//! - a string is written plain only when it starts with a letter or `/`, holds
//!   only `[A-Za-z0-9._/-]` and is not a word any YAML version reads as a
//!   boolean, null or special float; everything else is double-quoted on one
//!   line with JSON-compatible escapes (valid YAML double-quoted escapes);
//! - empty mappings and sequences are written `{}` and `[]`;
//! - sequences inside a mapping sit at the key's indentation (kubectl's layout).

use serde_json::{Map, Value};

/// Deeper values than this are refused rather than risking the stack; a
/// Kubernetes object is a dozen levels deep at most.
pub(crate) const MAX_DEPTH: usize = 128;

/// Nesting went past [`MAX_DEPTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooDeep;

/// Appends one YAML document (without the `---` line) holding `value`.
pub(crate) fn write_document(out: &mut String, value: &Value) -> Result<(), TooDeep> {
    match value {
        Value::Object(map) if !map.is_empty() => write_map(out, map, 0, false, 0),
        Value::Array(items) if !items.is_empty() => write_seq(out, items, 0, 0),
        scalar => {
            write_inline(out, scalar);
            out.push('\n');
            Ok(())
        }
    }
}

/// Writes a non-empty mapping at `indent`; with `first_inline` the first key
/// continues the current line (after a sequence's `- `).
fn write_map(
    out: &mut String,
    map: &Map<String, Value>,
    indent: usize,
    first_inline: bool,
    depth: usize,
) -> Result<(), TooDeep> {
    if depth > MAX_DEPTH {
        return Err(TooDeep);
    }
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (i, (key, value)) in entries.into_iter().enumerate() {
        if i > 0 || !first_inline {
            pad(out, indent);
        }
        write_string(out, key);
        out.push(':');
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(out, inner, indent + 2, false, depth + 1)?;
            }
            Value::Array(items) if !items.is_empty() => {
                out.push('\n');
                write_seq(out, items, indent, depth + 1)?;
            }
            scalar => {
                out.push(' ');
                write_inline(out, scalar);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// Writes a non-empty sequence whose `- ` markers sit at `indent`.
fn write_seq(
    out: &mut String,
    items: &[Value],
    indent: usize,
    depth: usize,
) -> Result<(), TooDeep> {
    if depth > MAX_DEPTH {
        return Err(TooDeep);
    }
    for item in items {
        pad(out, indent);
        out.push('-');
        match item {
            Value::Object(map) if !map.is_empty() => {
                out.push(' ');
                write_map(out, map, indent + 2, true, depth + 1)?;
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(out, inner, indent + 2, depth + 1)?;
            }
            scalar => {
                out.push(' ');
                write_inline(out, scalar);
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// A scalar, or an empty collection, on the current line.
fn write_inline(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json prints integers plainly and floats in a form that is also
        // a YAML 1.2 float (`0.5`, `1e300`); JSON has no NaN or infinity.
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(out, s),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Words that some YAML reader resolves to a non-string when written plain
/// (YAML 1.1 booleans, null, special floats), compared case-insensitively.
const AMBIGUOUS_WORDS: [&str; 12] = [
    "y", "yes", "n", "no", "true", "false", "on", "off", "null", "inf", "nan", "infinity",
];

/// Whether `s` can be written as a plain scalar and read back as the same string.
fn is_plain_safe(s: &str) -> bool {
    let Some(first) = s.bytes().next() else {
        return false;
    };
    (first.is_ascii_alphabetic() || first == b'/')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
        && !AMBIGUOUS_WORDS.iter().any(|w| w.eq_ignore_ascii_case(s))
}

fn write_string(out: &mut String, s: &str) {
    if is_plain_safe(s) {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Not printable in YAML (C0/C1 controls, DEL, line/paragraph
            // separators, BOM, non-characters): escape so a reader neither
            // rejects nor normalises them.
            '\u{0}'..='\u{1f}'
            | '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: &Value) -> String {
        let mut out = String::new();
        write_document(&mut out, v).unwrap();
        out
    }

    #[test]
    fn layout() {
        let v = json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "spec": {"containers": [{"name": "web", "ports": [{"containerPort": 8080}], "args": []}],
                     "nested": [[1, 2], []], "empty": {}},
        });
        assert_eq!(
            doc(&v),
            "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - args: []\n    name: web\n    ports:\n    - containerPort: 8080\n  empty: {}\n  nested:\n  -\n    - 1\n    - 2\n  - []\n"
        );
    }

    #[test]
    fn quoting() {
        for (s, want) in [
            ("web", "web"),
            ("/healthz", "/healthz"),
            ("app.kubernetes.io/name", "app.kubernetes.io/name"),
            ("8080", "\"8080\""),
            ("no", "\"no\""),
            ("Off", "\"Off\""),
            ("NULL", "\"NULL\""),
            ("1e3", "\"1e3\""),
            (".inf", "\".inf\""),
            ("", "\"\""),
            ("~", "\"~\""),
            ("a: b", "\"a: b\""),
            ("x #y", "\"x #y\""),
            ("line\nnext", "\"line\\nnext\""),
            ("q\"\\", "\"q\\\"\\\\\""),
            ("bell\u{7}", "\"bell\\u0007\""),
            ("ls\u{2028}", "\"ls\\u2028\""),
            ("café", "\"café\""),
        ] {
            let mut out = String::new();
            write_string(&mut out, s);
            assert_eq!(out, want, "{s:?}");
        }
    }

    #[test]
    fn too_deep_is_refused() {
        let mut v = json!(1);
        for _ in 0..(MAX_DEPTH + 5) {
            v = json!({ "a": v });
        }
        assert_eq!(write_document(&mut String::new(), &v), Err(TooDeep));
    }
}
