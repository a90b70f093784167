//! Parser for the Prometheus text exposition format 0.0.4, as served by the agents.
//!
//! The aggregator scrapes thousands of agents every 15 s and reads only a few metric
//! families from each body, so the parser is built around a name filter: a line whose
//! metric name is not wanted costs a name scan plus a newline search, nothing more.
//! Wanted lines are read in one pass without regexes, and label values borrow from the
//! body unless they contain escapes.
//!
//! We keep our own parser because published crates get the grammar wrong in ways that
//! matter to us: `prometheus-parse` mis-splits label values containing `,` and `=`, and
//! drops samples with `}` in a label value (a model name or a PCI bus id can contain
//! almost anything).
//!
//! Grammar (one sample per line, tokens separated by spaces or tabs):
//!
//! ```text
//! metric_name [ "{" label_name "=" '"' label_value '"' { "," label_name "=" '"' label_value '"' } [ "," ] "}" ] value [ timestamp ]
//! ```
//!
//! Deliberate choices:
//! - Metric names are `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names `[a-zA-Z_][a-zA-Z0-9_]*`.
//! - Label values are UTF-8 with the escapes `\\`, `\"` and `\n`; any other escape keeps
//!   both the backslash and the character, as Prometheus does. A raw newline inside a
//!   label value is an error (unterminated value), so skipping an unwanted line at its
//!   newline is safe. A raw `\r` or tab inside a value is content: the Rust encoder
//!   writes them unescaped.
//! - Whitespace is allowed around `{`, `,`, `=` and `}`; `{}` and a trailing comma are
//!   allowed. We also tolerate leading and trailing blanks on a line, no blank between
//!   `}` and the value, and `\r\n` line ends; a raw `\r` elsewhere is not whitespace.
//! - Values follow Go's `strconv.ParseFloat` restricted as Prometheus restricts it:
//!   decimal with optional fraction and exponent, `NaN`, `[+-]Inf`/`Infinity` (case-
//!   insensitive; the Rust encoder writes `inf`). No hex floats, no `_`, no signed NaN,
//!   and a finite literal that overflows to infinity is an error (Go's `ErrRange`).
//! - The timestamp is an optional base-10 int64 of milliseconds; anything after it is an
//!   error.
//! - A series has at most [`MAX_LABELS`] labels, and error messages are cut to a few hundred
//!   bytes. Parsing is linear in the body's size whatever the body holds (a line of a million
//!   labels, millions of tiny lines, megabyte label values or escapes), so a hostile agent
//!   costs at most what its body size (capped by `body_limit_bytes`) allows.

use std::borrow::Cow;

/// Most labels one series may carry. An agent's series have a handful (a GPU's `gpu`,
/// `uuid`, `model`, ...), Prometheus's own `label_limit` is usually set in the tens; a line
/// with more is hostile or broken and fails the scrape instead of costing memory and time.
pub const MAX_LABELS: usize = 256;

/// Label sets up to this size are checked for duplicates by a scan (fastest for the few
/// labels real series have); larger ones through a hash set.
const SCAN_LABELS: usize = 16;

/// One sample line of a wanted metric, borrowing from the scraped body.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name exactly as written (for histograms/summaries, including `_bucket` etc.).
    pub name: &'a str,
    /// Label pairs in the order written. Values are borrowed unless they contained escapes.
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    /// The sample value; may be NaN or infinite.
    pub value: f64,
    /// Optional timestamp in ms.
    pub timestamp_ms: Option<i64>,
}

impl Sample<'_> {
    /// The value of label `name`, if the sample has it. A linear scan: samples carry a
    /// handful of labels, and a scan beats building a map per sample.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// A malformed line. `line` is 1-based, counting every `\n`-terminated line of the body
/// (comments and blank lines included), so it can be matched against the raw scrape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Calls `on_sample` for every sample whose metric name satisfies `wanted`; lines of other
/// metrics are skipped after reading only their name (cheap). Comments (`# HELP`, `# TYPE`,
/// any `#` line) and blank lines are ignored. Stops at the first malformed line of a
/// *wanted* metric and returns its error; malformed lines of unwanted metrics may be skipped
/// without error only if the name itself is readable.
///
/// A name is readable when it is a valid metric name followed by a space, a tab, `{` or
/// the end of the line; anything else (a line starting with a digit, `foo-bar 1`) is an
/// error whatever `wanted` says, because we cannot tell which metric the line belongs to.
///
/// Samples already passed to `on_sample` stay delivered when a later line fails: callers
/// that need all-or-nothing should buffer them.
pub fn parse<'a>(
    text: &'a str,
    wanted: impl Fn(&str) -> bool,
    mut on_sample: impl FnMut(Sample<'a>),
) -> Result<(), ParseError> {
    let bytes = text.as_bytes();
    let mut pos = 0;
    let mut line = 0;
    while pos < bytes.len() {
        line += 1;
        let mut p = Line {
            text,
            b: bytes,
            pos,
            line,
        };
        p.skip_blanks();
        match p.peek() {
            None => break,
            Some(b'#') => {
                pos = next_line(text, p.pos);
                continue;
            }
            _ if p.at_eol() => {
                pos = next_line(text, p.pos);
                continue;
            }
            _ => {}
        }

        let start = p.pos;
        p.pos = scan_ident(bytes, start, METRIC_START, METRIC_CHAR);
        if p.pos == start {
            return Err(p.err(format!(
                "expected a metric name, found {}",
                describe_char(text, start)
            )));
        }
        if !(p.at_eol() || matches!(bytes[p.pos], b' ' | b'\t' | b'{')) {
            return Err(p.err(format!(
                "invalid character {} in metric name",
                describe_char(text, p.pos)
            )));
        }
        let name = &text[start..p.pos];
        if !wanted(name) {
            pos = next_line(text, p.pos);
            continue;
        }
        let sample = p.sample(name)?;
        pos = p.pos;
        on_sample(sample);
    }
    Ok(())
}

