//! Prometheus-style label selectors on target labels: `{provider="acme", cluster=~"east-.*"}`.
//!
//! Grammar (a subset of PromQL's vector selector, without a metric name):
//!
//! ```text
//! selector := ws [ "{" ] ws [ matcher ( ws "," ws matcher )* ws [ "," ] ] ws [ "}" ] ws
//! matcher  := label_name ws op ws value
//! op       := "=" | "!=" | "=~" | "!~"
//! value    := "..." | '...' | `...`        (backticks: raw, no escapes)
//! ```
//!
//! - Braces are optional, but an opening `{` needs its closing `}` and vice versa.
//! - Escapes in `"` and `'` strings: `\\`, `\"`, `\'`, `\n`, `\t`, `\r`, `\uXXXX`; any other
//!   escape is an error.
//! - Regexes (`=~`, `!~`) are fully anchored like Prometheus (`^(?s:re)$`): `=~"east"` does not
//!   match `east-1`.
//! - A label missing from the target matches as the empty string, like Prometheus.
//! - A selector must have at least one matcher that does **not** match the empty string
//!   (Prometheus's rule for vector selectors); otherwise it would match every host that lacks
//!   the label, and an empty selector would match every host. Both are parse errors.

use std::collections::BTreeMap;
use std::fmt;

use regex::Regex;

/// A parsed label selector. Cheap to clone; regexes are compiled once at parse time.
#[derive(Debug, Clone)]
pub struct Selector {
    matchers: Vec<Matcher>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Re,
    Nre,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Re => "=~",
            Op::Nre => "!~",
        }
    }
}

#[derive(Debug, Clone)]
struct Matcher {
    name: String,
    op: Op,
    value: String,
    /// The anchored regex for `=~` and `!~`.
    re: Option<Regex>,
}

impl Matcher {
    fn matches_value(&self, v: &str) -> bool {
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Re => self.re.as_ref().is_some_and(|re| re.is_match(v)),
            Op::Nre => !self.re.as_ref().is_some_and(|re| re.is_match(v)),
        }
    }
}

impl Selector {
    /// Parses a selector such as `{provider="acme", cluster=~"east-.*"}` (braces optional).
    ///
    /// Errors are one line, name the column (1-based, in characters) where it went wrong, and
    /// never panic.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut p = Parser {
            chars: s.chars().collect(),
            pos: 0,
        };
        let matchers = p.selector()?;
        if matchers.is_empty() {
            return Err("empty selector: it would match every host; \
                 give at least one matcher, e.g. {provider=\"acme\"}"
                .to_string());
        }
        if matchers.iter().all(|m| m.matches_value("")) {
            return Err(
                "every matcher matches the empty string, so the selector would match every \
                 host without those labels; give at least one matcher that needs a non-empty \
                 value, e.g. {provider=\"acme\"}"
                    .to_string(),
            );
        }
        Ok(Selector { matchers })
    }

    /// Whether a target with these labels is selected. A missing label matches as "".
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matchers.iter().all(|m| {
            let v = labels.get(&m.name).map(String::as_str).unwrap_or("");
            m.matches_value(v)
        })
    }
}

/// The canonical form, e.g. `{provider="acme", cluster=~"east-.*"}`; it parses back to an
/// equivalent selector.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, m) in self.matchers.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}{}\"{}\"", m.name, m.op.as_str(), escape(&m.value))?;
        }
        f.write_str("}")
    }
}

