//! JSON as Python's `json.dumps` writes it, byte for byte.
//!
//! Two outputs must match Python exactly: `adapter_config.json` (PEFT writes it with
//! `json.dumps(d, indent=2, sort_keys=True)`, and a byte-identical file is how a user sees that a
//! round trip changed nothing) and chat templates' `tojson` filter (its text is part of the prompt,
//! so a different byte is a different token). serde_json's own formatter differs in floats (`1e-5`
//! vs Python's `1e-05`, `8` vs `8.0`), item separators, and which characters it escapes, hence this
//! hand-written writer. Both callers share the leaves here: [`Style`] (the `json.dumps` options and
//! the container layout), [`write_string`] and [`float_repr`]; the chat template walks its own
//! value type with them.

use std::fmt::Write as _;

use serde_json::Value;

/// `json.dumps`'s layout options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Style {
    /// Escape every non-ASCII character as `\uXXXX` (surrogate pairs above the BMP).
    pub ensure_ascii: bool,
    /// `indent`: each level's prefix, with a newline before every item; `None` writes one line.
    pub indent: Option<String>,
    /// Between items: `", "` on one line, `","` when indented (Python's defaults).
    pub item_sep: String,
    /// Between a key and its value: `": "`.
    pub key_sep: String,
    /// Keys in code-point order instead of insertion order.
    pub sort_keys: bool,
}

impl Style {
    /// `json.dumps(x, ensure_ascii=ensure_ascii, indent=indent)` with default separators.
    pub fn new(ensure_ascii: bool, indent: Option<String>, sort_keys: bool) -> Self {
        let item_sep = if indent.is_some() { "," } else { ", " };
        Style { ensure_ascii, indent, item_sep: item_sep.into(), key_sep: ": ".into(), sort_keys }
    }

    /// `json.dumps(d, indent=2, sort_keys=True)`: how PEFT writes `adapter_config.json`.
    pub fn peft() -> Self {
        Style::new(true, Some("  ".into()), true)
    }

    /// `value` written in this style (no trailing newline).
    pub fn dumps(&self, value: &Value) -> String {
        let mut out = String::new();
        self.write_value(&mut out, value, 0);
        out
    }

    fn write_value(&self, out: &mut String, value: &Value, depth: usize) {
        let infallible = |r: Result<(), std::convert::Infallible>| match r {
            Ok(()) => (),
            Err(never) => match never {},
        };
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match n.as_f64().filter(|_| n.is_f64()) {
                Some(x) => write_float(out, x),
                None => out.push_str(&n.to_string()),
            },
            Value::String(s) => write_string(out, s, self.ensure_ascii),
            Value::Array(items) => {
                infallible(self.write_container(out, depth, ['[', ']'], items, |out, item, depth| {
                    self.write_value(out, item, depth);
                    Ok(())
                }))
            }
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                if self.sort_keys {
                    keys.sort();
                }
                infallible(self.write_container(out, depth, ['{', '}'], &keys, |out, key, depth| {
                    write_string(out, key, self.ensure_ascii);
                    out.push_str(&self.key_sep);
                    self.write_value(out, &map[key.as_str()], depth);
                    Ok(())
                }))
            }
        }
    }

    /// A list or map at nesting level `depth`: `[]` / `{}` when empty, else the items written by
    /// `write_item` (which gets the level of the items) between separators and indentation.
    pub fn write_container<T, E>(
        &self,
        out: &mut String,
        depth: usize,
        [open, close]: [char; 2],
        items: &[T],
        mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), E>,
    ) -> Result<(), E> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(depth + 1));
            }
            write_item(out, item, depth + 1)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
        out.push(close);
        Ok(())
    }
}

/// A JSON string literal as Python's `json` writes it: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`,
/// other control characters as `\u00XX`; with `ensure_ascii`, every non-ASCII character as `\uXXXX`
/// (DEL, U+007F, is ASCII and stays as it is).
pub fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as `json.dumps` writes it: [`float_repr`], and `NaN` / `Infinity` / `-Infinity`.
pub fn write_float(out: &mut String, x: f64) {
    if x.is_nan() {
        out.push_str("NaN");
    } else if x.is_infinite() {
        out.push_str(if x < 0.0 { "-Infinity" } else { "Infinity" });
    } else {
        out.push_str(&float_repr(x));
    }
}

/// Python's `repr(float)` of a finite float: the shortest digits that round-trip, positional for
/// decimal exponents in [-4, 16) with at least one decimal (`8.0`, `0.0001`), scientific otherwise
/// with a signed two-digit exponent (`1e-05`, `1e+16`).
pub fn float_repr(x: f64) -> String {
    let sci = format!("{x:e}"); // the shortest round-trip digits, e.g. "-1.5e-7"
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        let plain = format!("{x}");
        if plain.contains('.') {
            plain
        } else {
            format!("{plain}.0")
        }
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_is_pythons() {
        for (x, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (8.0, "8.0"),
            (0.05, "0.05"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-1.25e-5, "-1.25e-05"),
            (1e16, "1e+16"),
            (1.25e17, "1.25e+17"),
            (123456789012345.6, "123456789012345.6"),
            (-2.5, "-2.5"),
            (0.1 + 0.2, "0.30000000000000004"),
            (100.0, "100.0"),
            (1e15, "1000000000000000.0"),
        ] {
            assert_eq!(float_repr(x), want, "{x}");
        }
    }

    /// `json.dumps(v, indent=2, sort_keys=True)` of the same object, as Python printed it.
    #[test]
    fn peft_layout_matches_python() {
        let v: Value =
            serde_json::from_str(r#"{"b":[1,"x"],"a":{},"c":[],"d":{"z":null,"y":2.0},"e":"é\n\u007f"}"#).unwrap();
        let want = "{\n  \"a\": {},\n  \"b\": [\n    1,\n    \"x\"\n  ],\n  \"c\": [],\n  \"d\": {\n    \"y\": 2.0,\n    \"z\": null\n  },\n  \"e\": \"\\u00e9\\n\u{7f}\"\n}";
        assert_eq!(Style::peft().dumps(&v), want);
    }

    /// `json.dumps(v, sort_keys=True)` and the same with `ensure_ascii=False`: one line.
    #[test]
    fn one_line_layout_matches_python() {
        let v: Value = serde_json::from_str(r#"{"b":1,"a":[1.5e-7,"🤗"]}"#).unwrap();
        assert_eq!(Style::new(true, None, true).dumps(&v), r#"{"a": [1.5e-07, "\ud83e\udd17"], "b": 1}"#);
        assert_eq!(Style::new(false, None, true).dumps(&v), r#"{"a": [1.5e-07, "🤗"], "b": 1}"#);
    }
}
