//! Authentication and authorisation at the edge: who the caller is (an API
//! key, a JWT, a client certificate, or an opaque token checked by
//! introspection), whether the route's policy lets them in, and the
//! identity headers the upstream receives.
//!
//! Everything is compiled with the revision: a key lookup is one hash-map
//! probe and one constant-time comparison of SHA-256 digests; a client
//! certificate is verified once per connection and policy CA (`mtls`); an
//! opaque token costs a call to its endpoint once per cache period
//! (`introspect`). A request must bring exactly one credential the policy
//! accepts; a policy fails closed, never open.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use gatehouse_model::apikey;
use gatehouse_model::object::{ApiKey, AuthMethod, Consumer, Policy};
use gatehouse_model::{ConfigState, Kind, Object, ObjectRef};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::problem::Reject;

/// Headers the gateway sets for the upstream; any a client sends are removed.
pub const CONSUMER_NAME: HeaderName = HeaderName::from_static("x-consumer-name");
pub const CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");

/// A consumer as the upstream learns of it.
#[derive(Debug, PartialEq)]
pub struct ConsumerInfo {
    pub name: String,
    pub groups: Vec<String>,
    name_header: HeaderValue,
    groups_header: HeaderValue,
}

impl ConsumerInfo {
    fn compile(c: &Consumer) -> Result<ConsumerInfo, String> {
        Ok(ConsumerInfo {
            name: c.name.clone(),
            groups: c.groups.clone(),
            name_header: HeaderValue::from_str(&c.name)
                .map_err(|_| format!("consumer \"{}\": name is not a header value", c.name))?,
            groups_header: HeaderValue::from_str(&c.groups.join(","))
                .map_err(|_| format!("consumer \"{}\": groups are not a header value", c.name))?,
        })
    }
}

/// One API key. It names its consumer, looked up when the key is used, so
/// a consumer change touches only the consumer's own entry.
#[derive(Clone, Debug, PartialEq)]
struct KeyEntry {
    hash: [u8; 32],
    consumer: Arc<str>,
    expires_at: Option<SystemTime>,
    revoked: bool,
}

/// The credentials of one revision, in persistent maps: the next revision
/// is this one patched with the keys and consumers that changed, sharing
/// everything else, so one key's change costs O(log n), not a rebuild of
/// every key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Credentials {
    keys: imbl::HashMap<Arc<str>, KeyEntry>,
    consumers: imbl::HashMap<Arc<str>, Arc<ConsumerInfo>>,
}

impl Credentials {
    /// Every consumer and key of `state`.
    pub fn compile(state: &ConfigState) -> Result<Credentials, String> {
        let mut creds = Credentials::default();
        for o in state.list(Kind::Consumer) {
            if let Object::Consumer(c) = o {
                creds.put_consumer(c)?;
            }
        }
        for o in state.list(Kind::ApiKey) {
            if let Object::ApiKey(k) = o {
                creds.put_key(k)?;
            }
        }
        Ok(creds)
    }

    /// These credentials moved on to `state`, in which only the objects
    /// `changed` names differ: equal to `compile(state)`, in time
    /// proportional to the change.
    pub fn patch(&self, state: &ConfigState, changed: &[ObjectRef]) -> Result<Credentials, String> {
        let mut next = self.clone();
        // Consumers first: a new key may name a new consumer.
        for target in changed.iter().filter(|t| t.kind == Kind::Consumer) {
            match state.get(Kind::Consumer, &target.name) {
                Some(Object::Consumer(c)) => next.put_consumer(c)?,
                // A removed consumer must have no key left: checking that
                // means every key, as a full compile does (it is rare).
                _ => return Credentials::compile(state),
            }
        }
        for target in changed.iter().filter(|t| t.kind == Kind::ApiKey) {
            match state.get(Kind::ApiKey, &target.name) {
                Some(Object::ApiKey(k)) => next.put_key(k)?,
                _ => {
                    next.keys.remove(target.name.as_str());
                }
            }
        }
        Ok(next)
    }

    fn put_consumer(&mut self, c: &Consumer) -> Result<(), String> {
        let info = ConsumerInfo::compile(c)?;
        self.consumers
            .insert(Arc::from(c.name.as_str()), Arc::new(info));
        Ok(())
    }