/// Escapes a value for a double-quoted selector string.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn column(&self) -> usize {
        self.pos + 1
    }

    /// "found ..." text for the current position.
    fn found(&self) -> String {
        match self.peek() {
            Some(c) => format!("{c:?}"),
            None => "end of input".to_string(),
        }
    }

    fn selector(&mut self) -> Result<Vec<Matcher>, String> {
        self.skip_ws();
        let braced = self.peek() == Some('{');
        if braced {
            self.pos += 1;
        }
        let mut matchers = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None if braced => {
                    return Err(format!(
                        "missing closing \"}}\" at column {}",
                        self.column()
                    ));
                }
                None => break,
                Some('}') if braced => {
                    self.pos += 1;
                    break;
                }
                Some('}') => {
                    return Err(format!(
                        "unexpected \"}}\" at column {} without an opening \"{{\"",
                        self.column()
                    ));
                }
                _ => {}
            }
            matchers.push(self.matcher()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') | None => {}
                Some(_) => {
                    return Err(format!(
                        "expected \",\" or the end of the selector at column {}, found {}",
                        self.column(),
                        self.found()
                    ));
                }
            }
        }
        self.skip_ws();
        if self.peek().is_some() {
            return Err(format!(
                "unexpected {} at column {} after the end of the selector",
                self.found(),
                self.column()
            ));
        }
        Ok(matchers)
    }

    fn matcher(&mut self) -> Result<Matcher, String> {
        let name = self.label_name()?;
        self.skip_ws();
        let op_col = self.column();
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| matches!(c, '=' | '!' | '~' | '<' | '>'))
        {
            self.pos += 1;
        }
        let op_text: String = self.chars[start..self.pos].iter().collect();
        let op = match op_text.as_str() {
            "=" => Op::Eq,
            "!=" => Op::Ne,
            "=~" => Op::Re,
            "!~" => Op::Nre,
            "" => {
                return Err(format!(
                    "expected an operator (=, !=, =~ or !~) after label {name:?} at column \
                     {op_col}, found {}",
                    self.found()
                ));
            }
            other => {
                return Err(format!(
                    "unknown operator {other:?} after label {name:?} at column {op_col} \
                     (expected =, !=, =~ or !~)"
                ));
            }
        };
        self.skip_ws();
        let value_col = self.column();
        let value = self.quoted()?;
        let re = match op {
            Op::Re | Op::Nre => {
                // Checked on its own first, so a value like `a)|(b` cannot escape the anchors.
                Regex::new(&value).map_err(|e| {
                    format!(
                        "invalid regex {value:?} for label {name:?} at column {value_col}: {}",
                        regex_error(&e)
                    )
                })?;
                let anchored = Regex::new(&format!("^(?s:{value})$")).map_err(|e| {
                    format!(
                        "invalid regex {value:?} for label {name:?} at column {value_col}: {}",
                        regex_error(&e)
                    )
                })?;
                Some(anchored)
            }
            Op::Eq | Op::Ne => None,
        };
        Ok(Matcher {
            name,
            op,
            value,
            re,
        })
    }

    fn label_name(&mut self) -> Result<String, String> {
        let start = self.pos;
        match self.peek() {
            Some(c) if crate::configfile::is_label_start(c) => self.pos += 1,
            _ => {
                return Err(format!(
                    "expected a label name at column {}, found {}",
                    self.column(),
                    self.found()
                ));
            }
        }
        while self.peek().is_some_and(crate::configfile::is_label_char) {
            self.pos += 1;
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn quoted(&mut self) -> Result<String, String> {
        let open_col = self.column();
        let quote = match self.peek() {
            Some(q @ ('"' | '\'' | '`')) => q,
            _ => {
                return Err(format!(
                    "expected a quoted value at column {}, found {}",
                    self.column(),
                    self.found()
                ));
            }
        };
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(format!("unterminated string starting at column {open_col}"));
            };
            self.pos += 1;
            if c == quote {
                return Ok(out);
            }
            if c != '\\' || quote == '`' {
                out.push(c);
                continue;
            }
            let esc_col = self.column() - 1;
            let Some(e) = self.peek() else {
                return Err(format!("unterminated string starting at column {open_col}"));
            };
            self.pos += 1;
            match e {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                '\'' => out.push('\''),
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'u' => {
                    let hex: String = self.chars.iter().skip(self.pos).take(4).collect();
                    let ch = (hex.len() == 4 && hex.chars().all(|h| h.is_ascii_hexdigit()))
                        .then(|| u32::from_str_radix(&hex, 16).ok())
                        .flatten()
                        .and_then(char::from_u32)
                        .ok_or_else(|| {
                            format!("invalid \\u escape at column {esc_col}: expected \\uXXXX")
                        })?;
                    self.pos += 4;
                    out.push(ch);
                }
                other => {
                    return Err(format!("unknown escape \"\\{other}\" at column {esc_col}"));
                }
            }
        }
    }
}

