//! Route matching: which configured route serves a request, from its host,
//! path and method.
//!
//! [`Router::compile`] turns the routes of one config revision into lookup
//! tables once, off the hot path; [`Router::route`] then answers each request
//! without allocating, except to list the allowed methods of a 405 (and the
//! regex crate's per-thread match caches, made once and reused). The
//! router owns only that choice. Path canonicalisation happens before it
//! (paths are compared byte for byte, case-sensitively, as given), and the
//! proxy applies the chosen route: its policy, its upstream, its
//! `strip_prefix` (through [`RouteMatch::strip_len`]).
//!
//! # Precedence
//!
//! 1. **Host tier.** The request host is normalised: `:port` removed, one
//!    trailing `.` removed, ASCII lower-cased. Tiers are tried in this
//!    order: the routes that list that host exactly; then the routes of each
//!    `*.` wildcard that covers it, longest suffix first (`*.api.example.com`
//!    before `*.example.com`; a wildcard covers any depth, `a.b.example.com`,
//!    but not the bare `example.com`); last the routes without hosts. The
//!    first tier in which any route's path matches is the only tier used,
//!    whatever the method: a host-specific route that claims a path owns it.
//!    A bracketed IPv6 literal or an over-long host can name no route host,
//!    so it reaches only the routes without hosts.
//! 2. **Path, within that tier.** Exact paths, then prefixes, longest first,
//!    then regexes in order of route name, then path index. Among rules of
//!    the same path and kind, route name decides, then path index. A prefix
//!    matches at a segment boundary: `/api` matches `/api`, `/api/` and
//!    `/api/x` but not `/apix`; a prefix ending in `/` matches what lies
//!    under it (`/api/` matches `/api/x` and `/api/` but not `/api`). A regex
//!    is searched in the whole path exactly as written: the route author
//!    anchors it or not.
//! 3. **Method.** The path candidates of the tier are walked in that order
//!    and the first whose route allows the method (no methods = any) wins.
//!    If none allows it the answer is 405 with the union of their methods.
//!    It never falls through to a lower host tier: that would hand a method
//!    the host-specific route refuses to a catch-all with another policy.
//!
//! Route names are unique (the tie-break relies on it), so the outcome does
//! not depend on the order of the routes given to [`Router::compile`].

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_model::object::Route;
use gatehouse_model::validate::MAX_REGEX_BYTES;
use regex::{Regex, RegexBuilder};

/// The longest DNS name; a longer host cannot equal any route host.
const MAX_HOST: usize = 253;

/// Why a set of routes could not be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("route \"{route}\": paths[{path_index}].regex: invalid regex: {message}")]
    Regex {
        route: String,
        path_index: usize,
        message: String,
    },
    #[error("route \"{route}\": paths[{path_index}]: needs exactly one of exact, prefix or regex")]
    Path { route: String, path_index: usize },
    #[error("route \"{route}\" is given twice")]
    DuplicateName { route: String },
}

/// The route chosen for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// Index of the route in the slice given to [`Router::compile`].
    pub route: usize,
    /// Index of the matching rule in that route's `paths`.
    pub path_index: usize,
    /// How many leading bytes of the path `strip_prefix` removes: the
    /// matched prefix without a trailing `/`, so that what remains starts
    /// with `/` or is empty. 0 for exact and regex rules and for prefix `/`.
    pub strip_len: usize,
}

impl RouteMatch {
    /// The path to forward when the route strips its prefix: `/api/x`
    /// under prefix `/api` or `/api/` gives `/x`, and `/api` gives `/`.
    pub fn stripped<'p>(&self, path: &'p str) -> &'p str {
        match path.get(self.strip_len..) {
            Some("") => "/",
            Some(rest) => rest,
            None => path,
        }
    }
}

/// The answer for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match<'r> {
    Found(RouteMatch),
    /// No route covers this host and path: 404.
    NotFound,
    /// Routes cover the path but none allows the method: 405. `allowed` is
    /// sorted and without repeats, ready for the `Allow` header.
    MethodNotAllowed {
        allowed: Vec<&'r str>,
    },
}

