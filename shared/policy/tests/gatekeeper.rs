//! Gatekeeper semantics, on templates in the real gatekeeper-library format
//! (fixtures authored for these tests under `tests/fixtures/`).

// Tests may unwrap, helpers included (the workspace lint allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use gantry_policy::{EnforcementAction, PolicyError, PolicySet, Violation, run_suites};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A temporary folder with the given files.
fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// A template in the legacy `rego` form; the Rego starts on YAML line 13.
fn template_yaml(name: &str, kind: &str, rego: &str) -> String {
    let mut yaml = format!(
        "apiVersion: templates.gatekeeper.sh/v1\nkind: ConstraintTemplate\nmetadata:\n  name: {name}\n\
         spec:\n  crd:\n    spec:\n      names:\n        kind: {kind}\n  targets:\n    \
         - target: admission.k8s.gatekeeper.sh\n      rego: |\n"
    );
    for line in rego.lines() {
        if !line.is_empty() {
            yaml.push_str("        ");
        }
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml
}

fn always_template() -> String {
    std::fs::read_to_string(fixtures().join("always/template.yaml")).unwrap()
}

fn ns(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn deployment(name: &str, namespace: &str, labels: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}})
}

fn ingress(name: &str, namespace: &str, host: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"rules": [{"host": host}]}})
}

/// `constraint-name object-name` for every violation, for compact asserts.
fn hits(violations: &[Violation]) -> Vec<String> {
    violations
        .iter()
        .map(|v| format!("{} {}", v.constraint, v.name))
        .collect()
}

#[test]
fn rego_form_with_parameters_and_re_match() {
    let dir = fixtures().join("library/general/requiredlabels");
    let set = PolicySet::load(false, Some(&dir.join("template.yaml"))).unwrap();
    assert_eq!(set.templates(), vec!["k8srequiredlabels"]);
    assert_eq!(set.constraints(), 0);

    let constraint = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sRequiredLabels\n\
        metadata:\n  name: owner\nspec:\n  parameters:\n    message: custom\n    labels:\n    - key: owner\n      allowedRegex: '^team-'\n";
    let tpl = std::fs::read_to_string(dir.join("template.yaml")).unwrap();
    let both = folder(&[("t.yaml", &tpl), ("c.yaml", constraint)]);
    let set = PolicySet::load(false, Some(both.path())).unwrap();
    assert_eq!(set.constraints(), 1);
    let v = set
        .evaluate(
            &[
                ns("good", json!({"owner": "team-a"})),
                ns("bad-value", json!({"owner": "bob"})),
                ns("missing", json!({})),
            ],
            &[],
        )
        .unwrap();
    assert_eq!(hits(&v), vec!["owner bad-value", "owner missing"]);
    // The constraint's `message` parameter replaces the default message.
    assert!(v.iter().all(|v| v.message == "custom"), "{v:?}");
    assert_eq!(v[0].template, "k8srequiredlabels");
    assert_eq!(v[0].kind, "Namespace");
    assert_eq!(v[0].namespace, None);
    assert_eq!(v[0].enforcement_action, EnforcementAction::Deny);
}

#[test]
fn code_form_with_libs_and_inventory() {
    let dir = fixtures().join("library/general/uniqueingresshost");
    let set = PolicySet::load(false, Some(&dir)).unwrap();
    assert_eq!(set.templates(), vec!["k8suniqueingresshost"]);
    assert_eq!(set.constraints(), 1);

    let existing = [ingress("shop", "shop", "shop.contoso.com")];
    // A new host is fine; a taken host is not; the object itself (same
    // namespace/name already in the cluster) is not a conflict.
    let v = set
        .evaluate(&[ingress("web", "web", "web.contoso.com")], &existing)
        .unwrap();
    assert!(v.is_empty(), "{v:?}");
    let v = set
        .evaluate(&[ingress("web", "web", "shop.contoso.com")], &existing)
        .unwrap();
    assert_eq!(hits(&v), vec!["unique-ingress-host web"]);
    assert_eq!(v[0].namespace.as_deref(), Some("web"));
    assert!(v[0].message.contains("<shop/shop>"), "{}", v[0].message);
    let v = set
        .evaluate(&[ingress("shop", "shop", "shop.contoso.com")], &existing)
        .unwrap();
    assert!(v.is_empty(), "{v:?}");
    // Objects deployed together see each other.
    let v = set
        .evaluate(
            &[
                ingress("a", "web", "x.contoso.com"),
                ingress("b", "web", "x.contoso.com"),
            ],
            &[],
        )
        .unwrap();
    assert_eq!(
        hits(&v),
        vec!["unique-ingress-host a", "unique-ingress-host b"]
    );
    // Other kinds do not match the constraint.
    let v = set
        .evaluate(&[deployment("d", "web", json!({}))], &existing)
        .unwrap();
    assert!(v.is_empty());
}

