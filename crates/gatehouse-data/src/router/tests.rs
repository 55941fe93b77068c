use super::*;
use gatehouse_model::object::PathMatch;
use proptest::prelude::*;

fn exact(p: &str) -> PathMatch {
    PathMatch {
        exact: Some(p.into()),
        ..PathMatch::default()
    }
}

fn prefix(p: &str) -> PathMatch {
    PathMatch {
        prefix: Some(p.into()),
        ..PathMatch::default()
    }
}

fn regex(p: &str) -> PathMatch {
    PathMatch {
        regex: Some(p.into()),
        ..PathMatch::default()
    }
}

fn route(name: &str, hosts: &[&str], paths: &[PathMatch], methods: &[&str]) -> Route {
    Route {
        name: name.into(),
        labels: Default::default(),
        revision: 0,
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        paths: paths.to_vec(),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        upstream: "backend".into(),
        strip_prefix: false,
        raw_path: false,
        policy: None,
    }
}

/// The routes compiled, and a lookup that answers with the chosen route's name.
struct Fixture {
    routes: Vec<Route>,
    router: Router,
}

impl Fixture {
    fn new(routes: Vec<Route>) -> Self {
        let router = Router::compile(&routes).unwrap();
        Fixture { routes, router }
    }

    /// The name of the route chosen, `"404"`, or `"405 GET,POST"`.
    fn name(&self, host: &str, path: &str, method: &str) -> String {
        match self.router.route(host, path, method) {
            Match::Found(m) => self.routes[m.route].name.clone(),
            Match::NotFound => "404".into(),
            Match::MethodNotAllowed { allowed } => format!("405 {}", allowed.join(",")),
        }
    }

    fn found(&self, host: &str, path: &str, method: &str) -> RouteMatch {
        match self.router.route(host, path, method) {
            Match::Found(m) => m,
            other => panic!("{host} {method} {path}: {other:?}"),
        }
    }
}

#[test]
fn exact_host_beats_wildcard_and_wildcard_beats_any_host() {
    let f = Fixture::new(vec![
        route("any", &[], &[prefix("/")], &[]),
        route("wild", &["*.example.com"], &[prefix("/")], &[]),
        route("exact", &["api.example.com"], &[prefix("/")], &[]),
    ]);
    assert_eq!(f.name("api.example.com", "/x", "GET"), "exact");
    assert_eq!(f.name("web.example.com", "/x", "GET"), "wild");
    assert_eq!(f.name("example.org", "/x", "GET"), "any");
}

#[test]
fn host_tier_beats_path_specificity() {
    // The host-specific route wins with a mere regex over an exact path
    // of a less specific host.
    let f = Fixture::new(vec![
        route("any-exact", &[], &[exact("/users")], &[]),
        route("wild-exact", &["*.example.com"], &[exact("/users")], &[]),
        route("host-regex", &["api.example.com"], &[regex("^/us")], &[]),
    ]);
    assert_eq!(f.name("api.example.com", "/users", "GET"), "host-regex");
    assert_eq!(f.name("www.example.com", "/users", "GET"), "wild-exact");
}

#[test]
fn a_tier_without_a_matching_path_falls_through_to_the_next() {
    let f = Fixture::new(vec![
        route("exact", &["api.example.com"], &[prefix("/v1")], &[]),
        route("wild", &["*.example.com"], &[prefix("/v2")], &[]),
        route("any", &[], &[prefix("/v3")], &[]),
    ]);
    assert_eq!(f.name("api.example.com", "/v1/a", "GET"), "exact");
    assert_eq!(f.name("api.example.com", "/v2/a", "GET"), "wild");
    assert_eq!(f.name("api.example.com", "/v3/a", "GET"), "any");
    assert_eq!(f.name("api.example.com", "/v4/a", "GET"), "404");
}

#[test]
fn longer_wildcard_suffix_beats_shorter() {
    let f = Fixture::new(vec![
        route("short", &["*.example.com"], &[prefix("/")], &[]),
        route("long", &["*.api.example.com"], &[prefix("/")], &[]),
    ]);
    assert_eq!(f.name("v1.api.example.com", "/", "GET"), "long");
    assert_eq!(f.name("x.v1.api.example.com", "/", "GET"), "long");
    // `api.example.com` itself is under `*.example.com`, not `*.api.example.com`.
    assert_eq!(f.name("api.example.com", "/", "GET"), "short");
}

