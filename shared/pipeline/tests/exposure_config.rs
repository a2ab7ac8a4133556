//! `[apps.expose]`, `allow_public`, `[apps.keyvault]` and `[apps.egress]` in
//! `gantry.toml`: defaults, what is accepted, and that every bad value is
//! refused with an error naming the key.

#![allow(clippy::unwrap_used)]

use gantry_pipeline::Config;
use gantry_pipeline::exposure::{AzureService, ExposeMode};

const APP: &str =
    "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\n";
const TENANT: &str = "7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13";
const CLIENT: &str = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9";

fn parse(extra: &str) -> Result<Config, String> {
    Config::parse(&format!("{APP}{extra}"), "t").map_err(|e| e.to_string())
}

#[track_caller]
fn refused(extra: &str, needles: &[&str]) {
    let err = parse(extra).expect_err(extra);
    for n in needles {
        assert!(err.contains(n), "{err:?} lacks {n:?} for {extra}");
    }
}

#[test]
fn defaults_are_cluster_only_with_dns_egress() {
    let c = parse("").unwrap();
    let app = &c.apps[0];
    assert_eq!(app.expose.mode, ExposeMode::Cluster);
    assert!(!app.allow_public);
    assert!(app.keyvault.is_none());
    assert!(app.egress.dns);
    assert!(app.egress.cidrs.is_empty() && app.egress.services.is_empty());
}

#[test]
fn every_mode_parses() {
    let c = parse("[apps.expose]\nmode = \"internal-lb\"\ninternal_subnet = \"snet-ilb\"\nsource_ranges = [\"10.0.0.0/16\"]\n").unwrap();
    assert_eq!(c.apps[0].expose.mode, ExposeMode::InternalLb);
    let c = parse("allow_public = true\n[apps.expose]\nmode = \"public-lb\"\n").unwrap();
    assert_eq!(
        c.apps[0].expose.effective_source_ranges(),
        vec!["0.0.0.0/0".to_string()]
    );
    let c = parse("[apps.expose]\nmode = \"ingress\"\nclass = \"azure-application-gateway\"\nhost = \"web.contoso.com\"\nsource_ranges = [\"10.0.4.0/24\"]\n").unwrap();
    assert_eq!(c.apps[0].expose.path(), "/");
    let c = parse("[apps.expose]\nmode = \"cluster\"\nfrom_namespaces = [\"frontend\"]\n").unwrap();
    assert_eq!(c.apps[0].expose.from_namespaces[0].as_str(), "frontend");
}

#[test]
fn public_lb_needs_the_explicit_opt_in() {
    refused(
        "[apps.expose]\nmode = \"public-lb\"\n",
        &["apps[0].expose.mode", "allow_public = true"],
    );
    refused(
        "allow_public = true\n",
        &["apps[0].allow_public", "public-lb"],
    );
}

#[test]
fn bad_exposure_values_are_refused() {
    for (extra, needle) in [
        ("[apps.expose]\nmode = \"nodeport\"\n", "unknown variant"),
        ("[apps.expose]\nmod = \"cluster\"\n", "unknown field"),
        (
            "[apps.expose]\nmode = \"internal-lb\"\nsource_ranges = [\"10.0.0.1/16\"]\n",
            "expose.source_ranges",
        ),
        (
            "[apps.expose]\nmode = \"internal-lb\"\nsource_ranges = [\"10.0.0.0/16 \"]\n",
            "expose.source_ranges",
        ),
        (
            "[apps.expose]\nmode = \"internal-lb\"\ninternal_subnet = \"snet ilb\"\n",
            "expose.internal_subnet",
        ),
        (
            "[apps.expose]\nmode = \"internal-lb\"\nhost = \"web.contoso.com\"\n",
            "host is not used",
        ),
        (
            "[apps.expose]\nsource_ranges = [\"10.0.0.0/16\"]\n",
            "source_ranges is not used",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nhost = \"web.contoso.com\"\ncontroller_namespace = \"ingress\"\n",
            "expose.class",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"Azure\"\nhost = \"web.contoso.com\"\ncontroller_namespace = \"ingress\"\n",
            "expose.class",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web\"\ncontroller_namespace = \"ingress\"\n",
            "expose.host",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web.contoso.com\\n\"\ncontroller_namespace = \"ingress\"\n",
            "expose.host",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web.contoso.com\"\npath = \"/a b\"\ncontroller_namespace = \"ingress\"\n",
            "expose.path",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web.contoso.com\"\n",
            "controller_namespace",
        ),
        (
            "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web.contoso.com\"\ncontroller_namespace = \"Ingress\"\n",
            "controller_namespace",
        ),
    ] {
        refused(extra, &[needle]);
    }
}

