//! Cohort criteria over a patient's row (`[[patients.cohorts]] criteria`), e.g.
//! `diabetes and lvef_percent < 40 and not diagnoses("heart transplant")`.
//!
//! - names of the row's fields (`lvef_percent`, `smoking_status`), numbers, `"strings"`,
//!   `true`, `false`;
//! - comparisons `< <= > >= = !=` (`==` too);
//! - `and`, `or`, `not` (also `&&`, `||`, `!`) and parentheses;
//! - `LIST("words")`, for a list field of the row: true when an item's `name` contains the
//!   words (case and spacing aside) and, for a list of assertions (`diagnoses`), the patient
//!   has it (asserted in a note, about the patient).
//!
//! A fact the notes do not give is unknown, and logic is three-valued (SQL's): `lvef_percent
//! < 40` is unknown without an LVEF, `unknown and false` is false, `unknown or true` is true;
//! a patient is a member when the criteria are true.
//!
//! Hand-written rather than a crate: evalexpr (the usual choice) is AGPL since version 12 and
//! has neither word operators nor unknown values; CEL's crates bring a parser generator and
//! CEL syntax. The language is a page of recursive descent.

use std::fmt;

/// A parsed criterion.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Field(String),
    Number(f64),
    Text(String),
    Bool(bool),
    Has { list: String, words: String },
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Cmp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// A value while evaluating: unknown where the notes say nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    Unknown,
    Bool(bool),
    Number(f64),
    Text(String),
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Unknown => write!(f, "unknown"),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Number(n) => write!(f, "{n}"),
            Val::Text(t) => write!(f, "{t:?}"),
        }
    }
}

