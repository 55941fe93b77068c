//! SQL injection and XSS pattern rules: a fixed, conservative set of
//! regular expressions, compiled once per process into `RegexSet`s (one scan
//! of an input answers for every pattern), matched against the path, the
//! query, chosen headers and the first bytes of textual bodies after
//! percent-decoding.
//!
//! The patterns aim at the shapes attacks need and ordinary text rarely has
//! (a quote followed by a boolean tautology, `UNION SELECT`, a `<script` tag,
//! an event-handler attribute inside a tag), not at every SQL keyword: a
//! search for "select from the menu" or "union station" passes. Their
//! false-positive trade-offs are listed in `docs/security.md`; a policy can
//! run them in `detect` mode (log and count, never refuse) to see what they
//! would refuse before turning `block` on.

use std::borrow::Cow;
use std::sync::LazyLock;

use gatehouse_model::object::RuleMode;
use regex::{RegexSet, RegexSetBuilder};

/// SQL injection: each pattern is a shape an injection needs.
pub const SQL_INJECTION: &[&str] = &[
    // UNION-based extraction: `UNION SELECT`, `UNION ALL SELECT`, with
    // comments or parentheses for spaces.
    r"(?i)\bunion(?:\s|/\*.*?\*/|\()+(?:all(?:\s|/\*.*?\*/|\()+|distinct(?:\s|/\*.*?\*/|\()+)?select\b",
    // A quote closed, then a boolean tautology or comparison:
    // `' or '1'='1`, `" OR 1=1`, `') and 1=1`.
    r#"(?i)['"`]\s*\)*\s*(?:(?:or|and|xor)\b|\|\||&&)\s*\(*\s*['"`]?[\w.]+['"`]?\s*(?:=|<>|!=|<=|>=|<|>|\blike\b|\bis\b|\bin\b|\bbetween\b)"#,
    // A quote closed, then a stacked statement.
    r#"(?i)['"`]\s*\)*\s*;\s*(?:drop|delete|insert|update|alter|create|truncate|exec|execute|declare|shutdown|grant)\b"#,
    // A quote closed, then a comment that cuts the rest of the query off: `admin'--`, `1'#`.
    r"'\s*\)*\s*(?:--|#|/\*)",
    // Time-based blind injection.
    r"(?i)\b(?:sleep|pg_sleep|benchmark)\s*\(\s*\d",
    r"(?i)\bwaitfor\s+(?:delay|time)\s+'",
    // Catalog tables an attacker enumerates.
    r"(?i)\b(?:information_schema|pg_catalog|sqlite_master|sysobjects|syscolumns|mysql\.user)\b",
    // File and command access through the database.
    r"(?i)\b(?:load_file\s*\(|into\s+(?:out|dump)file\b|xp_cmdshell\b|utl_http\.)",
    // Error-based extraction.
    r"(?i)\b(?:extractvalue|updatexml)\s*\(",
    // Column counting: `ORDER BY 5--`.
    r"(?i)\border\s+by\s+\d+\s*(?:--|#|/\*)",
];

/// Cross-site scripting: markup and URLs that run script.
pub const XSS: &[&str] = &[
    // A script element.
    r"(?i)<\s*/?\s*script\b",
    // An event-handler attribute inside a tag: `<img src=x onerror=...>`.
    r"(?i)<[a-z!/][^>]*?[\s/]on[a-z]{3,30}\s*=",
    // Elements that load or run active content.
    r"(?i)<\s*(?:iframe|frame|object|embed|applet|svg|math|base|meta|link|style|form|isindex)\b",
    // A script URL where a URL value starts: `href=javascript:`, `?next=javascript:`.
    r#"(?i)(?:^|[=("'`]\s*)(?:javascript|vbscript|livescript)\s*:"#,
    // An HTML document as a data URL.
    r"(?i)\bdata\s*:\s*text/html\b",
    // Attributes and CSS that run script.
    r"(?i)\bsrcdoc\s*=",
    r"(?i)\bexpression\s*\(",
];