#[test]
fn wildcard_covers_any_depth_but_not_the_bare_domain() {
    let f = Fixture::new(vec![route("wild", &["*.example.com"], &[prefix("/")], &[])]);
    assert_eq!(f.name("a.example.com", "/", "GET"), "wild");
    assert_eq!(f.name("a.b.example.com", "/", "GET"), "wild");
    assert_eq!(f.name("example.com", "/", "GET"), "404");
    assert_eq!(f.name("badexample.com", "/", "GET"), "404");
    assert_eq!(f.name(".example.com", "/", "GET"), "404");
    assert_eq!(f.name("example.com.evil.org", "/", "GET"), "404");
}

#[test]
fn routes_without_hosts_match_any_host_below_host_routes() {
    let f = Fixture::new(vec![
        route("any", &[], &[prefix("/")], &[]),
        route("host", &["a.example.com"], &[prefix("/")], &[]),
    ]);
    assert_eq!(f.name("a.example.com", "/", "GET"), "host");
    for host in [
        "b.example.com",
        "",
        "[::1]:8080",
        "10.0.0.1:80",
        "ünïcode.example",
    ] {
        assert_eq!(f.name(host, "/", "GET"), "any", "host {host:?}");
    }
}

#[test]
fn host_port_case_and_trailing_dot_are_normalised() {
    let f = Fixture::new(vec![
        route("exact", &["api.example.com"], &[prefix("/")], &[]),
        route("wild", &["*.example.com"], &[prefix("/")], &[]),
    ]);
    for host in [
        "api.example.com:8443",
        "API.Example.COM",
        "Api.Example.Com:80",
        "api.example.com.",
    ] {
        assert_eq!(f.name(host, "/", "GET"), "exact", "host {host:?}");
    }
    assert_eq!(f.name("WWW.EXAMPLE.COM:8080", "/", "GET"), "wild");
    let long = format!("{}.example.com", "a".repeat(300));
    assert_eq!(f.name(&long, "/", "GET"), "404");
}

#[test]
fn ipv6_literal_hosts_can_be_routed_by_route_hosts_of_ipv4_only() {
    let f = Fixture::new(vec![
        route("v4", &["127.0.0.1"], &[prefix("/")], &[]),
        route("any", &[], &[prefix("/")], &[]),
    ]);
    assert_eq!(f.name("127.0.0.1:8080", "/", "GET"), "v4");
    assert_eq!(f.name("[::1]:8080", "/", "GET"), "any");
}

#[test]
fn exact_beats_prefix_beats_regex() {
    let f = Fixture::new(vec![
        route("a-regex", &[], &[regex("^/users")], &[]),
        route("b-prefix", &[], &[prefix("/users")], &[]),
        route("c-exact", &[], &[exact("/users/me")], &[]),
    ]);
    assert_eq!(f.name("h", "/users/me", "GET"), "c-exact");
    assert_eq!(f.name("h", "/users/you", "GET"), "b-prefix");
    assert_eq!(f.name("h", "/usersx", "GET"), "a-regex");
}

#[test]
fn longer_prefix_beats_shorter() {
    let f = Fixture::new(vec![
        route("root", &[], &[prefix("/")], &[]),
        route("api", &[], &[prefix("/api")], &[]),
        route("v1", &[], &[prefix("/api/v1/")], &[]),
    ]);
    assert_eq!(f.name("h", "/api/v1/users", "GET"), "v1");
    assert_eq!(f.name("h", "/api/v2/users", "GET"), "api");
    assert_eq!(f.name("h", "/other", "GET"), "root");
}

#[test]
fn prefix_matches_at_segment_boundaries_only() {
    let f = Fixture::new(vec![route("api", &[], &[prefix("/api")], &[])]);
    for p in ["/api", "/api/", "/api/x", "/api/x/y"] {
        assert_eq!(f.name("h", p, "GET"), "api", "path {p}");
    }
    for p in ["/apix", "/ap", "/", "/x/api", "/API"] {
        assert_eq!(f.name("h", p, "GET"), "404", "path {p}");
    }

    let f = Fixture::new(vec![route("api", &[], &[prefix("/api/")], &[])]);
    for p in ["/api/", "/api/x", "/api//x"] {
        assert_eq!(f.name("h", p, "GET"), "api", "path {p}");
    }
    for p in ["/api", "/apix"] {
        assert_eq!(f.name("h", p, "GET"), "404", "path {p}");
    }

    let f = Fixture::new(vec![route("root", &[], &[prefix("/")], &[])]);
    for p in ["/", "/a", "/a/b/"] {
        assert_eq!(f.name("h", p, "GET"), "root", "path {p}");
    }
}

