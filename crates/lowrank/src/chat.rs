//! Chat templates: a conversation → the prompt text the model was trained on.
//!
//! Templates are Jinja, rendered here with minijinja set up as transformers sets up Jinja2 in
//! `apply_chat_template` (`utils/chat_template_utils.py`), so the text matches
//! `apply_chat_template(messages, tokenize=False)` byte for byte:
//!
//! - `trim_blocks` and `lstrip_blocks` on, one trailing newline of the source dropped;
//! - variables `messages`, `add_generation_prompt`, `bos_token`/`eos_token` (when the model has
//!   them), `tools` and `documents` (none);
//! - `raise_exception(msg)` fails the render with `msg`; `strftime_now(fmt)` (UTC here);
//! - `tojson` is Python's `json.dumps(x, ensure_ascii=False)` with its `indent`, `separators`,
//!   `sort_keys` arguments (not minijinja's HTML-safe one);
//! - Python string and dict methods (`.strip()`, `.split()`, `.items()`, ...) via
//!   minijinja-contrib's pycompat; values print as Python prints them (`None`, `True`,
//!   `{'role': 'user'}`);
//! - `{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag) renders its body.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pyjson::{self, Style};
use crate::tokenizer::Tokenizer;

/// Name of the one template in a [`ChatTemplate`]'s environment (shows in error locations).
const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A message with `role` and `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template with the special-token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Instructions one render may run: a real template spends a few hundred per message, so this is
/// tens of thousands of messages, and about a second of a loop that never ends.
pub const RENDER_FUEL: u64 = 20_000_000;

impl ChatTemplate {
    /// Compiles `source`. A syntax error is an [`Error::ChatTemplate`] naming the line and what
    /// is wrong. `bos_token`/`eos_token` are the strings the template sees under those names.
    pub fn new(source: String, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates come with model files: one that loops for ever runs out of fuel (an error)
        // instead of holding a request, or the server, for good.
        env.set_fuel(Some(RENDER_FUEL));
        env.set_formatter(|out, _state, value| {
            let mut text = String::new();
            write_python_str(&mut text, value);
            out.write_str(&text).map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(&source))
            .map_err(|e| Error::ChatTemplate(format!("compiling: {}", describe(&e))))?;
        Ok(ChatTemplate { env, source, bos_token, eos_token })
    }

    /// The Jinja source, as the model's files give it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of an HF model directory: `chat_template.jinja` if present (transformers
    /// prefers it), else `chat_template` in `tokenizer_config.json` — a string, or a list of
    /// `{name, template}` of which the one named `default` is used. `Ok(None)` if neither exists.
    /// `bos_token`/`eos_token` come from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>> {
        let config = crate::tokenizer::read_json_object(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let token = |name: &str| match config.get(name) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(map)) => map.get("content").and_then(|v| v.as_str()).map(str::to_string),
            _ => None,
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => Some(source),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => config_template(&config)?,
            Err(e) => return Err(Error::io("reading", &jinja_path, e)),
        };
        source.map(|source| ChatTemplate::new(source, token("bos_token"), token("eos_token"))).transpose()
    }

    /// The template in GGUF metadata (`tokenizer.chat_template`), with the tokenizer's bos/eos
    /// strings. `Ok(None)` if the file has none.
    pub fn from_gguf(metadata: &HashMap<String, gguf_file::Value>, tokenizer: &Tokenizer) -> Result<Option<Self>> {
        match metadata.get("tokenizer.chat_template") {
            None => Ok(None),
            Some(gguf_file::Value::String(source)) => ChatTemplate::new(
                source.clone(),
                tokenizer.bos_token().map(str::to_string),
                tokenizer.eos_token().map(str::to_string),
            )
            .map(Some),
            Some(_) => Err(Error::ChatTemplate("GGUF `tokenizer.chat_template` is not a string".into())),
        }
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// begins. Equals transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    ///
    /// The text already holds every special token the model expects, a leading bos included when
    /// the template writes `{{ bos_token }}`. Encode it with `add_special_tokens = false` (as
    /// transformers' `apply_chat_template(tokenize=True)` does), or a tokenizer that adds a bos
    /// would add a second one.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| Error::ChatTemplate(describe(&e)))?;
        let mut context: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
        ];
        if let Some(bos) = &self.bos_token {
            context.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            context.push(("eos_token", Value::from(eos.as_str())));
        }
        let context: Value = context.into_iter().collect();
        template.render(context).map_err(|e| Error::ChatTemplate(format!("rendering: {}", describe(&e))))
    }

    /// The bos string the template sees.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The eos string the template sees.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// `chat_template` of `tokenizer_config.json`: a string, or `[{name, template}, ...]` → `default`.
fn config_template(config: &serde_json::Map<String, serde_json::Value>) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
        Some(serde_json::Value::Array(list)) => {
            let named = |entry: &serde_json::Value| {
                Some((entry.get("name")?.as_str()?.to_string(), entry.get("template")?.as_str()?.to_string()))
            };
            let templates: Vec<(String, String)> = list.iter().filter_map(named).collect();
            match templates.iter().find(|(name, _)| name == "default") {
                Some((_, source)) => Ok(Some(source.clone())),
                None => Err(Error::ChatTemplate(format!(
                    "tokenizer_config.json has several chat templates and none named `default` (found: {})",
                    templates.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
        Some(_) => {
            Err(Error::ChatTemplate("`chat_template` in tokenizer_config.json is not a string or a list".into()))
        }
    }
}

/// One line for a minijinja error: what went wrong, where, and the chain of causes.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

/// transformers' `{% generation %}` block renders its body unchanged; make it a plain `if true`
/// block so minijinja parses it (whitespace-control markers kept).
fn rewrite_generation_tags(source: &str) -> String {
    let tag = |name: &str, replacement: &str| -> Option<(regex::Regex, String)> {
        let pattern = format!(r"\{{%([-+]?)\s*{name}\s*([-+]?)%\}}");
        regex::Regex::new(&pattern).ok().map(|re| (re, format!("{{%${{1}} {replacement} ${{2}}%}}")))
    };
    let mut text = source.to_string();
    for (re, replacement) in [tag("generation", "if true"), tag("endgeneration", "endif")].into_iter().flatten() {
        text = re.replace_all(&text, replacement.as_str()).into_owned();
    }
    text
}

/// `raise_exception(message)`: fails the render with the template's message.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time (UTC) formatted as Python's `strftime` would.
fn strftime_now(format: String) -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    strftime(&format, seconds)
}

/// Python's `strftime` for the common directives, at `seconds` since the Unix epoch (UTC).
fn strftime(format: &str, seconds: i64) -> String {
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let day_of_year = before_month + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// HF's `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators.filter(|v| !v.is_none()) {
        Some(v) => {
            let parts: Vec<String> = v.try_iter()?.map(|s| s.to_string()).collect();
            match parts.as_slice() {
                [item, key] => (item.clone(), key.clone()),
                _ => {
                    return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair"))
                }
            }
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = Style {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&style, &mut out, &value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// A template value as `json.dumps` writes it in `style`.
fn write_json(
    style: &Style,
    out: &mut String,
    value: &Value,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_python_number(out, value, true),
        ValueKind::String | ValueKind::Bytes => pyjson::write_string(out, &value.to_string(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            style.write_container(out, depth, ['[', ']'], &items, |out, item, depth| {
                write_json(style, out, item, depth)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            style.write_container(out, depth, ['{', '}'], &keys, |out, key, depth| {
                pyjson::write_string(out, &key.to_string(), style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(style, out, &value.get_item(key)?, depth)
            })?;
        }
        _ => pyjson::write_string(out, &value.to_string(), style.ensure_ascii),
    }
    Ok(())
}

/// A number as Python prints it: ints as is, floats as `repr` (`1.0`, `1e+16`, `1e-05`); in JSON
/// non-finite floats are `NaN`/`Infinity` as `json.dumps` writes them.
fn write_python_number(out: &mut String, value: &Value, json: bool) {
    if let Some(i) = value.as_i64().filter(|_| value.is_integer()) {
        let _ = write!(out, "{i}");
        return;
    }
    let x = match f64::try_from(value.clone()) {
        Ok(x) => x,
        Err(_) => {
            let _ = write!(out, "{value}");
            return;
        }
    };
    if json {
        pyjson::write_float(out, x);
        return;
    }
    let _ = match (x.is_nan(), x.is_infinite()) {
        (true, _) => write!(out, "nan"),
        (_, true) => write!(out, "{}inf", if x < 0.0 { "-" } else { "" }),
        _ => write!(out, "{}", pyjson::float_repr(x)),
    };
}

/// How Jinja2 prints a value with `{{ }}`: Python's `str()`.
fn write_python_str(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        _ => write_python_repr(out, value),
    }
}

/// Python's `repr()` of a template value (strings quoted, `None`, `True`, lists, dicts).
fn write_python_repr(out: &mut String, value: &Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_python_number(out, value, false),
        ValueKind::String => write_python_string_repr(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_repr(out, &item);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_repr(out, &key);
                out.push_str(": ");
                write_python_repr(out, &value.get_item(&key).unwrap_or_default());
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn write_python_string_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_printable(c) => {
                let _ = match c as u32 {
                    code @ 0..=0xff => write!(out, "\\x{code:02x}"),
                    code @ 0x100..=0xffff => write!(out, "\\u{code:04x}"),
                    code => write!(out, "\\U{code:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, which decides whether `repr` escapes it:
/// false for control, format, separator (but the space) and private-use characters. Unassigned
/// code points, which Python also escapes, are not known here and print as themselves.
fn python_printable(c: char) -> bool {
    !matches!(c as u32,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad // C0, DEL, C1, no-break space, soft hyphen
        | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890 | 0x891 | 0x8e2 | 0x1680 | 0x180e
        | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000
        | 0xe000..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a
        | 0xe0001 | 0xe0020..=0xe007f | 0xf0000..=0x10ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str) -> String {
        let template = ChatTemplate::new(source.to_string(), Some("<s>".into()), None).unwrap();
        template.render(&[Message::new("user", "hi")], false).unwrap()
    }

    /// A template that would loop ~10¹⁰ times runs out of fuel: an error naming it, in about a
    /// second; a conversation of 2000 turns renders within the budget.
    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x";
        let template = ChatTemplate::new(endless.to_string(), None, None).unwrap();
        let started = std::time::Instant::now();
        let e = template.render(&[Message::new("user", "hi")], false).unwrap_err();
        assert!(e.to_string().contains("fuel"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
        let chatml =
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}";
        let template = ChatTemplate::new(chatml.to_string(), None, None).unwrap();
        let long: Vec<Message> =
            (0..2000).map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, "hello there")).collect();
        assert_eq!(template.render(&long, false).unwrap().matches("<|im_start|>").count(), 2000);
    }

    #[test]
    fn prints_values_as_python() {
        assert_eq!(
            render("{{ none }} {{ true }} {{ [1, 'a', none] }} {{ 2.5 }} {{ 3 }}"),
            "None True [1, 'a', None] 2.5 3"
        );
        assert_eq!(render("{{ messages[0] }}"), "{'role': 'user', 'content': 'hi'}");
        assert_eq!(render("{{ \"it's\" ~ ' ' ~ ['it\\'s'] }}"), "it's [\"it's\"]");
        assert_eq!(render("{{ ['a\\u200bb\\u00a0c\\x01é'] }}"), "['a\\u200bb\\xa0c\\x01é']");
    }

    #[test]
    fn tojson_matches_json_dumps() {
        assert_eq!(render("{{ {'b': 1, 'a': [1.0, 'é<>']} | tojson }}"), r#"{"b": 1, "a": [1.0, "é<>"]}"#);
        assert_eq!(render("{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}"), r#"{"a": 2, "b": 1}"#);
        assert_eq!(render("{{ [1, {'x': []}] | tojson(indent=2) }}"), "[\n  1,\n  {\n    \"x\": []\n  }\n]");
        assert_eq!(render("{{ 'a\\nb' | tojson(ensure_ascii=true) }}"), r#""a\nb""#);
    }

    #[test]
    fn raise_exception_fails_with_message() {
        let template = ChatTemplate::new("{{ raise_exception('bad roles') }}".into(), None, None).unwrap();
        let error = template.render(&[], false).unwrap_err().to_string();
        assert!(error.contains("bad roles"), "{error}");
    }

    #[test]
    fn syntax_error_names_the_problem() {
        let error = ChatTemplate::new("{% for m in messages %}".into(), None, None).unwrap_err().to_string();
        assert!(error.contains("unexpected end of input") && error.contains("chat_template:1"), "{error}");
    }

    #[test]
    fn generation_tag_renders_its_body() {
        assert_eq!(render("{%- generation -%} A {%- endgeneration %}!"), "A!");
    }

    #[test]
    fn strftime_formats_dates() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        assert_eq!(strftime("%d %b %Y %H:%M:%S %A %j %%", 1_722_000_309), "26 Jul 2024 13:25:09 Friday 208 %");
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn list_of_templates_picks_default() {
        let config = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        let config = config.as_object().unwrap();
        assert_eq!(config_template(config).unwrap().as_deref(), Some("D"));
    }
}