/// The routes of one config revision, compiled for lookup.
#[derive(Debug)]
pub struct Router {
    /// Methods of each input route, by input index; empty allows any.
    methods: Vec<Vec<String>>,
    exact_hosts: HashMap<Box<str>, Tier>,
    /// Keyed by what follows `*.`.
    wildcard_hosts: HashMap<Box<str>, Tier>,
    any_host: Tier,
}

/// The path rules of the routes that share one host pattern. Every list is
/// kept in (route name, path index) order, which is the tie-break.
#[derive(Debug, Default)]
struct Tier {
    exact: HashMap<Box<str>, Vec<Candidate>>,
    prefix: HashMap<Box<str>, Vec<Candidate>>,
    /// The distinct lengths of `prefix` keys, longest first: a path is
    /// probed only at those lengths, so a deep path costs no more lookups
    /// than there are prefix lengths.
    prefix_lens: Vec<usize>,
    regex: Vec<(Arc<Regex>, Candidate)>,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    route: usize,
    path_index: usize,
}

enum Rule<'a> {
    Exact(&'a str),
    Prefix(&'a str),
    Regex(Arc<Regex>),
}

impl Tier {
    fn add(&mut self, rule: &Rule<'_>, c: Candidate) {
        match rule {
            Rule::Exact(p) => self.exact.entry((*p).into()).or_default().push(c),
            Rule::Prefix(p) => self.prefix.entry((*p).into()).or_default().push(c),
            Rule::Regex(re) => self.regex.push((Arc::clone(re), c)),
        }
    }

    fn finish(&mut self) {
        self.prefix_lens = self.prefix.keys().map(|k| k.len()).collect();
        self.prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        self.prefix_lens.dedup();
    }

    /// Every rule of this tier that matches `path`, in precedence order, with
    /// the strip length each implies. Lazy, so the regexes run only when no
    /// earlier candidate has been taken.
    fn candidates<'a>(&'a self, path: &'a str) -> impl Iterator<Item = (Candidate, usize)> + 'a {
        let exact = self.exact.get(path).into_iter().flatten().map(|c| (*c, 0));
        let prefix = self
            .prefix_lens
            .iter()
            .filter_map(move |&len| {
                let p = prefix_at(path, len)?;
                let strip = p.strip_suffix('/').unwrap_or(p).len();
                Some((self.prefix.get(p)?, strip))
            })
            .flat_map(|(cs, strip)| cs.iter().map(move |c| (*c, strip)));
        let regex = self
            .regex
            .iter()
            .filter(move |(re, _)| re.is_match(path))
            .map(|(_, c)| (*c, 0));
        exact.chain(prefix).chain(regex)
    }
}

/// The first `len` bytes of `path`, if a prefix rule of that length would
/// match it: at the end of the path, or at a segment boundary.
fn prefix_at(path: &str, len: usize) -> Option<&str> {
    let b = path.as_bytes();
    let boundary =
        len == b.len() || b.get(len) == Some(&b'/') || (len > 0 && b.get(len - 1) == Some(&b'/'));
    if len > b.len() || !boundary {
        return None;
    }
    path.get(..len)
}

/// The request host as route hosts are written, in `buf`; `None` when it
/// cannot equal any route host.
fn host_key<'b>(host: &str, buf: &'b mut [u8; MAX_HOST]) -> Option<&'b str> {
    // A bracketed IPv6 literal holds colons of its own, and no route host is one.
    if host.starts_with('[') {
        return None;
    }
    let name = host.split_once(':').map_or(host, |(name, _port)| name);
    // `example.com.` is the fully qualified spelling of `example.com`: the
    // same site, so the same routes.
    let name = name.strip_suffix('.').unwrap_or(name);
    let out = buf.get_mut(..name.len())?;
    for (o, b) in out.iter_mut().zip(name.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

impl Router {
    /// Compiles `routes`; a [`RouteMatch`] names a route by its index here.
    pub fn compile(routes: &[Route]) -> Result<Router, RouterError> {
        // Insertion in name order makes every tier list sorted by the tie-break.
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by(|&a, &b| routes[a].name.cmp(&routes[b].name));
        if let Some(w) = order
            .windows(2)
            .find(|w| routes[w[0]].name == routes[w[1]].name)
        {
            return Err(RouterError::DuplicateName {
                route: routes[w[0]].name.clone(),
            });
        }

        let mut router = Router {
            methods: routes.iter().map(|r| r.methods.clone()).collect(),
            exact_hosts: HashMap::new(),
            wildcard_hosts: HashMap::new(),
            any_host: Tier::default(),
        };
        for route in order {
            let r = &routes[route];
            for (path_index, p) in r.paths.iter().enumerate() {
                let rule = match (&p.exact, &p.prefix, &p.regex) {
                    (Some(e), None, None) => Rule::Exact(e),
                    (None, Some(pre), None) => Rule::Prefix(pre),
                    (None, None, Some(re)) => Rule::Regex(Arc::new(
                        RegexBuilder::new(re)
                            .size_limit(MAX_REGEX_BYTES)
                            .dfa_size_limit(MAX_REGEX_BYTES)
                            .build()
                            .map_err(|e| RouterError::Regex {
                                route: r.name.clone(),
                                path_index,
                                message: e
                                    .to_string()
                                    .split_whitespace()
                                    .collect::<Vec<_>>()
                                    .join(" "),
                            })?,
                    )),
                    _ => {
                        return Err(RouterError::Path {
                            route: r.name.clone(),
                            path_index,
                        })
                    }
                };
                let c = Candidate { route, path_index };
                if r.hosts.is_empty() {
                    router.any_host.add(&rule, c);
                }
                for h in &r.hosts {
                    // Validation already demands lower case; lowering again
                    // keeps the request side's lower-casing sufficient.
                    let h = h.to_ascii_lowercase();
                    let tier = match h.strip_prefix("*.") {
                        Some(suffix) => router.wildcard_hosts.entry(suffix.into()).or_default(),
                        None => router.exact_hosts.entry(h.into()).or_default(),
                    };
                    tier.add(&rule, c);
                }
            }
        }
        router
            .exact_hosts
            .values_mut()
            .chain(router.wildcard_hosts.values_mut())
            .chain(std::iter::once(&mut router.any_host))
            .for_each(Tier::finish);
        Ok(router)
    }

    /// Chooses the route for a request. `host` is the request's host,
    /// with or without `:port`, in any case; `path` the path without the
    /// query, already canonical; `method` as sent (methods are case-sensitive).
    pub fn route(&self, host: &str, path: &str, method: &str) -> Match<'_> {
        let mut buf = [0u8; MAX_HOST];
        if let Some(host) = host_key(host, &mut buf) {
            if let Some(m) = self
                .exact_hosts
                .get(host)
                .and_then(|t| self.in_tier(t, path, method))
            {
                return m;
            }
            if !self.wildcard_hosts.is_empty() {
                // Left to right over the dots is longest suffix first; a dot
                // at 0 would let `.example.com` pass for a name under it.
                for (dot, _) in host.match_indices('.').filter(|(i, _)| *i > 0) {
                    let suffix = host.get(dot + 1..).unwrap_or_default();
                    if let Some(m) = self
                        .wildcard_hosts
                        .get(suffix)
                        .and_then(|t| self.in_tier(t, path, method))
                    {
                        return m;
                    }
                }
            }
        }
        self.in_tier(&self.any_host, path, method)
            .unwrap_or(Match::NotFound)
    }

    /// The answer from one tier, or `None` when no rule in it matches the path.
    fn in_tier<'r>(&'r self, tier: &'r Tier, path: &str, method: &str) -> Option<Match<'r>> {
        let mut any = false;
        for (c, strip_len) in tier.candidates(path) {
            any = true;
            if self.allows(c, method) {
                return Some(Match::Found(RouteMatch {
                    route: c.route,
                    path_index: c.path_index,
                    strip_len,
                }));
            }
        }
        if !any {
            return None;
        }
        // The rare path: walk the candidates again rather than collect them
        // on every lookup that falls back.
        let mut allowed: Vec<&'r str> = tier
            .candidates(path)
            .flat_map(|(c, _)| self.methods.get(c.route).into_iter().flatten())
            .map(String::as_str)
            .collect();
        allowed.sort_unstable();
        allowed.dedup();
        Some(Match::MethodNotAllowed { allowed })
    }

    fn allows(&self, c: Candidate, method: &str) -> bool {
        self.methods
            .get(c.route)
            .is_some_and(|ms| ms.is_empty() || ms.iter().any(|m| m == method))
    }
}

#[cfg(test)]
mod tests;
