//! `gatehouse certs init`: a development CA and certificates for
//! control-plane nodes, data planes and admins, in one directory.
//!
//! Each certificate names its holder in the subject's CN and its role in
//! the OU (`control_plane`, `data_plane`, `admin`, `editor`, `viewer`),
//! which is how the cluster tells who is on the other end of a connection.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Flags of `gatehouse certs init`.
#[derive(Args)]
pub struct InitArgs {
    /// Directory to write into (created; existing files are never overwritten).
    #[arg(long, default_value = "gatehouse-certs")]
    dir: PathBuf,
    /// Control-plane node names (CN and a DNS name); repeat or separate with commas.
    #[arg(long = "control-plane", value_delimiter = ',', default_values_t = ["cp-1".to_string(), "cp-2".to_string(), "cp-3".to_string()])]
    control_planes: Vec<String>,
    /// Data-plane names; repeat or separate with commas.
    #[arg(long = "data-plane", value_delimiter = ',', default_values_t = ["dp-1".to_string()])]
    data_planes: Vec<String>,
    /// Admin client certificates, as NAME or NAME:ROLE (admin, editor, viewer).
    #[arg(long = "admin", value_delimiter = ',', default_values_t = ["admin".to_string()])]
    admins: Vec<String>,
    /// Extra names (DNS names or IP addresses) in every control-plane node's
    /// certificate. `localhost`, `127.0.0.1` and `::1` are always in.
    #[arg(long = "san", value_delimiter = ',')]
    sans: Vec<String>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !ok {
        bail!("{what} name {name:?}: use 1 to 64 characters of a-z, A-Z, 0-9, '-', '_' and '.'");
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, days: u32) {
    let now = rcgen::date_time_ymd(1970, 1, 1)
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
    params.not_before = now - std::time::Duration::from_secs(3600);
    params.not_after = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
}

pub fn init(args: &InitArgs) -> Result<()> {
    if args.days == 0 || args.days > 3650 {
        bail!("--days must be 1 to 3650");
    }
    let mut leaves: Vec<(String, &str, Vec<String>)> = Vec::new();
    for name in &args.control_planes {
        check_name("control-plane", name)?;
        let mut sans = vec![
            name.clone(),
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into(),
        ];
        sans.extend(args.sans.iter().cloned());
        leaves.push((name.clone(), "control_plane", sans));
    }
    for name in &args.data_planes {
        check_name("data-plane", name)?;
        leaves.push((name.clone(), "data_plane", vec![name.clone()]));
    }
    for admin in &args.admins {
        let (name, role) = admin.split_once(':').unwrap_or((admin, "admin"));
        check_name("admin", name)?;
        let role = match role {
            "admin" => "admin",
            "editor" => "editor",
            "viewer" => "viewer",
            other => bail!("--admin {admin:?}: role {other:?} is not admin, editor or viewer"),
        };
        leaves.push((name.to_string(), role, vec![name.to_string()]));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (name, _, _) in &leaves {
        if !seen.insert(name.as_str()) {
            bail!("{name:?} is named twice: every certificate needs its own name");
        }
    }

    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Gatehouse development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params, args.days);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    crate::tokens::write_new(&args.dir.join("ca-key.pem"), &ca_key.serialize_pem(), true)?;
    crate::tokens::write_new(&args.dir.join("ca.pem"), &ca_cert.pem(), false)?;
    let issuer = Issuer::new(ca_params, ca_key);

    for (name, role, sans) in &leaves {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, *role);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if *role == "control_plane" {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        validity(&mut params, args.days);
        let cert = params.signed_by(&key, &issuer)?;
        crate::tokens::write_new(
            &args.dir.join(format!("{name}-key.pem")),
            &key.serialize_pem(),
            true,
        )?;
        crate::tokens::write_new(&args.dir.join(format!("{name}.pem")), &cert.pem(), false)?;
        eprintln!("{name}: {role} ({name}.pem, {name}-key.pem)");
    }
    eprintln!(
        "wrote a development CA and {} certificates to {}; keep ca-key.pem offline or delete it",
        leaves.len(),
        args.dir.display()
    );
    Ok(())
}
