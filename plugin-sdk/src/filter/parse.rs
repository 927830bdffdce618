//! The `filter` parser: text → [`Expr`]. Errors carry the 1-based character column where the
//! parser gave up, so the API can point at it.
//!
//! ```text
//! expr    := or
//! or      := and ( "OR" and )*
//! and     := not ( "AND" not )*
//! not     := "NOT" not | primary
//! primary := "(" expr ")"
//!          | path ( "=" | "!=" | ">" | ">=" | "<" | "<=" ) value
//!          | path [ "NOT" ] "IN" "[" value ( "," value )* [ "," ] "]"
//!          | path [ "NOT" ] "EXISTS"
//! path    := a bare word of letters, digits, `_`, `-`, `.`, `@`, `$` (any script), or a
//!            backquoted name for keys with other characters: `weird key`.nested
//! value   := "double quoted" | 'single quoted' (backslash escapes) | a bare word / number
//! ```
//! Keywords are case-insensitive.

use super::{CmpOp, Expr, Literal};

/// A filter the parser could not read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid filter at column {column}: {message}")]
pub struct ParseError {
    /// 1-based character position in the filter text.
    pub column: usize,
    pub message: String,
}

/// Longest filter accepted, and deepest nesting: bounds parse time and recursion.
pub const MAX_FILTER_CHARS: usize = 8 * 1024;
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Op(CmpOp),
    /// A bare word (keyword, path or unquoted value).
    Word(String),
    /// A backquoted path.
    Path(String),
    Quoted(String),
    End,
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | '$' | '+' | ':' | '/')
}

impl Lexer {
    fn err(&self, at: usize, message: impl Into<String>) -> ParseError {
        ParseError {
            column: at + 1,
            message: message.into(),
        }
    }