/// Cursor over one line of the body. It never looks past the line's `\n`, but works on
/// the whole body so that no line slice has to be found before parsing (one pass).
struct Line<'a> {
    text: &'a str,
    b: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Line<'a> {
    fn err(&self, message: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            message: clip(message.into()),
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// End of input, `\n`, or a `\r` that ends the line (`\r\n` or `\r` at end of input).
    #[inline]
    fn at_eol(&self) -> bool {
        match self.b.get(self.pos) {
            None | Some(b'\n') => true,
            Some(b'\r') => matches!(self.b.get(self.pos + 1), None | Some(b'\n')),
            Some(_) => false,
        }
    }

    /// Skips spaces and tabs; says whether there were any.
    #[inline]
    fn skip_blanks(&mut self) -> bool {
        let start = self.pos;
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        self.pos != start
    }

    /// A run of non-blank characters up to the end of the line. Ends on an ASCII byte or
    /// the end of input, so the slice is on char boundaries.
    #[inline]
    fn token(&mut self) -> &'a str {
        let start = self.pos;
        while !self.at_eol() && !matches!(self.b[self.pos], b' ' | b'\t') {
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    /// Parses the rest of a wanted line after its name and moves past its newline.
    fn sample(&mut self, name: &'a str) -> Result<Sample<'a>, ParseError> {
        self.skip_blanks();
        let mut labels = Vec::new();
        if self.peek() == Some(b'{') {
            self.pos += 1;
            self.labels(&mut labels)?;
            self.skip_blanks();
        }
        if self.at_eol() {
            return Err(self.err(format!("missing value for metric {name}")));
        }

        let token = self.token();
        let value = parse_value(token)
            .ok_or_else(|| self.err(format!("invalid value {token:?} for metric {name}")))?;

        let mut timestamp_ms = None;
        self.skip_blanks();
        if !self.at_eol() {
            let token = self.token();
            // Like Go's strconv.ParseInt(s, 10, 64): optional sign, digits, no overflow.
            let ts = token
                .parse::<i64>()
                .map_err(|_| self.err(format!("invalid timestamp {token:?} for metric {name}")))?;
            timestamp_ms = Some(ts);
            self.skip_blanks();
            if !self.at_eol() {
                let junk = self.token();
                return Err(self.err(format!(
                    "unexpected text {junk:?} after timestamp of metric {name}"
                )));
            }
        }

        // Consume the line ending: `\r\n`, `\n`, `\r` at end of input, or nothing at EOF.
        if self.peek() == Some(b'\r') {
            self.pos += 1;
        }
        if self.peek() == Some(b'\n') {
            self.pos += 1;
        }

        Ok(Sample {
            name,
            labels,
            value,
            timestamp_ms,
        })
    }

    /// Parses label pairs after `{` up to and including `}`.
    fn labels(&mut self, labels: &mut Vec<(&'a str, Cow<'a, str>)>) -> Result<(), ParseError> {
        let mut names: Option<std::collections::HashSet<&'a str>> = None;
        loop {
            self.skip_blanks();
            // `}` here closes `{}` or follows a trailing comma.
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(());
            }
            let start = self.pos;
            self.pos = scan_ident(self.b, start, LABEL_START, LABEL_CHAR);
            if self.pos == start {
                return Err(self.err(if self.at_eol() {
                    "unterminated label set: expected a label name or '}'".to_string()
                } else {
                    format!(
                        "expected a label name, found {}",
                        describe_char(self.text, start)
                    )
                }));
            }
            let label = &self.text[start..self.pos];

            self.skip_blanks();
            if self.peek() != Some(b'=') {
                return Err(self.err(format!(
                    "expected '=' after label name {label}, found {}",
                    describe_char(self.text, self.pos)
                )));
            }
            self.pos += 1;
            self.skip_blanks();
            if self.peek() != Some(b'"') {
                return Err(self.err(format!(
                    "expected '\"' to start the value of label {label}, found {}",
                    describe_char(self.text, self.pos)
                )));
            }
            self.pos += 1;
            let value = self.label_value(label)?;
            // A scan while the set is small (every real series); past that, a hash set, so
            // that a hostile line with thousands of labels costs linear time, not quadratic.
            let duplicate = if labels.len() < SCAN_LABELS {
                labels.iter().any(|(n, _)| *n == label)
            } else {
                let names = names.get_or_insert_with(|| {
                    let mut set = std::collections::HashSet::with_capacity(2 * SCAN_LABELS);
                    set.extend(labels.iter().map(|(n, _)| *n));
                    set
                });
                !names.insert(label)
            };
            if duplicate {
                return Err(self.err(format!("duplicate label {label}")));
            }
            if labels.len() == MAX_LABELS {
                return Err(self.err(format!("more than {MAX_LABELS} labels in one series")));
            }
            labels.push((label, value));

            self.skip_blanks();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => {
                    return Err(self.err(format!(
                        "expected ',' or '}}' after the value of label {label}, found {}",
                        describe_char(self.text, self.pos)
                    )))
                }
            }
        }
    }

    /// Reads a label value after its opening quote, through the closing quote. Borrows
    /// when there is no backslash; otherwise builds the unescaped string once.
    fn label_value(&mut self, label: &str) -> Result<Cow<'a, str>, ParseError> {
        let b = self.b;
        let start = self.pos;
        // Fast path: no escapes, borrow.
        let mut i = find_value_special(b, start);
        match b.get(i) {
            Some(b'"') => {
                self.pos = i + 1;
                return Ok(Cow::Borrowed(&self.text[start..i]));
            }
            Some(b'\\') => {}
            _ => return Err(self.err(format!("unterminated value of label {label}"))),
        }

        // Slow path: copy the runs between escapes. Every split point is an ASCII byte,
        // so all slices are on char boundaries.
        let mut out = String::with_capacity(i - start + 16);
        let mut seg = start;
        loop {
            match b.get(i) {
                Some(b'"') => {
                    out.push_str(&self.text[seg..i]);
                    self.pos = i + 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    out.push_str(&self.text[seg..i]);
                    seg = match b.get(i + 1) {
                        Some(b'\\') => {
                            out.push('\\');
                            i + 2
                        }
                        Some(b'"') => {
                            out.push('"');
                            i + 2
                        }
                        Some(b'n') => {
                            out.push('\n');
                            i + 2
                        }
                        Some(b'\n') | None => {
                            return Err(self.err(format!(
                                "unterminated value of label {label}: backslash at end of line"
                            )))
                        }
                        // Unknown escape: keep the backslash; the character after it
                        // (not special, or a case above would have matched) starts the
                        // next run.
                        Some(_) => {
                            out.push('\\');
                            i + 1
                        }
                    };
                    i = find_value_special(b, seg);
                }
                _ => return Err(self.err(format!("unterminated value of label {label}"))),
            }
        }
    }
}

/// Position just past the next `\n` at or after `from`, or the end of the body.
/// `str::find` with a char uses core's word-at-a-time memchr.
#[inline]
fn next_line(text: &str, from: usize) -> usize {
    match text[from..].find('\n') {
        Some(i) => from + i + 1,
        None => text.len(),
    }
}