/// Each set holds SQL-injection patterns first, then XSS ones.
fn build(patterns: &[&str]) -> RegexSet {
    RegexSetBuilder::new(patterns)
        .size_limit(4 << 20)
        .dfa_size_limit(4 << 20)
        .build()
        // A unit test compiles every set: a failure here is a build bug.
        .expect("the built-in injection patterns compile")
}

static SQLI_SET: LazyLock<RegexSet> = LazyLock::new(|| build(SQL_INJECTION));
static XSS_SET: LazyLock<RegexSet> = LazyLock::new(|| build(XSS));
static BOTH_SET: LazyLock<RegexSet> = LazyLock::new(|| {
    let all: Vec<&str> = SQL_INJECTION.iter().chain(XSS).copied().collect();
    build(&all)
});

/// Which rule set matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    SqlInjection,
    Xss,
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::SqlInjection => "sql_injection",
            Family::Xss => "xss",
        }
    }
}

/// A match: which rule set, which pattern (its index in its list) and the
/// mode the policy runs that set in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    pub family: Family,
    pub pattern: usize,
    pub mode: RuleMode,
}

/// A policy's injection rules, compiled: the shared set that covers the
/// modes it turned on.
#[derive(Debug, Default)]
pub struct Inspector {
    set: Option<&'static RegexSet>,
    /// How many SQL-injection patterns the set starts with (0 when none).
    sqli_len: usize,
    sqli: RuleMode,
    xss: RuleMode,
}

impl Inspector {
    pub fn new(sqli: RuleMode, xss: RuleMode) -> Inspector {
        let (set, sqli_len): (Option<&'static RegexSet>, usize) =
            match (sqli != RuleMode::Off, xss != RuleMode::Off) {
                (false, false) => (None, 0),
                (true, false) => (Some(&SQLI_SET), SQL_INJECTION.len()),
                (false, true) => (Some(&XSS_SET), 0),
                (true, true) => (Some(&BOTH_SET), SQL_INJECTION.len()),
            };
        Inspector {
            set,
            sqli_len,
            sqli,
            xss,
        }
    }

    /// Whether any rule set is on.
    pub fn is_on(&self) -> bool {
        self.set.is_some()
    }

    /// The first pattern `text` matches, and the mode of its rule set;
    /// a blocking set's match wins over a detecting one's.
    pub fn scan(&self, text: &str) -> Option<Finding> {
        let set = self.set?;
        if text.is_empty() || !set.is_match(text) {
            return None;
        }
        let mut found: Option<Finding> = None;
        for i in set.matches(text).iter() {
            let finding = if i < self.sqli_len {
                Finding {
                    family: Family::SqlInjection,
                    pattern: i,
                    mode: self.sqli,
                }
            } else {
                Finding {
                    family: Family::Xss,
                    pattern: i - self.sqli_len,
                    mode: self.xss,
                }
            };
            if finding.mode == RuleMode::Block {
                return Some(finding);
            }
            found.get_or_insert(finding);
        }
        found
    }
}

/// Percent-decodes `input` for matching (`+` as a space when
/// `plus_as_space`, as in queries and forms), twice when the first round
/// leaves escapes (`%2527` is `%27` is `'`). Bytes that are not UTF-8 become
/// U+FFFD. Input without `%` or `+` is borrowed as it is.
pub fn decode(input: &str, plus_as_space: bool) -> Cow<'_, str> {
    let needs = |s: &str| s.contains('%') || (plus_as_space && s.contains('+'));
    if !needs(input) {
        return Cow::Borrowed(input);
    }
    let once = decode_round(input, plus_as_space);
    if once.contains('%') {
        Cow::Owned(decode_round(&once, false))
    } else {
        Cow::Owned(once)
    }
}