    /// The next token and the index of its first character.
    fn next(&mut self) -> Result<(Tok, usize), ParseError> {
        while self.pos < self.chars.len() && self.chars[self.pos].is_whitespace() {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(&c) = self.chars.get(self.pos) else {
            return Ok((Tok::End, start));
        };
        self.pos += 1;
        let peek = self.chars.get(self.pos).copied();
        let tok = match c {
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            '[' => Tok::LBracket,
            ']' => Tok::RBracket,
            ',' => Tok::Comma,
            '=' => Tok::Op(CmpOp::Eq),
            '!' if peek == Some('=') => {
                self.pos += 1;
                Tok::Op(CmpOp::Ne)
            }
            '>' | '<' => {
                let eq = peek == Some('=');
                if eq {
                    self.pos += 1;
                }
                Tok::Op(match (c, eq) {
                    ('>', false) => CmpOp::Gt,
                    ('>', true) => CmpOp::Ge,
                    ('<', false) => CmpOp::Lt,
                    _ => CmpOp::Le,
                })
            }
            '"' | '\'' | '`' => {
                let mut s = String::new();
                loop {
                    match self.chars.get(self.pos) {
                        None => {
                            return Err(self.err(start, format!("unterminated {c}quote{c}")));
                        }
                        Some('\\') => {
                            let Some(&e) = self.chars.get(self.pos + 1) else {
                                return Err(self.err(self.pos, "a backslash ends the filter"));
                            };
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                            self.pos += 2;
                        }
                        Some(&q) if q == c => {
                            self.pos += 1;
                            break;
                        }
                        Some(&other) => {
                            s.push(other);
                            self.pos += 1;
                        }
                    }
                }
                if c != '`' {
                    Tok::Quoted(s)
                } else {
                    // More segments: `a b`.c or `a b`.`c d`
                    while self.chars.get(self.pos) == Some(&'.') {
                        self.pos += 1;
                        s.push('.');
                        if self.chars.get(self.pos) == Some(&'`') {
                            let (Tok::Path(seg), _) = self.next()? else {
                                unreachable!("a backquote starts a path")
                            };
                            s.push_str(&seg);
                            break;
                        }
                        while self.chars.get(self.pos).is_some_and(|c| is_word_char(*c)) {
                            s.push(self.chars[self.pos]);
                            self.pos += 1;
                        }
                    }
                    Tok::Path(s)
                }
            }
            c if is_word_char(c) => {
                while self.chars.get(self.pos).is_some_and(|c| is_word_char(*c)) {
                    self.pos += 1;
                }
                Tok::Word(self.chars[start..self.pos].iter().collect())
            }
            other => return Err(self.err(start, format!("unexpected character {other:?}"))),
        };
        Ok((tok, start))
    }
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    i: usize,
    len: usize,
}

fn keyword(t: &Tok, k: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(k))
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::LParen => "`(`".into(),
        Tok::RParen => "`)`".into(),
        Tok::LBracket => "`[`".into(),
        Tok::RBracket => "`]`".into(),
        Tok::Comma => "`,`".into(),
        Tok::Op(op) => format!("`{}`", op.symbol()),
        Tok::Word(w) => format!("`{w}`"),
        Tok::Path(p) => format!("`{p}`"),
        Tok::Quoted(q) => format!("{q:?}"),
        Tok::End => "the end of the filter".into(),
    }
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.i].0
    }
    fn at(&self) -> usize {
        self.toks[self.i].1
    }
    fn bump(&mut self) -> Tok {
        let t = self.toks[self.i].0.clone();
        if self.i + 1 < self.toks.len() {
            self.i += 1;
        }
        t
    }
    fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            column: self.at().min(self.len) + 1,
            message: message.into(),
        }
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.err(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut parts = vec![self.and(depth)?];
        while keyword(self.peek(), "OR") {
            self.bump();
            parts.push(self.and(depth)?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one")
        } else {
            Expr::Or(parts)
        })
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut parts = vec![self.not(depth)?];
        while keyword(self.peek(), "AND") {
            self.bump();
            parts.push(self.not(depth)?);
        }
        Ok(if parts.len() == 1 {
            parts.pop().expect("one")
        } else {
            Expr::And(parts)
        })
    }

    fn not(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if keyword(self.peek(), "NOT") {
            self.bump();
            if depth > MAX_DEPTH {
                return Err(self.err(format!("nested deeper than {MAX_DEPTH} levels")));
            }
            return Ok(Expr::Not(Box::new(self.not(depth + 1)?)));
        }
        self.primary(depth)
    }

    fn primary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        match self.peek().clone() {
            Tok::LParen => {
                self.bump();
                let e = self.or(depth + 1)?;
                if *self.peek() != Tok::RParen {
                    return Err(self.err(format!(
                        "expected `)` to close the parenthesis, found {}",
                        describe(self.peek())
                    )));
                }
                self.bump();
                Ok(e)
            }
            Tok::Word(w)
                if ["AND", "OR", "IN", "EXISTS"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                Err(self.err(format!("expected a field name, found the keyword `{w}`")))
            }
            Tok::Word(path) | Tok::Path(path) => {
                self.bump();
                self.condition(path)
            }
            other => Err(self.err(format!(
                "expected a field name, `NOT` or `(`, found {}",
                describe(&other)
            ))),
        }
    }

    fn condition(&mut self, path: String) -> Result<Expr, ParseError> {
        let negated = keyword(self.peek(), "NOT");
        if negated {
            self.bump();
        }
        let tok = self.peek().clone();
        let e = match tok {
            Tok::Op(op) if !negated => {
                self.bump();
                let value = self.value()?;
                Expr::Cmp(path, op, value)
            }
            Tok::Word(ref w) if w.eq_ignore_ascii_case("EXISTS") => {
                self.bump();
                Expr::Exists(path)
            }
            Tok::Word(ref w) if w.eq_ignore_ascii_case("IN") => {
                self.bump();
                if *self.peek() != Tok::LBracket {
                    return Err(self.err(format!(
                        "expected `[` after IN, found {}",
                        describe(self.peek())
                    )));
                }
                self.bump();
                let mut values = Vec::new();
                loop {
                    if *self.peek() == Tok::RBracket {
                        self.bump();
                        break;
                    }
                    values.push(self.value()?);
                    match self.peek() {
                        Tok::Comma => {
                            self.bump();
                        }
                        Tok::RBracket => {}
                        other => {
                            return Err(self.err(format!(
                                "expected `,` or `]` in the IN list, found {}",
                                describe(other)
                            )));
                        }
                    }
                }
                Expr::In(path, values)
            }
            other => {
                return Err(self.err(format!(
                    "expected an operator (=, !=, >, >=, <, <=, IN, EXISTS) after `{path}`, found {}",
                    describe(&other)
                )));
            }
        };
        Ok(if negated { Expr::Not(Box::new(e)) } else { e })
    }

    fn value(&mut self) -> Result<Literal, ParseError> {
        match self.peek().clone() {
            Tok::Quoted(s) => {
                self.bump();
                Ok(Literal::new(s))
            }
            Tok::Word(w)
                if !["AND", "OR", "NOT"]
                    .iter()
                    .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                self.bump();
                Ok(Literal::new(w))
            }
            other => Err(self.err(format!(
                "expected a value (a number, a word or a quoted string), found {}",
                describe(&other)
            ))),
        }
    }
}

