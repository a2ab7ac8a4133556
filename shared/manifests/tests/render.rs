//! Rendering tests: every hardening field by path, apply order, digest-only
//! images, determinism, quota arithmetic, YAML round-trips and named errors.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use gantry_manifests::{
    APPLY_ORDER, RenderError, RenderInput, Rendered, object_file_name, render, to_yaml,
};
use gantry_pipeline::{AppConfig, CommitSha, Config, Digest, RunId};
use serde_json::{Value, json};

const CONFIG: &str = r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
namespace = "web-prod"
port = 8080
replicas = 3
health_path = "/healthz"

[apps.resources]
cpu_request = "250m"
cpu_limit = "0.5"
memory_request = "128Mi"
memory_limit = "1G"

[apps.env]
ZETA = "last"
ALPHA = "first"
PORT = "8080"
FLAG = "no"
"#;

fn app() -> AppConfig {
    Config::parse(CONFIG, "test").unwrap().apps.remove(0)
}

fn digest(byte: &str) -> Digest {
    Digest::parse(&format!("sha256:{}", byte.repeat(32))).unwrap()
}

fn run_id() -> RunId {
    RunId::parse("01jf8zq3k4m5n6p7q8r9s0t1v2").unwrap()
}

fn commit() -> CommitSha {
    CommitSha::parse(&"ab12".repeat(10)).unwrap()
}

fn render_with(app: &AppConfig, digest: &Digest, verdicts: Option<&str>) -> Rendered {
    let run_id = run_id();
    let commit = commit();
    render(&RenderInput {
        app,
        digest,
        registry_image: &app.image,
        run_id: Some(&run_id),
        commit: Some(&commit),
        verdicts,
    })
    .unwrap()
}

fn rendered() -> Rendered {
    render_with(
        &app(),
        &digest("ab"),
        Some("scan: passed (0 high); policy: passed"),
    )
}

fn kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], k: &str) -> &'a Value {
    let found = kind(objects, k);
    assert_eq!(found.len(), 1, "{k}");
    found[0]
}

/// Asserts `obj` at JSON pointer `path` equals `want`.
#[track_caller]
fn at(obj: &Value, path: &str, want: Value) {
    assert_eq!(obj.pointer(path), Some(&want), "{path} in {}", obj["kind"]);
}

#[test]
fn objects_follow_apply_order() {
    let r = rendered();
    let kinds: Vec<&str> = r
        .objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ResourceQuota",
            "LimitRange",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "NetworkPolicy",
            "ServiceAccount",
            "Deployment",
            "Service"
        ]
    );
    let mut distinct = kinds.clone();
    distinct.dedup();
    // No Key Vault, no Ingress by default: the other kinds keep their order.
    let expected: Vec<&str> = APPLY_ORDER
        .iter()
        .copied()
        .filter(|k| !matches!(*k, "SecretProviderClass" | "Ingress"))
        .collect();
    assert_eq!(distinct, expected);
    let names: Vec<String> = r.objects.iter().map(object_file_name).collect();
    assert_eq!(
        names,
        [
            "01-namespace-web-prod.yaml",
            "02-resourcequota-web.yaml",
            "03-limitrange-web.yaml",
            "04-networkpolicy-default-deny-egress.yaml",
            "04-networkpolicy-default-deny-ingress.yaml",
            "04-networkpolicy-web-allow-egress.yaml",
            "04-networkpolicy-web-allow-http.yaml",
            "05-serviceaccount-web.yaml",
            "06-deployment-web.yaml",
            "07-service-web.yaml",
        ]
    );
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, names, "a directory listing is the apply order");
}

#[test]
fn every_object_is_labelled_and_namespaced() {
    for obj in rendered().objects {
        at(
            &obj,
            "/metadata/labels/app.kubernetes.io~1name",
            json!("web"),
        );
        at(
            &obj,
            "/metadata/labels/app.kubernetes.io~1managed-by",
            json!("gantry"),
        );
        if obj["kind"] == "Namespace" {
            assert!(obj.pointer("/metadata/namespace").is_none());
        } else {
            at(&obj, "/metadata/namespace", json!("web-prod"));
        }
    }
}