/// Character classes of the identifier grammar, looked up by byte: one load per byte
/// instead of a chain of range comparisons on the hot name scans.
const METRIC_START: u8 = 1;
const METRIC_CHAR: u8 = 2;
const LABEL_START: u8 = 4;
const LABEL_CHAR: u8 = 8;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        let alpha = c.is_ascii_alphabetic() || c == b'_';
        let digit = c.is_ascii_digit();
        let colon = c == b':';
        let mut k = 0;
        if alpha || colon {
            k |= METRIC_START | METRIC_CHAR;
        }
        if digit {
            k |= METRIC_CHAR | LABEL_CHAR;
        }
        if alpha {
            k |= LABEL_START | LABEL_CHAR;
        }
        t[i] = k;
        i += 1;
    }
    t
};

/// End of the identifier starting at `start` whose first byte has class `first` and the
/// rest class `rest` (equal to `start` if there is none).
#[inline]
fn scan_ident(b: &[u8], start: usize, first: u8, rest: u8) -> usize {
    match b.get(start) {
        Some(&c) if CLASS[c as usize] & first != 0 => {}
        _ => return start,
    }
    let mut i = start + 1;
    while i < b.len() && CLASS[b[i] as usize] & rest != 0 {
        i += 1;
    }
    i
}

/// Index of the first `"`, `\\` or `\n` at or after `i`, or `b.len()`. Label values are
/// mostly long runs of plain bytes (UUIDs, model names), so this checks eight bytes at a
/// time: a byte equal to the target becomes zero after XOR, and the classic
/// `(x - 0x01..) & !x & 0x80..` flags zero bytes. That test can also flag bytes *above*
/// a real zero (borrow), never below one, so the lowest flag in any of the three masks
/// is a real match and the lowest over all three is the first special byte.
#[inline]
fn find_value_special(b: &[u8], mut i: usize) -> usize {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    #[inline]
    fn zero_bytes(x: u64) -> u64 {
        x.wrapping_sub(LO) & !x & HI
    }
    while let Some(chunk) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let m = zero_bytes(w ^ (LO * b'"' as u64))
            | zero_bytes(w ^ (LO * b'\\' as u64))
            | zero_bytes(w ^ (LO * b'\n' as u64));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < b.len() && !matches!(b[i], b'"' | b'\\' | b'\n') {
        i += 1;
    }
    i
}

/// Longest error message kept: a message quotes tokens from the body, and a hostile body's
/// token can be megabytes long; the message goes to logs and the status page.
const MAX_MESSAGE: usize = 300;