    fn put_key(&mut self, k: &ApiKey) -> Result<(), String> {
        let hash: [u8; 32] = hex::decode(&k.key_hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("api_key \"{}\": key_hash is not a SHA-256", k.name))?;
        let (consumer, _) = self
            .consumers
            .get_key_value(k.consumer.as_str())
            .ok_or_else(|| {
                format!(
                    "api_key \"{}\": unknown consumer \"{}\"",
                    k.name, k.consumer
                )
            })?;
        let entry = KeyEntry {
            hash,
            consumer: consumer.clone(),
            expires_at: k.expires_at,
            revoked: k.revoked,
        };
        self.keys.insert(Arc::from(k.name.as_str()), entry);
        Ok(())
    }

    /// How many API keys there are.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The consumer a verified token names.
    fn consumer_named(&self, name: &str) -> Option<Arc<ConsumerInfo>> {
        self.consumers.get(name).cloned()
    }

    /// The consumer of a presented key, if the key is valid now.
    fn consumer_of(&self, presented: &str, now: SystemTime) -> Option<Arc<ConsumerInfo>> {
        let parsed = apikey::parse_key(presented).ok()?;
        let entry = self.keys.get(parsed.id)?;
        // Compare first, decide after: the same work whatever fails.
        let matches = apikey::secret_matches(parsed.secret, &entry.hash);
        let live = !entry.revoked && entry.expires_at.is_none_or(|t| now < t);
        if matches && live {
            self.consumer_named(&entry.consumer)
        } else {
            None
        }
    }
}

/// What compiling a policy needs from outside the revision.
#[derive(Debug, Default)]
pub struct AuthEnv {
    /// Token introspection may call plain http on loopback (tests only).
    pub allow_insecure_idp_loopback: bool,
    /// Introspectors of the revision being served, by policy name: reused
    /// (with their caches) when the settings did not change.
    pub introspectors: HashMap<String, Arc<crate::introspect::Introspector>>,
}

/// A policy compiled for the hot path.
#[derive(Debug)]
pub struct CompiledPolicy {
    pub name: String,
    methods: Vec<AuthMethod>,
    key_header: HeaderName,
    key_query: Option<String>,
    groups: Vec<String>,
    scopes: Vec<String>,
    claims: Vec<gatehouse_model::object::ClaimMatch>,
    /// Scopes or claims required: API keys carry none, so such a policy
    /// admits no API-key caller.
    needs_token: bool,
    /// The issuers whose tokens are accepted.
    issuers: Vec<Arc<crate::jwt::CompiledIssuer>>,
    /// The CA client certificates must chain to.
    mtls: Option<crate::mtls::CompiledMtls>,
    /// The endpoint opaque tokens are checked at.
    introspector: Option<Arc<crate::introspect::Introspector>>,
    challenge: HeaderValue,
    /// The policy's rate limits.
    pub limits: crate::limits::PolicyLimits,
    /// The policy's per-consumer quotas.
    pub quotas: Vec<crate::limits::CompiledQuota>,
    /// The policy's firewall rules.
    pub firewall: crate::firewall::CompiledFirewall,
}

