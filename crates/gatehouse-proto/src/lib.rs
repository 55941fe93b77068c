//! Generated gRPC code for `proto/gatehouse/v1`, and the conversions between
//! its messages and the domain types of `gatehouse-model`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use gatehouse_model::{ErrorCode, Kind, Object, ObjectRef};

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("gatehouse.v1");
}

pub use v1 as pb;

pub mod tls;

/// The metadata entry that carries the leader's admin address on UNAVAILABLE.
pub const LEADER_HINT: &str = "x-gatehouse-leader";
/// Set on an UNAVAILABLE answer when the cluster did not act on the request
/// (for example no leader was known): retrying it cannot apply it twice.
pub const NOT_APPLIED: &str = "x-gatehouse-not-applied";
/// Set on a request one node forwards to the leader, so it is never forwarded twice.
pub const FORWARDED: &str = "x-gatehouse-forwarded";
/// Set on the FAILED_PRECONDITION answer of a control-plane node that
/// refuses a data plane of another cluster: the node's own cluster id.
pub const CLUSTER_ID: &str = "x-gatehouse-cluster-id";
/// The longest cluster id accepted in a config-stream hello or a flag
/// (the control plane makes 24 hex digits).
pub const MAX_CLUSTER_ID_LEN: usize = 64;

/// Checks the form of a cluster id: 1 to [`MAX_CLUSTER_ID_LEN`] characters
/// of `a-z`, `A-Z`, `0-9`, `-` and `_` (ids made by the control plane are
/// hex). `Err` says what is wrong, for the caller to name the field.
pub fn check_cluster_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLUSTER_ID_LEN {
        return Err(format!(
            "must be 1 to {MAX_CLUSTER_ID_LEN} characters, not {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("may hold only a-z, A-Z, 0-9, '-' and '_'".into());
    }
    Ok(())
}

/// The largest admin request accepted: one write, all of whose objects
/// become one Raft log entry.
pub const MAX_ADMIN_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// The largest admin response (a list of every object can be large).
pub const MAX_ADMIN_RESPONSE_BYTES: usize = 512 * 1024 * 1024;
/// The largest raft message; bigger batches of entries are split.
pub const MAX_RAFT_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Adds `authorization: Bearer TOKEN` to every call of a client, marked
/// sensitive so that it never shows in debug output or logs.
#[derive(Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(..)"
        } else {
            "BearerToken(none)"
        })
    }
}

impl BearerToken {
    /// `None` sends no credential (the server then answers UNAUTHENTICATED).
    pub fn new(token: Option<&str>) -> Result<BearerToken, InvalidMessage> {
        let Some(token) = token.map(str::trim) else {
            return Ok(BearerToken(None));
        };
        let mut value: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| InvalidMessage::Field {
                    field: "token".into(),
                    message: "must be printable ASCII".into(),
                })?;
        value.set_sensitive(true);
        Ok(BearerToken(Some(value)))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An admin client that sends a token with every call.
pub type AdminClient = pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// A proto message that does not describe a valid domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("{field}: is required")]
    Missing { field: &'static str },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

pub fn parse_kind(field: &str, kind: &str) -> Result<Kind, InvalidMessage> {
    kind.parse().map_err(
        |e: gatehouse_model::object::UnknownKind| InvalidMessage::Field {
            field: field.to_string(),
            message: e.to_string(),
        },
    )
}

impl TryFrom<pb::Object> for Object {
    type Error = InvalidMessage;

    fn try_from(o: pb::Object) -> Result<Self, Self::Error> {
        let kind = parse_kind("object.kind", &o.kind)?;
        let spec: serde_json::Value = if o.spec_json.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(&o.spec_json).map_err(|e| InvalidMessage::Field {
                field: "object.spec_json".into(),
                message: format!("is not JSON: {e}"),
            })?
        };
        let serde_json::Value::Object(mut map) = spec else {
            return Err(InvalidMessage::Field {
                field: "object.spec_json".into(),
                message: "must be a JSON object".into(),
            });
        };
        for reserved in ["kind", "name", "labels", "revision"] {
            if map.contains_key(reserved) {
                return Err(InvalidMessage::Field {
                    field: "object.spec_json".into(),
                    message: format!(
                        "must not hold \"{reserved}\"; it is a field of the object message"
                    ),
                });
            }
        }
        map.insert("kind".into(), kind.as_str().into());
        map.insert("name".into(), o.name.into());
        map.insert("revision".into(), o.revision.into());
        let labels: serde_json::Map<_, _> = o
            .labels
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        map.insert("labels".into(), labels.into());
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| InvalidMessage::Field {
            field: format!("{kind} spec"),
            message: e.to_string(),
        })
    }
}