/// One line out of a regex error (its Display spans several lines with a caret).
pub(crate) fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| text.lines().last().unwrap_or("").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn four_operators() {
        let l = labels(&[("provider", "acme"), ("cluster", "east-1")]);
        assert!(sel(r#"{provider="acme"}"#).matches(&l));
        assert!(!sel(r#"{provider="acme2"}"#).matches(&l));
        assert!(sel(r#"{provider="acme", cluster!="west-1"}"#).matches(&l));
        assert!(!sel(r#"{provider="acme", cluster!="east-1"}"#).matches(&l));
        assert!(sel(r#"{cluster=~"east-.*"}"#).matches(&l));
        assert!(!sel(r#"{cluster=~"west-.*"}"#).matches(&l));
        assert!(sel(r#"{provider="acme", cluster!~"west-.*"}"#).matches(&l));
        assert!(!sel(r#"{provider="acme", cluster!~"east-.*"}"#).matches(&l));
    }

    #[test]
    fn regexes_are_fully_anchored() {
        let l = labels(&[("cluster", "east-1")]);
        assert!(!sel(r#"{cluster=~"east"}"#).matches(&l));
        assert!(!sel(r#"{cluster=~"1"}"#).matches(&l));
        assert!(sel(r#"{cluster=~"east|east-1"}"#).matches(&l));
        assert!(sel(r#"{provider="x", cluster!~"east"}"#)
            .matches(&labels(&[("provider", "x"), ("cluster", "east-1")])));
        // An alternation cannot escape the anchors.
        assert!(!sel(r#"{cluster=~"west|east"}"#).matches(&labels(&[("cluster", "east-1")])));
        // `.` matches newlines, like Prometheus.
        assert!(sel(r#"{a=~"x.y"}"#).matches(&labels(&[("a", "x\ny")])));
    }

    #[test]
    fn missing_labels_match_as_empty() {
        let l = labels(&[("provider", "acme")]);
        assert!(sel(r#"{provider="acme", rack=""}"#).matches(&l));
        assert!(sel(r#"{provider="acme", rack!="r1"}"#).matches(&l));
        assert!(!sel(r#"{provider="acme", rack="r1"}"#).matches(&l));
        assert!(sel(r#"{provider="acme", rack=~".*"}"#).matches(&l));
        assert!(!sel(r#"{provider="acme", rack=~"r.*"}"#).matches(&l));
        assert!(sel(r#"{provider="acme", rack!~"r.*"}"#).matches(&l));
        assert!(!sel(r#"{rack=~".+"}"#).matches(&l));
    }

    #[test]
    fn braces_whitespace_and_trailing_comma_are_optional() {
        let l = labels(&[("provider", "acme"), ("cluster", "east-1")]);
        for s in [
            r#"provider="acme""#,
            r#"  provider = "acme" , cluster =~ "east-.*" , "#,
            r#"{provider="acme",}"#,
            "{\n  provider='acme',\n  cluster=~`east-.*`\n}",
        ] {
            assert!(sel(s).matches(&l), "{s}");
        }
    }

    #[test]
    fn escapes_inside_quoted_values() {
        let s = sel(r#"{a="say \"hi\"", b="back\\slash", c='it\'s', d="\u00e9\t"}"#);
        assert!(s.matches(&labels(&[
            ("a", "say \"hi\""),
            ("b", "back\\slash"),
            ("c", "it's"),
            ("d", "é\t"),
        ])));
        // A regex escape survives into the regex: `\\.` is the regex `\.`.
        let s = sel(r#"{host=~"gpu\\.a"}"#);
        assert!(s.matches(&labels(&[("host", "gpu.a")])));
        assert!(!s.matches(&labels(&[("host", "gpuxa")])));
        // Backticks are raw.
        let s = sel(r#"{host=~`gpu\.a`}"#);
        assert!(s.matches(&labels(&[("host", "gpu.a")])));
    }

    #[test]
    fn display_round_trips() {
        let s = sel(r#"{a="x\"y", b!~"z\\d+"}"#);
        assert_eq!(s.to_string(), r#"{a="x\"y", b!~"z\\d+"}"#);
        let again = sel(&s.to_string());
        assert_eq!(again.to_string(), s.to_string());
    }

    #[test]
    fn parse_errors() {
        let err = |s: &str| Selector::parse(s).unwrap_err();
        assert_eq!(
            err(""),
            "empty selector: it would match every host; give at least one matcher, \
             e.g. {provider=\"acme\"}"
        );
        assert_eq!(err("{ }"), err(""));
        assert_eq!(
            err(r#"{rack=""}"#),
            "every matcher matches the empty string, so the selector would match every host \
             without those labels; give at least one matcher that needs a non-empty value, \
             e.g. {provider=\"acme\"}"
        );
        assert_eq!(
            err(r#"{a=="b"}"#),
            r#"unknown operator "==" after label "a" at column 3 (expected =, !=, =~ or !~)"#
        );
        assert_eq!(
            err(r#"{a~"b"}"#),
            r#"unknown operator "~" after label "a" at column 3 (expected =, !=, =~ or !~)"#
        );
        assert_eq!(
            err(r#"{a "b"}"#),
            r#"expected an operator (=, !=, =~ or !~) after label "a" at column 4, found '"'"#
        );
        assert_eq!(
            err(r#"{a=~"(east"}"#),
            r#"invalid regex "(east" for label "a" at column 5: unclosed group"#
        );
        assert_eq!(
            err(r#"{a=~"x)|(y"}"#),
            r#"invalid regex "x)|(y" for label "a" at column 5: unopened group"#
        );
        assert_eq!(err(r#"{a="b""#), "missing closing \"}\" at column 7");
        assert_eq!(
            err(r#"a="b"}"#),
            "unexpected \"}\" at column 6 without an opening \"{\""
        );
        assert_eq!(
            err(r#"{a="b"} x"#),
            "unexpected 'x' at column 9 after the end of the selector"
        );
        assert_eq!(
            err(r#"{a="b" c="d"}"#),
            "expected \",\" or the end of the selector at column 8, found 'c'"
        );
        assert_eq!(
            err(r#"{1a="b"}"#),
            "expected a label name at column 2, found '1'"
        );
        assert_eq!(
            err(r#"{a=b}"#),
            "expected a quoted value at column 4, found 'b'"
        );
        assert_eq!(err(r#"{a="b}"#), "unterminated string starting at column 4");
        assert_eq!(err(r#"{a="b\"#), "unterminated string starting at column 4");
        assert_eq!(err(r#"{a="\q"}"#), "unknown escape \"\\q\" at column 5");
        assert_eq!(
            err(r#"{a="\u12"}"#),
            "invalid \\u escape at column 5: expected \\uXXXX"
        );
        assert_eq!(
            err(r#"{a="\ud800"}"#),
            "invalid \\u escape at column 5: expected \\uXXXX"
        );
    }

    proptest! {
        /// Any non-empty value, escaped the way Display does, parses back and matches exactly
        /// itself; Display of the parsed selector is stable.
        #[test]
        fn equality_matchers_round_trip(v in "(\\PC|[\\\\\"\n\t\r]){1,12}", other in "\\PC{0,12}") {
            let text = format!("{{k=\"{}\"}}", escape(&v));
            let s = Selector::parse(&text).unwrap();
            prop_assert_eq!(s.to_string(), text);
            prop_assert!(s.matches(&labels(&[("k", &v)])));
            prop_assert_eq!(s.matches(&labels(&[("k", &other)])), other == v);
        }

        /// Arbitrary input never panics.
        #[test]
        fn never_panics(input in "\\PC{0,40}") {
            let _ = Selector::parse(&input);
        }

        #[test]
        fn never_panics_near_valid(input in "[{}a-c=!~\"'`\\\\,. ]{0,30}") {
            let _ = Selector::parse(&input);
        }
    }
}
