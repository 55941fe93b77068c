//! The Gatehouse data plane: it receives the configuration from the control
//! plane, compiles it into one immutable value, and proxies requests by it.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod auth;
pub mod client;
pub mod compile;
pub mod connpool;
pub mod cors;
pub mod firewall;
pub mod framing;
pub mod headers;
pub mod health;
pub mod idp_http;
pub mod inspect;
pub mod introspect;
pub mod jwks;
pub mod jwt;
pub mod jwt_crypto;
pub mod limits;
pub mod lkg;
pub mod metrics;
pub mod mtls;
pub mod node;
pub mod observe;
pub mod ops;
pub mod path;
pub mod problem;
pub mod proxy;
pub mod resources;
pub mod router;
pub mod tls;
pub mod upstream;