#[test]
fn keyvault_parses_and_is_checked() {
    let ok = format!(
        "[apps.keyvault]\nvault_name = \"kv-contoso\"\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\n[[apps.keyvault.secrets]]\nname = \"db-connection\"\nenv = \"DATABASE_URL\"\n"
    );
    let c = parse(&ok).unwrap();
    let kv = c.apps[0].keyvault.as_ref().unwrap();
    assert_eq!(kv.secrets[0].file_env(), "DATABASE_URL_FILE");
    assert_eq!(kv.secrets[0].file_path(), "/mnt/secrets/db-connection");
    for (bad, needle) in [
        (
            ok.replace("kv-contoso", "kv_contoso"),
            "keyvault.vault_name",
        ),
        (ok.replace(TENANT, "not-a-uuid"), "keyvault.tenant_id"),
        (ok.replace(CLIENT, "0b1c2d3e"), "keyvault.client_id"),
        (
            ok.replace("db-connection", "db_connection"),
            "keyvault.secrets.name",
        ),
        (
            ok.replace("DATABASE_URL", "DATABASE-URL"),
            "keyvault.secrets.env",
        ),
        (
            format!("{ok}[[apps.keyvault.secrets]]\nname = \"DB-connection\"\nenv = \"OTHER\"\n"),
            "listed twice",
        ),
        (
            format!("{ok}[[apps.keyvault.secrets]]\nname = \"other\"\nenv = \"DATABASE_URL\"\n"),
            "listed twice",
        ),
        (
            format!("[apps.env]\nDATABASE_URL_FILE = \"/x\"\n{ok}"),
            "also set in [apps.env]",
        ),
        (format!("{ok}value = \"x\"\n"), "unknown field"),
        (
            ok.split("[[apps.keyvault.secrets]]")
                .next()
                .unwrap()
                .to_string(),
            "at least one",
        ),
    ] {
        refused(&bad, &[needle]);
    }
}

#[test]
fn secret_looking_env_is_refused() {
    refused(
        "[apps.env]\nDB_PASSWORD = \"hunter2\"\n",
        &[
            "apps[0].env",
            "DB_PASSWORD",
            "looks like a secret",
            "[apps.keyvault]",
        ],
    );
    refused(
        "[apps.env]\nDSN = \"Server=db;AccountKey=abc==\"\n",
        &["apps[0].env", "DSN", "accountkey="],
    );
    refused("[apps.env]\nSIGNING_KEY = \"x\"\n", &["_KEY"]);
    // Neither the value nor the refusal may echo the secret.
    let err = parse("[apps.env]\nDB_PASSWORD = \"hunter2\"\n").unwrap_err();
    assert!(!err.contains("hunter2"), "{err}");
    assert!(
        parse("[apps.env]\nLOG_LEVEL = \"debug\"\nDB_PASSWORD_FILE = \"/mnt/secrets/db\"\n")
            .is_ok()
    );
}

#[test]
fn egress_parses_and_is_checked() {
    let c = parse("[apps.egress]\ndns = false\ncidrs = [\"10.1.0.0/16\"]\nports = [5432]\nservices = [\"keyvault\", \"sql\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n").unwrap();
    let e = &c.apps[0].egress;
    assert!(!e.dns);
    assert_eq!(e.services, [AzureService::Keyvault, AzureService::Sql]);
    for (bad, needle) in [
        ("[apps.egress]\ncidrs = [\"10.1.0.0/33\"]\n", "egress.cidrs"),
        ("[apps.egress]\nports = [443]\n", "egress.ports"),
        (
            "[apps.egress]\ncidrs = [\"10.1.0.0/16\"]\nports = [0]\n",
            "egress.ports",
        ),
        (
            "[apps.egress]\nservices = [\"keyvault\"]\n",
            "egress.private_endpoint_cidr",
        ),
        (
            "[apps.egress]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n",
            "egress.private_endpoint_cidr",
        ),
        (
            "[apps.egress]\nservices = [\"keyvault\", \"keyvault\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n",
            "listed twice",
        ),
        (
            "[apps.egress]\nservices = [\"ftp\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n",
            "unknown variant",
        ),
        (
            "[apps.egress]\nservices = [\"sql\"]\nprivate_endpoint_cidr = \"10.0.8.1/24\"\n",
            "host bits",
        ),
        ("[apps.egress]\nfqdns = [\"x.com\"]\n", "unknown field"),
        (
            "[apps.egress]\nservices = [\"sql\"]\n[apps.egress.service_cidrs]\nredis = \"10.0.9.0/24\"\n",
            "\"redis\" is not in egress.services",
        ),
        (
            "[apps.egress]\nservices = [\"sql\"]\n[apps.egress.service_cidrs]\nsql = \"10.0.9.0\"\n",
            "egress.service_cidrs",
        ),
        (
            "[apps.egress]\nservices = [\"sql\", \"redis\"]\n[apps.egress.service_cidrs]\nsql = \"10.0.9.0/24\"\n",
            "egress.service_cidrs.redis",
        ),
        (
            "[apps.egress]\nservices = [\"sql\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n[apps.egress.service_cidrs]\nsql = \"10.0.9.0/24\"\n",
            "no service uses it",
        ),
    ] {
        refused(bad, &[needle]);
    }
}