impl CompiledPolicy {
    pub fn compile(
        p: &Policy,
        limiters: &crate::limits::LimiterRegistry,
        metrics: &crate::metrics::Metrics,
        issuers: &HashMap<String, Arc<crate::jwt::CompiledIssuer>>,
        env: &AuthEnv,
    ) -> Result<CompiledPolicy, String> {
        let header = p
            .api_key
            .as_ref()
            .map_or("x-api-key", |k| k.header.as_str());
        let key_header = HeaderName::from_bytes(header.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("policy \"{}\": api_key.header is not a header name", p.name))?;
        let mut challenges = Vec::new();
        if p.authentication.contains(&AuthMethod::Jwt)
            || p.authentication.contains(&AuthMethod::Introspection)
        {
            challenges.push("Bearer realm=\"gatehouse\"".to_string());
        }
        if p.authentication.contains(&AuthMethod::Mtls) {
            // No registered scheme names a TLS client certificate; this one
            // tells a client what to bring.
            challenges.push("ClientCertificate realm=\"gatehouse\"".to_string());
        }
        if p.authentication.contains(&AuthMethod::ApiKey) || challenges.is_empty() {
            challenges.push(format!(
                "ApiKey realm=\"gatehouse\", header=\"{key_header}\""
            ));
        }
        let challenge = HeaderValue::from_str(&challenges.join(", "))
            .map_err(|_| format!("policy \"{}\": cannot build its challenge", p.name))?;
        Ok(CompiledPolicy {
            name: p.name.clone(),
            methods: p.authentication.clone(),
            key_header,
            key_query: p.api_key.as_ref().and_then(|k| k.query_param.clone()),
            groups: p.authorization.groups.clone(),
            needs_token: !p.authorization.scopes.is_empty() || !p.authorization.claims.is_empty(),
            scopes: p.authorization.scopes.clone(),
            claims: p.authorization.claims.clone(),
            issuers: p
                .jwt
                .iter()
                .flat_map(|j| j.issuers.iter())
                .map(|name| {
                    issuers.get(name).cloned().ok_or_else(|| {
                        format!(
                            "policy \"{}\": jwt.issuers: unknown jwt_issuer \"{name}\"",
                            p.name
                        )
                    })
                })
                .collect::<Result<_, String>>()?,
            mtls: p
                .mtls
                .as_ref()
                .map(|m| crate::mtls::CompiledMtls::compile(&p.name, m))
                .transpose()?,
            introspector: p
                .introspection
                .as_ref()
                .map(|i| {
                    crate::introspect::Introspector::compile(
                        &p.name,
                        i,
                        &p.authorization
                            .claims
                            .iter()
                            .map(|c| c.claim.clone())
                            .collect::<Vec<_>>(),
                        env.allow_insecure_idp_loopback,
                        env.introspectors.get(&p.name),
                    )
                })
                .transpose()?,
            challenge,
            firewall: crate::firewall::CompiledFirewall::compile(&p.name, &p.firewall)?,
            quotas: p
                .quotas
                .iter()
                .map(|q| crate::limits::CompiledQuota::compile(&p.name, q, metrics))
                .collect(),
            limits: crate::limits::PolicyLimits::new(
                p.rate_limits
                    .iter()
                    .map(|l| crate::limits::CompiledLimit::compile(&p.name, l, limiters, metrics))
                    .collect::<Result<_, _>>()?,
                p.rate_limit_headers,
            ),
        })
    }

    fn unauthorized(&self) -> Reject {
        Reject::Unauthorized {
            challenge: self.challenge.clone(),
        }
    }

    /// Call before [`Self::authenticate`]: when the request's bearer token
    /// needs keys a JWKS issuer of this policy does not hold (an unknown
    /// `kid`, or no usable key set), waits for one fetch of them (shared
    /// with other requests; at most one started per issuer per cooldown).
    /// Returns at once otherwise.
    pub async fn fetch_token_keys(&self, headers: &HeaderMap) {
        if !self.methods.contains(&AuthMethod::Jwt) || !crate::jwt::any_jwks(&self.issuers) {
            return;
        }
        if let Ok(Some(token)) = self.presented_bearer(headers) {
            crate::jwt::fetch_keys_for(token, &self.issuers).await;
        }
    }

    /// Whether the policy asks callers who they are (its `authentication`
    /// lists a method).
    pub fn authenticates(&self) -> bool {
        !self.methods.is_empty()
    }

    /// The policy's token introspector, if it has one.
    pub fn introspector(&self) -> Option<&Arc<crate::introspect::Introspector>> {
        self.introspector.as_ref()
    }

