//! Credentials of the authentication targets of `gatehouse-bench proxies`:
//! an RSA 2048 and a P-256 key pair (made with `openssl`, as an operator
//! would), and a token signed with each that both Gatehouse and HAProxy
//! accept: issuer, audience and expiry set, the key's algorithm in the header.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};

pub const ISSUER: &str = "https://idp.bench.invalid/";
pub const AUDIENCE: &str = "bench-api";
/// The consumer the tokens name (`sub`) and the API key belongs to.
pub const CONSUMER: &str = "bench";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }
}

/// A key pair and a token it signed.
#[derive(Clone, Debug)]
pub struct Signed {
    /// The public key, PEM (SubjectPublicKeyInfo).
    pub public_pem: String,
    /// The same, as a file (HAProxy's `jwt_verify` reads a file).
    pub public_file: PathBuf,
    pub token: String,
}

/// Both key pairs and tokens.
#[derive(Clone, Debug)]
pub struct Material {
    pub rs256: Signed,
    pub es256: Signed,
}

impl Material {
    pub fn of(&self, alg: Alg) -> &Signed {
        match alg {
            Alg::Rs256 => &self.rs256,
            Alg::Es256 => &self.es256,
        }
    }
}

/// Made on first use, then shared by every JWT target of the run.
#[derive(Default)]
pub struct Lazy(Option<Material>);

impl Lazy {
    pub fn get(&mut self, dir: &Path) -> Result<Material> {
        if let Some(m) = &self.0 {
            return Ok(m.clone());
        }
        let m = Material {
            rs256: signed(dir, Alg::Rs256)?,
            es256: signed(dir, Alg::Es256)?,
        };
        self.0 = Some(m.clone());
        Ok(m)
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .context("running openssl (install it with `apt-get install -y openssl`)")?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn signed(dir: &Path, alg: Alg) -> Result<Signed> {
    let name = alg.name().to_lowercase();
    let private = dir.join(format!("{name}-private.pem"));
    let public = dir.join(format!("{name}-public.pem"));
    let private_s = private.to_str().context("a UTF-8 temp path")?;
    let public_s = public.to_str().context("a UTF-8 temp path")?;
    match alg {
        Alg::Rs256 => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            private_s,
        ])?,
        Alg::Es256 => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            private_s,
        ])?,
    }
    openssl(&["pkey", "-in", private_s, "-pubout", "-out", public_s])?;
    let private_pem = std::fs::read(&private)?;
    let key = match alg {
        Alg::Rs256 => jsonwebtoken::EncodingKey::from_rsa_pem(&private_pem)?,
        Alg::Es256 => jsonwebtoken::EncodingKey::from_ec_pem(&private_pem)?,
    };
    let header = jsonwebtoken::Header::new(match alg {
        Alg::Rs256 => jsonwebtoken::Algorithm::RS256,
        Alg::Es256 => jsonwebtoken::Algorithm::ES256,
    });
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": CONSUMER,
        "iat": now,
        // Valid for the whole run.
        "exp": now + 24 * 3600,
    });
    let token = jsonwebtoken::encode(&header, &claims, &key)?;
    Ok(Signed {
        public_pem: std::fs::read_to_string(&public)?,
        public_file: public,
        token,
    })
}
