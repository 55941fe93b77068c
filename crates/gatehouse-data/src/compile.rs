//! One configuration revision compiled for the hot path: the router, the
//! upstream pools and each route's settings, built once when the revision
//! arrives and then only read.

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_model::object::{Route, Upstream};
use gatehouse_model::{ConfigState, Kind, Object};

use crate::auth::{CompiledPolicy, Credentials};
use crate::router::Router;
use crate::tls::CertStore;
use crate::upstream::Pool;

/// A route's settings, by the router's route index.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Shared so that metric labels clone it without allocating.
    pub name: Arc<String>,
    pub upstream: Arc<Pool>,
    pub strip_prefix: bool,
    /// Forward the path as the client sent it (no canonicalisation).
    pub raw_path: bool,
    /// The policy that guards the route, if any.
    pub policy: Option<Arc<CompiledPolicy>>,
    /// The route's latency histogram, looked up once per revision.
    pub latency: prometheus_client::metrics::histogram::Histogram,
}

/// Everything a request needs, for one revision.
#[derive(Debug)]
pub struct Compiled {
    pub revision: u64,
    pub router: Router,
    pub routes: Vec<CompiledRoute>,
    /// Every upstream, routed to or not.
    pub pools: Vec<Arc<Pool>>,
    /// Server certificates by name, for the TLS listener.
    pub tls: CertStore,
    /// API keys and the consumers they name.
    pub credentials: Credentials,
    /// Whether some policy accepts client certificates: the TLS listener
    /// asks for one only then.
    pub client_certs: bool,
}

impl Compiled {
    /// (upstream, target, health check) for every target, for the prober.
    pub fn health_targets(
        &self,
    ) -> Vec<(String, String, Option<gatehouse_model::object::HealthCheck>)> {
        self.pools
            .iter()
            .flat_map(|p| {
                p.targets
                    .iter()
                    .map(|t| (p.name.clone(), t.address.clone(), p.health_check.clone()))
            })
            .collect()
    }
}

impl Compiled {
    /// Compiles a configuration the control plane validated. An error names
    /// the object at fault; the caller keeps serving the previous revision.
    /// `shared` provides what outlives a revision: target health, upstream
    /// clients and metrics.
    pub fn build(state: &ConfigState, shared: &crate::proxy::Shared) -> Result<Compiled, String> {
        let (health, clients) = (&shared.health, &shared.clients);
        let mut pools: HashMap<&str, Arc<Pool>> = HashMap::new();
        let upstreams: Vec<&Upstream> = state
            .list(Kind::Upstream)
            .filter_map(|o| match o {
                Object::Upstream(u) => Some(u),
                _ => None,
            })
            .collect();
        for u in &upstreams {
            pools.insert(&u.name, Arc::new(Pool::compile(u, health, clients)?));
        }
        let routes: Vec<Route> = state
            .list(Kind::Route)
            .filter_map(|o| match o {
                Object::Route(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let router = Router::compile(&routes).map_err(|e| e.to_string())?;
        // Sealed key material is opened here, into the compiled revision
        // only: the state, and the last-known-good file, keep it sealed.
        let open = |o: &Object| -> Result<Object, String> {
            let mut o = o.clone();
            gatehouse_model::seal::open_object(&mut o, shared.seal.as_ref())
                .map_err(|e| e.to_string())?;
            Ok(o)
        };
        let mut issuers = HashMap::new();
        for o in state.list(Kind::JwtIssuer) {
            if let Object::JwtIssuer(j) = open(o)? {
                issuers.insert(
                    j.name.clone(),
                    Arc::new(crate::jwt::CompiledIssuer::compile(&j, &shared.jwks)?),
                );
            }
        }
        let certificates: Vec<gatehouse_model::object::Certificate> = state
            .list(Kind::Certificate)
            .map(open)
            .filter_map(|o| match o {
                Ok(Object::Certificate(c)) => Some(Ok(c)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()?;
        // Introspectors (and their caches) of the revision being served,
        // reused by policies whose introspection settings stay the same.
        let previous = shared.config.load_full();
        let env = crate::auth::AuthEnv {
            allow_insecure_idp_loopback: shared.allow_insecure_idp_loopback,
            introspectors: previous
                .iter()
                .flat_map(|c| c.routes.iter())
                .filter_map(|r| r.policy.as_ref())
                .filter_map(|p| Some((p.name.clone(), p.introspector()?.clone())))
                .collect(),
        };
        let mut policies: HashMap<&str, Arc<CompiledPolicy>> = HashMap::new();
        let mut client_certs = false;
        for o in state.list(Kind::Policy) {
            if let Object::Policy(p) = o {
                // The introspection client secret may be sealed.
                let Object::Policy(opened) = open(o)? else {
                    continue;
                };
                client_certs |= p.mtls.is_some();
                policies.insert(
                    &p.name,
                    Arc::new(CompiledPolicy::compile(
                        &opened,
                        &shared.limiters,
                        &shared.metrics,
                        &issuers,
                        &env,
                    )?),
                );
            }
        }
        let compiled_routes = routes
            .iter()
            .map(|r| {
                let upstream = pools.get(r.upstream.as_str()).cloned().ok_or_else(|| {
                    format!(
                        "route \"{}\": upstream: references unknown upstream \"{}\"",
                        r.name, r.upstream
                    )
                })?;
                let policy = match &r.policy {
                    None => None,
                    Some(p) => Some(policies.get(p.as_str()).cloned().ok_or_else(|| {
                        format!(
                            "route \"{}\": policy: references unknown policy \"{p}\"",
                            r.name
                        )
                    })?),
                };
                let name = Arc::new(r.name.clone());
                let latency = shared
                    .metrics
                    .latency
                    .get_or_create(&crate::metrics::RouteLabels {
                        route: name.clone(),
                    })
                    .clone();
                Ok(CompiledRoute {
                    name,
                    upstream,
                    strip_prefix: r.strip_prefix,
                    raw_path: r.raw_path,
                    policy,
                    latency,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Compiled {
            revision: state.revision(),
            router,
            routes: compiled_routes,
            pools: pools.into_values().collect(),
            credentials: Credentials::compile(state)?,
            tls: CertStore::compile(certificates.iter())?,
            client_certs,
        })
    }
}
