//! The grammar an answer is decoded under, from the pipeline's JSON schema.
//!
//! The grammar is Lark in llguidance's dialect. Without `copy` fields it is the schema itself
//! (`%json`). A string property marked `"copy": true` may only take a substring of the source
//! segment (the line or document the model reads), so it cannot be invented: objects and
//! arrays holding copy fields are written out as Lark rules in which copy fields are
//! substring terminals over that segment's text and every other value is the schema's own
//! sub-schema (`%json`). Answers are compact JSON (no whitespace between tokens), as the
//! prompts' examples are written, after at most one space: a raw prompt ends with `JSON:`
//! and SentencePiece vocabularies write the space and the brace as one token (` {"`).

use medbatch_engine::Grammar;
use serde_json::{json, Map, Value};

/// Why a schema cannot be turned into a grammar.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("schema {pointer}: {reason}")]
pub struct SchemaGrammarError {
    /// JSON pointer of the offending sub-schema.
    pub pointer: String,
    pub reason: String,
}

/// Whether any sub-schema is marked `copy`.
pub fn has_copy_fields(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => m.get("copy") == Some(&Value::Bool(true)) || m.values().any(has_copy_fields),
        Value::Array(a) => a.iter().any(has_copy_fields),
        _ => false,
    }
}

/// Checks once, at pipeline load, that the schema can be decoded under (copy fields only on
/// string properties of objects whose properties are all required, inside objects/arrays).
pub fn check_schema(schema: &Value) -> Result<(), SchemaGrammarError> {
    let mut b = LarkBuilder::new("");
    b.value(schema, "").map(|_| ())
}

/// The grammar for one answer about `source` (the text copy fields may copy from).
pub fn answer_grammar(schema: &Value, source: &str) -> Result<Grammar, SchemaGrammarError> {
    let mut b = LarkBuilder::new(if has_copy_fields(schema) { source } else { "" });
    let top = b.value(schema, "")?;
    let mut lark = format!("start: \" \"? {top}\n");
    for r in &b.rules {
        lark.push_str(r);
        lark.push('\n');
    }
    Ok(Grammar::Lark(lark))
}

/// The grammar of a localization answer, after Google's MedGemma 1.5 notebook: an optional
/// thinking trace between the two `thinking` tokens (ids), visible reasoning of at most
/// `reasoning_tokens` tokens ending with `Final Answer:`, then the boxes as JSON under
/// `schema` in a ```` ```json ```` fence, written as the notebook's example writes it
/// (`", "` and `": "` between items and keys).
pub fn localize_grammar(schema: &Value, thinking: Option<(u32, u32)>, reasoning_tokens: u32) -> Grammar {
    let mut s = strip_copy(schema);
    if let Value::Object(m) = &mut s {
        m.insert(
            "x-guidance".into(),
            json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " }),
        );
    }
    let mut lark = String::from("start: ");
    if thinking.is_some() {
        lark.push_str("thought? ");
    }
    lark.push_str("reasoning \" \"? \"```json\" \"\\n\"? boxes \"\\n\"? \"```\"\n");
    if let Some((start, end)) = thinking {
        lark.push_str(&format!("thought: <[{start}]> thinking <[{end}]>\n"));
        // The trace's text (special tokens end it: they are never text).
        lark.push_str("thinking: /(?s:.*)/\n");
    }
    lark.push_str(&format!("reasoning[suffix=\"Final Answer:\", max_tokens={reasoning_tokens}]: /(?s:.*)/\n"));
    lark.push_str(&format!("boxes: %json {}\n", serde_json::to_string(&s).expect("a schema serializes")));
    Grammar::Lark(lark)
}

/// The schema with llguidance's option for compact JSON, `copy` markers removed.
fn compact(schema: &Value) -> Value {
    let mut s = strip_copy(schema);
    if let Value::Object(m) = &mut s {
        m.insert("x-guidance".into(), json!({ "whitespace_flexible": false }));
    }
    s
}

fn strip_copy(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(k, _)| k.as_str() != "copy").map(|(k, v)| (k.clone(), strip_copy(v))).collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_copy).collect()),
        other => other.clone(),
    }
}