#[test]
fn libs_with_the_same_package_stay_per_template() {
    let set = PolicySet::load(false, Some(&fixtures().join("shared-lib"))).unwrap();
    assert_eq!(set.templates(), vec!["k8sliba", "k8slibb"]);
    let v = set.evaluate(&[ns("n", json!({}))], &[]).unwrap();
    let messages: Vec<&str> = v.iter().map(|v| v.message.as_str()).collect();
    assert_eq!(messages, vec!["template A saw n", "template B saw n"]);
}

#[test]
fn match_criteria_follow_gatekeeper() {
    let constraints = r#"
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: everything}
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: apps-kinds}
spec:
  match:
    kinds: [{apiGroups: ["apps"], kinds: ["*"]}]
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: core-namespaces}
spec:
  match:
    kinds: [{apiGroups: ["*"], kinds: ["Namespace"]}]
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: in-team}
spec:
  match:
    namespaces: ["team-*", "exact"]
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: not-system}
spec:
  match:
    excludedNamespaces: ["*-system"]
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: labelled}
spec:
  match:
    labelSelector:
      matchLabels: {app: web}
      matchExpressions:
      - {key: tier, operator: In, values: [front, back]}
      - {key: env, operator: NotIn, values: [dev]}
      - {key: owner, operator: Exists}
      - {key: legacy, operator: DoesNotExist}
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: prod-namespaces}
spec:
  match:
    namespaceSelector:
      matchLabels: {env: prod}
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: cluster-scope}
spec:
  match:
    scope: Cluster
---
apiVersion: constraints.gatekeeper.sh/v1beta1
kind: K8sAlways
metadata: {name: named}
spec:
  match:
    name: "web-*"
"#;
    let dir = folder(&[
        ("template.yaml", &always_template()),
        ("constraints.yaml", constraints),
    ]);
    let set = PolicySet::load(false, Some(dir.path())).unwrap();
    assert_eq!(set.constraints(), 9);

    let web_labels = json!({"app": "web", "tier": "front", "owner": "me"});
    let objects = [
        deployment("web-1", "team-a", web_labels.clone()),
        deployment("plain", "kube-system", json!({})),
        deployment(
            "labelled-dev",
            "exact",
            json!({"app": "web", "tier": "back", "owner": "x", "env": "dev"}),
        ),
        ns("team-a", json!({"env": "prod"})),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "web-reader"}}),
    ];
    let v = set.evaluate(&objects, &[]).unwrap();
    let got = hits(&v);
    let want = vec![
        // web-1 in team-a (namespace labelled env=prod, found among the objects)
        "everything web-1",
        "apps-kinds web-1",
        "in-team web-1",
        "not-system web-1",
        "labelled web-1",
        "prod-namespaces web-1",
        "named web-1",
        // plain in kube-system: excluded by not-system; its namespace is unknown (no labels)
        "everything plain",
        "apps-kinds plain",
        // labelled-dev: env=dev fails NotIn
        "everything labelled-dev",
        "apps-kinds labelled-dev",
        "in-team labelled-dev",
        "not-system labelled-dev",
        // a Namespace is in itself: team-a matches namespaces and its own labels
        "everything team-a",
        "core-namespaces team-a",
        "in-team team-a",
        "not-system team-a",
        "prod-namespaces team-a",
        "cluster-scope team-a",
        // cluster-scoped non-Namespace: namespace criteria do not apply
        "everything web-reader",
        "in-team web-reader",
        "not-system web-reader",
        "prod-namespaces web-reader",
        "cluster-scope web-reader",
        "named web-reader",
    ];
    assert_eq!(got, want);

    // namespaceSelector also reads Namespaces from the inventory.
    let v = set
        .evaluate(
            &[deployment("other", "shop", json!({}))],
            &[ns("shop", json!({"env": "prod"}))],
        )
        .unwrap();
    assert!(
        hits(&v).contains(&"prod-namespaces other".to_string()),
        "{v:?}"
    );
}