#[test]
fn paths_compare_case_sensitively() {
    let f = Fixture::new(vec![
        route("exact", &[], &[exact("/Users")], &[]),
        route("prefix", &[], &[prefix("/Admin")], &[]),
    ]);
    assert_eq!(f.name("h", "/Users", "GET"), "exact");
    assert_eq!(f.name("h", "/users", "GET"), "404");
    assert_eq!(f.name("h", "/Admin/x", "GET"), "prefix");
    assert_eq!(f.name("h", "/admin/x", "GET"), "404");
}

#[test]
fn regexes_are_not_anchored_by_the_router() {
    let f = Fixture::new(vec![
        route("anchored", &[], &[regex("^/v[0-9]+/items$")], &[]),
        route("loose", &[], &[regex("secret")], &[]),
    ]);
    assert_eq!(f.name("h", "/v2/items", "GET"), "anchored");
    assert_eq!(f.name("h", "/x/v2/items", "GET"), "404");
    assert_eq!(f.name("h", "/a/secret/b", "GET"), "loose");
}

#[test]
fn regexes_are_tried_by_route_name_then_path_index() {
    // Input order is the reverse of the expected order on purpose.
    let f = Fixture::new(vec![
        route("b", &[], &[regex("^/x")], &[]),
        route(
            "a",
            &[],
            &[regex("^/nomatch"), regex("^/x/1"), regex("^/x")],
            &[],
        ),
    ]);
    assert_eq!(f.name("h", "/x/1", "GET"), "a");
    assert_eq!(f.found("h", "/x/1", "GET").path_index, 1);
    assert_eq!(f.found("h", "/x/2", "GET").path_index, 2);
}

#[test]
fn equal_candidates_break_ties_by_route_name() {
    for routes in [
        vec![
            route("zeta", &[], &[exact("/same"), prefix("/p")], &[]),
            route("alpha", &[], &[exact("/same"), prefix("/p")], &[]),
        ],
        vec![
            route("alpha", &[], &[exact("/same"), prefix("/p")], &[]),
            route("zeta", &[], &[exact("/same"), prefix("/p")], &[]),
        ],
    ] {
        let f = Fixture::new(routes);
        assert_eq!(f.name("h", "/same", "GET"), "alpha");
        assert_eq!(f.name("h", "/p/q", "GET"), "alpha");
    }
}

#[test]
fn method_not_allowed_differs_from_not_found() {
    let f = Fixture::new(vec![
        route("read", &[], &[exact("/items")], &["GET", "HEAD"]),
        route("write", &[], &[prefix("/items")], &["POST", "GET"]),
    ]);
    assert_eq!(f.name("h", "/items", "DELETE"), "405 GET,HEAD,POST");
    assert_eq!(f.name("h", "/items/1", "DELETE"), "405 GET,POST");
    assert_eq!(f.name("h", "/nothing", "DELETE"), "404");
    // Methods are case-sensitive (RFC 9110).
    assert_eq!(f.name("h", "/items/1", "post"), "405 GET,POST");
}

#[test]
fn method_falls_back_to_the_next_path_candidate_of_the_tier() {
    let f = Fixture::new(vec![
        route("a-exact-get", &[], &[exact("/items")], &["GET"]),
        route("b-exact-put", &[], &[exact("/items")], &["PUT"]),
        route("c-prefix-post", &[], &[prefix("/items")], &["POST"]),
        route("d-regex-any", &[], &[regex("^/items")], &[]),
    ]);
    assert_eq!(f.name("h", "/items", "GET"), "a-exact-get");
    assert_eq!(f.name("h", "/items", "PUT"), "b-exact-put");
    assert_eq!(f.name("h", "/items", "POST"), "c-prefix-post");
    assert_eq!(f.name("h", "/items", "PATCH"), "d-regex-any");
}

