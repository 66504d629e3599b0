//! The three JSONL row shapes, and the parser that tells them apart.
//!
//! A row's shape is named by its keys: `text`; `prompt` + `completion`; `messages`. Other keys
//! (`id`, `source`, ...) are ignored. A row whose keys name two shapes is ambiguous and rejected,
//! since guessing which one the author meant would silently train on the wrong tokens.

use serde_json::{Map, Value};

use crate::chat::Message;

/// Which of the three shapes a file's rows have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `{"text": "..."}`: loss on every token.
    Text,
    /// `{"prompt": "...", "completion": "..."}`: loss on the completion.
    PromptCompletion,
    /// `{"messages": [{"role": "...", "content": "..."}, ...]}`: loss on the assistant turns.
    Messages,
}

impl Format {
    /// The keys that name this shape, as a user would write them.
    pub fn keys(self) -> &'static str {
        match self {
            Format::Text => "\"text\"",
            Format::PromptCompletion => "\"prompt\" + \"completion\"",
            Format::Messages => "\"messages\"",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt-completion",
            Format::Messages => "messages",
        })
    }
}

/// One parsed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Row {
    Text(String),
    PromptCompletion { prompt: String, completion: String },
    Messages(Vec<Message>),
}

impl Row {
    /// Cuts every text of the row to at most `max_bytes` (at a character boundary); whether any
    /// was longer. A text that long holds more tokens than a sequence takes, and tokenising what
    /// would be cut off only costs memory.
    pub(crate) fn cut(&mut self, max_bytes: usize) -> bool {
        let cut = |s: &mut String| {
            if s.len() <= max_bytes {
                return false;
            }
            let end = (0..=max_bytes).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
            s.truncate(end);
            true
        };
        match self {
            Row::Text(t) => cut(t),
            Row::PromptCompletion { prompt, completion } => cut(prompt) | cut(completion),
            Row::Messages(messages) => messages.iter_mut().fold(false, |any, m| cut(&mut m.content) | any),
        }
    }

    /// The row's shape.
    pub(crate) fn format(&self) -> Format {
        match self {
            Row::Text(_) => Format::Text,
            Row::PromptCompletion { .. } => Format::PromptCompletion,
            Row::Messages(_) => Format::Messages,
        }
    }
}

/// Parses one line of JSONL into a [`Row`]; the error is a message for the user (the caller adds
/// the file and line).
pub(crate) fn parse_row(line: &str) -> Result<Row, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "expected a JSON object with {}, {} or {}; found {}",
            Format::Text.keys(),
            Format::PromptCompletion.keys(),
            Format::Messages.keys(),
            kind(&value)
        ));
    };
    match shape_of(&object)? {
        Format::Text => Ok(Row::Text(string_field(&object, "text")?)),
        Format::PromptCompletion => Ok(Row::PromptCompletion {
            prompt: string_field(&object, "prompt")?,
            completion: string_field(&object, "completion")?,
        }),
        Format::Messages => parse_messages(&object).map(Row::Messages),
    }
}

/// The shape the object's keys name; an error if none, two, or half of prompt/completion.
fn shape_of(object: &Map<String, Value>) -> Result<Format, String> {
    let has = |key: &str| object.contains_key(key);
    let mut shapes = Vec::new();
    if has("text") {
        shapes.push(Format::Text);
    }
    if has("prompt") || has("completion") {
        shapes.push(Format::PromptCompletion);
    }
    if has("messages") {
        shapes.push(Format::Messages);
    }
    match shapes.as_slice() {
        [] => Err(format!(
            "no {}, {} or {} field (keys: {})",
            Format::Text.keys(),
            Format::PromptCompletion.keys(),
            Format::Messages.keys(),
            key_list(object)
        )),
        [Format::PromptCompletion] if !has("prompt") => Err("\"completion\" without \"prompt\"".into()),
        [Format::PromptCompletion] if !has("completion") => Err("\"prompt\" without \"completion\"".into()),
        [one] => Ok(*one),
        several => Err(format!(
            "ambiguous row: it has the keys of several formats ({}); keep one",
            several.iter().map(|f| f.keys()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn parse_messages(object: &Map<String, Value>) -> Result<Vec<Message>, String> {
    let Some(Value::Array(items)) = object.get("messages") else {
        let found = object.get("messages").map(kind).unwrap_or("nothing");
        return Err(format!("\"messages\" must be a list of {{\"role\", \"content\"}} objects; found {found}"));
    };
    if items.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(message) = item else {
                return Err(format!("messages[{i}] must be an object; found {}", kind(item)));
            };
            let field = |key: &str| match message.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(other) => Err(format!("messages[{i}].{key} must be a string; found {}", kind(other))),
                None => Err(format!("messages[{i}] has no \"{key}\"")),
            };
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

fn string_field(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("\"{key}\" must be a string; found {}", kind(other))),
        None => Err(format!("missing \"{key}\"")),
    }
}

fn key_list(object: &Map<String, Value>) -> String {
    if object.is_empty() {
        return "none".into();
    }
    object.keys().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", ")
}

/// A JSON value's kind, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_shape_and_ignores_extra_keys() {
        assert_eq!(parse_row(r#"{"text": "hi", "id": 3}"#), Ok(Row::Text("hi".into())));
        assert_eq!(
            parse_row(r#"{"prompt": "a", "completion": "b"}"#),
            Ok(Row::PromptCompletion { prompt: "a".into(), completion: "b".into() })
        );
        assert_eq!(
            parse_row(r#"{"messages": [{"role": "user", "content": "q"}]}"#),
            Ok(Row::Messages(vec![Message::new("user", "q")]))
        );
    }

    #[test]
    fn rejects_bad_rows_with_a_reason() {
        let cases = [
            (r#"{"text": "a""#, "invalid JSON"),
            (r#"[1, 2]"#, "expected a JSON object"),
            (r#"{"body": "x"}"#, "keys: \"body\""),
            (r#"{"text": 3}"#, "\"text\" must be a string; found a number"),
            (r#"{"prompt": "a"}"#, "\"prompt\" without \"completion\""),
            (r#"{"text": "a", "messages": []}"#, "ambiguous"),
            (r#"{"messages": "hi"}"#, "must be a list"),
            (r#"{"messages": []}"#, "is empty"),
            (r#"{"messages": [{"role": "user"}]}"#, "messages[0] has no \"content\""),
            (r#"{"messages": [{"role": "user", "content": null}]}"#, "messages[0].content must be a string"),
        ];
        for (line, expected) in cases {
            let error = parse_row(line).unwrap_err();
            assert!(error.contains(expected), "{line}: {error}");
        }
    }
}
