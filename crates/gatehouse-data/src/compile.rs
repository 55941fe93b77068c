//! One configuration revision compiled for the hot path: the router, the
//! upstream pools and each route's settings, built once when the revision
//! arrives and then only read.
//!
//! A revision that arrives as a delta is compiled from the previous one:
//! the credentials are patched with the keys and consumers that changed,
//! and the router, pools, policies and certificates are shared unchanged
//! when no object they are built from changed. A one-key change on a
//! configuration of a million keys costs microseconds, not a recompile.

use std::collections::HashMap;
use std::sync::Arc;

use gatehouse_model::object::{Route, Upstream};
use gatehouse_model::{ConfigState, Kind, Object, ObjectRef};

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
    /// Its count of 200 answers, the usual one, looked up once per revision
    /// (other statuses per request).
    pub ok: prometheus_client::metrics::counter::Counter,
}

/// Everything a request needs, for one revision.
#[derive(Debug)]
pub struct Compiled {
    pub revision: u64,
    pub router: Arc<Router>,
    pub routes: Arc<Vec<CompiledRoute>>,
    /// Every upstream, routed to or not.
    pub pools: Arc<Vec<Arc<Pool>>>,
    /// Server certificates by name, for the TLS listener.
    pub tls: Arc<CertStore>,
    /// API keys and the consumers they name.
    pub credentials: Credentials,
    /// Whether some policy accepts client certificates: the TLS listener
    /// asks for one only then.
    pub client_certs: bool,
}

/// Whether an object of this kind is compiled into the credentials only
/// (or not at all): a change to it leaves the router, pools, policies and
/// certificates as they were.
fn credentials_only(kind: Kind) -> bool {
    matches!(kind, Kind::ApiKey | Kind::Consumer | Kind::AdminToken)
}

/// The parts built from everything but the credentials.
struct Core {
    router: Arc<Router>,
    routes: Arc<Vec<CompiledRoute>>,
    pools: Arc<Vec<Arc<Pool>>>,
    tls: Arc<CertStore>,
    client_certs: bool,
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
        let core = Compiled::build_core(state, shared)?;
        Ok(Compiled {
            revision: state.revision(),
            router: core.router,
            routes: core.routes,
            pools: core.pools,
            tls: core.tls,
            client_certs: core.client_certs,
            credentials: Credentials::compile(state)?,
        })
    }

    /// This revision moved on to `state`, in which only the objects
    /// `changed` differ from this one's: the same result as
    /// [`Compiled::build`], sharing what the change does not touch.
    pub fn patch(
        &self,
        state: &ConfigState,
        changed: &[ObjectRef],
        shared: &crate::proxy::Shared,
    ) -> Result<Compiled, String> {
        let core = if changed.iter().all(|t| credentials_only(t.kind)) {
            Core {
                router: self.router.clone(),
                routes: self.routes.clone(),
                pools: self.pools.clone(),
                tls: self.tls.clone(),
                client_certs: self.client_certs,
            }
        } else {
            Compiled::build_core(state, shared)?
        };
        let credentials = if changed
            .iter()
            .any(|t| matches!(t.kind, Kind::ApiKey | Kind::Consumer))
        {
            self.credentials.patch(state, changed)?
        } else {
            self.credentials.clone()
        };
        Ok(Compiled {
            revision: state.revision(),
            router: core.router,
            routes: core.routes,
            pools: core.pools,
            tls: core.tls,
            client_certs: core.client_certs,
            credentials,
        })
    }

    fn build_core(state: &ConfigState, shared: &crate::proxy::Shared) -> Result<Core, String> {
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
                let ok = shared
                    .metrics
                    .requests
                    .get_or_create(&crate::metrics::RequestLabels {
                        route: name.clone(),
                        status: 200,
                    })
                    .clone();
                Ok(CompiledRoute {
                    ok,
                    name,
                    upstream,
                    strip_prefix: r.strip_prefix,
                    raw_path: r.raw_path,
                    policy,
                    latency,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Core {
            router: Arc::new(router),
            routes: Arc::new(compiled_routes),
            pools: Arc::new(pools.into_values().collect()),
            tls: Arc::new(CertStore::compile(certificates.iter())?),
            client_certs,
        })
    }
}

#[cfg(test)]
mod tests;