/// `message`, cut to [`MAX_MESSAGE`] bytes (on a char boundary) with `…` when longer.
fn clip(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// The character at `pos` for error messages, or "end of line"/"end of input".
fn describe_char(text: &str, pos: usize) -> String {
    match text[pos..].chars().next() {
        None => "end of input".to_string(),
        Some('\n') => "end of line".to_string(),
        Some(c) => format!("{c:?}"),
    }
}

/// Parses a sample value as Prometheus does: Go's `strconv.ParseFloat` without hex floats
/// or underscores (Prometheus rejects `p`, `P` and `_`), and with overflow an error.
fn parse_value(s: &str) -> Option<f64> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'+' => (false, &s[1..]),
        b'-' => (true, &s[1..]),
        _ => (false, s),
    };
    match rest.as_bytes().first()? {
        // Rust's decimal grammar equals Go's for these (digits, optional fraction,
        // optional exponent, at least one mantissa digit), and its parse is correctly
        // rounded for inputs of any length, which the round trip relies on: the Rust
        // encoder writes 1e300 as 301 digits.
        b'0'..=b'9' | b'.' => {
            let v: f64 = s.parse().ok()?;
            // Go returns ±Inf with ErrRange for an overflowing literal; Prometheus then
            // rejects the line. Underflow to zero is accepted by both.
            (!v.is_infinite()).then_some(v)
        }
        _ => {
            if rest.eq_ignore_ascii_case("inf") || rest.eq_ignore_ascii_case("infinity") {
                Some(if negative {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                })
            } else if s.eq_ignore_ascii_case("nan") {
                // Go accepts NaN only unsigned.
                Some(f64::NAN)
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::{btree_map, btree_set, vec};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn all(text: &str) -> Result<Vec<Sample<'_>>, ParseError> {
        let mut out = Vec::new();
        parse(text, |_| true, |s| out.push(s))?;
        Ok(out)
    }

    fn one(text: &str) -> Sample<'_> {
        let mut v = all(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(v.len(), 1, "{text:?}");
        v.pop().unwrap()
    }

    fn err(text: &str) -> ParseError {
        match all(text) {
            Ok(s) => panic!("{text:?} parsed as {s:?}"),
            Err(e) => e,
        }
    }

    fn labels<'a>(s: &'a Sample<'_>) -> Vec<(&'a str, &'a str)> {
        s.labels.iter().map(|(n, v)| (*n, v.as_ref())).collect()
    }

    #[test]
    fn label_values_with_separators_and_quotes() {
        let text = concat!(
            r#"m{a="x,y",b="k=v",c="}",d="{",e="say \"hi\"",f="C:\\dir\\",g="line1\nline2","#,
            r##"h="ünïcødé 🚀 ∑",i="",j="a} 1 b{c=\"d\"",k="#x"} 1"##,
            "\n"
        );
        let s = one(text);
        assert_eq!(s.name, "m");
        assert_eq!(
            labels(&s),
            vec![
                ("a", "x,y"),
                ("b", "k=v"),
                ("c", "}"),
                ("d", "{"),
                ("e", "say \"hi\""),
                ("f", "C:\\dir\\"),
                ("g", "line1\nline2"),
                ("h", "ünïcødé 🚀 ∑"),
                ("i", ""),
                ("j", "a} 1 b{c=\"d\""),
                ("k", "#x"),
            ]
        );
        assert_eq!(s.value, 1.0);
        assert_eq!(s.timestamp_ms, None);
        // Values without escapes are borrowed; only escaped ones allocate.
        for (name, value) in &s.labels {
            let escaped = matches!(*name, "e" | "f" | "g" | "j");
            assert_eq!(matches!(value, Cow::Owned(_)), escaped, "label {name}");
        }
        assert_eq!(s.label("c"), Some("}"));
        assert_eq!(s.label("h"), Some("ünïcødé 🚀 ∑"));
        assert_eq!(s.label("zz"), None);
    }

    #[test]
    fn unknown_escape_keeps_backslash() {
        let s = one(r#"m{a="\x\t\ü\\n"} 1"#);
        assert_eq!(s.label("a"), Some(r"\x\t\ü\n"));
    }

    #[test]
    fn raw_carriage_return_and_tab_inside_label_value_are_kept() {
        let s = one("m{a=\"x\ry\tz\r\"} 1\r\n");
        assert_eq!(s.label("a"), Some("x\ry\tz\r"));
    }

    #[test]
    fn special_values() {
        let cases: &[(&str, f64)] = &[
            ("+Inf", f64::INFINITY),
            ("Inf", f64::INFINITY),
            ("inf", f64::INFINITY),
            ("-Inf", f64::NEG_INFINITY),
            ("-inf", f64::NEG_INFINITY),
            ("+infinity", f64::INFINITY),
            ("-0", -0.0),
            ("0", 0.0),
            ("1.", 1.0),
            (".5", 0.5),
            ("-2.5e-3", -2.5e-3),
            ("1E+10", 1e10),
            ("007", 7.0),
            ("1e-400", 0.0),
            ("1.7976931348623157e308", f64::MAX),
            ("4.9e-324", 4.9e-324),
        ];
        for (text, want) in cases {
            let line = format!("m {text}\n");
            let s = one(&line);
            assert_eq!(s.value.to_bits(), want.to_bits(), "{text}");
        }
        for nan in ["NaN", "nan", "NAN"] {
            assert!(one(&format!("m {nan}")).value.is_nan(), "{nan}");
        }
        for bad in [
            "+NaN", "-nan", "0x10", "0x1p3", "1_000", "1e", "e5", ".", "+", "-", "1e400", "-1e400",
            "infin", "1.0.0", "1,5", "--1", "+-1", "Inff",
        ] {
            let e = err(&format!("m {bad}\n"));
            assert_eq!(e.line, 1, "{bad}");
            assert!(e.message.contains("invalid value"), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamps() {
        let s = one("m{a=\"b\"} 1.5 1700000000000\n");
        assert_eq!(s.value, 1.5);
        assert_eq!(s.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(one("m 1 -5").timestamp_ms, Some(-5));
        assert_eq!(one("m 1 +5").timestamp_ms, Some(5));
        assert_eq!(
            one(&format!("m 1 {}", i64::MIN)).timestamp_ms,
            Some(i64::MIN)
        );
        assert_eq!(
            one(&format!("m 1 {}", i64::MAX)).timestamp_ms,
            Some(i64::MAX)
        );
        for bad in ["1.5", "9223372036854775808", "1e3", "x", "-", "0x10"] {
            let e = err(&format!("m 1 {bad}\n"));
            assert!(e.message.contains("invalid timestamp"), "{bad}: {e}");
        }
    }

    #[test]
    fn trailing_comma_and_empty_label_set() {
        assert_eq!(labels(&one(r#"m{a="b",} 1"#)), vec![("a", "b")]);
        assert_eq!(labels(&one(r#"m{a="b" , } 1"#)), vec![("a", "b")]);
        assert!(one("m{} 1").labels.is_empty());
        assert!(one("m { } 1").labels.is_empty());
        // A lone comma is not a label set.
        assert_eq!(err("m{,} 1").line, 1);
        assert_eq!(err(r#"m{a="b",,} 1"#).line, 1);
    }

    #[test]
    fn whitespace_variants() {
        let s = one("  m \t {\t a \t=  \"b\" ,c\t=\"d\"\t}\t \t2.5 \t 3 \t\r\n");
        assert_eq!(s.name, "m");
        assert_eq!(labels(&s), vec![("a", "b"), ("c", "d")]);
        assert_eq!(s.value, 2.5);
        assert_eq!(s.timestamp_ms, Some(3));

        // No blank needed between `}` and the value.
        assert_eq!(one(r#"m{a="b"}7"#).value, 7.0);
        // No trailing newline at end of input; `\r` alone at end of input.
        assert_eq!(one("m 1").value, 1.0);
        assert_eq!(one("m 1\r").value, 1.0);

        let text = "\n  \n\t\r\n# a comment\n   # indented comment\na 1\r\n\r\nb{x=\"y\"} 2\r\n\n";
        let got = all(text).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].name, got[0].value), ("a", 1.0));
        assert_eq!((got[1].name, got[1].value), ("b", 2.0));
        assert_eq!(got[1].label("x"), Some("y"));
    }

    #[test]
    fn crlf_line_endings_count_once() {
        let text = "# TYPE a gauge\r\na{x=\"1\"} 1\r\nb 2 3\r\n\r\nc\r\nd 4\r\n";
        let mut got = Vec::new();
        let e = parse(text, |_| true, |s| got.push((s.name, s.value))).unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert_eq!(got, vec![("a", 1.0), ("b", 2.0)]);
    }

    #[test]
    fn empty_and_comment_only_bodies() {
        assert!(all("").unwrap().is_empty());
        assert!(all("\n\n").unwrap().is_empty());
        assert!(all("# HELP m x\n# TYPE m counter\n#\n#no space")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn metric_names() {
        for name in ["a", "_", ":", "a:b_c9", "_:x", "A_Z"] {
            assert_eq!(one(&format!("{name} 1")).name, name);
        }
    }

    const AGENT_BODY: &str = r#"# HELP commitmeter_agent_polls_total Sampling rounds completed with NVML up.
# TYPE commitmeter_agent_polls_total counter
commitmeter_agent_polls_total 1234
# HELP commitmeter_build_info Build of the running commitmeter.
# TYPE commitmeter_build_info gauge
commitmeter_build_info{role="agent",version="0.1.0"} 1
# HELP commitmeter_gpu_allocated_seconds_total Observed time with at least one compute process.
# TYPE commitmeter_gpu_allocated_seconds_total counter
commitmeter_gpu_allocated_seconds_total{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 3600.25
commitmeter_gpu_allocated_seconds_total{gpu="1",uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555"} 0
# HELP commitmeter_gpu_busy_seconds_total Integral of GPU utilization over observed time.
# TYPE commitmeter_gpu_busy_seconds_total counter
commitmeter_gpu_busy_seconds_total{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 1800.125
commitmeter_gpu_busy_seconds_total{gpu="1",uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555"} 0.000001
# HELP commitmeter_gpu_info GPU identity and the source of busy time.
# TYPE commitmeter_gpu_info gauge
commitmeter_gpu_info{busy_source="utilization",gpu="0",model="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:1B:00.0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 1
commitmeter_gpu_info{busy_source="utilization",gpu="1",model="Weird \"model\", {v=2}",pci_bus_id="00000000:1C:00.0",uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555"} 1
# HELP commitmeter_gpu_memory_used_bytes GPU memory in use.
# TYPE commitmeter_gpu_memory_used_bytes gauge
commitmeter_gpu_memory_used_bytes{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 85899345920
# HELP commitmeter_gpu_observed_seconds_total Time the GPU was seen present and healthy (delivered).
# TYPE commitmeter_gpu_observed_seconds_total counter
commitmeter_gpu_observed_seconds_total{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 7200.5
commitmeter_gpu_observed_seconds_total{gpu="1",uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555"} 7199
# HELP commitmeter_gpu_up 1 while the GPU answers NVML, 0 once lost.
# TYPE commitmeter_gpu_up gauge
commitmeter_gpu_up{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 1
commitmeter_gpu_up{gpu="1",uuid="GPU-9f8e7d6c-0000-1111-2222-333344445555"} 0
# HELP commitmeter_gpu_utilization_ratio Share of the last driver sample period in which a kernel ran (0-1).
# TYPE commitmeter_gpu_utilization_ratio gauge
commitmeter_gpu_utilization_ratio{gpu="0",uuid="GPU-1a2b3c4d-0000-1111-2222-333344445555"} 0.5
# HELP commitmeter_host_info Labels of this host from the agent's config file.
# TYPE commitmeter_host_info gauge
commitmeter_host_info{cluster="a,b=c",rack="r{1}"} 1
# HELP commitmeter_nvml_errors_total NVML calls that failed, by call and error.
# TYPE commitmeter_nvml_errors_total counter
commitmeter_nvml_errors_total{call="nvmlDeviceGetPowerUsage",error="NotSupported"} 3
# HELP commitmeter_nvml_up 1 while NVML is loaded and initialized.
# TYPE commitmeter_nvml_up gauge
commitmeter_nvml_up 1
"#;

    const WANTED: [&str; 5] = [
        "commitmeter_gpu_observed_seconds_total",
        "commitmeter_gpu_busy_seconds_total",
        "commitmeter_gpu_allocated_seconds_total",
        "commitmeter_gpu_info",
        "commitmeter_gpu_up",
    ];

    #[test]
    fn agent_exposition_with_filter() {
        let mut got = Vec::new();
        parse(AGENT_BODY, |n| WANTED.contains(&n), |s| got.push(s)).unwrap();
        let summary: Vec<(&str, Option<&str>, f64)> = got
            .iter()
            .map(|s| (s.name, s.label("gpu"), s.value))
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "commitmeter_gpu_allocated_seconds_total",
                    Some("0"),
                    3600.25
                ),
                ("commitmeter_gpu_allocated_seconds_total", Some("1"), 0.0),
                ("commitmeter_gpu_busy_seconds_total", Some("0"), 1800.125),
                ("commitmeter_gpu_busy_seconds_total", Some("1"), 0.000001),
                ("commitmeter_gpu_info", Some("0"), 1.0),
                ("commitmeter_gpu_info", Some("1"), 1.0),
                ("commitmeter_gpu_observed_seconds_total", Some("0"), 7200.5),
                ("commitmeter_gpu_observed_seconds_total", Some("1"), 7199.0),
                ("commitmeter_gpu_up", Some("0"), 1.0),
                ("commitmeter_gpu_up", Some("1"), 0.0),
            ]
        );
        let info = &got[5];
        assert_eq!(
            labels(info),
            vec![
                ("busy_source", "utilization"),
                ("gpu", "1"),
                ("model", "Weird \"model\", {v=2}"),
                ("pci_bus_id", "00000000:1C:00.0"),
                ("uuid", "GPU-9f8e7d6c-0000-1111-2222-333344445555"),
            ]
        );

        // Everything parses when everything is wanted, and nothing is returned when
        // nothing is.
        assert_eq!(all(AGENT_BODY).unwrap().len(), 17);
        let mut n = 0;
        parse(AGENT_BODY, |_| false, |_| n += 1).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn malformed_unwanted_lines_are_skipped_if_the_name_is_readable() {
        let text = concat!(
            "other{a=\"unterminated 1\n",
            "other\n",
            "other{a=\"b\"} not_a_number junk junk\n",
            "other 1 2 3 4\n",
            "other{dup=\"1\",dup=\"2\"} 1\n",
            "wanted 5\n",
        );
        let mut got = Vec::new();
        parse(text, |n| n == "wanted", |s| got.push(s)).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].name, got[0].value), ("wanted", 5.0));

        // Each of those lines fails when its metric is wanted.
        for (i, line) in text.lines().take(5).enumerate() {
            let body = format!("wanted 1\n{line}\nwanted 2\n");
            let e = parse(&body, |n| n == "other", |_| {}).unwrap_err();
            assert_eq!(e.line, 2, "line {}: {e}", i + 1);
        }

        // An unreadable name is an error even if nothing is wanted.
        for bad in [
            "1abc 1",
            "-m 1",
            "m-x 1",
            "{a=\"b\"} 1",
            "m\u{e9} 1",
            "m\rx 1",
            "\"m\" 1",
        ] {
            let text = format!("ok 1\n{bad}\nok 2\n");
            let e = parse(&text, |_| false, |_| {}).unwrap_err();
            assert_eq!(e.line, 2, "{bad:?}: {e}");
        }
    }

    #[test]
    fn errors_carry_the_right_line_number() {
        let prefix = "# HELP m help\n# TYPE m gauge\n\nm{a=\"ok\"} 1\n";
        let cases: &[(&str, &str)] = &[
            ("m", "missing value"),
            ("m\r", "missing value"),
            ("m{a=\"b\"}", "missing value"),
            ("m{a=\"b\"}   ", "missing value"),
            ("m \t ", "missing value"),
            ("m{a=\"b} 1", "unterminated value of label a"),
            ("m{a=\"b", "unterminated value of label a"),
            ("m{a=\"b\\", "backslash at end of line"),
            ("m{a=\"b\\\nc\"} 1", "backslash at end of line"),
            ("1m 1", "expected a metric name"),
            ("m.x 1", "invalid character '.' in metric name"),
            (
                "m 1 1700000000000 junk",
                "unexpected text \"junk\" after timestamp",
            ),
            ("m 1 2 3", "unexpected text \"3\" after timestamp"),
            ("m{a=\"1\",b=\"2\",a=\"3\"} 1", "duplicate label a"),
            ("m{a=\"1\"} abc", "invalid value \"abc\""),
            ("m{a=\"1\"} 1 abc", "invalid timestamp \"abc\""),
            ("m{a \"1\"} 1", "expected '=' after label name a"),
            ("m{a=1} 1", "expected '\"' to start the value of label a"),
            (
                "m{a=\"1\" b=\"2\"} 1",
                "expected ',' or '}' after the value of label a",
            ),
            (
                "m{a=\"1\"",
                "expected ',' or '}' after the value of label a",
            ),
            ("m{", "unterminated label set"),
            ("m{a=\"1\",", "unterminated label set"),
            ("m{1a=\"1\"} 1", "expected a label name, found '1'"),
            ("m{a:b=\"1\"} 1", "expected '=' after label name a"),
            ("m 1\rx", "invalid value \"1\\rx\""),
            ("m 1 2\rx", "invalid timestamp"),
        ];
        for (bad, want) in cases {
            for suffix in ["", "\n", "\nm 2\n"] {
                let text = format!("{prefix}{bad}{suffix}");
                let e = err(&text);
                assert_eq!(e.line, 5, "{text:?}: {e}");
                assert!(e.message.contains(want), "{text:?}: {e}");
                assert!(e.to_string().starts_with("line 5: "), "{e}");
            }
        }
    }

    #[test]
    fn samples_before_an_error_are_delivered() {
        let mut got = Vec::new();
        let e = parse("a 1\nb 2\nc\nd 4\n", |_| true, |s| got.push(s.name)).unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(got, vec!["a", "b"]);
    }

    /// Hostile bodies of one shape, `n` bytes or just over.
    fn hostile(shape: &str, n: usize) -> String {
        let mut s = String::with_capacity(n + 64);
        match shape {
            // One series with as many labels as fit.
            "labels" => {
                s.push_str("m{");
                let mut i = 0;
                while s.len() < n {
                    s.push_str(&format!("l{i}=\"\","));
                    i += 1;
                }
                s.push_str("} 1\n");
            }
            // The most labels a series may have, on every line, so the duplicate check
            // runs on every label through the hash set.
            "max_labels" => {
                let mut line = String::from("m{");
                for i in 0..MAX_LABELS {
                    line.push_str(&format!("l{i}=\"v\","));
                }
                line.push_str("} 1\n");
                while s.len() < n {
                    s.push_str(&line);
                }
            }
            "tiny_lines" => {
                while s.len() < n {
                    s.push_str("m 1\n");
                }
            }
            "long_value" => {
                s.push_str("m{a=\"");
                s.push_str(&"x".repeat(n));
                s.push_str("\"} 1\n");
            }
            "escapes" => {
                s.push_str("m{a=\"");
                while s.len() < n {
                    s.push_str("\\\\\\\"\\n\\q");
                }
                s.push_str("\"} 1\n");
            }
            "long_token" => {
                s.push_str("m ");
                s.push_str(&"9".repeat(n));
                s.push_str("x\n");
            }
            "unwanted" => {
                s.push_str("skipped{");
                let mut i = 0;
                while s.len() < n {
                    s.push_str(&format!("l{i}=\"\","));
                    i += 1;
                }
                s.push_str("} 1\nm 1\n");
            }
            _ => unreachable!("{shape}"),
        }
        s
    }

    /// Hostile 16 MiB bodies fail (or pass) with the right error, in time linear in their
    /// size: each shape is timed at 1 MiB and 8 MiB and the figures are printed (run with
    /// `--nocapture`); the assertion on time is only a generous bound against the
    /// quadratic behaviour this replaced (a 1 MB line of labels took 13 s).
    #[test]
    fn hostile_bodies_parse_in_linear_time() {
        let run = |body: &str| {
            let mut samples = 0usize;
            let mut labels = 0usize;
            let t = crate::clock::monotonic_now();
            let r = parse(
                body,
                |n| n == "m",
                |s| {
                    samples += 1;
                    labels += s.labels.len();
                },
            );
            (r, samples, labels, crate::clock::elapsed(t))
        };
        let big = 16 << 20;
        for shape in [
            "labels",
            "max_labels",
            "tiny_lines",
            "long_value",
            "escapes",
            "long_token",
            "unwanted",
        ] {
            let body = hostile(shape, big);
            let (r, samples, labels, took) = run(&body);
            match shape {
                "labels" => {
                    let e = r.unwrap_err();
                    assert_eq!(e.line, 1);
                    assert_eq!(
                        e.message,
                        format!("more than {MAX_LABELS} labels in one series")
                    );
                }
                "max_labels" => {
                    r.unwrap();
                    assert!(samples > 1000, "{samples}");
                    assert_eq!(labels, samples * MAX_LABELS);
                }
                "tiny_lines" => {
                    r.unwrap();
                    assert_eq!(samples, big / 4);
                }
                "long_value" | "escapes" => {
                    r.unwrap();
                    assert_eq!(samples, 1);
                    assert!(labels == 1);
                }
                "long_token" => {
                    let e = r.unwrap_err();
                    assert!(e.message.starts_with("invalid value \"999"), "{e}");
                    assert!(e.message.len() <= MAX_MESSAGE + 3, "{}", e.message.len());
                }
                "unwanted" => {
                    r.unwrap();
                    assert_eq!(samples, 1);
                }
                _ => unreachable!(),
            }
            let (_, _, _, t1) = run(&hostile(shape, 1 << 20));
            let (_, _, _, t8) = run(&hostile(shape, 8 << 20));
            eprintln!(
                "parse {shape:>10}: 1 MiB {:>7.1} ms, 8 MiB {:>7.1} ms (ratio {:.1}), 16 MiB {:>7.1} ms",
                t1.as_secs_f64() * 1e3,
                t8.as_secs_f64() * 1e3,
                t8.as_secs_f64() / t1.as_secs_f64().max(1e-9),
                took.as_secs_f64() * 1e3
            );
            assert!(
                took < std::time::Duration::from_secs(60),
                "{shape}: {took:?}"
            );
        }
        // A duplicate among many labels is still found, by the hash set.
        let mut line = String::from("m{");
        for i in 0..100 {
            line.push_str(&format!("l{i}=\"\","));
        }
        line.push_str("l42=\"again\"} 1\n");
        assert_eq!(err(&line).message, "duplicate label l42");
        // Exactly MAX_LABELS labels pass; one more fails.
        let labels_line = |n: usize| {
            let mut l = String::from("m{");
            for i in 0..n {
                l.push_str(&format!("l{i}=\"\","));
            }
            l + "} 1\n"
        };
        assert_eq!(one(&labels_line(MAX_LABELS)).labels.len(), MAX_LABELS);
        assert!(err(&labels_line(MAX_LABELS + 1))
            .message
            .starts_with("more than"));
    }

    #[test]
    fn character_classes_match_the_grammar() {
        for c in 0..=255u8 {
            let alpha = c.is_ascii_alphabetic() || c == b'_';
            let k = CLASS[c as usize];
            assert_eq!(k & METRIC_START != 0, alpha || c == b':', "{c}");
            assert_eq!(
                k & METRIC_CHAR != 0,
                alpha || c == b':' || c.is_ascii_digit(),
                "{c}"
            );
            assert_eq!(k & LABEL_START != 0, alpha, "{c}");
            assert_eq!(k & LABEL_CHAR != 0, alpha || c.is_ascii_digit(), "{c}");
        }
    }

    proptest! {
        /// The eight-bytes-at-a-time search agrees with a byte loop, from every start.
        #[test]
        fn find_value_special_matches_naive(
            bytes in vec(prop_oneof![
                4 => Just(b'a'),
                1 => Just(b'"'),
                1 => Just(b'\\'),
                1 => Just(b'\n'),
                1 => any::<u8>(),
            ], 0..40)
        ) {
            for start in 0..=bytes.len() {
                let naive = (start..bytes.len())
                    .find(|&i| matches!(bytes[i], b'"' | b'\\' | b'\n'))
                    .unwrap_or(bytes.len());
                prop_assert_eq!(find_value_special(&bytes, start), naive, "start {}", start);
            }
        }
    }

    // ---- Round trip against the real encoder ----

    fn metric_name() -> impl Strategy<Value = String> {
        "[a-zA-Z_:][a-zA-Z0-9_:]{0,24}"
    }

    fn label_name() -> impl Strategy<Value = String> {
        "[a-zA-Z_][a-zA-Z0-9_]{0,12}"
    }

    /// Label values biased towards the characters that break naive parsers, plus
    /// arbitrary unicode.
    fn label_value() -> impl Strategy<Value = String> {
        prop_oneof![
            r#"[,={}"\\\n\r\t #a-z0-9 ]{0,12}"#,
            any::<String>(),
            r#"(\\n|\\\\|\\"|\\|"|\n|[,}{=])*"#,
        ]
    }

    /// Finite values of every shape: zero and -0, subnormal, tiny, huge, negative.
    fn finite_value() -> impl Strategy<Value = f64> {
        prop_oneof![
            prop::num::f64::POSITIVE
                | prop::num::f64::NEGATIVE
                | prop::num::f64::NORMAL
                | prop::num::f64::SUBNORMAL
                | prop::num::f64::ZERO,
            Just(f64::MAX),
            Just(f64::MIN),
            Just(f64::MIN_POSITIVE),
            Just(f64::from_bits(1)),
            (-1e6f64..1e6),
        ]
    }

    fn help() -> impl Strategy<Value = String> {
        // The registry requires a non-empty help; it may contain anything, including
        // newlines and backslashes (the encoder escapes those two on HELP lines).
        any::<String>().prop_map(|s| format!("h{s}"))
    }

    #[derive(Debug, Clone)]
    struct Family {
        counter: bool,
        help: String,
        labels: Vec<String>,
        series: BTreeMap<Vec<String>, f64>,
    }

    fn family() -> impl Strategy<Value = Family> {
        (any::<bool>(), help(), btree_set(label_name(), 0..=4)).prop_flat_map(
            |(counter, help, labels)| {
                let labels: Vec<String> = labels.into_iter().collect();
                let series = btree_map(vec(label_value(), labels.len()), finite_value(), 1..5);
                (Just(counter), Just(help), Just(labels), series).prop_map(
                    |(counter, help, labels, series)| Family {
                        counter,
                        help,
                        labels,
                        series,
                    },
                )
            },
        )
    }

    /// (name, labels sorted by name)
    type Key = (String, Vec<(String, String)>);
    /// Key -> value
    type Expected = BTreeMap<Key, f64>;

    fn key(name: &str, labels: impl IntoIterator<Item = (String, String)>) -> Key {
        let mut labels: Vec<(String, String)> = labels.into_iter().collect();
        labels.sort();
        (name.to_string(), labels)
    }

    fn same_value(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    fn check_round_trip(
        body: &str,
        expected: &Expected,
        timestamps: &BTreeMap<Key, i64>,
    ) -> Result<(), TestCaseError> {
        let mut got: Expected = BTreeMap::new();
        let mut count = 0;
        let res = parse(
            body,
            |_| true,
            |s| {
                count += 1;
                let k = key(
                    s.name,
                    s.labels.iter().map(|(n, v)| (n.to_string(), v.to_string())),
                );
                if let Some(&ts) = timestamps.get(&k) {
                    assert_eq!(s.timestamp_ms, Some(ts), "{k:?}");
                } else {
                    assert_eq!(s.timestamp_ms, None, "{k:?}");
                }
                got.insert(k, s.value);
            },
        );
        prop_assert!(res.is_ok(), "{:?}\n{}", res, body);
        prop_assert_eq!(count, expected.len(), "{}", body);
        prop_assert_eq!(got.len(), expected.len());
        for ((k, want), (k2, have)) in expected.iter().zip(got.iter()) {
            prop_assert_eq!(k, k2);
            prop_assert!(
                same_value(*want, *have),
                "{:?}: want {:?} ({:#x}) got {:?} ({:#x})\n{}",
                k,
                want,
                want.to_bits(),
                have,
                have.to_bits(),
                body
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Families registered as GaugeVec/CounterVec in a real Registry, encoded with
        /// TextEncoder, come back sample for sample: same name, labels and value bits.
        #[test]
        fn round_trip_through_registry_and_text_encoder(
            families in btree_map(metric_name(), family(), 1..6)
        ) {
            use prometheus::{CounterVec, Encoder, GaugeVec, Opts, Registry, TextEncoder};

            let registry = Registry::new();
            let mut expected = Expected::new();
            for (name, fam) in &families {
                let label_refs: Vec<&str> = fam.labels.iter().map(String::as_str).collect();
                let opts = Opts::new(name.clone(), fam.help.clone());
                if fam.counter {
                    let c = CounterVec::new(opts, &label_refs).unwrap();
                    registry.register(Box::new(c.clone())).unwrap();
                    for (values, v) in &fam.series {
                        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                        // Counters only go up: 0 + |v| == |v| exactly.
                        c.with_label_values(&refs).inc_by(v.abs());
                        expected.insert(
                            key(name, fam.labels.iter().cloned().zip(values.iter().cloned())),
                            v.abs(),
                        );
                    }
                } else {
                    let g = GaugeVec::new(opts, &label_refs).unwrap();
                    registry.register(Box::new(g.clone())).unwrap();
                    for (values, v) in &fam.series {
                        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                        g.with_label_values(&refs).set(*v);
                        expected.insert(
                            key(name, fam.labels.iter().cloned().zip(values.iter().cloned())),
                            *v,
                        );
                    }
                }
            }
            let mut body = Vec::new();
            TextEncoder::new().encode(&registry.gather(), &mut body).unwrap();
            let body = String::from_utf8(body).unwrap();
            check_round_trip(&body, &expected, &BTreeMap::new())?;

            // Filtering to one family returns exactly that family's samples.
            let first = families.keys().next().unwrap();
            let mut n = 0;
            parse(&body, |m| m == first, |s| { assert_eq!(s.name, first); n += 1; }).unwrap();
            prop_assert_eq!(n, families[first].series.len());
        }

        /// MetricFamily built directly, to cover what a Registry does not produce:
        /// timestamps, NaN and infinities (written by the Rust encoder as `NaN`, `inf`,
        /// `-inf`), and label order other than sorted.
        #[test]
        fn round_trip_direct_metric_families(
            families in btree_map(
                metric_name(),
                (any::<bool>(), vec(label_name(), 0..=4), btree_map(
                    vec(label_value(), 4),
                    (prop_oneof![finite_value(), prop::num::f64::ANY], any::<i64>()),
                    1..4,
                )),
                1..4,
            )
        ) {
            use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
            use prometheus::TextEncoder;

            let mut mfs = Vec::new();
            let mut expected = Expected::new();
            let mut timestamps = BTreeMap::new();
            for (name, (counter, label_names, series)) in &families {
                let mut names = label_names.clone();
                names.sort();
                names.dedup();
                names.reverse(); // written in non-sorted order
                let mut metrics = Vec::new();
                for (values, (v, ts)) in series {
                    let pairs: Vec<(String, String)> =
                        names.iter().cloned().zip(values.iter().cloned()).collect();
                    let k = key(name, pairs.clone());
                    if expected.contains_key(&k) {
                        continue;
                    }
                    let mut m = Metric::default();
                    m.set_label(
                        pairs
                            .iter()
                            .map(|(n, v)| {
                                let mut lp = LabelPair::default();
                                lp.set_name(n.clone());
                                lp.set_value(v.clone());
                                lp
                            })
                            .collect(),
                    );
                    if *counter {
                        let mut c = Counter::default();
                        c.set_value(*v);
                        m.set_counter(c);
                    } else {
                        let mut g = Gauge::default();
                        g.set_value(*v);
                        m.set_gauge(g);
                    }
                    // The encoder omits a zero timestamp.
                    m.set_timestamp_ms(*ts);
                    if *ts != 0 {
                        timestamps.insert(k.clone(), *ts);
                    }
                    expected.insert(k, *v);
                    metrics.push(m);
                }
                let mut mf = MetricFamily::default();
                mf.set_name(name.clone());
                mf.set_help("help".to_string());
                mf.set_field_type(if *counter { MetricType::COUNTER } else { MetricType::GAUGE });
                mf.set_metric(metrics);
                mfs.push(mf);
            }
            let body = TextEncoder::new().encode_to_string(&mfs).unwrap();
            check_round_trip(&body, &expected, &timestamps)?;

            // Labels also come back in the order written.
            let mut written = Vec::new();
            for mf in &mfs {
                for m in mf.get_metric() {
                    written.push(m.get_label().iter().map(|lp| lp.name().to_string()).collect::<Vec<_>>());
                }
            }
            let mut read = Vec::new();
            parse(&body, |_| true, |s| read.push(s.labels.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>())).unwrap();
            prop_assert_eq!(read, written);
        }
    }

    // ---- Robustness: never panic ----

    /// Invariants that hold for any input: no panic, samples only for wanted names,
    /// and skipping is never stricter than parsing.
    fn check_any_input(text: &str) -> Result<(), TestCaseError> {
        let mut everything = Vec::new();
        let all_res = parse(text, |_| true, |s| everything.push(s));
        for s in &everything {
            prop_assert!(!s.name.is_empty());
            for (i, (n, _)) in s.labels.iter().enumerate() {
                prop_assert!(!n.is_empty());
                prop_assert!(s.labels[..i].iter().all(|(m, _)| m != n));
            }
        }

        let wanted = |n: &str| n.as_bytes().first().is_some_and(|&c| c < b'm');
        let mut some = Vec::new();
        let some_res = parse(text, wanted, |s| some.push(s));
        prop_assert!(some.iter().all(|s| wanted(s.name)));

        let none_res = parse(text, |_| false, |_| panic!("nothing is wanted"));
        if all_res.is_ok() {
            prop_assert!(some_res.is_ok());
            prop_assert!(none_res.is_ok());
            let filtered: Vec<_> = everything.iter().filter(|s| wanted(s.name)).collect();
            prop_assert_eq!(filtered.len(), some.len());
            for (a, b) in filtered.iter().zip(&some) {
                prop_assert_eq!(a.name, b.name);
                prop_assert_eq!(&a.labels, &b.labels);
                prop_assert!(same_value(a.value, b.value));
                prop_assert_eq!(a.timestamp_ms, b.timestamp_ms);
            }
        }
        if some_res.is_ok() {
            prop_assert!(none_res.is_ok());
        }
        if let (Err(a), Err(b)) = (&all_res, &some_res) {
            prop_assert!(a.line <= b.line);
        }
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Insert(usize, char),
        Delete(usize),
        Truncate(usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let interesting = prop_oneof![
            prop::sample::select(vec![
                '{', '}', '"', '\\', ',', '=', ' ', '\t', '\n', '\r', '#', 'e', '.', '-', '+', '0',
                'x', 'é', '🚀'
            ]),
            any::<char>(),
        ];
        prop_oneof![
            (any::<usize>(), interesting).prop_map(|(i, c)| Mutation::Insert(i, c)),
            any::<usize>().prop_map(Mutation::Delete),
            any::<usize>().prop_map(Mutation::Truncate),
        ]
    }

    /// The char boundary at or before `i % (len + 1)`.
    fn boundary(s: &str, i: usize) -> usize {
        let mut i = i % (s.len() + 1);
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        i
    }

    fn apply(mut s: String, mutations: &[Mutation]) -> String {
        for m in mutations {
            match *m {
                Mutation::Insert(i, c) => {
                    let i = boundary(&s, i);
                    s.insert(i, c);
                }
                Mutation::Delete(i) => {
                    if !s.is_empty() {
                        let i = boundary(&s, i % s.len());
                        s.remove(i);
                    }
                }
                Mutation::Truncate(i) => {
                    let i = boundary(&s, i);
                    s.truncate(i);
                }
            }
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_strings_never_panic(text in any::<String>()) {
            check_any_input(&text)?;
        }

        #[test]
        fn exposition_like_strings_never_panic(
            text in r#"([a-z_:{}=",\\ \t\n\r#0-9.eEnNaIf+-]|\\n|\\"|inf|NaN|\{a="|"\}| 1\n){0,60}"#
        ) {
            check_any_input(&text)?;
        }

        #[test]
        fn mutated_expositions_never_panic(
            mutations in vec(mutation(), 1..8),
            start in any::<usize>(),
        ) {
            // Start from a random line so that truncations and edits hit every part.
            let lines: Vec<&str> = AGENT_BODY.split_inclusive('\n').collect();
            let base: String = lines[start % lines.len()..].concat();
            let text = apply(base, &mutations);
            check_any_input(&text)?;
        }
    }
}