    /// Who the caller is, or why not: `Ok(None)` when the policy asks for
    /// no authentication. `peer` is the client certificate chain of the
    /// connection (TLS listener only).
    pub async fn authenticate(
        &self,
        creds: &Credentials,
        headers: &HeaderMap,
        query: Option<&str>,
        peer: Option<&crate::mtls::PeerChain>,
        now: SystemTime,
    ) -> Result<Option<Arc<ConsumerInfo>>, Reject> {
        if self.methods.is_empty() {
            return Ok(None);
        }
        let key = if self.methods.contains(&AuthMethod::ApiKey) {
            self.presented_key(headers, query)?
        } else {
            None
        };
        let bearer = if self.methods.contains(&AuthMethod::Jwt)
            || self.methods.contains(&AuthMethod::Introspection)
        {
            self.presented_bearer(headers)?
        } else {
            None
        };
        let cert = self.mtls.as_ref().zip(peer);
        // Exactly one credential: with two, which would the upstream believe?
        let verified_jwt;
        let answer;
        let (consumer, claims) = match (key, bearer, cert) {
            (Some(key), None, None) => (
                creds
                    .consumer_of(key, now)
                    .ok_or_else(|| self.unauthorized())?,
                None,
            ),
            (None, Some(token), None) => {
                // A token that verifies as a JWT of the policy's issuers is
                // one; any other goes to the introspection endpoint.
                let jwt = if self.methods.contains(&AuthMethod::Jwt) {
                    Some(crate::jwt::verify(token, &self.issuers))
                } else {
                    None
                };
                let (subject, claims) = match (jwt, &self.introspector) {
                    (Some(Ok(v)), _) => {
                        verified_jwt = v;
                        (verified_jwt.subject.as_str(), &verified_jwt.claims)
                    }
                    // Keys that could check it are unavailable, and no other
                    // method of this policy can: 503, not 401.
                    (Some(Err(crate::jwt::TokenError::KeysUnavailable)), None) => {
                        return Err(Reject::KeysUnavailable)
                    }
                    (_, Some(introspector)) => {
                        answer = introspector
                            .check(token)
                            .await
                            .map_err(|_| Reject::AuthUnavailable)?;
                        match &*answer {
                            crate::introspect::Answer::Active {
                                subject: Some(subject),
                                claims,
                            } => (subject.as_str(), claims),
                            _ => return Err(self.unauthorized()),
                        }
                    }
                    (_, None) => return Err(self.unauthorized()),
                };
                let consumer = creds
                    .consumer_named(subject)
                    .ok_or_else(|| self.unauthorized())?;
                (consumer, Some(claims))
            }
            (None, None, Some((mtls, chain))) => {
                // A certificate of another CA, expired, or naming no
                // Consumer object is no credential here.
                let name = mtls
                    .identify(chain, now)
                    .ok_or_else(|| self.unauthorized())?;
                let consumer = creds
                    .consumer_named(&name)
                    .ok_or_else(|| self.unauthorized())?;
                (consumer, None)
            }
            _ => return Err(self.unauthorized()),
        };
        if !self.groups.is_empty() && !consumer.groups.iter().any(|g| self.groups.contains(g)) {
            return Err(Reject::Forbidden);
        }
        if self.needs_token {
            // Scopes and claims come with a token; an API key or a client
            // certificate carries none.
            let claims = claims.ok_or(Reject::Forbidden)?;
            let scopes = crate::jwt::claim_values(claims, "scope");
            if !self.scopes.iter().all(|s| scopes.contains(s)) {
                return Err(Reject::Forbidden);
            }
            for rule in &self.claims {
                let values = crate::jwt::claim_values(claims, &rule.claim);
                let ok = match (&rule.equals, &rule.one_of, &rule.contains) {
                    (Some(v), _, _) => values.len() == 1 && values[0] == *v,
                    (_, Some(list), _) => values.len() == 1 && list.contains(&values[0]),
                    (_, _, Some(v)) => values.contains(v),
                    _ => false,
                };
                if !ok {
                    return Err(Reject::Forbidden);
                }
            }
        }
        Ok(Some(consumer))
    }