#[test]
fn namespace_enforces_restricted_pod_security() {
    let r = rendered();
    let ns = one(&r.objects, "Namespace");
    at(ns, "/apiVersion", json!("v1"));
    at(ns, "/metadata/name", json!("web-prod"));
    for (label, value) in [
        ("enforce", "restricted"),
        ("enforce-version", "latest"),
        ("audit", "restricted"),
        ("audit-version", "latest"),
        ("warn", "restricted"),
        ("warn-version", "latest"),
    ] {
        at(
            ns,
            &format!("/metadata/labels/pod-security.kubernetes.io~1{label}"),
            json!(value),
        );
    }
}

#[test]
fn quota_covers_a_rolling_update() {
    let r = rendered();
    let q = one(&r.objects, "ResourceQuota");
    // replicas 3 + maxSurge 1 + 1 terminating = 5 pod slots.
    at(q, "/spec/hard/pods", json!("5"));
    at(q, "/spec/hard/requests.cpu", json!("1250m")); // 5 × 250m
    at(q, "/spec/hard/limits.cpu", json!("2500m")); // 5 × 0.5
    at(q, "/spec/hard/requests.memory", json!("640Mi")); // 5 × 128Mi
    at(q, "/spec/hard/limits.memory", json!("5000000000")); // 5 × 1G (not a binary multiple)
    at(q, "/spec/hard/services.loadbalancers", json!("0"));
    at(q, "/spec/hard/services.nodeports", json!("0"));

    let mut app = app();
    app.replicas = 2;
    app.resources.cpu_limit = "1".into();
    app.resources.memory_limit = "512Mi".into();
    let r = render_with(&app, &digest("ab"), None);
    let q = one(&r.objects, "ResourceQuota");
    at(q, "/spec/hard/pods", json!("4"));
    at(q, "/spec/hard/limits.cpu", json!("4"));
    at(q, "/spec/hard/limits.memory", json!("2Gi"));
}

#[test]
fn limit_range_defaults_to_the_app_resources() {
    let r = rendered();
    let lr = one(&r.objects, "LimitRange");
    at(lr, "/spec/limits/0/type", json!("Container"));
    at(
        lr,
        "/spec/limits/0/default",
        json!({"cpu": "0.5", "memory": "1G"}),
    );
    at(
        lr,
        "/spec/limits/0/defaultRequest",
        json!({"cpu": "250m", "memory": "128Mi"}),
    );
    at(
        lr,
        "/spec/limits/0/max",
        json!({"cpu": "0.5", "memory": "1G"}),
    );
}