#[test]
fn dryrun_and_warn_are_reported_but_do_not_block() {
    let constraints = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sAlways\nmetadata: {name: d}\n\
        spec: {enforcementAction: dryrun}\n---\napiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sAlways\n\
        metadata: {name: w}\nspec: {enforcementAction: warn}\n---\napiVersion: constraints.gatekeeper.sh/v1beta1\n\
        kind: K8sAlways\nmetadata: {name: x}\nspec: {enforcementAction: deny}\n";
    let dir = folder(&[("t.yaml", &always_template()), ("c.yaml", constraints)]);
    let set = PolicySet::load(false, Some(dir.path())).unwrap();
    let v = set.evaluate(&[ns("n", json!({}))], &[]).unwrap();
    let actions: Vec<_> = v
        .iter()
        .map(|v| (v.constraint.as_str(), v.enforcement_action))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("d", EnforcementAction::Dryrun),
            ("w", EnforcementAction::Warn),
            ("x", EnforcementAction::Deny)
        ]
    );
    let blocking: Vec<_> = v
        .iter()
        .filter(|v| v.enforcement_action.is_blocking())
        .collect();
    assert_eq!(blocking.len(), 1);
    let json = serde_json::to_value(&v[0]).unwrap();
    assert_eq!(json["enforcement_action"], "dryrun");

    let bad = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sAlways\nmetadata: {name: b}\nspec: {enforcementAction: block}\n";
    let dir = folder(&[("t.yaml", &always_template()), ("c.yaml", bad)]);
    let err = PolicySet::load(false, Some(dir.path())).unwrap_err();
    assert!(err.to_string().contains("enforcementAction"), "{err}");
}

