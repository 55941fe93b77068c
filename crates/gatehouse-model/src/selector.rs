//! Label selectors for list requests: `team=payments,tier!=dev,owner`.

use crate::object::Labels;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
}

/// A conjunction of label terms; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Term>);

/// A selector that cannot be parsed; names the bad term.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("label selector term {term:?}: {reason}")]
pub struct InvalidSelector {
    pub term: String,
    pub reason: &'static str,
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, InvalidSelector> {
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = |reason| InvalidSelector {
                term: raw.to_string(),
                reason,
            };
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = raw.split_once('=') {
                Term::Equals(
                    k.trim().to_string(),
                    v.trim_start_matches('=').trim().to_string(),
                )
            } else {
                Term::Exists(raw.to_string())
            };
            let key = match &term {
                Term::Equals(k, _) | Term::NotEquals(k, _) | Term::Exists(k) => k,
            };
            if key.is_empty() {
                return Err(bad("has no label key"));
            }
            if key.contains(|c: char| c.is_whitespace() || c == '=' || c == '!') {
                return Err(bad("has an invalid label key"));
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn terms_combine_as_and() {
        let s = Selector::parse("team=pay, tier!=dev,owner").unwrap();
        assert!(s.matches(&labels(&[
            ("team", "pay"),
            ("tier", "prod"),
            ("owner", "x")
        ])));
        assert!(!s.matches(&labels(&[("team", "pay"), ("tier", "dev"), ("owner", "x")])));
        assert!(!s.matches(&labels(&[("team", "pay"), ("tier", "prod")])));
        assert!(Selector::parse("").unwrap().matches(&Labels::new()));
    }

    #[test]
    fn bad_terms_are_named() {
        let e = Selector::parse("team=pay,=x").unwrap_err();
        assert_eq!(e.term, "=x");
    }
}