/// A Lark string literal for `text` (Lark's literals take JSON's escapes).
fn literal(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

struct LarkBuilder {
    /// Each character of the source as it appears inside a JSON string.
    chunks: Vec<String>,
    rules: Vec<String>,
    copy_rule: Option<String>,
}

/// The pieces a copy field is cut from: words, numbers (with their decimal point or
/// comma), runs of whitespace, and every other character alone. A copy is a run of whole
/// pieces, so it can take `12,0` out of `12,0–16,0` or `250` out of `[<250]`, but never `9`
/// out of `9,8` or `Hämo` out of `Hämoglobin`.
pub fn copy_pieces(source: &str) -> Vec<&str> {
    #[derive(PartialEq)]
    enum Class {
        Word,
        Number,
        Space,
        Other,
    }
    let class = |c: char| {
        if c.is_ascii_digit() {
            Class::Number
        } else if c.is_alphanumeric() || c == '_' {
            Class::Word
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    };
    let chars: Vec<(usize, char)> = source.char_indices().collect();
    let mut pieces = Vec::new();
    let mut start = 0;
    for (k, &(i, c)) in chars.iter().enumerate() {
        if k == 0 {
            continue;
        }
        let prev = chars[k - 1].1;
        let decimal = |a: char, b: Option<char>| a.is_ascii_digit() && b.is_some_and(|b| b.is_ascii_digit());
        // `.`/`,` between digits stays inside the number.
        let inside_number = (matches!(c, '.' | ',') && decimal(prev, chars.get(k + 1).map(|x| x.1)))
            || (c.is_ascii_digit() && matches!(prev, '.' | ',') && k >= 2 && chars[k - 2].1.is_ascii_digit());
        let same = !inside_number && class(c) == class(prev) && class(c) != Class::Other;
        if !(same || inside_number) {
            pieces.push(&source[start..i]);
            start = i;
        }
    }
    if !source.is_empty() {
        pieces.push(&source[start..]);
    }
    pieces
}

impl LarkBuilder {
    fn new(source: &str) -> Self {
        let chunks = copy_pieces(source)
            .into_iter()
            .map(|p| {
                let quoted = serde_json::to_string(p).expect("a string serializes");
                quoted[1..quoted.len() - 1].to_string()
            })
            .collect();
        Self { chunks, rules: Vec::new(), copy_rule: None }
    }

    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.rules.len());
        self.rules.push(format!("{name}: {body}"));
        name
    }

    /// The rule for a JSON string that is a substring of the source.
    fn copy_string(&mut self) -> String {
        if let Some(r) = &self.copy_rule {
            return r.clone();
        }
        let chunks = serde_json::to_string(&self.chunks).expect("strings serialize");
        // One terminal: the quotes and the substring lex together.
        self.rules.push(format!("COPY: \"\\\"\" %regex {{ \"substring_chunks\": {chunks} }} \"\\\"\""));
        self.copy_rule = Some("COPY".into());
        "COPY".into()
    }

    /// The Lark expression for a value matching `schema` (at JSON pointer `at`).
    fn value(&mut self, schema: &Value, at: &str) -> Result<String, SchemaGrammarError> {
        let err = |reason: &str| SchemaGrammarError {
            pointer: if at.is_empty() { "/".into() } else { at.into() },
            reason: reason.into(),
        };
        if !has_copy_fields(schema) {
            let s = serde_json::to_string(&compact(schema)).expect("a schema serializes");
            return Ok(self.rule(format!("%json {s}")));
        }
        let m = schema.as_object().ok_or_else(|| err("a schema must be an object"))?;
        let types: Vec<&str> = match m.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let nullable = types.contains(&"null");
        if m.get("copy") == Some(&Value::Bool(true)) {
            if !types.contains(&"string") {
                return Err(err("`copy` applies to string fields only"));
            }
            if types.iter().any(|t| !matches!(*t, "string" | "null")) {
                return Err(err("a `copy` field may be a string or null, nothing else"));
            }
            let copy = self.copy_string();
            return Ok(if nullable { self.rule(format!("{copy} | \"null\"")) } else { copy });
        }
        let body = if types.contains(&"object") || m.contains_key("properties") {
            self.object(m, at, &err)?
        } else if types.contains(&"array") || m.contains_key("items") {
            let items = m.get("items").ok_or_else(|| err("an array holding copy fields needs `items`"))?;
            let count = |k: &str| match m.get(k) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| err(&format!("`{k}` must be a whole number"))),
            };
            let (min, max) = (count("minItems")?.unwrap_or(0), count("maxItems")?);
            if max.is_some_and(|max| max < min) {
                return Err(err("`maxItems` is below `minItems`"));
            }
            let item = self.value(items, &format!("{at}/items"))?;
            // The first item, then `rest` more: `{a,b}` repetitions of `, item`.
            let a = min.max(1) - 1;
            let rest = match max {
                Some(0) => None,
                Some(1) => Some(String::new()),
                Some(max) => Some(format!(" (\",\" {item}){{{a},{}}}", max - 1)),
                None if a == 0 => Some(format!(" (\",\" {item})*")),
                None => Some(format!(" (\",\" {item}){{{a},}}")),
            };
            match rest {
                None => "\"[\" \"]\"".to_string(),
                Some(rest) if min == 0 => format!("\"[\" ({item}{rest})? \"]\""),
                Some(rest) => format!("\"[\" {item}{rest} \"]\""),
            }
        } else {
            return Err(err("`copy` fields must sit in objects or arrays"));
        };
        Ok(if nullable { self.rule(format!("{body} | \"null\"")) } else { self.rule(body) })
    }

    fn object(
        &mut self,
        m: &Map<String, Value>,
        at: &str,
        err: &dyn Fn(&str) -> SchemaGrammarError,
    ) -> Result<String, SchemaGrammarError> {
        let props =
            m.get("properties").and_then(Value::as_object).ok_or_else(|| err("an object needs `properties`"))?;
        let required: Vec<&str> = m
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(missing) = props.keys().find(|k| !required.contains(&k.as_str())) {
            return Err(err(&format!(
                "every property of an object holding copy fields must be required (`{missing}` is not); \
                 make it nullable instead"
            )));
        }
        let mut parts = Vec::new();
        for (i, (k, v)) in props.iter().enumerate() {
            let key = serde_json::to_string(k).expect("a key serializes");
            let sep = if i == 0 { "" } else { "," };
            let value = self.value(v, &format!("{at}/properties/{k}"))?;
            parts.push(format!("{} {value}", literal(&format!("{sep}{key}:"))));
        }
        Ok(format!("\"{{\" {} \"}}\"", parts.join(" ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "test": { "type": ["string", "null"], "copy": true },
                "value": { "type": "string", "copy": true },
                "n": { "type": "integer" }
            },
            "required": ["test", "value", "n"],
            "additionalProperties": false
        })
    }

    #[test]
    fn schema_without_copy_fields_is_its_own_grammar() {
        let s = json!({ "type": "object", "properties": { "a": { "type": "string" } } });
        let Grammar::Lark(g) = answer_grammar(&s, "text").unwrap() else { panic!("lark expected") };
        let (start, rule) = g.split_once('\n').unwrap();
        assert_eq!(start, "start: \" \"? r0");
        let embedded: Value = serde_json::from_str(rule.strip_prefix("r0: %json ").unwrap()).unwrap();
        assert_eq!(embedded["x-guidance"]["whitespace_flexible"], false);
        assert_eq!(embedded["properties"], s["properties"]);
        assert!(!g.contains("text"));
    }

    #[test]
    fn copy_fields_become_substring_terminals() {
        let Grammar::Lark(g) = answer_grammar(&line_schema(), "Na \"x\" 140").unwrap() else { panic!("lark expected") };
        assert!(g.starts_with("start: \" \"? r"), "{g}");
        assert!(g.contains(r#""substring_chunks": ["Na"," ","\\\"","x","\\\""," ","140"]"#), "{g}");
        assert!(g.contains(r#"COPY | "null""#), "{g}");
        assert!(g.contains(r#"",\"n\":" r"#), "{g}");
        assert!(g.contains("%json {"), "{g}");
        assert!(!g.contains("\"copy\""), "{g}");
    }

    #[test]
    fn arrays_of_copies_keep_their_length_bounds() {
        let arr = |extra: Value| {
            let mut s = json!({ "type": "array", "items": { "type": "string", "copy": true } });
            s.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let Grammar::Lark(g) = answer_grammar(&s, "a b").unwrap() else { panic!("lark expected") };
            let rule = g.lines().find(|l| l.starts_with('r') && l.contains("\"[\"")).unwrap();
            rule.split_once(": ").unwrap().1.to_string()
        };
        assert_eq!(arr(json!({})), r#""[" (COPY ("," COPY)*)? "]""#);
        assert_eq!(arr(json!({ "maxItems": 3 })), r#""[" (COPY ("," COPY){0,2})? "]""#);
        assert_eq!(arr(json!({ "minItems": 2, "maxItems": 4 })), r#""[" COPY ("," COPY){1,3} "]""#);
        assert_eq!(arr(json!({ "minItems": 2 })), r#""[" COPY ("," COPY){1,} "]""#);
        assert_eq!(arr(json!({ "maxItems": 1 })), r#""[" (COPY)? "]""#);
        assert_eq!(arr(json!({ "maxItems": 0 })), r#""[" "]""#);
    }

    #[test]
    fn copies_are_cut_at_word_and_number_boundaries() {
        assert_eq!(
            copy_pieces("Hämoglobin   12,1 g/dl 12,0–16,0 [<250] 1.2.3"),
            [
                "Hämoglobin",
                "   ",
                "12,1",
                " ",
                "g",
                "/",
                "dl",
                " ",
                "12,0",
                "–",
                "16,0",
                " ",
                "[",
                "<",
                "250",
                "]",
                " ",
                "1.2.3"
            ]
        );
        assert_eq!(copy_pieces("5.9mmol/L, x10^9"), ["5.9", "mmol", "/", "L", ",", " ", "x", "10", "^", "9"]);
        assert_eq!(copy_pieces("a"), ["a"]);
        assert!(copy_pieces("").is_empty());
    }

    #[test]
    fn unsupported_copy_placements_are_named() {
        let mut s = line_schema();
        s["required"] = json!(["test", "value"]);
        let e = check_schema(&s).unwrap_err();
        assert_eq!(e.pointer, "/");
        assert!(e.reason.contains("`n` is not"), "{e}");
        let s =
            json!({ "type": "object", "properties": { "v": { "type": "number", "copy": true } }, "required": ["v"] });
        assert_eq!(check_schema(&s).unwrap_err().pointer, "/properties/v");
        let s = json!({ "type": "array", "items": { "type": "string", "copy": true }, "minItems": 3, "maxItems": 2 });
        assert!(check_schema(&s).unwrap_err().reason.contains("below"));
        assert!(check_schema(&line_schema()).is_ok());
    }
}