#[test]
fn rego_syntax_error_names_file_and_yaml_line() {
    let template = template_yaml(
        "broken",
        "Broken",
        "package broken\n\nviolation[{\"msg\": msg}] {\n  msg := sprintf(\"x %v\", [1]\n}\n",
    );
    // line 13 is `package broken`, line 16 the unclosed call.
    let dir = folder(&[("policies/broken.yaml", &template)]);
    let err = PolicySet::load(false, Some(dir.path())).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    match &err {
        PolicyError::CompileRego {
            place,
            template,
            rego_line,
            ..
        } => {
            assert!(place.file.ends_with("policies/broken.yaml"), "{place}");
            assert_eq!(template, "broken");
            let line = place.line.expect("a YAML line");
            let rego_line = rego_line.expect("a Rego line");
            assert_eq!(line, 13 + rego_line - 1);
            assert!((15..=17).contains(&line), "line {line}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(text.contains("broken.yaml:1"), "{text}");
    assert!(!err.is_transient());
}

#[test]
fn rego_compile_error_found_at_load_names_the_template() {
    // Parses, but cannot be scheduled: regorus rejects it when the engine is
    // prepared, which `load` does.
    let template = template_yaml(
        "cyclic",
        "Cyclic",
        "package cyclic\n\nviolation[{\"msg\": m}] {\n  m := x\n  x := m\n}\n",
    );
    let dir = folder(&[("t.yaml", &template)]);
    let err = PolicySet::load(false, Some(dir.path())).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, PolicyError::CompileRego { .. }), "{err:?}");
    assert!(text.contains("ConstraintTemplate cyclic"), "{text}");
    assert!(text.contains("t.yaml:16"), "{text}");
}

#[test]
fn rego_errors_regorus_finds_only_when_running_name_file_and_line() {
    // OPA rejects the unsafe `y` at compile time; regorus only when the rule
    // body runs (a known gap). The error still points at the YAML line.
    let template = template_yaml(
        "unsafe",
        "Unsafe",
        "package unsafe\n\nviolation[{\"msg\": y}] {\n  x := 1\n}\n",
    );
    let constraint =
        "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: Unsafe\nmetadata:\n  name: u\n";
    let dir = folder(&[("t.yaml", &template), ("c.yaml", constraint)]);
    let set = PolicySet::load(false, Some(dir.path())).unwrap();
    let err = set.evaluate(&[ns("n", json!({}))], &[]).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    assert!(matches!(err, PolicyError::Evaluate { .. }), "{err:?}");
    assert!(text.contains("t.yaml:15"), "{text}");
    assert!(text.contains("var y is unsafe"), "{text}");
    assert!(text.contains("Namespace n"), "{text}");
}

#[test]
fn constraint_for_an_unknown_template_names_file_and_kind() {
    let c = "apiVersion: constraints.gatekeeper.sh/v1beta1\nkind: K8sNoSuchThing\nmetadata:\n  name: orphan\n";
    let dir = folder(&[("t.yaml", &always_template()), ("nested/orphan.yaml", c)]);
    let err = PolicySet::load(false, Some(dir.path())).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PolicyError::LoadConstraint { .. }), "{err:?}");
    assert!(text.contains("nested/orphan.yaml"), "{text}");
    assert!(text.contains("K8sNoSuchThing"), "{text}");
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let bad = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels: [a, b\ndata: {}\n";
    let dir = folder(&[("t.yaml", &always_template()), ("bad.yml", bad)]);
    let err = PolicySet::load(false, Some(dir.path())).unwrap_err();
    let text = err.to_string();
    println!("{text}");
    match &err {
        PolicyError::ParseYaml { place, .. } => {
            assert!(place.file.ends_with("bad.yml"), "{place}");
            assert!(place.line.is_some_and(|l| (5..=7).contains(&l)), "{place}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn duplicate_kinds_and_parameter_types_are_errors() {
    let dir = folder(&[
        ("a.yaml", &always_template()),
        ("b.yaml", &always_template()),
    ]);
    let err = PolicySet::load(false, Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("K8sAlways") && err.contains("a.yaml") && err.contains("b.yaml"),
        "{err}"
    );

    let dir = fixtures().join("library/general/requiredlabels");
    let tpl = std::fs::read_to_string(dir.join("template.yaml")).unwrap();
    let invalid =
        std::fs::read_to_string(dir.join("samples/must-have-owner/constraint_invalid.yaml"))
            .unwrap();
    let both = folder(&[("t.yaml", &tpl), ("c.yaml", &invalid)]);
    let err = PolicySet::load(false, Some(both.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.parameters.labels: expected array, got string"),
        "{err}"
    );
}

#[test]
fn non_gatekeeper_documents_are_skipped() {
    let other =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n---\n# only a comment\n";
    let dir = folder(&[
        ("t.yaml", &always_template()),
        ("cm.yaml", other),
        ("notes.txt", ": not yaml ["),
    ]);
    let set = PolicySet::load(false, Some(dir.path())).unwrap();
    assert_eq!(set.templates(), vec!["k8salways"]);
    assert_eq!(set.constraints(), 0);
    assert!(set.evaluate(&[ns("n", json!({}))], &[]).unwrap().is_empty());
}

#[test]
fn library_layout_suites_run_unmodified() {
    let report = run_suites(&fixtures().join("library")).unwrap();
    for f in &report.failures {
        eprintln!("{f}");
    }
    // requiredlabels: 5 cases + 1 invalid test (1 case and 1 test skipped);
    // uniqueingresshost: 2 cases.
    assert_eq!((report.passed, report.failed), (8, 0), "{report}");
    assert_eq!(report.summary(), "8 passed, 0 failed");
}

#[test]
fn failing_suite_cases_are_reported_with_names() {
    let dir = fixtures().join("library/general/requiredlabels");
    let suite = format!(
        r#"kind: Suite
apiVersion: test.gatekeeper.sh/v1alpha1
tests:
- name: wrong-expectations
  template: {dir}/template.yaml
  constraint: {dir}/samples/must-have-owner/constraint.yaml
  cases:
  - name: allowed-said-to-fail
    object: {dir}/samples/must-have-owner/example_allowed.yaml
    assertions:
    - violations: yes
  - name: right
    object: {dir}/samples/must-have-owner/example_disallowed.yaml
    assertions:
    - violations: 1
  - name: wrong-count
    object: {dir}/samples/must-have-owner/example_disallowed.yaml
    assertions:
    - violations: 2
  - name: wrong-message
    object: {dir}/samples/must-have-owner/example_disallowed.yaml
    assertions:
    - violations: yes
      message: "^nothing like this$"
  - name: missing-object
    object: nowhere.yaml
    assertions:
    - violations: no
- name: valid-constraint-said-invalid
  template: {dir}/template.yaml
  constraint: {dir}/samples/must-have-owner/constraint.yaml
  invalid: true
- name: broken-template
  template: nowhere/template.yaml
  constraint: {dir}/samples/must-have-owner/constraint.yaml
  cases:
  - name: never-runs
    object: {dir}/samples/must-have-owner/example_allowed.yaml
    assertions:
    - violations: no
"#,
        dir = dir.display()
    );
    let tmp = folder(&[("suite.yaml", &suite)]);
    let report = run_suites(&tmp.path().join("suite.yaml")).unwrap();
    println!("{report}");
    assert_eq!((report.passed, report.failed), (1, 6), "{report}");
    let names: Vec<(&str, &str)> = report
        .failures
        .iter()
        .map(|f| (f.test.as_str(), f.case.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("wrong-expectations", "allowed-said-to-fail"),
            ("wrong-expectations", "wrong-count"),
            ("wrong-expectations", "wrong-message"),
            ("wrong-expectations", "missing-object"),
            ("valid-constraint-said-invalid", "(invalid)"),
            ("broken-template", "never-runs"),
        ]
    );
    let why: Vec<&str> = report.failures.iter().map(|f| f.why.as_str()).collect();
    assert!(
        why[0].contains("got 0 violations but want at least 1"),
        "{}",
        why[0]
    );
    assert!(
        why[1].contains("got 1 violations but want exactly 2"),
        "{}",
        why[1]
    );
    assert!(
        why[2].contains("containing \"^nothing like this$\""),
        "{}",
        why[2]
    );
    assert!(why[3].contains("nowhere.yaml"), "{}", why[3]);
    assert!(why[5].contains("nowhere/template.yaml"), "{}", why[5]);
    assert!(
        report
            .failures
            .iter()
            .all(|f| f.suite.ends_with("suite.yaml"))
    );
    assert!(report.to_string().ends_with("1 passed, 6 failed"));
    assert!(!report.is_success());
}

#[test]
fn suite_errors_and_empty_folders() {
    let tmp = folder(&[("suite.yaml", "kind: NotASuite\n"), ("x/y.yaml", "a: 1\n")]);
    let err = run_suites(&tmp.path().join("suite.yaml")).unwrap_err();
    assert!(matches!(err, PolicyError::LoadSuite { .. }), "{err:?}");
    let err = run_suites(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("no suite.yaml"), "{err}");
    let tmp = folder(&[("suite.yaml", "kind: Suite\ntests: [\n")]);
    let err = run_suites(tmp.path()).unwrap_err();
    assert!(matches!(err, PolicyError::ParseYaml { .. }), "{err:?}");
}

#[test]
fn policy_sets_are_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PolicySet>();
    let set = std::sync::Arc::new(PolicySet::builtin().unwrap());
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let set = set.clone();
            std::thread::spawn(move || set.evaluate(&[ns("n", json!({}))], &[]).unwrap().len())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 1);
    }
}

#[test]
fn raw_engine_for_bench_evaluates_one_template() {
    let tpl =
        std::fs::read_to_string(fixtures().join("library/general/requiredlabels/template.yaml"))
            .unwrap();
    let (mut engine, query) = gantry_policy::raw_engine_for_bench(&tpl).unwrap();
    assert_eq!(query, "data.k8srequiredlabels.violation");
    let input = json!({"review": {"object": ns("n", json!({}))}, "parameters": {"labels": [{"key": "owner"}]}});
    engine.set_input(gantry_policy::regorus::Value::from(input));
    let result = engine.eval_rule(query).unwrap();
    assert_eq!(result.as_set().unwrap().len(), 1);
}

#[test]
fn builtins_and_a_folder_load_together_but_kinds_stay_unique() {
    let set = PolicySet::load(true, Some(&fixtures().join("shared-lib"))).unwrap();
    assert_eq!(set.templates().len(), 15);
    assert_eq!(set.constraints(), 15);
    assert_eq!(&set.templates()[13..], &["k8sliba", "k8slibb"]);

    let clash = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/probes/template.yaml"),
    )
    .unwrap()
    .replace("name: gantryprobes", "name: myprobes");
    let dir = folder(&[("mine.yaml", &clash)]);
    let err = PolicySet::load(true, Some(dir.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kind GantryProbes is already defined"),
        "{err}"
    );
    assert!(err.contains("policies/probes/template.yaml"), "{err}");
}