/// Why criteria do not parse: the place (in characters) and what was expected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("at character {at}: {reason}")]
pub struct CriteriaError {
    pub at: usize,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Number(f64),
    Text(String),
    Op(&'static str),
    Open,
    Close,
}

fn lex(src: &str) -> Result<Vec<(Tok, usize)>, CriteriaError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[at..i].iter().collect();
            let tok = match word.as_str() {
                "and" | "AND" => Tok::Op("and"),
                "or" | "OR" => Tok::Op("or"),
                "not" | "NOT" => Tok::Op("not"),
                _ => Tok::Ident(word),
            };
            out.push((tok, at));
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let s: String = chars[at..i].iter().collect();
            let n = s.parse().map_err(|_| CriteriaError { at, reason: format!("{s:?} is not a number") })?;
            out.push((Tok::Number(n), at));
            continue;
        }
        if c == '"' || c == '\'' {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == c)
                .ok_or(CriteriaError { at, reason: "a string without its closing quote".into() })?;
            out.push((Tok::Text(chars[i + 1..i + 1 + end].iter().collect()), at));
            i += end + 2;
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op = match two.as_str() {
            "<=" => Some("<="),
            ">=" => Some(">="),
            "!=" | "<>" => Some("!="),
            "==" => Some("="),
            "&&" => Some("and"),
            "||" => Some("or"),
            _ => None,
        };
        if let Some(op) = op {
            out.push((Tok::Op(op), at));
            i += 2;
            continue;
        }
        let tok = match c {
            '<' => Tok::Op("<"),
            '>' => Tok::Op(">"),
            '=' => Tok::Op("="),
            '!' => Tok::Op("not"),
            '(' => Tok::Open,
            ')' => Tok::Close,
            ',' => Tok::Op(","),
            _ => return Err(CriteriaError { at, reason: format!("unexpected {c:?}") }),
        };
        out.push((tok, at));
        i += 1;
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    at: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.0)
    }

    fn place(&self) -> usize {
        self.toks.get(self.at).map_or(self.len, |t| t.1)
    }

    fn err<T>(&self, reason: &str) -> Result<T, CriteriaError> {
        Err(CriteriaError { at: self.place(), reason: reason.into() })
    }

    fn eat(&mut self, op: &str) -> bool {
        let found = matches!(self.peek(), Some(Tok::Op(o)) if *o == op);
        if found {
            self.at += 1;
        }
        found
    }

    fn or(&mut self) -> Result<Expr, CriteriaError> {
        let mut e = self.and()?;
        while self.eat("or") {
            e = Expr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<Expr, CriteriaError> {
        let mut e = self.not()?;
        while self.eat("and") {
            e = Expr::And(Box::new(e), Box::new(self.not()?));
        }
        Ok(e)
    }

    fn not(&mut self) -> Result<Expr, CriteriaError> {
        if self.eat("not") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, CriteriaError> {
        let left = self.atom()?;
        let cmp = match self.peek() {
            Some(Tok::Op("<")) => Cmp::Lt,
            Some(Tok::Op("<=")) => Cmp::Le,
            Some(Tok::Op(">")) => Cmp::Gt,
            Some(Tok::Op(">=")) => Cmp::Ge,
            Some(Tok::Op("=")) => Cmp::Eq,
            Some(Tok::Op("!=")) => Cmp::Ne,
            _ => return Ok(left),
        };
        self.at += 1;
        Ok(Expr::Compare(cmp, Box::new(left), Box::new(self.atom()?)))
    }

    fn atom(&mut self) -> Result<Expr, CriteriaError> {
        let Some(tok) = self.peek().cloned() else { return self.err("the criteria end too early") };
        self.at += 1;
        match tok {
            Tok::Number(n) => Ok(Expr::Number(n)),
            Tok::Text(t) => Ok(Expr::Text(t)),
            Tok::Open => {
                let e = self.or()?;
                if self.peek() != Some(&Tok::Close) {
                    return self.err("expected `)`");
                }
                self.at += 1;
                Ok(e)
            }
            Tok::Ident(name) if name == "true" || name == "false" => Ok(Expr::Bool(name == "true")),
            Tok::Ident(name) => {
                if self.peek() != Some(&Tok::Open) {
                    return Ok(Expr::Field(name));
                }
                self.at += 1;
                let Some(Tok::Text(words)) = self.peek().cloned() else {
                    return self.err(&format!("{name}(…) takes one quoted name"));
                };
                self.at += 1;
                if self.peek() != Some(&Tok::Close) {
                    return self.err("expected `)`");
                }
                self.at += 1;
                Ok(Expr::Has { list: name, words })
            }
            Tok::Close | Tok::Op(_) => {
                self.at -= 1;
                self.err("expected a field, a value or `(`")
            }
        }
    }
}

/// Parses criteria.
pub fn parse(src: &str) -> Result<Expr, CriteriaError> {
    let toks = lex(src)?;
    let mut p = Parser { toks, at: 0, len: src.chars().count() };
    let e = p.or()?;
    if p.at < p.toks.len() {
        return p.err("expected `and`, `or` or the end");
    }
    Ok(e)
}

impl Expr {
    /// The fields and list tests the criteria read, in order, each once.
    pub fn reads(&self) -> Vec<&Expr> {
        let mut out: Vec<&Expr> = Vec::new();
        self.walk(&mut |e| {
            if matches!(e, Expr::Field(_) | Expr::Has { .. }) && !out.contains(&e) {
                out.push(e);
            }
        });
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Expr)) {
        f(self);
        match self {
            Expr::Not(a) => a.walk(f),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(_, a, b) => {
                a.walk(f);
                b.walk(f);
            }
            _ => {}
        }
    }

    /// Evaluates with `field` giving a field's value and `has` a list test's.
    pub fn eval(&self, field: &dyn Fn(&str) -> Val, has: &dyn Fn(&str, &str) -> Val) -> Val {
        let truth = |v: Val| match v {
            Val::Bool(b) => Some(b),
            _ => None,
        };
        match self {
            Expr::Field(n) => field(n),
            Expr::Number(n) => Val::Number(*n),
            Expr::Text(t) => Val::Text(t.clone()),
            Expr::Bool(b) => Val::Bool(*b),
            Expr::Has { list, words } => has(list, words),
            Expr::Not(a) => truth(a.eval(field, has)).map_or(Val::Unknown, |b| Val::Bool(!b)),
            Expr::And(a, b) => match (truth(a.eval(field, has)), truth(b.eval(field, has))) {
                (Some(false), _) | (_, Some(false)) => Val::Bool(false),
                (Some(true), Some(true)) => Val::Bool(true),
                _ => Val::Unknown,
            },
            Expr::Or(a, b) => match (truth(a.eval(field, has)), truth(b.eval(field, has))) {
                (Some(true), _) | (_, Some(true)) => Val::Bool(true),
                (Some(false), Some(false)) => Val::Bool(false),
                _ => Val::Unknown,
            },
            Expr::Compare(cmp, a, b) => {
                let ord = match (a.eval(field, has), b.eval(field, has)) {
                    (Val::Number(x), Val::Number(y)) => x.partial_cmp(&y),
                    (Val::Text(x), Val::Text(y)) => Some(x.to_lowercase().cmp(&y.to_lowercase())),
                    (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(&y)),
                    _ => None,
                };
                let Some(o) = ord else { return Val::Unknown };
                use std::cmp::Ordering::*;
                Val::Bool(match cmp {
                    Cmp::Lt => o == Less,
                    Cmp::Le => o != Greater,
                    Cmp::Gt => o == Greater,
                    Cmp::Ge => o != Less,
                    Cmp::Eq => o == Equal,
                    Cmp::Ne => o != Equal,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str, fields: &[(&str, Val)], has: &[(&str, &str)]) -> Val {
        let e = parse(src).unwrap();
        let field = |n: &str| fields.iter().find(|f| f.0 == n).map_or(Val::Unknown, |f| f.1.clone());
        let has_fn = |l: &str, w: &str| Val::Bool(has.contains(&(l, w)));
        e.eval(&field, &has_fn)
    }

    #[test]
    fn criteria_read_as_written_with_word_and_symbol_operators() {
        let f = [("diabetes", Val::Bool(true)), ("lvef_percent", Val::Number(35.0))];
        assert_eq!(eval("diabetes and lvef_percent < 40", &f, &[]), Val::Bool(true));
        assert_eq!(eval("diabetes && !(lvef_percent >= 40)", &f, &[]), Val::Bool(true));
        assert_eq!(eval("not diabetes or lvef_percent = 35", &f, &[]), Val::Bool(true));
        assert_eq!(
            eval("smoking_status = 'Current'", &[("smoking_status", Val::Text("current".into()))], &[]),
            Val::Bool(true)
        );
        assert_eq!(
            eval(r#"diagnoses("heart failure") and lvef_percent <= 35"#, &f, &[("diagnoses", "heart failure")]),
            Val::Bool(true)
        );
        assert_eq!(parse("a or b and c").unwrap(), parse("a or (b and c)").unwrap(), "`and` binds tighter than `or`");
    }

    #[test]
    fn missing_facts_are_unknown_and_logic_is_three_valued() {
        let f = [("diabetes", Val::Bool(true))];
        assert_eq!(eval("diabetes and lvef_percent < 40", &f, &[]), Val::Unknown, "no LVEF: not a member");
        assert_eq!(eval("lvef_percent < 40 or diabetes", &f, &[]), Val::Bool(true));
        assert_eq!(eval("lvef_percent < 40 and not diabetes", &f, &[]), Val::Bool(false));
        assert_eq!(eval("not lvef_percent < 40", &f, &[]), Val::Unknown, "not unknown is unknown");
        assert_eq!(eval("diabetes = 3", &f, &[]), Val::Unknown, "values of different kinds compare to unknown");
    }

    #[test]
    fn bad_criteria_say_where() {
        assert_eq!(parse("diabetes and").unwrap_err().at, 12);
        assert_eq!(parse("lvef_percent < 40)").unwrap_err().at, 17);
        assert!(parse("diagnoses(heart)").unwrap_err().reason.contains("quoted"));
        assert!(parse("a # b").unwrap_err().reason.contains("unexpected"));
        assert!(parse("x = 'open").is_err());
        let e = parse(r#"diabetes and diagnoses("CKD") and diabetes"#).unwrap();
        assert_eq!(e.reads().len(), 2, "each field or test once");
    }
}