#[test]
fn network_policies_deny_by_default_and_open_the_app_port() {
    let r = rendered();
    let policies = kind(&r.objects, "NetworkPolicy");
    for (deny, direction) in [(policies[0], "Egress"), (policies[1], "Ingress")] {
        let name = format!("default-deny-{}", direction.to_lowercase());
        at(deny, "/metadata/name", json!(name));
        at(deny, "/spec/podSelector", json!({}));
        at(deny, "/spec/policyTypes", json!([direction]));
        assert!(
            deny.pointer("/spec/ingress").is_none() && deny.pointer("/spec/egress").is_none(),
            "deny-all has no rules"
        );
    }

    // Default egress: DNS to kube-dns only.
    let egress = policies[2];
    at(egress, "/metadata/name", json!("web-allow-egress"));
    at(egress, "/spec/policyTypes", json!(["Egress"]));
    at(
        egress,
        "/spec/podSelector/matchLabels",
        json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web"}),
    );
    at(
        egress,
        "/spec/egress",
        json!([{
            "to": [{
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        }]),
    );

    // Default exposure (cluster): the app port from pods of any namespace only.
    let allow = policies[3];
    at(allow, "/metadata/name", json!("web-allow-http"));
    at(
        allow,
        "/spec/podSelector/matchLabels",
        json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web"}),
    );
    at(allow, "/spec/policyTypes", json!(["Ingress"]));
    at(
        allow,
        "/spec/ingress",
        json!([{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": 8080}]}]),
    );
}

#[test]
fn service_account_has_no_token() {
    let r = rendered();
    let sa = one(&r.objects, "ServiceAccount");
    at(sa, "/metadata/name", json!("web"));
    at(sa, "/automountServiceAccountToken", json!(false));
}

#[test]
fn deployment_is_hardened() {
    let r = rendered();
    let d = one(&r.objects, "Deployment");
    let pod = "/spec/template/spec";
    let c = "/spec/template/spec/containers/0";
    let checks = [
        ("/apiVersion", json!("apps/v1")),
        ("/spec/replicas", json!(3)),
        ("/spec/revisionHistoryLimit", json!(5)),
        ("/spec/progressDeadlineSeconds", json!(300)),
        ("/spec/strategy/type", json!("RollingUpdate")),
        ("/spec/strategy/rollingUpdate/maxUnavailable", json!(0)),
        ("/spec/strategy/rollingUpdate/maxSurge", json!(1)),
        (
            "/spec/selector/matchLabels",
            json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web"}),
        ),
        ("/metadata/labels/app.kubernetes.io~1instance", json!("web")),
        (
            "/spec/template/metadata/labels/app.kubernetes.io~1name",
            json!("web"),
        ),
        (
            "/spec/template/metadata/labels/app.kubernetes.io~1instance",
            json!("web"),
        ),
        (
            "/spec/template/metadata/labels/app.kubernetes.io~1managed-by",
            json!("gantry"),
        ),
        (&format!("{pod}/serviceAccountName"), json!("web")),
        (&format!("{pod}/automountServiceAccountToken"), json!(false)),
        (&format!("{pod}/securityContext/runAsNonRoot"), json!(true)),
        (&format!("{pod}/securityContext/runAsUser"), json!(10001)),
        (&format!("{pod}/securityContext/runAsGroup"), json!(10001)),
        (&format!("{pod}/securityContext/fsGroup"), json!(10001)),
        (
            &format!("{pod}/securityContext/seccompProfile/type"),
            json!("RuntimeDefault"),
        ),
        (
            &format!("{pod}/volumes"),
            json!([{"name": "tmp", "emptyDir": {"sizeLimit": "128Mi"}}]),
        ),
        (
            &format!("{c}/securityContext/allowPrivilegeEscalation"),
            json!(false),
        ),
        (
            &format!("{c}/securityContext/readOnlyRootFilesystem"),
            json!(true),
        ),
        (&format!("{c}/securityContext/runAsNonRoot"), json!(true)),
        (&format!("{c}/securityContext/privileged"), json!(false)),
        (
            &format!("{c}/securityContext/capabilities/drop"),
            json!(["ALL"]),
        ),
        (
            &format!("{c}/resources/requests"),
            json!({"cpu": "250m", "memory": "128Mi"}),
        ),
        (
            &format!("{c}/resources/limits"),
            json!({"cpu": "0.5", "memory": "1G"}),
        ),
        (
            &format!("{c}/ports"),
            json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}]),
        ),
        (
            &format!("{c}/volumeMounts"),
            json!([{"name": "tmp", "mountPath": "/tmp"}]),
        ),
    ]
    .map(|(p, v)| (p.to_string(), v));
    for (path, want) in checks {
        at(d, &path, want);
    }
    for probe in ["livenessProbe", "readinessProbe"] {
        at(d, &format!("{c}/{probe}/httpGet/path"), json!("/healthz"));
        at(d, &format!("{c}/{probe}/httpGet/port"), json!(8080));
    }
    let containers = d.pointer(&format!("{pod}/containers")).unwrap();
    assert_eq!(containers.as_array().unwrap().len(), 1);
}

#[test]
fn env_is_sorted_and_values_stay_strings() {
    let r = rendered();
    let d = one(&r.objects, "Deployment");
    at(
        d,
        "/spec/template/spec/containers/0/env",
        json!([
            {"name": "ALPHA", "value": "first"},
            {"name": "FLAG", "value": "no"},
            {"name": "PORT", "value": "8080"},
            {"name": "ZETA", "value": "last"},
        ]),
    );
    let mut app = app();
    app.env.clear();
    let r = render_with(&app, &digest("ab"), None);
    let d = one(&r.objects, "Deployment");
    assert!(d.pointer("/spec/template/spec/containers/0/env").is_none());
}

#[test]
fn image_is_by_digest_only() {
    for byte in ["ab", "00", "f1"] {
        let d = digest(byte);
        let r = render_with(&app(), &d, None);
        let dep = one(&r.objects, "Deployment");
        let image = dep
            .pointer("/spec/template/spec/containers/0/image")
            .and_then(Value::as_str)
            .unwrap();
        assert_eq!(image, format!("contoso.azurecr.io/web@{d}"));
        let (name, reference) = image.split_once('@').unwrap();
        let last = name.rsplit('/').next().unwrap();
        assert!(!last.contains(':'), "tag in {image}");
        assert!(Digest::parse(reference).is_ok(), "{reference}");
        // No other image field anywhere (init containers, sidecars).
        let yaml = to_yaml(&r.objects).unwrap();
        assert_eq!(yaml.matches("image:").count(), 1, "{yaml}");
    }
    // A tag or digest smuggled into the registry image is refused, not rendered.
    let app = app();
    let d = digest("ab");
    for bad in [
        "contoso.azurecr.io/web:latest",
        "contoso.azurecr.io/web@sha256:abc",
        "web",
    ] {
        let err = render(&RenderInput {
            app: &app,
            digest: &d,
            registry_image: bad,
            run_id: None,
            commit: None,
            verdicts: None,
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("registry_image:"), "{err}");
    }
    // A registry with a port keeps its colon in the host only.
    let ok = render(&RenderInput {
        app: &app,
        digest: &d,
        registry_image: "localhost:5000/web",
        run_id: None,
        commit: None,
        verdicts: None,
    })
    .unwrap();
    let dep = one(&ok.objects, "Deployment");
    at(
        dep,
        "/spec/template/spec/containers/0/image",
        json!(format!("localhost:5000/web@{d}")),
    );
}

#[test]
fn provenance_annotations_only_when_given() {
    let r = rendered();
    let d = one(&r.objects, "Deployment");
    let want = json!({
        "gantry.dev/digest": digest("ab").as_str(),
        "gantry.dev/run-id": "01jf8zq3k4m5n6p7q8r9s0t1v2",
        "gantry.dev/commit": "ab12".repeat(10),
        "gantry.dev/verdicts": "scan: passed (0 high); policy: passed",
    });
    at(d, "/metadata/annotations", want.clone());
    at(d, "/spec/template/metadata/annotations", want);

    let app = app();
    let dg = digest("ab");
    let bare = render(&RenderInput {
        app: &app,
        digest: &dg,
        registry_image: &app.image,
        run_id: None,
        commit: None,
        verdicts: None,
    })
    .unwrap();
    let d = one(&bare.objects, "Deployment");
    let only_digest = json!({ "gantry.dev/digest": dg.as_str() });
    at(d, "/metadata/annotations", only_digest.clone());
    at(d, "/spec/template/metadata/annotations", only_digest);
    // Provenance is not part of what runs: same hash without it.
    assert_eq!(bare.hash, r.hash);

    let long = format!("line one\n{}", "x".repeat(5000));
    let r = render_with(&app, &dg, Some(&long));
    let d = one(&r.objects, "Deployment");
    let v = d["metadata"]["annotations"]["gantry.dev/verdicts"]
        .as_str()
        .unwrap();
    assert!(
        v.len() <= 1024 && v.starts_with("line one x") && v.ends_with("..."),
        "{v}"
    );
}

#[test]
fn service_maps_80_to_the_app_port() {
    let r = rendered();
    let s = one(&r.objects, "Service");
    at(s, "/spec/type", json!("ClusterIP"));
    at(
        s,
        "/spec/ports",
        json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]),
    );
    at(
        s,
        "/spec/selector",
        json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web"}),
    );
}

#[test]
fn rendering_is_deterministic() {
    let a = rendered();
    let b = rendered();
    assert_eq!(a, b);
    assert_eq!(to_yaml(&a.objects).unwrap(), to_yaml(&b.objects).unwrap());
    assert_eq!(a.hash.len(), 64);
    assert!(a.hash.bytes().all(|c| c.is_ascii_hexdigit()));

    let other_digest = render_with(&app(), &digest("cd"), None);
    assert_ne!(other_digest.hash, a.hash);
    let mut app = app();
    app.replicas = 4;
    assert_ne!(render_with(&app, &digest("ab"), None).hash, a.hash);
    // Other verdicts and run ids: same workload, same hash.
    assert_eq!(
        render_with(&self::app(), &digest("ab"), Some("other")).hash,
        a.hash
    );
}

#[test]
fn yaml_round_trips_to_identical_json() {
    let r = rendered();
    let yaml = to_yaml(&r.objects).unwrap();
    assert!(
        yaml.starts_with("---\napiVersion: v1\nkind: Namespace\n"),
        "{yaml}"
    );
    assert_eq!(yaml.matches("---\n").count(), r.objects.len());
    let back: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(back, r.objects);

    let tricky = vec![
        json!({
            "kind": "Tricky",
            "strings": [
                "8080", "true", "no", "yes", "off", "Y", "null", "~", "1e3", "0x1f", "0o17",
                "1_000", "12:30", "2026-01-01", ".inf", "-.5", "+1", "", " lead", "trail ",
                "a: b", "x #y", "#c", "- item", "? k", "[a]", "{a}", "*ref", "&anchor", "!tag",
                "|", ">", "'q'", "\"dq\"", "back\\slash", "multi\nline\n", "tab\there", "\r",
                "bell\u{7}", "nel\u{85}", "ls\u{2028}", "bom\u{feff}", "café", "日本", "%x", "@x", "`x",
            ],
            "numbers": [0, -1, 8080, 0.5, 1.5e300, u64::MAX, i64::MIN],
            "bools": [true, false],
            "nothing": null,
            "empty_map": {},
            "empty_list": [],
            "nested": [[], [{}], [[1]], {"k": []}],
            "8080": "numeric key",
            "no": "bool key",
            "a: b": "colon key",
            "": "empty key",
        }),
        json!({}),
        json!([]),
    ];
    let yaml = to_yaml(&tricky).unwrap();
    let back: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(back, tricky, "{yaml}");
}

#[test]
fn invalid_input_names_the_field() {
    let d = digest("ab");
    type Mutation = Box<dyn Fn(&mut AppConfig)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|a| a.resources.memory_limit = "99999999999999999999Ei".into()),
            "resources.memory_limit",
        ),
        (
            Box::new(|a| a.resources.cpu_limit = "lots".into()),
            "resources.cpu_limit",
        ),
        (
            Box::new(|a| a.resources.cpu_request = "-1".into()),
            "resources.cpu_request",
        ),
        (
            Box::new(|a| a.resources.memory_request = "2Gi".into()),
            "resources.memory_request",
        ),
        (
            Box::new(|a| a.resources.cpu_limit = "0".into()),
            "resources.cpu_limit",
        ),
        // Each pod fits, but 5 pod slots overflow the quota's 64-bit range.
        (
            Box::new(|a| {
                a.resources.memory_request = "2Ei".into();
                a.resources.memory_limit = "2Ei".into();
            }),
            "resources.memory_request",
        ),
        (
            Box::new(|a| {
                a.resources.cpu_request = "1".into();
                a.resources.cpu_limit = "9000000000000000".into();
            }),
            "resources.cpu_limit",
        ),
        (Box::new(|a| a.replicas = 0), "replicas"),
        (Box::new(|a| a.port = 0), "port"),
        (
            Box::new(|a| a.health_path = "healthz".into()),
            "health_path",
        ),
        (
            Box::new(|a| {
                a.env.insert("BAD-NAME".into(), "x".into());
            }),
            "env",
        ),
    ];
    for (mutate, field) in cases {
        let mut app = app();
        mutate(&mut app);
        let err = render(&RenderInput {
            app: &app,
            digest: &d,
            registry_image: &app.image,
            run_id: None,
            commit: None,
            verdicts: None,
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with(&format!("{field}:")),
            "{field}: {err}"
        );
        match err {
            RenderError::Quantity { field: f, .. } | RenderError::Invalid { field: f, .. } => {
                assert_eq!(f, field)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The largest replicas value still renders: quota slots are computed in u64.
    let mut app = app();
    app.replicas = u32::MAX;
    app.resources.memory_request = "1Mi".into();
    app.resources.memory_limit = "1Mi".into();
    let r = render_with(&app, &d, None);
    at(
        one(&r.objects, "ResourceQuota"),
        "/spec/hard/pods",
        json!("4294967297"),
    );
}

#[test]
fn too_deep_values_are_a_yaml_error() {
    let mut v = json!(1);
    for _ in 0..200 {
        v = json!([v]);
    }
    let err = to_yaml(&[v]).unwrap_err();
    assert!(matches!(err, RenderError::Yaml { .. }), "{err}");
}

/// The governance config check relies on `GANTRY_LABELS` being exactly what
/// the renderer puts on the Deployment and its pods.
#[test]
fn deployment_labels_are_gantry_labels() {
    let r = rendered();
    let d = one(&r.objects, "Deployment");
    for pointer in ["/metadata/labels", "/spec/template/metadata/labels"] {
        let keys: Vec<&str> = d
            .pointer(pointer)
            .unwrap()
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = gantry_pipeline::governance::GANTRY_LABELS.to_vec();
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, expected, "{pointer}");
    }
}

#[test]
fn app_labels_go_on_every_object_and_the_pods_not_the_selectors() {
    let text = format!("{CONFIG}\n[apps.labels]\nowner = \"team-a\"\ncost-center = \"cc-42\"\n");
    let app = Config::parse(&text, "test").unwrap().apps.remove(0);
    let r = render_with(&app, &digest("ab"), None);
    for o in &r.objects {
        assert_eq!(o["metadata"]["labels"]["owner"], "team-a", "{}", o["kind"]);
        assert_eq!(o["metadata"]["labels"]["cost-center"], "cc-42");
    }
    let d = one(&r.objects, "Deployment");
    assert_eq!(
        d["spec"]["template"]["metadata"]["labels"]["owner"],
        "team-a"
    );
    assert!(d["spec"]["selector"]["matchLabels"].get("owner").is_none());
    let s = one(&r.objects, "Service");
    assert!(s["spec"]["selector"].get("owner").is_none());
    // Labels are part of the manifest: a changed owner is a changed hash.
    assert_ne!(r.hash, render_with(&self::app(), &digest("ab"), None).hash);
    // Without app labels the objects are as before.
    let plain = render_with(&self::app(), &digest("ab"), None);
    assert!(
        plain
            .objects
            .iter()
            .all(|o| o["metadata"]["labels"].get("owner").is_none())
    );
}
