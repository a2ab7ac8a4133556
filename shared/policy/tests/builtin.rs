//! The built-in policies: their suites pass, and they judge a whole app.

// Tests may unwrap, helpers included (the workspace lint allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use gantry_policy::{EnforcementAction, PolicySet, run_suites};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The allowed example Deployment the suites use: satisfies every built-in.
fn good_deployment() -> Value {
    let path = repo_root()
        .join("policies/container-hardening/samples/container-hardening/example_allowed.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// The namespace's default-deny egress NetworkPolicy, as gantry renders it.
fn default_deny_egress() -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "default-deny-egress", "namespace": "web"},
           "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})
}

fn good_namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": "web", "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
}

#[test]
fn builtin_suites_pass() {
    let report = run_suites(&repo_root().join("policies")).unwrap();
    println!("{report}");
    assert_eq!(report.failed, 0, "{report}");
    // Every built-in has allowed and disallowed cases.
    assert!(report.passed >= 40, "{}", report.summary());
}

#[test]
fn every_builtin_suite_has_allowed_and_disallowed_cases() {
    let dirs: Vec<_> = std::fs::read_dir(repo_root().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 13);
    for dir in dirs {
        let suite = std::fs::read_to_string(dir.join("suite.yaml")).unwrap();
        assert!(
            suite.contains("violations: no"),
            "{} has no allowed case",
            dir.display()
        );
        let disallowed = suite.contains("violations: yes") || suite.contains("violations: 1");
        assert!(disallowed, "{} has no disallowed case", dir.display());
    }
}

#[test]
fn builtin_set_passes_a_hardened_app() {
    let set = PolicySet::builtin().unwrap();
    assert_eq!(set.constraints(), 13);
    assert_eq!(
        set.templates(),
        vec![
            "gantryimagedigest",
            "gantryimagenotag",
            "gantrycontainerhardening",
            "gantryseccomp",
            "gantryresources",
            "gantryhostnamespaces",
            "gantryprobes",
            "gantryautomounttoken",
            "gantrynamespacepsa",
            "gantrypubliclb",
            "gantrysecretenv",
            "gantrypipelinesecret",
            "gantryegress",
        ]
    );
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "web"}, "spec": {"ports": [{"port": 80}]}});
    let v = set
        .evaluate(
            &[
                good_namespace(),
                default_deny_egress(),
                good_deployment(),
                service,
            ],
            &[],
        )
        .unwrap();
    assert!(v.is_empty(), "{v:#?}");
}

#[test]
fn builtin_set_flags_every_weakness_of_a_careless_app() {
    let set = PolicySet::builtin().unwrap();
    let careless = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "web"},
        "spec": {"template": {"spec": {
            "hostNetwork": true,
            "containers": [{"name": "web", "image": "contoso.azurecr.io/web:latest",
                            "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]
        }}}
    });
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}});
    let public = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "web"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
    let secret = json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "web", "namespace": "web",
                     "labels": {"app.kubernetes.io/managed-by": "gantry"}}});
    let v = set
        .evaluate(&[namespace, careless, public, secret], &[])
        .unwrap();
    let templates: BTreeSet<&str> = v.iter().map(|v| v.template.as_str()).collect();
    assert_eq!(templates.len(), 13, "{templates:?}");
    assert!(
        v.iter()
            .all(|v| v.enforcement_action == EnforcementAction::Deny)
    );
    let psa: Vec<_> = v
        .iter()
        .filter(|v| v.template == "gantrynamespacepsa")
        .collect();
    assert_eq!(
        (
            psa[0].kind.as_str(),
            psa[0].name.as_str(),
            psa[0].namespace.as_deref()
        ),
        ("Namespace", "web", None)
    );
    let deployment = v.iter().find(|v| v.kind == "Deployment").unwrap();
    assert_eq!(deployment.namespace.as_deref(), Some("web"));
}

/// Not a benchmark (the lead owns those): a sanity figure for the docs.
/// `cargo test -p gantry-policy --release --test builtin -- --ignored --nocapture`
#[test]
#[ignore]
fn evaluation_rate() {
    let set = PolicySet::builtin().unwrap();
    let objects: Vec<Value> = (0..50)
        .map(|i| {
            let mut d = good_deployment();
            d["metadata"]["name"] = json!(format!("web-{i}"));
            d
        })
        .collect();
    let inventory = [good_namespace(), default_deny_egress()];
    for (label, inv) in [
        ("default deny only", &inventory[1..]),
        ("with inventory", &inventory[..]),
    ] {
        let start = Instant::now();
        let rounds = 20;
        for _ in 0..rounds {
            assert!(set.evaluate(&objects, inv).unwrap().is_empty());
        }
        let pairs = rounds * objects.len() * 9; // 9 workload constraints match each Deployment
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{label}: {:.0} (object, constraint) evaluations/s, {:.2} ms per evaluate() of 50 objects",
            pairs as f64 / secs,
            secs * 1000.0 / rounds as f64
        );
    }
    let start = Instant::now();
    for _ in 0..100 {
        assert!(
            set.evaluate(&objects[..1], &inventory[1..])
                .unwrap()
                .is_empty()
        );
    }
    println!(
        "one object: {:.3} ms per evaluate()",
        start.elapsed().as_secs_f64() * 10.0
    );
    let start = Instant::now();
    let _ = PolicySet::builtin().unwrap();
    println!(
        "PolicySet::builtin(): {:.1} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
}