#[test]
fn method_fallback_never_leaves_the_host_tier() {
    let f = Fixture::new(vec![
        route("catch-all", &[], &[prefix("/")], &[]),
        route("wild", &["*.example.com"], &[prefix("/")], &[]),
        route(
            "host-get",
            &["api.example.com"],
            &[prefix("/admin")],
            &["GET"],
        ),
    ]);
    assert_eq!(f.name("api.example.com", "/admin/x", "GET"), "host-get");
    assert_eq!(f.name("api.example.com", "/admin/x", "POST"), "405 GET");
    // A path the host's routes do not claim still falls through.
    assert_eq!(f.name("api.example.com", "/public", "POST"), "wild");
}

#[test]
fn route_indexes_refer_to_the_input_slice() {
    let f = Fixture::new(vec![
        route("z", &[], &[exact("/z")], &[]),
        route("m", &[], &[exact("/nothing"), prefix("/m")], &[]),
        route("a", &[], &[exact("/a")], &[]),
    ]);
    assert_eq!(
        f.found("h", "/m/1", "GET"),
        RouteMatch {
            route: 1,
            path_index: 1,
            strip_len: 2
        }
    );
    assert_eq!(f.found("h", "/a", "GET").route, 2);
    assert_eq!(f.found("h", "/z", "GET").route, 0);
}

#[test]
fn strip_len_leaves_the_remainder_rooted() {
    let f = Fixture::new(vec![
        route("a", &[], &[prefix("/api")], &[]),
        route("b", &[], &[prefix("/svc/")], &[]),
        route("c", &[], &[prefix("/")], &[]),
        route("d", &[], &[exact("/exact")], &[]),
        route("e", &[], &[regex("^/re")], &[]),
    ]);
    let stripped = |path: &str| {
        let m = f.found("h", path, "GET");
        (m.strip_len, m.stripped(path).to_string())
    };
    assert_eq!(stripped("/api/x"), (4, "/x".into()));
    assert_eq!(stripped("/api"), (4, "/".into()));
    assert_eq!(stripped("/api/"), (4, "/".into()));
    assert_eq!(stripped("/svc/x/y"), (4, "/x/y".into()));
    assert_eq!(stripped("/svc/"), (4, "/".into()));
    assert_eq!(stripped("/other"), (0, "/other".into()));
    assert_eq!(stripped("/exact"), (0, "/exact".into()));
    assert_eq!(stripped("/re/x"), (0, "/re/x".into()));
}

#[test]
fn an_empty_router_finds_nothing() {
    let f = Fixture::new(vec![]);
    assert_eq!(f.name("h", "/", "GET"), "404");
}

#[test]
fn compile_errors_name_the_route_and_path() {
    let err = Router::compile(&[
        route("fine", &[], &[prefix("/")], &[]),
        route("billing", &[], &[prefix("/b"), regex("^/(unclosed")], &[]),
    ])
    .unwrap_err();
    assert!(matches!(&err, RouterError::Regex { route, path_index: 1, .. } if route == "billing"));
    let msg = err.to_string();
    assert!(
        msg.starts_with("route \"billing\": paths[1].regex: invalid regex: "),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");

    let huge = regex(&format!("^/({})$", "[a-z]{1,100}".repeat(50)));
    let err = Router::compile(&[route("huge", &[], &[huge], &[])]).unwrap_err();
    assert!(
        matches!(err, RouterError::Regex { path_index: 0, .. }),
        "{err}"
    );

    let both = PathMatch {
        exact: Some("/a".into()),
        prefix: Some("/a".into()),
        regex: None,
    };
    let err = Router::compile(&[route("r", &[], &[prefix("/"), both], &[])]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "route \"r\": paths[1]: needs exactly one of exact, prefix or regex"
    );
    let err = Router::compile(&[route("r", &[], &[PathMatch::default()], &[])]).unwrap_err();
    assert!(matches!(err, RouterError::Path { path_index: 0, .. }));

    let err = Router::compile(&[
        route("twice", &[], &[prefix("/")], &[]),
        route("other", &[], &[prefix("/")], &[]),
        route("twice", &[], &[prefix("/")], &[]),
    ])
    .unwrap_err();
    assert_eq!(err.to_string(), "route \"twice\" is given twice");
}

#[test]
fn deep_paths_cost_lookups_only_at_configured_prefix_lengths() {
    let f = Fixture::new(vec![route("a", &[], &[prefix("/a")], &[])]);
    let deep = "/a".to_string() + &"/x".repeat(100_000);
    assert_eq!(f.name("h", &deep, "GET"), "a");
    assert_eq!(f.name("h", &"/".repeat(100_000), "GET"), "404");
}

// Property tests over a small vocabulary, so that routes collide often.

const HOSTS: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "*.example.com",
    "*.a.example.com",
    "x.a.example.com",
];
const PATHS: &[&str] = &["/", "/a", "/a/", "/a/b", "/ab", "/a/b/c", "/x"];
const REGEXES: &[&str] = &["^/a", "^/a/b$", "b", ".*", "^/x$"];
const METHODS: &[&str] = &["GET", "POST", "PUT"];
const REQUEST_HOSTS: &[&str] = &[
    "a.example.com",
    "A.EXAMPLE.COM:8080",
    "x.a.example.com",
    "y.x.a.example.com",
    "example.com",
    "other.org",
    "",
];