/// Parses a filter. An empty (or all-space) filter is `Ok(None)`: it selects everything.
pub fn parse(text: &str) -> Result<Option<Expr>, ParseError> {
    let len = text.chars().count();
    if len > MAX_FILTER_CHARS {
        return Err(ParseError {
            column: MAX_FILTER_CHARS + 1,
            message: format!("the filter is longer than {MAX_FILTER_CHARS} characters"),
        });
    }
    let mut lexer = Lexer {
        chars: text.chars().collect(),
        pos: 0,
    };
    let mut toks = Vec::new();
    loop {
        let (t, at) = lexer.next()?;
        let end = t == Tok::End;
        toks.push((t, at));
        if end {
            break;
        }
    }
    if toks.len() == 1 {
        return Ok(None);
    }
    let mut p = Parser { toks, i: 0, len };
    let e = p.or(0)?;
    if *p.peek() != Tok::End {
        return Err(p.err(format!(
            "expected AND, OR or the end of the filter, found {}",
            describe(p.peek())
        )));
    }
    Ok(Some(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Expr {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn parses_the_contract_example() {
        let e = p(r#"type = "account_created" AND amount >= 100"#);
        assert_eq!(
            e,
            Expr::And(vec![
                Expr::Cmp(
                    "type".into(),
                    CmpOp::Eq,
                    Literal::new("account_created".into())
                ),
                Expr::Cmp("amount".into(), CmpOp::Ge, Literal::new("100".into())),
            ])
        );
    }

    #[test]
    fn precedence_and_binds_tighter_than_or() {
        let e = p("a = 1 OR b = 2 AND NOT c EXISTS");
        let Expr::Or(parts) = e else { panic!() };
        assert_eq!(parts.len(), 2);
        assert!(matches!(&parts[1], Expr::And(v) if matches!(&v[1], Expr::Not(_))));
    }

    #[test]
    fn in_lists_not_in_not_exists_and_backquoted_paths() {
        assert!(matches!(p("plan IN [pro, 'team', \"free\",]"), Expr::In(_, v) if v.len() == 3));
        assert!(matches!(p("plan NOT IN [pro]"), Expr::Not(_)));
        assert!(matches!(p("user.email NOT EXISTS"), Expr::Not(_)));
        assert!(
            matches!(p("`clé spéciale`.x = 1"), Expr::Cmp(path, _, _) if path == "clé spéciale.x")
        );
        assert!(matches!(p("straße = 'ü'"), Expr::Cmp(path, _, _) if path == "straße"));
        assert!(parse("   ").unwrap().is_none());
    }

    #[test]
    fn errors_point_at_the_column() {
        let e = parse("type = ").unwrap_err();
        assert_eq!(e.column, 8);
        let e = parse("type = 'x' AND (amount > 3").unwrap_err();
        assert_eq!(e.column, 27);
        assert!(e.message.contains("`)`"));
        let e = parse("type == 3").unwrap_err();
        assert_eq!(e.column, 7);
        let e = parse("type = \"open").unwrap_err();
        assert_eq!(e.column, 8);
        let e = parse("a = 1 b = 2").unwrap_err();
        assert_eq!(e.column, 7);
        let e = parse("a # 1").unwrap_err();
        assert_eq!(e.column, 3);
    }

    #[test]
    fn hostile_filters_are_bounded() {
        let deep = format!("{}a = 1{}", "(".repeat(1000), ")".repeat(1000));
        assert!(parse(&deep).unwrap_err().message.contains("nested"));
        let nots = format!("{}a = 1", "NOT ".repeat(1000));
        assert!(parse(&nots).is_err());
        assert!(parse(&"a".repeat(MAX_FILTER_CHARS + 1)).is_err());
    }
}
