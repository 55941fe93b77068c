//! Who is calling the admin API and the config stream, and what they may do.
//!
//! Every call carries `authorization: Bearer TOKEN`. The token's SHA-256 is
//! looked up among the AdminToken objects of this node's state; the object's
//! role decides what the caller may do. Before the cluster holds any admin
//! token, the cluster's bootstrap token (whose hash every member learns when
//! it joins) is accepted with the admin role; the leader then stores it as
//! admin token `bootstrap`, so it can be listed and revoked like any other.
//!
//! A missing or unknown token is `UNAUTHENTICATED`, a known token without
//! the role `PERMISSION_DENIED`. Failed attempts are counted per peer
//! address; past [`MAX_FAILURES`] in [`FAILURE_WINDOW`] the peer is refused
//! until the window ends, even with a good token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatehouse_model::admintoken;
use gatehouse_model::object::{AdminRole, Object};
use gatehouse_model::Kind;
use tonic::{Request, Status};

use crate::identity::Identity;
use crate::store::Shared;

/// Failed attempts one peer may make per window.
pub const MAX_FAILURES: u32 = 20;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked at most; the oldest windows are dropped first.
const MAX_TRACKED_PEERS: usize = 10_000;
/// The admin token the leader stores the bootstrap token as.
pub const BOOTSTRAP_TOKEN_NAME: &str = "bootstrap";

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading configuration, status and the audit log.
    Read,
    /// Writing configuration objects other than admin tokens.
    Config,
    /// Creating, changing and deleting admin tokens.
    Tokens,
    /// Membership changes.
    Cluster,
    /// Watching the config stream.
    Stream,
}

impl Need {
    fn describe(self) -> &'static str {
        match self {
            Need::Read => "read the configuration",
            Need::Config => "change configuration objects",
            Need::Tokens => "manage admin tokens",
            Need::Cluster => "change cluster membership",
            Need::Stream => "watch the config stream",
        }
    }
}

/// Whether `role` grants `need`.
pub fn allows(role: AdminRole, need: Need) -> bool {
    match role {
        AdminRole::Admin => true,
        AdminRole::Editor => matches!(need, Need::Read | Need::Config),
        AdminRole::Viewer => need == Need::Read,
        AdminRole::DataPlane => need == Need::Stream,
    }
}

fn role_name(role: AdminRole) -> &'static str {
    match role {
        AdminRole::Admin => "admin",
        AdminRole::Editor => "editor",
        AdminRole::Viewer => "viewer",
        AdminRole::DataPlane => "data_plane",
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// `token:NAME`, as the audit log records it.
    pub actor: String,
    pub role: AdminRole,
    /// Authenticated by the cluster's bootstrap token before it was stored:
    /// the caller's first write stores it too, so that it keeps working.
    pub unstored_bootstrap: bool,
}

impl Caller {
    pub fn require(&self, need: Need) -> Result<(), Status> {
        if allows(self.role, need) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{} has role {}, which may not {}",
                self.actor,
                role_name(self.role),
                need.describe()
            )))
        }
    }
}

/// Checks tokens for one node.
pub struct Auth {
    sm: Arc<Shared>,
    identity: Arc<Identity>,
    /// This node's own bootstrap token, for `cluster init` before it has a cluster.
    local_bootstrap_hash: String,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// Listeners use TLS: client certificates can name callers, and the
    /// config stream requires one.
    tls: bool,
}

/// Metadata a node adds when it forwards the call of a caller who
/// authenticated by certificate: `ROLE ACTOR`. Believed only from a peer
/// whose own certificate says `control_plane`.
pub const ON_BEHALF_OF: &str = "x-gatehouse-on-behalf-of";

fn parse_role(role: &str) -> Option<AdminRole> {
    match role {
        "admin" => Some(AdminRole::Admin),
        "editor" => Some(AdminRole::Editor),
        "viewer" => Some(AdminRole::Viewer),
        "data_plane" => Some(AdminRole::DataPlane),
        _ => None,
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth")
    }
}

