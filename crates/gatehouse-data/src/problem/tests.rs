use super::*;
use http::header::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use serde_json::Value;

fn all() -> Vec<Reject> {
    vec![
        Reject::BadRequest,
        Reject::Unauthorized {
            challenge: HeaderValue::from_static(r#"Bearer realm="gatehouse""#),
        },
        Reject::Forbidden,
        Reject::Blocked,
        Reject::NoRoute,
        Reject::method_not_allowed(["GET", "HEAD"]),
        Reject::RequestTimeout,
        Reject::PayloadTooLarge,
        Reject::TooManyRequests {
            retry_after_secs: 7,
        },
        Reject::QuotaExceeded {
            retry_after_secs: 60,
        },
        Reject::UriTooLong,
        Reject::HeaderFieldsTooLarge,
        Reject::BadGateway,
        Reject::UpstreamUnavailable,
        Reject::RateLimitUnavailable,
        Reject::KeysUnavailable,
        Reject::AuthUnavailable,
        Reject::NotReady,
        Reject::Overloaded,
        Reject::GatewayTimeout,
    ]
}

fn json(bytes: &Bytes) -> Value {
    serde_json::from_slice(bytes).expect("the body is JSON")
}

#[test]
fn every_reason_has_its_status_and_documented_slug() {
    let expected = [
        (400, "bad-request"),
        (401, "unauthorized"),
        (403, "forbidden"),
        (403, "blocked"),
        (404, "no-route"),
        (405, "method-not-allowed"),
        (408, "request-timeout"),
        (413, "payload-too-large"),
        (429, "too-many-requests"),
        (429, "quota-exceeded"),
        (414, "uri-too-long"),
        (431, "header-fields-too-large"),
        (502, "bad-gateway"),
        (503, "upstream-unavailable"),
        (503, "rate-limit-unavailable"),
        (503, "keys-unavailable"),
        (503, "auth-unavailable"),
        (503, "not-ready"),
        (503, "overloaded"),
        (504, "gateway-timeout"),
    ];
    let got: Vec<(u16, &str)> = all()
        .iter()
        .map(|r| (r.status().as_u16(), r.slug()))
        .collect();
    assert_eq!(got, expected);
    for reject in all() {
        assert_eq!(reject.type_uri(), format!("{TYPE_BASE}{}", reject.slug()));
        assert!(!reject.title().is_empty());
    }
}

#[test]
fn body_has_type_title_status_and_nothing_else_by_default() {
    let body = json(&Reject::GatewayTimeout.body(None, None));
    assert_eq!(
        body,
        serde_json::json!({
            "type": "https://gatehouse.dev/problems/gateway-timeout",
            "title": "Upstream timed out",
            "status": 504,
        })
    );
}

#[test]
fn detail_and_request_id_appear_when_given() {
    let body = json(&Reject::PayloadTooLarge.body(
        Some("the request body exceeds the route's limit"),
        Some("01J9Z3-abc_d.e~f"),
    ));
    assert_eq!(body["detail"], "the request body exceeds the route's limit");
    assert_eq!(body["instance"], "urn:gatehouse:request:01J9Z3-abc_d.e~f");
}

#[test]
fn a_hostile_request_id_is_escaped_into_valid_json_and_a_valid_uri() {
    let id = "a\"b\\c\n</script>é";
    let bytes = Reject::BadRequest.body(Some("say \"hi\"\n"), Some(id));
    let body = json(&bytes);
    assert_eq!(body["detail"], "say \"hi\"\n");
    assert_eq!(
        body["instance"],
        "urn:gatehouse:request:a%22b%5Cc%0A%3C%2Fscript%3E%C3%A9"
    );
    // Nothing of the raw id survives unescaped in the bytes on the wire.
    let raw = std::str::from_utf8(&bytes).unwrap();
    assert!(!raw.contains("</script>"), "{raw}");
}

#[test]
fn every_response_is_problem_json_and_never_cached() {
    for reject in all() {
        let (_, headers, _) = reject.parts(None, None);
        assert_eq!(
            headers[CONTENT_TYPE], "application/problem+json",
            "{reject:?}"
        );
        assert_eq!(headers[CACHE_CONTROL], "no-store", "{reject:?}");
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{reject:?}");
    }
}

#[test]
fn only_the_reasons_that_need_one_carry_an_extra_header() {
    let extra: [HeaderName; 3] = [ALLOW, WWW_AUTHENTICATE, RETRY_AFTER];
    for reject in all() {
        let (_, headers, _) = reject.parts(None, None);
        let present: Vec<&HeaderName> = extra.iter().filter(|h| headers.contains_key(*h)).collect();
        let expected: Vec<&HeaderName> = match reject {
            Reject::Unauthorized { .. } => vec![&extra[1]],
            Reject::MethodNotAllowed { .. } => vec![&extra[0]],
            Reject::TooManyRequests { .. } | Reject::QuotaExceeded { .. } | Reject::Overloaded => {
                vec![&extra[2]]
            }
            _ => vec![],
        };
        assert_eq!(present, expected, "{reject:?}");
    }
}

#[test]
fn extra_headers_carry_the_given_values() {
    let (_, h, _) = Reject::method_not_allowed(["GET", "HEAD", "OPTIONS"]).parts(None, None);
    assert_eq!(h[ALLOW], "GET, HEAD, OPTIONS");

    let (_, h, _) = Reject::TooManyRequests {
        retry_after_secs: 30,
    }
    .parts(None, None);
    assert_eq!(h[RETRY_AFTER], "30");

    let challenge = HeaderValue::from_static(r#"Bearer realm="gatehouse", error="invalid_token""#);
    let (_, h, _) = Reject::Unauthorized {
        challenge: challenge.clone(),
    }
    .parts(None, None);
    assert_eq!(h[WWW_AUTHENTICATE], challenge);
}

#[test]
fn allow_skips_names_that_are_not_tokens() {
    let reject = Reject::method_not_allowed(["GET", "", "BAD METHOD", "PO\r\nST", "PURGE"]);
    assert_eq!(
        reject,
        Reject::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, PURGE")
        }
    );
    let (_, h, _) = Reject::method_not_allowed(Vec::<String>::new()).parts(None, None);
    assert_eq!(h[ALLOW], "", "405 must still send Allow, even empty");
}

#[tokio::test]
async fn response_is_the_same_as_its_parts() {
    let reject = Reject::method_not_allowed(["POST"]);
    let (status, headers, body) = reject.parts(Some("use POST"), Some("r1"));
    let response = reject.response(Some("use POST"), Some("r1"));
    assert_eq!(response.status(), status);
    assert_eq!(response.headers(), &headers);
    let collected = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(collected, body);
    assert_eq!(json(&collected)["status"], 405);
}
