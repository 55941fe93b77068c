//! The firewall rule compiler: a policy firewall built from the input
//! (one field per line), validated as the control plane validates it, must
//! compile on the data plane whenever validation accepts it, and the
//! compiled rules must then check a request made of the same input without
//! panicking. Validation and compilation disagreeing is a bug: the control
//! plane would accept a revision every data plane refuses.
#![no_main]

use gatehouse_data::firewall::CompiledFirewall;
use gatehouse_data::metrics::Metrics;
use gatehouse_model::object::{Cors, Firewall, Object, Policy, RuleMode};
use gatehouse_model::validate::validate_object;
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;
use std::time::Duration;

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

fn mode(b: u8) -> RuleMode {
    match b % 3 {
        0 => RuleMode::Off,
        1 => RuleMode::Detect,
        _ => RuleMode::Block,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut fw = Firewall {
        sql_injection: mode(head),
        xss: mode(head / 3),
        ..Firewall::default()
    };
    let mut sample = Vec::new();
    let new_cors = || Cors {
        allowed_origins: Vec::new(),
        allowed_methods: Vec::new(),
        allowed_headers: Vec::new(),
        allow_credentials: head & 0x80 != 0,
        max_age: Duration::from_secs(60),
    };
    // Each line is `<field selector><value>`.
    for line in text.lines() {
        let mut chars = line.chars();
        let Some(selector) = chars.next() else {
            continue;
        };
        let value = chars.as_str().to_string();
        match selector {
            'a' => fw.allow_ips.push(value),
            'd' => fw.deny_ips.push(value),
            't' => fw.trusted_proxies.push(value),
            'm' => fw.allowed_methods.push(value),
            'h' => fw.inspect_headers.push(value),
            'u' => fw.deny_user_agents.push(value),
            'b' => fw.max_body_bytes = value.parse().ok(),
            'x' => fw.max_header_bytes = value.parse().ok(),
            'i' => fw.inspect_body_bytes = value.parse().unwrap_or(0),
            'o' => fw
                .cors
                .get_or_insert_with(new_cors)
                .allowed_origins
                .push(value),
            'M' => fw
                .cors
                .get_or_insert_with(new_cors)
                .allowed_methods
                .push(value),
            'H' => fw
                .cors
                .get_or_insert_with(new_cors)
                .allowed_headers
                .push(value),
            _ => sample.push(line.to_string()),
        }
    }
    let policy = Policy {
        firewall: fw.clone(),
        ..serde_json::from_str::<Policy>(r#"{"name":"fuzz"}"#).expect("a minimal policy")
    };
    let valid = validate_object(&Object::Policy(policy)).is_ok();
    let compiled = CompiledFirewall::compile("fuzz", &fw);
    if valid {
        let compiled = compiled.expect("a firewall that validates compiles");
        let joined = sample.join("\n");
        let mut headers = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&joined) {
            headers.insert(http::header::USER_AGENT, v.clone());
            headers.insert(http::header::REFERER, v.clone());
            headers.insert(http::header::ORIGIN, v);
        }
        let _ = compiled.check_content("fuzz", &joined, Some(&joined), &headers, &METRICS);
        if let Some((n, kind)) = compiled.body_inspection(&headers) {
            let _ = compiled.check_body(
                "fuzz",
                &joined.as_bytes()[..joined.len().min(n)],
                kind,
                &METRICS,
            );
        }
        if let Some(cors) = &compiled.cors {
            let _ = cors.preflight(&http::Method::GET, &headers);
            let mut response = http::HeaderMap::new();
            if let Some(origin) = headers.get(http::header::ORIGIN) {
                cors.decorate(origin, &mut response);
            }
        }
    }
});