    /// The API key the request carries, if one; two is an error.
    fn presented_key<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
    ) -> Result<Option<&'a str>, Reject> {
        let mut presented = headers.get_all(&self.key_header).iter();
        let from_header = match (presented.next(), presented.next()) {
            (None, _) => None,
            (Some(v), None) => Some(v.to_str().map_err(|_| self.unauthorized())?),
            (Some(_), Some(_)) => return Err(self.unauthorized()),
        };
        let from_query = match (&self.key_query, query) {
            (Some(param), Some(q)) => {
                let mut values = q.split('&').filter_map(|pair| {
                    pair.split_once('=')
                        .filter(|(k, _)| k == param)
                        .map(|(_, v)| v)
                });
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(v), None) => Some(v),
                    (Some(_), Some(_)) => return Err(self.unauthorized()),
                }
            }
            _ => None,
        };
        match (from_header, from_query) {
            (Some(_), Some(_)) => Err(self.unauthorized()),
            (k, None) | (None, k) => Ok(k),
        }
    }

    /// The bearer token of the one `Authorization` header, if any.
    fn presented_bearer<'a>(&self, headers: &'a HeaderMap) -> Result<Option<&'a str>, Reject> {
        let mut auth = headers.get_all(http::header::AUTHORIZATION).iter();
        match (auth.next(), auth.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => {
                let v = v.to_str().map_err(|_| self.unauthorized())?;
                match v.split_once(' ') {
                    Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                        Ok(Some(token.trim()))
                    }
                    _ => Ok(None),
                }
            }
            (Some(_), Some(_)) => Err(self.unauthorized()),
        }
    }

    /// Removes the credential from what the upstream receives, and returns
    /// the query without the key parameter.
    pub fn strip_credentials<'q>(
        &self,
        headers: &mut HeaderMap,
        query: Option<&'q str>,
    ) -> Option<std::borrow::Cow<'q, str>> {
        // Only a policy that reads API keys owns their header and parameter.
        if !self.methods.contains(&AuthMethod::ApiKey) {
            return query.map(Into::into);
        }
        headers.remove(&self.key_header);
        let q = query?;
        let Some(param) = &self.key_query else {
            return Some(q.into());
        };
        let kept: Vec<&str> = q
            .split('&')
            .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != param)
            .collect();
        (!kept.is_empty()).then(|| kept.join("&").into())
    }
}