/// The token of `authorization: Bearer TOKEN`, if well formed.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Auth {
    pub fn new(
        sm: Arc<Shared>,
        identity: Arc<Identity>,
        local_bootstrap_hash: String,
        tls: bool,
    ) -> Auth {
        Auth {
            sm,
            identity,
            local_bootstrap_hash,
            failures: Mutex::new(HashMap::new()),
            tls,
        }
    }

    /// Checks a config-stream watcher. With TLS it must present a client
    /// certificate of role `data_plane` (or `admin`): its identity is the
    /// certificate's. Without TLS (loopback), an admin token.
    pub fn check_stream<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if !self.tls {
            return self.check(request, Need::Stream);
        }
        match gatehouse_proto::tls::peer_identity(request) {
            Some(peer) => {
                let caller = parse_role(&peer.role)
                    .map(|role| Caller {
                        actor: format!("cert:{}", peer.name),
                        role,
                        unstored_bootstrap: false,
                    })
                    .ok_or_else(|| {
                        Status::permission_denied(format!(
                            "certificate {} has role {}, which may not watch the config stream",
                            peer.name, peer.role
                        ))
                    })?;
                caller.require(Need::Stream)?;
                Ok(caller)
            }
            None => Err(Status::unauthenticated(
                "the config stream needs a client certificate (mutual TLS) with role data_plane",
            )),
        }
    }

    /// The hash of the bootstrap token this node's new cluster starts with.
    pub fn local_bootstrap_hash(&self) -> &str {
        &self.local_bootstrap_hash
    }

    /// Authenticates the caller of `request` without counting a failure.
    pub fn lookup<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        if let Some(ip) = self.limited_peer(request) {
            self.refuse_if_blocked(ip)?;
        }
        self.authenticate(request)
    }

    /// The peer address failures count against: none for a fellow
    /// control-plane node (its forwarded calls carry other people's
    /// credentials, so their failures must not shut the node out).
    fn limited_peer<T>(&self, request: &Request<T>) -> Option<IpAddr> {
        if self.tls
            && gatehouse_proto::tls::peer_identity(request)
                .is_some_and(|p| p.role == "control_plane")
        {
            return None;
        }
        request.remote_addr().map(|a| a.ip())
    }

    /// Authenticates the caller of `request` and checks it may do `need`;
    /// a failed authentication counts against the peer.
    pub fn check<T>(&self, request: &Request<T>, need: Need) -> Result<Caller, Status> {
        let peer = self.limited_peer(request);
        if let Some(ip) = peer {
            self.refuse_if_blocked(ip)?;
        }
        match self.authenticate(request) {
            Ok(caller) => {
                caller.require(need)?;
                Ok(caller)
            }
            Err(status) => {
                if let Some(ip) = peer {
                    self.count_failure(ip);
                }
                Err(status)
            }
        }
    }

    fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let peer = if self.tls {
            gatehouse_proto::tls::peer_identity(request)
        } else {
            None
        };
        if let Some(peer) = &peer {
            // A fellow node forwarding the call of a certificate holder.
            if peer.role == "control_plane" {
                if let Some(on_behalf) = request
                    .metadata()
                    .get(ON_BEHALF_OF)
                    .and_then(|v| v.to_str().ok())
                {
                    if let Some((role, actor)) = on_behalf.split_once(' ') {
                        if let Some(role) = parse_role(role) {
                            return Ok(Caller {
                                actor: actor.to_string(),
                                role,
                                unstored_bootstrap: false,
                            });
                        }
                    }
                }
            } else if bearer(request).is_none() {
                if let Some(role) = parse_role(&peer.role) {
                    return Ok(Caller {
                        actor: format!("cert:{}", peer.name),
                        role,
                        unstored_bootstrap: false,
                    });
                }
            }
        }
        let Some(token) = bearer(request) else {
            return Err(Status::unauthenticated(
                "no admin token: send `authorization: Bearer TOKEN` (gatehousectl: --token-file or GATEHOUSE_TOKEN)",
            ));
        };
        if !admintoken::well_formed(token) {
            return Err(Status::unauthenticated("the admin token is malformed"));
        }
        let hash = admintoken::hash(token);
        let (found, any_token) = self.sm.read(|d| {
            let mut tokens = d.config.list(Kind::AdminToken).peekable();
            let any = tokens.peek().is_some();
            let found = tokens.find_map(|o| match o {
                Object::AdminToken(t) if t.token_hash == hash => Some((t.name.clone(), t.role)),
                _ => None,
            });
            (found, any)
        });
        if let Some((name, role)) = found {
            return Ok(Caller {
                actor: format!("token:{name}"),
                role,
                unstored_bootstrap: false,
            });
        }
        if !any_token && self.is_bootstrap(&hash) {
            return Ok(Caller {
                actor: format!("token:{BOOTSTRAP_TOKEN_NAME}"),
                role: AdminRole::Admin,
                unstored_bootstrap: true,
            });
        }
        Err(Status::unauthenticated(
            "the admin token is not known to this cluster (revoked, or never created)",
        ))
    }

    /// The cluster's bootstrap token, or this node's own before it has a cluster.
    fn is_bootstrap(&self, hash: &str) -> bool {
        match self.identity.bootstrap_hash() {
            Some(cluster) => !cluster.is_empty() && cluster == hash,
            None => self.identity.cluster_id().is_none() && self.local_bootstrap_hash == hash,
        }
    }

    fn refuse_if_blocked(&self, ip: IpAddr) -> Result<(), Status> {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        match failures.get(&ip) {
            Some((count, since)) if *count >= MAX_FAILURES && since.elapsed() < FAILURE_WINDOW => {
                let wait = FAILURE_WINDOW.saturating_sub(since.elapsed()).as_secs() + 1;
                Err(Status::unauthenticated(format!(
                    "too many failed authentication attempts from {ip}; retry in {wait} s"
                )))
            }
            _ => Ok(()),
        }
    }

    fn count_failure(&self, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= MAX_TRACKED_PEERS && !failures.contains_key(&ip) {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            if failures.len() >= MAX_TRACKED_PEERS {
                if let Some(oldest) = failures
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(ip, _)| *ip)
                {
                    failures.remove(&oldest);
                }
            }
        }
        let entry = failures.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
        if entry.0 == MAX_FAILURES {
            tracing::warn!(peer = %ip, "admin API: too many failed authentication attempts; refusing this peer for a while");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_grant_what_the_docs_say() {
        use AdminRole::*;
        use Need::*;
        let table = [
            (Admin, [true, true, true, true, true]),
            (Editor, [true, true, false, false, false]),
            (Viewer, [true, false, false, false, false]),
            (DataPlane, [false, false, false, false, true]),
        ];
        for (role, expected) in table {
            let got: Vec<bool> = [Read, Config, Tokens, Cluster, Stream]
                .iter()
                .map(|n| allows(role, *n))
                .collect();
            assert_eq!(got, expected, "{role:?}");
        }
        let viewer = Caller {
            actor: "token:v".into(),
            role: Viewer,
            unstored_bootstrap: false,
        };
        let denied = viewer.require(Config).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            denied.message(),
            "token:v has role viewer, which may not change configuration objects"
        );
    }

    #[test]
    fn only_bearer_credentials_are_read() {
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        assert_eq!(bearer(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&with("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&with("Basic abc")), None);
        assert_eq!(bearer(&with("abc")), None);
        assert_eq!(bearer(&Request::new(())), None);
    }
}