fn path_rule() -> impl Strategy<Value = PathMatch> {
    prop_oneof![
        prop::sample::select(PATHS).prop_map(exact),
        prop::sample::select(PATHS).prop_map(prefix),
        prop::sample::select(REGEXES).prop_map(regex),
    ]
}

fn prefix_or_regex() -> impl Strategy<Value = PathMatch> {
    prop_oneof![
        prop::sample::select(PATHS).prop_map(prefix),
        prop::sample::select(REGEXES).prop_map(regex),
    ]
}

fn subset(pool: &'static [&'static str]) -> impl Strategy<Value = Vec<&'static str>> {
    prop::sample::subsequence(pool, 0..=pool.len())
}

/// Routes with unique names and overlapping hosts, paths and methods.
fn routes_from(paths: impl Strategy<Value = PathMatch>) -> impl Strategy<Value = Vec<Route>> {
    prop::collection::vec(
        (
            subset(HOSTS),
            prop::collection::vec(paths, 1..4),
            subset(METHODS),
        ),
        0..10,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (hosts, paths, methods))| route(&format!("r{i}"), &hosts, &paths, &methods))
            .collect()
    })
}

/// An answer as it would be seen from outside: route names, not indexes.
fn outcome(routes: &[Route], m: Match<'_>) -> String {
    match m {
        Match::Found(m) => format!("{} {} {}", routes[m.route].name, m.path_index, m.strip_len),
        Match::NotFound => "404".into(),
        Match::MethodNotAllowed { allowed } => format!("405 {}", allowed.join(",")),
    }
}

fn request() -> impl Strategy<Value = (&'static str, &'static str, &'static str)> {
    (
        prop::sample::select(REQUEST_HOSTS),
        prop::sample::select([PATHS, &["/abc", "/a/b/c/d", "/y"]].concat()),
        prop::sample::select([METHODS, &["DELETE"]].concat()),
    )
}

proptest! {
    #[test]
    fn routing_is_independent_of_input_order(
        (routes, shuffled) in routes_from(path_rule()).prop_flat_map(|r| (Just(r.clone()), Just(r).prop_shuffle())),
        requests in prop::collection::vec(request(), 1..20),
    ) {
        let a = Router::compile(&routes).unwrap();
        let b = Router::compile(&shuffled).unwrap();
        for (host, path, method) in requests {
            let first = outcome(&routes, a.route(host, path, method));
            prop_assert_eq!(&first, &outcome(&routes, a.route(host, path, method)));
            prop_assert_eq!(first, outcome(&shuffled, b.route(host, path, method)));
        }
    }

    #[test]
    fn a_single_exact_path_wins_over_prefixes_and_regexes_of_its_host(
        others in routes_from(prefix_or_regex()),
        host in prop::sample::select(&HOSTS[..2]),
        path in prop::sample::select(PATHS),
        methods in subset(METHODS),
        method in prop::sample::select(METHODS),
        port in prop::option::of(1u16..),
    ) {
        prop_assume!(methods.is_empty() || methods.contains(&method));
        let mut routes = others;
        routes.push(route("winner", &[host], &[exact(path)], &methods));
        let router = Router::compile(&routes).unwrap();
        let request_host = match port {
            Some(p) => format!("{}:{p}", host.to_ascii_uppercase()),
            None => host.to_string(),
        };
        prop_assert_eq!(
            outcome(&routes, router.route(&request_host, path, method)),
            "winner 0 0".to_string()
        );
    }
}

#[test]
fn a_router_can_be_shared_between_threads() {
    // The compiled config is swapped through arc-swap and read from every worker.
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Router>();
}