/// Sets the identity headers: the client's are always removed first, then
/// the consumer's are added when one was authenticated.
pub fn identity_headers(headers: &mut HeaderMap, consumer: Option<&ConsumerInfo>) {
    headers.remove(&CONSUMER_NAME);
    headers.remove(&CONSUMER_GROUPS);
    if let Some(c) = consumer {
        headers.insert(CONSUMER_NAME, c.name_header.clone());
        headers.insert(CONSUMER_GROUPS, c.groups_header.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::{ApiKey, ApiKeyAuth, Authorization, Consumer};
    use std::time::Duration;

    impl CompiledPolicy {
        /// `authenticate` without a client certificate, to completion.
        fn authenticate_blocking(
            &self,
            creds: &Credentials,
            headers: &HeaderMap,
            query: Option<&str>,
            now: SystemTime,
        ) -> Result<Option<Arc<ConsumerInfo>>, Reject> {
            futures::executor::block_on(self.authenticate(creds, headers, query, None, now))
        }
    }

    fn setup(expires_in: Option<Duration>, revoked: bool) -> (Credentials, String) {
        let mut n = 3u8;
        let (id, secret) = apikey::generate(&mut || {
            n = n.wrapping_mul(29).wrapping_add(11);
            n
        });
        let consumer = Object::Consumer(Consumer {
            name: "acme".into(),
            labels: Default::default(),
            revision: 1,
            groups: vec!["gold".into()],
            metadata: Default::default(),
        });
        let key = Object::ApiKey(ApiKey {
            name: id.clone(),
            labels: Default::default(),
            revision: 2,
            consumer: "acme".into(),
            key_hash: apikey::hash_secret(&secret),
            expires_at: expires_in.map(|d| SystemTime::now() + d),
            revoked,
        });
        let state = ConfigState::from_objects(2, [consumer, key]);
        (
            Credentials::compile(&state).unwrap(),
            apikey::format_key(&id, &secret),
        )
    }

    fn policy(groups: &[&str], query: bool) -> CompiledPolicy {
        CompiledPolicy::compile(
            &Policy {
                name: "p".into(),
                labels: Default::default(),
                revision: 1,
                authentication: vec![AuthMethod::ApiKey],
                api_key: Some(ApiKeyAuth {
                    header: "X-Api-Key".into(),
                    query_param: query.then(|| "api_key".into()),
                }),
                jwt: None,
                mtls: None,
                introspection: None,
                authorization: Authorization {
                    groups: groups.iter().map(|g| g.to_string()).collect(),
                    ..Default::default()
                },
                rate_limits: vec![],
                rate_limit_headers: true,
                quotas: vec![],
                firewall: Default::default(),
            },
            &Default::default(),
            &Default::default(),
            &HashMap::new(),
            &AuthEnv::default(),
        )
        .unwrap()
    }

    fn with(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_valid_key_names_its_consumer_and_anything_else_is_401() {
        let (creds, key) = setup(None, false);
        let p = policy(&[], false);
        let now = SystemTime::now();
        let who = p
            .authenticate_blocking(&creds, &with(&[("x-api-key", &key)]), None, now)
            .unwrap()
            .unwrap();
        assert_eq!(who.name, "acme");
        let status = |h: HeaderMap| {
            p.authenticate_blocking(&creds, &h, None, now)
                .unwrap_err()
                .status()
                .as_u16()
        };
        assert_eq!(status(with(&[])), 401);
        assert_eq!(
            status(with(&[("x-api-key", &key), ("x-api-key", &key)])),
            401,
            "two keys"
        );
        assert_eq!(
            status(with(&[("x-api-key", &format!("{key}x"))])),
            401,
            "a suffix"
        );
        assert_eq!(status(with(&[("x-api-key", &key.to_uppercase())])), 401);
        assert_eq!(status(with(&[("x-api-key", "abc")])), 401);
        assert_eq!(status(with(&[("x-api-key", "")])), 401);
        let err = p
            .authenticate_blocking(&creds, &with(&[]), None, now)
            .unwrap_err();
        let mut h = HeaderMap::new();
        err.write_headers(&mut h);
        assert_eq!(
            h["www-authenticate"],
            "ApiKey realm=\"gatehouse\", header=\"x-api-key\""
        );
    }

    #[test]
    fn expired_and_revoked_keys_are_refused() {
        let now = SystemTime::now();
        let (creds, key) = setup(Some(Duration::from_secs(60)), false);
        let p = policy(&[], false);
        let h = with(&[("x-api-key", &key)]);
        assert!(p.authenticate_blocking(&creds, &h, None, now).is_ok());
        assert!(p
            .authenticate_blocking(&creds, &h, None, now + Duration::from_secs(61))
            .is_err());
        let (creds, key) = setup(None, true);
        assert!(p
            .authenticate_blocking(&creds, &with(&[("x-api-key", &key)]), None, now)
            .is_err());
    }

    #[test]
    fn groups_decide_403_and_a_query_key_only_where_allowed() {
        let (creds, key) = setup(None, false);
        let now = SystemTime::now();
        let h = with(&[("x-api-key", &key)]);
        assert_eq!(
            policy(&["silver"], false)
                .authenticate_blocking(&creds, &h, None, now)
                .unwrap_err(),
            Reject::Forbidden
        );
        assert!(policy(&["gold"], false)
            .authenticate_blocking(&creds, &h, None, now)
            .is_ok());
        let q = format!("a=1&api_key={key}");
        assert!(
            policy(&[], false)
                .authenticate_blocking(&creds, &with(&[]), Some(&q), now)
                .is_err(),
            "not allowed"
        );
        let p = policy(&[], true);
        assert!(p
            .authenticate_blocking(&creds, &with(&[]), Some(&q), now)
            .is_ok());
        assert!(
            p.authenticate_blocking(&creds, &h, Some(&q), now).is_err(),
            "a key in both places"
        );
        let mut headers = h.clone();
        assert_eq!(
            p.strip_credentials(&mut headers, Some(&q)).as_deref(),
            Some("a=1")
        );
        assert!(headers.get("x-api-key").is_none());
    }

    #[test]
    fn only_a_key_policy_strips_the_key_header() {
        let jwt_only = CompiledPolicy::compile(
            &Policy {
                name: "t".into(),
                labels: Default::default(),
                revision: 1,
                authentication: vec![AuthMethod::Jwt],
                api_key: None,
                jwt: Some(gatehouse_model::object::JwtAuth { issuers: vec![] }),
                mtls: None,
                introspection: None,
                authorization: Default::default(),
                rate_limits: vec![],
                rate_limit_headers: true,
                quotas: vec![],
                firewall: Default::default(),
            },
            &Default::default(),
            &Default::default(),
            &HashMap::new(),
            &AuthEnv::default(),
        )
        .unwrap();
        let mut h = with(&[("x-api-key", "for-the-upstream")]);
        assert_eq!(
            jwt_only
                .strip_credentials(&mut h, Some("api_key=1"))
                .as_deref(),
            Some("api_key=1")
        );
        assert_eq!(h["x-api-key"], "for-the-upstream");
        let mut h = with(&[("x-api-key", "secret")]);
        policy(&[], false).strip_credentials(&mut h, None);
        assert!(h.get("x-api-key").is_none());
    }

    #[test]
    fn identity_headers_replace_whatever_the_client_sent() {
        let (creds, key) = setup(None, false);
        let who = policy(&[], false)
            .authenticate_blocking(
                &creds,
                &with(&[("x-api-key", &key)]),
                None,
                SystemTime::now(),
            )
            .unwrap();
        let mut h = with(&[("x-consumer-name", "admin"), ("X-Consumer-Groups", "root")]);
        identity_headers(&mut h, None);
        assert!(h.get("x-consumer-name").is_none() && h.get("x-consumer-groups").is_none());
        let mut h = with(&[("x-consumer-name", "admin")]);
        identity_headers(&mut h, who.as_deref());
        assert_eq!(h["x-consumer-name"], "acme");
        assert_eq!(h["x-consumer-groups"], "gold");
    }

    /// A policy that accepts client certificates of `ca` (and API keys),
    /// with `scopes` required.
    fn cert_policy(ca: &str, scopes: &[&str]) -> CompiledPolicy {
        CompiledPolicy::compile(
            &Policy {
                name: "certs".into(),
                labels: Default::default(),
                revision: 1,
                authentication: vec![AuthMethod::Mtls, AuthMethod::ApiKey],
                api_key: None,
                jwt: None,
                mtls: Some(gatehouse_model::object::MtlsAuth {
                    ca_pem: ca.to_string(),
                    consumer_from: Default::default(),
                }),
                introspection: None,
                authorization: Authorization {
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
                rate_limits: vec![],
                rate_limit_headers: true,
                quotas: vec![],
                firewall: Default::default(),
            },
            &Default::default(),
            &Default::default(),
            &HashMap::new(),
            &AuthEnv::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_client_certificate_is_one_credential_among_the_policy_methods() {
        use crate::mtls::testing::{ca, leaf};
        let (creds, key) = setup(None, false);
        let a = ca("A");
        let chain =
            |cn: &str| crate::mtls::PeerChain::from_ders(vec![leaf(&a, cn, vec![], (-1, 30))]);
        let p = cert_policy(&a.pem, &[]);
        let now = SystemTime::now();
        let run = |h: HeaderMap, peer: Option<&crate::mtls::PeerChain>| {
            futures::executor::block_on(p.authenticate(&creds, &h, None, peer, now))
        };
        let acme = chain("acme");
        assert_eq!(run(with(&[]), Some(&acme)).unwrap().unwrap().name, "acme");
        // A certificate and a key: which would the upstream believe? Neither.
        assert_eq!(
            run(with(&[("x-api-key", &key)]), Some(&acme))
                .unwrap_err()
                .status()
                .as_u16(),
            401
        );
        // Without a certificate the key alone does it.
        assert!(run(with(&[("x-api-key", &key)]), None).is_ok());
        // A certificate naming no Consumer object: 401, and the challenge
        // names both methods.
        let err = run(with(&[]), Some(&chain("nobody"))).unwrap_err();
        let mut h = HeaderMap::new();
        err.write_headers(&mut h);
        assert_eq!(
            h["www-authenticate"],
            "ClientCertificate realm=\"gatehouse\", ApiKey realm=\"gatehouse\", header=\"x-api-key\""
        );
        // A certificate carries no scopes.
        let scoped = cert_policy(&a.pem, &["billing:read"]);
        assert_eq!(
            futures::executor::block_on(scoped.authenticate(
                &creds,
                &with(&[]),
                None,
                Some(&acme),
                now
            ))
            .unwrap_err(),
            Reject::Forbidden
        );
    }
}