/// The commented `[apps.keyvault]` and `[apps.egress]` examples in
/// `gantry.toml` are valid once uncommented (the docs cannot rot silently).
#[test]
fn commented_examples_in_gantry_toml_are_valid() {
    let example = gantry_pipeline::config::EMBEDDED_EXAMPLE;
    let block = |header: &str| -> String {
        let start = example
            .find(&format!("# {header}\n"))
            .unwrap_or_else(|| panic!("{header} example missing"));
        example[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let text = format!(
        "{APP}{}\n{}\n",
        block("[apps.keyvault]"),
        block("[apps.egress]")
    );
    let c = Config::parse(&text, "example").unwrap();
    let app = &c.apps[0];
    assert_eq!(
        app.keyvault.as_ref().unwrap().secrets[0].env,
        "DATABASE_URL"
    );
    assert_eq!(
        app.egress.services,
        [AzureService::Keyvault, AzureService::Sql]
    );
}

#[test]
fn per_service_cidrs_override_the_private_endpoint_subnet() {
    let c = parse("[apps.egress]\nservices = [\"keyvault\", \"sql\", \"storage\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n[apps.egress.service_cidrs]\nsql = \"10.0.9.0/24\"\n").unwrap();
    assert_eq!(
        c.apps[0].egress.service_rules(),
        vec![
            ("10.0.8.0/24".to_string(), vec![(443, 443)]),
            (
                "10.0.9.0/24".to_string(),
                vec![(1433, 1433), (11000, 11999)]
            ),
        ]
    );
    // Every service with its own CIDR: no shared subnet needed.
    let c = parse(
        "[apps.egress]\nservices = [\"sql\"]\n[apps.egress.service_cidrs]\nsql = \"10.0.9.0/24\"\n",
    )
    .unwrap();
    assert_eq!(c.apps[0].egress.service_rules().len(), 1);
}

/// Egress to the whole internet needs `allow_internet = true`, like a public
/// load balancer needs `allow_public = true`; the opt-in alone is refused,
/// and a private-endpoint subnet is never the whole address space.
#[test]
fn internet_egress_needs_the_explicit_opt_in() {
    refused(
        "[apps.egress]\ncidrs = [\"0.0.0.0/0\"]\n",
        &[
            "apps[0].egress.cidrs",
            "\"0.0.0.0/0\" is the whole internet",
            "allow_internet = true",
        ],
    );
    refused(
        "[apps.egress]\ncidrs = [\"10.1.0.0/16\", \"::/0\"]\nports = [443]\n",
        &["apps[0].egress.cidrs", "\"::/0\"", "allow_internet = true"],
    );
    refused(
        "[apps.egress]\nallow_internet = true\ncidrs = [\"10.1.0.0/16\"]\n",
        &["apps[0].egress.allow_internet", "0.0.0.0/0"],
    );
    refused(
        "[apps.egress]\nallow_internet = true\n",
        &["apps[0].egress.allow_internet"],
    );
    for key in [
        "private_endpoint_cidr = \"0.0.0.0/0\"\n",
        "[apps.egress.service_cidrs]\nsql = \"0.0.0.0/0\"\n",
    ] {
        refused(
            &format!("[apps.egress]\nservices = [\"sql\"]\n{key}"),
            &["whole address space"],
        );
    }
    let c = parse("[apps.egress]\nallow_internet = true\ncidrs = [\"0.0.0.0/0\"]\nports = [443]\n")
        .unwrap();
    assert!(c.apps[0].egress.allow_internet);
    assert!(!parse("").unwrap().apps[0].egress.allow_internet);
}