fn decode_round(input: &str, plus_as_space: bool) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' if plus_as_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: Option<&u8>) -> Option<u8> {
    match *b? {
        c @ b'0'..=b'9' => Some(c - b'0'),
        c @ b'a'..=b'f' => Some(c - b'a' + 10),
        c @ b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> Inspector {
        Inspector::new(RuleMode::Block, RuleMode::Block)
    }

    fn hit(text: &str) -> Option<Family> {
        both().scan(&decode(text, true)).map(|f| f.family)
    }

    #[test]
    fn every_set_compiles() {
        assert_eq!(SQLI_SET.len(), SQL_INJECTION.len());
        assert_eq!(XSS_SET.len(), XSS.len());
        assert_eq!(BOTH_SET.len(), SQL_INJECTION.len() + XSS.len());
    }

    #[test]
    fn classic_sql_injections_match() {
        for attack in [
            "id=1' OR '1'='1",
            "id=1%27%20or%201%3D1--",
            "user=admin'--",
            "q=x' and 1=1",
            "id=1 UNION SELECT username, password FROM users",
            "id=1/**/union/**/all/**/select/**/1,2",
            "id=-1 union(select(1))",
            "id=1'; DROP TABLE users",
            "id=1) or sleep(5)#",
            "id=1 and sleep(5)",
            "x=1; waitfor delay '0:0:5'",
            "t=select * from information_schema.tables",
            "id=1 and extractvalue(1,concat(0x7e,version()))",
            "id=1 order by 5--",
            "id=1%2527%2520or%25201%253D1", // double-encoded
            "f=load_file('/etc/passwd')",
        ] {
            assert_eq!(hit(attack), Some(Family::SqlInjection), "{attack}");
        }
    }

    #[test]
    fn classic_xss_matches() {
        for attack in [
            "q=<script>alert(1)</script>",
            "q=%3Cscript%3Ealert(1)%3C%2Fscript%3E",
            "q=<img src=x onerror=alert(1)>",
            "q=<svg/onload=alert(1)>",
            "q=<iframe src=//evil>",
            "next=javascript:alert(1)",
            "next=%6Aavascript%3Aalert(1)",
            "u=data:text/html;base64,PHNjcmlwdD4=",
            "q=<body onload=alert(1)>",
            "q=%253Cscript%253E", // double-encoded
        ] {
            assert_eq!(hit(attack), Some(Family::Xss), "{attack}");
        }
    }

    #[test]
    fn ordinary_text_passes() {
        for benign in [
            "q=select from the menu",
            "q=union station to downtown",
            "q=O'Reilly books",
            "q=rock 'n' roll",
            "name=D'Angelo&city=L'Aquila",
            "q=1 < 2 and 3 > 2",
            "q=a+b=c",
            "q=how to sleep better",
            "q=order by price",
            "q=javascript tutorial",
            "q=learn javascript: the good parts",
            "email=someone@example.com&tags=c%2B%2B,rust",
            "q=the drop-down menu",
            "path=/api/v1/users/42",
            "q=50% off",
            "q=it's 5 o'clock",
            "q='orange' = fruit",
            "q=\"andromeda\" > galaxy",
        ] {
            assert_eq!(hit(benign), None, "{benign}");
        }
    }

    #[test]
    fn a_blocking_set_wins_over_a_detecting_one_and_off_sets_are_skipped() {
        let i = Inspector::new(RuleMode::Detect, RuleMode::Block);
        let f = i.scan("' or 1=1 <script>").unwrap();
        assert_eq!((f.family, f.mode), (Family::Xss, RuleMode::Block));
        let i = Inspector::new(RuleMode::Off, RuleMode::Detect);
        assert_eq!(i.scan("' or 1=1"), None);
        assert_eq!(i.scan("<script>").unwrap().mode, RuleMode::Detect);
        assert!(!Inspector::new(RuleMode::Off, RuleMode::Off).is_on());
    }

    #[test]
    fn decoding() {
        assert!(matches!(decode("plain", true), Cow::Borrowed("plain")));
        assert_eq!(decode("a+b%20c", true), "a b c");
        assert_eq!(decode("a+b", false), "a+b");
        assert_eq!(decode("%2527", true), "'");
        assert_eq!(decode("100%", true), "100%");
        assert_eq!(decode("%zz%4", true), "%zz%4");
        assert_eq!(decode("%ff", true), "\u{fffd}");
    }
}