impl From<&Object> for pb::Object {
    fn from(o: &Object) -> Self {
        let mut value = serde_json::to_value(o).expect("objects serialize to JSON");
        if let Some(map) = value.as_object_mut() {
            for reserved in ["kind", "name", "labels", "revision"] {
                map.remove(reserved);
            }
        }
        pb::Object {
            kind: o.kind().as_str().to_string(),
            name: o.name().to_string(),
            labels: o
                .labels()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            revision: o.revision(),
            spec_json: value.to_string(),
        }
    }
}

impl TryFrom<pb::ObjectRef> for ObjectRef {
    type Error = InvalidMessage;

    fn try_from(r: pb::ObjectRef) -> Result<Self, Self::Error> {
        Ok(ObjectRef {
            kind: parse_kind("target.kind", &r.kind)?,
            name: r.name,
        })
    }
}

impl From<&ObjectRef> for pb::ObjectRef {
    fn from(r: &ObjectRef) -> Self {
        pb::ObjectRef {
            kind: r.kind.as_str().to_string(),
            name: r.name.clone(),
        }
    }
}

/// The gRPC status code for a domain error code.
pub fn grpc_code(code: ErrorCode) -> tonic::Code {
    match code {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::Conflict => tonic::Code::Aborted,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::Unavailable => tonic::Code::Unavailable,
        ErrorCode::Internal => tonic::Code::Internal,
    }
}

/// The labels of a message as the domain's ordered map.
pub fn labels(map: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::Consumer;

    #[test]
    fn objects_round_trip_through_the_message() {
        let consumer = Object::Consumer(Consumer {
            name: "acme".into(),
            labels: [("team".to_string(), "pay".to_string())].into(),
            revision: 7,
            groups: vec!["gold".into()],
            metadata: Default::default(),
        });
        let msg = pb::Object::from(&consumer);
        assert_eq!(msg.kind, "consumer");
        assert!(
            !msg.spec_json.contains("acme"),
            "name travels outside the spec"
        );
        assert_eq!(Object::try_from(msg).unwrap(), consumer);
    }

    #[test]
    fn bad_messages_name_the_field() {
        let msg = |kind: &str, spec: &str| pb::Object {
            kind: kind.into(),
            name: "x".into(),
            spec_json: spec.into(),
            ..Default::default()
        };
        let e = Object::try_from(msg("router", "{}")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("object.kind: unknown kind \"router\""),
            "{e}"
        );
        let e = Object::try_from(msg("consumer", "[1]")).unwrap_err();
        assert_eq!(e.to_string(), "object.spec_json: must be a JSON object");
        let e = Object::try_from(msg("consumer", r#"{"name":"y"}"#)).unwrap_err();
        assert!(e.to_string().contains("must not hold \"name\""), "{e}");
        let e = Object::try_from(msg("consumer", r#"{"grups":[]}"#)).unwrap_err();
        assert!(e.to_string().contains("unknown field `grups`"), "{e}");
    }
}

#[cfg(test)]
mod cluster_id_tests {
    use super::check_cluster_id;

    #[test]
    fn cluster_ids_are_short_plain_words() {
        assert!(check_cluster_id("3f9c0a1b2c3d4e5f60718293").is_ok());
        assert!(check_cluster_id("staging-eu_1").is_ok());
        assert!(check_cluster_id(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "x\n", "naïve", "a/b"] {
            assert!(check_cluster_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_cluster_id(&"a".repeat(65)).is_err());
    }
}
