//! Rendering of the exposure modes, the Key Vault wiring and declared egress:
//! exact Service types and annotations, Ingress, NetworkPolicy peers and
//! ports, the SecretProviderClass and its pod wiring, and that no Secret is
//! ever rendered.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use gantry_manifests::{RenderError, RenderInput, Rendered, object_file_name, render, to_yaml};
use gantry_pipeline::{AppConfig, Config, Digest};
use serde_json::{Value, json};

const APP: &str = "[[apps]]\nname = \"web\"\nrepo = \"contoso/web\"\nimage = \"contoso.azurecr.io/web\"\nport = 8080\n";
const TENANT: &str = "7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13";
const CLIENT: &str = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9";

fn app(extra: &str) -> AppConfig {
    Config::parse(&format!("{APP}{extra}"), "test")
        .unwrap()
        .apps
        .remove(0)
}

fn render_app(app: &AppConfig) -> Result<Rendered, RenderError> {
    let digest = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
    render(&RenderInput {
        app,
        digest: &digest,
        registry_image: &app.image,
        run_id: None,
        commit: None,
        verdicts: None,
    })
}

fn rendered(extra: &str) -> Rendered {
    render_app(&app(extra)).unwrap()
}

fn find<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Value {
    r.objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn kinds(r: &Rendered) -> Vec<&str> {
    r.objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect()
}

#[track_caller]
fn at(obj: &Value, path: &str, want: Value) {
    assert_eq!(obj.pointer(path), Some(&want), "{path} in {}", obj["kind"]);
}

/// The `from` peers of the app's ingress rule, and its ports.
fn ingress_rule(r: &Rendered) -> (Value, Value) {
    let np = find(r, "NetworkPolicy", "web-allow-http");
    let rules = np["spec"]["ingress"].as_array().unwrap();
    assert_eq!(
        rules.len(),
        1,
        "one rule: the app port from the chosen path"
    );
    (rules[0]["from"].clone(), rules[0]["ports"].clone())
}

const APP_PORT: fn() -> Value = || json!([{"protocol": "TCP", "port": 8080}]);

#[test]
fn cluster_mode_is_a_cluster_ip_reachable_from_pods_only() {
    let r = rendered("");
    let svc = find(&r, "Service", "web");
    at(svc, "/spec/type", json!("ClusterIP"));
    assert!(svc.pointer("/metadata/annotations").is_none());
    assert!(svc.pointer("/spec/externalTrafficPolicy").is_none());
    assert!(!kinds(&r).contains(&"Ingress"));
    at(
        find(&r, "ResourceQuota", "web"),
        "/spec/hard/services.loadbalancers",
        json!("0"),
    );
    let (from, ports) = ingress_rule(&r);
    assert_eq!(from, json!([{"namespaceSelector": {}}]));
    assert_eq!(ports, APP_PORT());

    let r = rendered("[apps.expose]\nfrom_namespaces = [\"shop\", \"frontend\"]\n");
    let (from, _) = ingress_rule(&r);
    assert_eq!(
        from,
        json!([{"namespaceSelector": {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["frontend", "shop"],
        }]}}])
    );
}

#[test]
fn internal_lb_is_an_internal_load_balancer_open_to_its_ranges() {
    let r = rendered(
        "[apps.expose]\nmode = \"internal-lb\"\ninternal_subnet = \"snet-ilb\"\nsource_ranges = [\"10.20.0.0/16\", \"192.168.1.0/24\"]\n",
    );
    let svc = find(&r, "Service", "web");
    at(svc, "/spec/type", json!("LoadBalancer"));
    at(
        svc,
        "/metadata/annotations",
        json!({
            "service.beta.kubernetes.io/azure-load-balancer-internal": "true",
            "service.beta.kubernetes.io/azure-load-balancer-internal-subnet": "snet-ilb",
        }),
    );
    at(svc, "/spec/externalTrafficPolicy", json!("Local"));
    at(
        svc,
        "/spec/loadBalancerSourceRanges",
        json!(["10.20.0.0/16", "192.168.1.0/24"]),
    );
    at(
        svc,
        "/spec/ports",
        json!([{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}]),
    );
    at(
        find(&r, "ResourceQuota", "web"),
        "/spec/hard/services.loadbalancers",
        json!("1"),
    );
    let (from, ports) = ingress_rule(&r);
    assert_eq!(
        from,
        json!([{"ipBlock": {"cidr": "10.20.0.0/16"}}, {"ipBlock": {"cidr": "192.168.1.0/24"}}])
    );
    assert_eq!(ports, APP_PORT());

    // Without source_ranges: the private ranges, no loadBalancerSourceRanges,
    // no subnet annotation.
    let r = rendered("[apps.expose]\nmode = \"internal-lb\"\n");
    let svc = find(&r, "Service", "web");
    at(
        svc,
        "/metadata/annotations",
        json!({"service.beta.kubernetes.io/azure-load-balancer-internal": "true"}),
    );
    assert!(svc.pointer("/spec/loadBalancerSourceRanges").is_none());
    let (from, _) = ingress_rule(&r);
    assert_eq!(
        from,
        json!([
            {"ipBlock": {"cidr": "10.0.0.0/8"}},
            {"ipBlock": {"cidr": "172.16.0.0/12"}},
            {"ipBlock": {"cidr": "192.168.0.0/16"}},
        ])
    );
}

#[test]
fn public_lb_carries_the_opt_in_and_no_internal_annotation() {
    let r = rendered("allow_public = true\n[apps.expose]\nmode = \"public-lb\"\n");
    let svc = find(&r, "Service", "web");
    at(svc, "/spec/type", json!("LoadBalancer"));
    at(
        svc,
        "/metadata/annotations",
        json!({"gantry.dev/allow-public": "true"}),
    );
    at(svc, "/spec/externalTrafficPolicy", json!("Local"));
    let (from, ports) = ingress_rule(&r);
    assert_eq!(from, json!([{"ipBlock": {"cidr": "0.0.0.0/0"}}]));
    assert_eq!(ports, APP_PORT());

    let r = rendered(
        "allow_public = true\n[apps.expose]\nmode = \"public-lb\"\nsource_ranges = [\"203.0.113.0/24\"]\n",
    );
    let svc = find(&r, "Service", "web");
    at(
        svc,
        "/spec/loadBalancerSourceRanges",
        json!(["203.0.113.0/24"]),
    );
    let (from, _) = ingress_rule(&r);
    assert_eq!(from, json!([{"ipBlock": {"cidr": "203.0.113.0/24"}}]));
}

#[test]
fn public_lb_built_in_code_without_the_opt_in_is_not_rendered() {
    // gantry.toml refuses it (pipeline tests); an AppConfig built in code is
    // checked again by the renderer.
    let mut a = app("allow_public = true\n[apps.expose]\nmode = \"public-lb\"\n");
    a.allow_public = false;
    match render_app(&a) {
        Err(RenderError::Invalid { field, message }) => {
            assert_eq!(field, "expose.mode");
            assert!(message.contains("allow_public"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut a = app("");
    a.env.insert("DB_PASSWORD".into(), "hunter2".into());
    match render_app(&a) {
        Err(RenderError::Invalid { field, message }) => {
            assert_eq!(field, "env");
            assert!(!message.contains("hunter2"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ingress_mode_renders_an_ingress_and_admits_only_the_gateway() {
    let r = rendered(
        "[apps.expose]\nmode = \"ingress\"\nclass = \"azure-application-gateway\"\nhost = \"web.contoso.com\"\npath = \"/shop\"\ncontroller_namespace = \"app-routing-system\"\nsource_ranges = [\"10.0.4.0/24\"]\n",
    );
    let svc = find(&r, "Service", "web");
    at(svc, "/spec/type", json!("ClusterIP"));
    assert!(svc.pointer("/metadata/annotations").is_none());
    let ing = find(&r, "Ingress", "web");
    at(ing, "/apiVersion", json!("networking.k8s.io/v1"));
    at(ing, "/metadata/namespace", json!("web"));
    at(
        ing,
        "/metadata/labels/app.kubernetes.io~1managed-by",
        json!("gantry"),
    );
    at(
        ing,
        "/spec",
        json!({
            "ingressClassName": "azure-application-gateway",
            "rules": [{"host": "web.contoso.com", "http": {"paths": [{
                "path": "/shop",
                "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}},
            }]}}],
        }),
    );
    assert_eq!(*kinds(&r).last().unwrap(), "Ingress", "applied last");
    assert_eq!(object_file_name(ing), "08-ingress-web.yaml");
    let (from, ports) = ingress_rule(&r);
    assert_eq!(
        from,
        json!([
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app-routing-system"}}},
            {"ipBlock": {"cidr": "10.0.4.0/24"}},
        ])
    );
    assert_eq!(ports, APP_PORT());
    at(
        find(&r, "ResourceQuota", "web"),
        "/spec/hard/services.loadbalancers",
        json!("0"),
    );

    // Default path, controller namespace only.
    let r = rendered(
        "[apps.expose]\nmode = \"ingress\"\nclass = \"webapprouting.kubernetes.azure.com\"\nhost = \"web.contoso.com\"\ncontroller_namespace = \"app-routing-system\"\n",
    );
    at(
        find(&r, "Ingress", "web"),
        "/spec/rules/0/http/paths/0/path",
        json!("/"),
    );
    let (from, _) = ingress_rule(&r);
    assert_eq!(
        from,
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app-routing-system"}}}])
    );
}

fn keyvault_toml() -> String {
    format!(
        "[apps.env]\nLOG_LEVEL = \"info\"\n[apps.keyvault]\nvault_name = \"kv-contoso\"\ntenant_id = \"{TENANT}\"\nclient_id = \"{CLIENT}\"\n[[apps.keyvault.secrets]]\nname = \"db-connection\"\nenv = \"DATABASE_URL\"\n[[apps.keyvault.secrets]]\nname = \"api-signing\"\nenv = \"SIGNING_KEY\"\n"
    )
}

#[test]
fn keyvault_secrets_are_mounted_files_read_with_workload_identity() {
    let r = rendered(&keyvault_toml());
    let spc = find(&r, "SecretProviderClass", "web");
    at(spc, "/apiVersion", json!("secrets-store.csi.x-k8s.io/v1"));
    at(spc, "/metadata/namespace", json!("web"));
    at(
        spc,
        "/spec",
        json!({
            "provider": "azure",
            "parameters": {
                "usePodIdentity": "false",
                "clientID": CLIENT,
                "keyvaultName": "kv-contoso",
                "tenantId": TENANT,
                "objects": "array:\n  - |\n    objectName: db-connection\n    objectType: secret\n  - |\n    objectName: api-signing\n    objectType: secret\n",
            },
        }),
    );
    assert!(spc.pointer("/spec/secretObjects").is_none());
    // The objects string is what the Azure provider parses: YAML with an
    // array of YAML documents.
    let objects: Value =
        serde_saphyr::from_str(spc["spec"]["parameters"]["objects"].as_str().unwrap()).unwrap();
    let first: Value = serde_saphyr::from_str(objects["array"][0].as_str().unwrap()).unwrap();
    assert_eq!(
        first,
        json!({"objectName": "db-connection", "objectType": "secret"})
    );

    let sa = find(&r, "ServiceAccount", "web");
    at(
        sa,
        "/metadata/annotations",
        json!({"azure.workload.identity/client-id": CLIENT}),
    );
    at(sa, "/automountServiceAccountToken", json!(false));

    let d = find(&r, "Deployment", "web");
    at(
        d,
        "/spec/template/metadata/labels/azure.workload.identity~1use",
        json!("true"),
    );
    // The selector is immutable and stays the app's identity only.
    at(
        d,
        "/spec/selector/matchLabels",
        json!({"app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web"}),
    );
    at(
        d,
        "/spec/template/spec/automountServiceAccountToken",
        json!(false),
    );
    at(d, "/spec/template/spec/serviceAccountName", json!("web"));
    at(
        d,
        "/spec/template/spec/volumes/1",
        json!({"name": "secrets-store", "csi": {
            "driver": "secrets-store.csi.k8s.io",
            "readOnly": true,
            "volumeAttributes": {"secretProviderClass": "web"},
        }}),
    );
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    at(
        c,
        "/volumeMounts",
        json!([
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "secrets-store", "mountPath": "/mnt/secrets", "readOnly": true},
        ]),
    );
    at(
        c,
        "/env",
        json!([
            {"name": "DATABASE_URL_FILE", "value": "/mnt/secrets/db-connection"},
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "SIGNING_KEY_FILE", "value": "/mnt/secrets/api-signing"},
        ]),
    );

    // Order: the SecretProviderClass before the ServiceAccount and the
    // Deployment; file names list in that order.
    let k = kinds(&r);
    let pos = |kind: &str| k.iter().position(|x| *x == kind).unwrap();
    assert!(pos("SecretProviderClass") < pos("ServiceAccount"));
    assert!(pos("ServiceAccount") < pos("Deployment"));
    let names: Vec<String> = r.objects.iter().map(object_file_name).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, names);
    assert!(names.contains(&"05-secretproviderclass-web.yaml".to_string()));
    assert!(
        names.contains(&"06-deployment-web.yaml".to_string()),
        "{names:?}"
    );

    // No Secret, and no value anywhere: only names pass through gantry.
    assert!(!k.contains(&"Secret"));
    let yaml = to_yaml(&r.objects).unwrap();
    let back: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(back, r.objects, "the objects string survives YAML");
}

#[test]
fn without_keyvault_nothing_of_it_is_rendered() {
    let r = rendered("");
    assert!(!kinds(&r).contains(&"SecretProviderClass"));
    let sa = find(&r, "ServiceAccount", "web");
    assert!(sa.pointer("/metadata/annotations").is_none());
    let d = find(&r, "Deployment", "web");
    assert!(
        d.pointer("/spec/template/metadata/labels/azure.workload.identity~1use")
            .is_none()
    );
    at(
        d,
        "/spec/template/spec/volumes",
        json!([{"name": "tmp", "emptyDir": {"sizeLimit": "128Mi"}}]),
    );
}

#[test]
fn egress_is_denied_except_what_is_declared() {
    let r = rendered(
        "[apps.egress]\ndns = false\ncidrs = [\"10.1.0.0/16\", \"10.2.0.0/24\"]\nports = [5432, 443, 443]\nservices = [\"sql\", \"keyvault\", \"servicebus\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n",
    );
    let deny = find(&r, "NetworkPolicy", "default-deny-egress");
    at(
        deny,
        "/spec",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    );
    let np = find(&r, "NetworkPolicy", "web-allow-egress");
    at(np, "/spec/policyTypes", json!(["Egress"]));
    at(
        np,
        "/spec/egress",
        json!([
            {
                "to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}, {"ipBlock": {"cidr": "10.2.0.0/24"}}],
                "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 5432}],
            },
            {
                "to": [{"ipBlock": {"cidr": "10.0.8.0/24"}}],
                "ports": [
                    {"protocol": "TCP", "port": 443},
                    {"protocol": "TCP", "port": 1433},
                    {"protocol": "TCP", "port": 5671},
                    {"protocol": "TCP", "port": 11000, "endPort": 11999},
                ],
            },
        ]),
    );

    // A service with its own private-endpoint CIDR gets its own rule.
    let r = rendered(
        "[apps.egress]\nservices = [\"keyvault\", \"postgres\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n[apps.egress.service_cidrs]\npostgres = \"10.0.10.0/28\"\n",
    );
    let np = find(&r, "NetworkPolicy", "web-allow-egress");
    assert_eq!(np["spec"]["egress"].as_array().unwrap().len(), 3, "dns + 2");
    at(
        np,
        "/spec/egress/1",
        json!({"to": [{"ipBlock": {"cidr": "10.0.10.0/28"}}], "ports": [{"protocol": "TCP", "port": 5432}]}),
    );
    at(
        np,
        "/spec/egress/2",
        json!({"to": [{"ipBlock": {"cidr": "10.0.8.0/24"}}], "ports": [{"protocol": "TCP", "port": 443}]}),
    );

    // CIDRs without ports: every port to them.
    let r = rendered("[apps.egress]\ncidrs = [\"10.1.0.0/16\"]\n");
    let np = find(&r, "NetworkPolicy", "web-allow-egress");
    at(
        np,
        "/spec/egress/1",
        json!({"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}]}),
    );
    at(
        np,
        "/spec/egress/0/ports/0",
        json!({"protocol": "UDP", "port": 53}),
    );

    // Nothing declared: the policy stays, with no rule (deny).
    let r = rendered("[apps.egress]\ndns = false\n");
    let np = find(&r, "NetworkPolicy", "web-allow-egress");
    at(np, "/spec/egress", json!([]));
}

const INTERNET: &str =
    "[apps.egress]\nallow_internet = true\ncidrs = [\"0.0.0.0/0\"]\nports = [443]\n";

#[test]
fn internet_egress_carries_the_opt_in_only_when_declared() {
    let r = rendered(INTERNET);
    let np = find(&r, "NetworkPolicy", "web-allow-egress");
    at(
        np,
        "/metadata/annotations",
        json!({"gantry.dev/allow-internet-egress": "true"}),
    );
    at(
        np,
        "/spec/egress/1",
        json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}),
    );
    // The namespace still denies by default: only the app's pods get out.
    find(&r, "NetworkPolicy", "default-deny-egress");

    // Without the opt-in nothing carries the annotation.
    for extra in ["", "[apps.egress]\ncidrs = [\"10.1.0.0/16\"]\n"] {
        let r = rendered(extra);
        let np = find(&r, "NetworkPolicy", "web-allow-egress");
        assert!(np["metadata"].get("annotations").is_none(), "{np}");
    }

    // gantry.toml refuses a /0 without the opt-in (pipeline tests); an
    // AppConfig built in code is checked again by the renderer, both ways.
    let mut a = app(INTERNET);
    a.egress.allow_internet = false;
    match render_app(&a) {
        Err(RenderError::Invalid { field, message }) => {
            assert_eq!(field, "egress.cidrs");
            assert!(message.contains("allow_internet = true"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut a = app("");
    a.egress.allow_internet = true;
    match render_app(&a) {
        Err(RenderError::Invalid { field, .. }) => assert_eq!(field, "egress.allow_internet"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_mode_renders_deterministically_and_differently() {
    let modes = [
        String::new(),
        "[apps.expose]\nmode = \"internal-lb\"\n".to_string(),
        "allow_public = true\n[apps.expose]\nmode = \"public-lb\"\n".to_string(),
        "[apps.expose]\nmode = \"ingress\"\nclass = \"nginx\"\nhost = \"web.contoso.com\"\ncontroller_namespace = \"ingress\"\n".to_string(),
        keyvault_toml(),
        "[apps.egress]\ncidrs = [\"10.1.0.0/16\"]\n".to_string(),
    ];
    let mut hashes = std::collections::BTreeSet::new();
    for extra in &modes {
        let a = rendered(extra);
        let b = rendered(extra);
        assert_eq!(a, b);
        assert_eq!(to_yaml(&a.objects).unwrap(), to_yaml(&b.objects).unwrap());
        assert!(hashes.insert(a.hash.clone()), "{extra}");
        // Every object is labelled as gantry's (the audit and the
        // no-pipeline-secret policy rely on it).
        for o in &a.objects {
            at(
                o,
                "/metadata/labels/app.kubernetes.io~1managed-by",
                json!("gantry"),
            );
        }
    }
}

/// Every rendered mode passes gantry's built-in policy set (the set the
/// policy gate enforces), evaluated together as the gate does.
#[test]
fn every_rendered_mode_passes_the_builtin_policies() {
    let set = gantry_policy::PolicySet::builtin().unwrap();
    for extra in [
        String::new(),
        "[apps.expose]\nmode = \"internal-lb\"\ninternal_subnet = \"snet-ilb\"\n".to_string(),
        "allow_public = true\n[apps.expose]\nmode = \"public-lb\"\nsource_ranges = [\"203.0.113.0/24\"]\n".to_string(),
        "[apps.expose]\nmode = \"ingress\"\nclass = \"azure-alb-external\"\nhost = \"web.contoso.com\"\nsource_ranges = [\"10.0.4.0/24\"]\n".to_string(),
        format!("{}[apps.egress]\nservices = [\"keyvault\", \"sql\"]\nprivate_endpoint_cidr = \"10.0.8.0/24\"\n", keyvault_toml()),
        "[apps.egress]\ndns = false\ncidrs = [\"10.1.0.0/16\"]\n".to_string(),
        INTERNET.to_string(),
    ] {
        let r = rendered(&extra);
        let v = set.evaluate(&r.objects, &[]).unwrap();
        assert!(v.is_empty(), "{extra}: {v:#?}");
    }
}

/// The policy gate catches what the renderer would never produce: a public
/// load balancer without the opt-in, a secret in plain env, a Secret object
/// labelled as the pipeline's, a namespace without default-deny egress, and
/// egress to anywhere without the opt-in.
#[test]
fn hand_made_weakenings_of_a_render_are_denied() {
    let set = gantry_policy::PolicySet::builtin().unwrap();
    let templates = |objects: &[Value]| -> Vec<String> {
        set.evaluate(objects, &[])
            .unwrap()
            .into_iter()
            .map(|v| format!("{}:{}", v.template, v.name))
            .collect()
    };

    let mut r = rendered("allow_public = true\n[apps.expose]\nmode = \"public-lb\"\n");
    let svc = r
        .objects
        .iter_mut()
        .find(|o| o["kind"] == "Service")
        .unwrap();
    svc["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    assert_eq!(templates(&r.objects), ["gantrypubliclb:web"]);

    // An internal load balancer whose annotation was flipped is public.
    let mut r = rendered("[apps.expose]\nmode = \"internal-lb\"\n");
    let svc = r
        .objects
        .iter_mut()
        .find(|o| o["kind"] == "Service")
        .unwrap();
    svc["metadata"]["annotations"]["service.beta.kubernetes.io/azure-load-balancer-internal"] =
        json!("false");
    assert_eq!(templates(&r.objects), ["gantrypubliclb:web"]);

    let mut r = rendered(&keyvault_toml());
    let d = r
        .objects
        .iter_mut()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    d["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "DATABASE_URL", "value": "Server=db;Password=hunter2"}));
    assert_eq!(templates(&r.objects), ["gantrysecretenv:web"]);

    let mut r = rendered("");
    r.objects.push(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "web-db", "namespace": "web",
                     "labels": {"app.kubernetes.io/name": "web", "app.kubernetes.io/managed-by": "gantry"}},
        "stringData": {"DATABASE_URL": "postgres://db"},
    }));
    assert_eq!(templates(&r.objects), ["gantrypipelinesecret:web-db"]);

    // Without default-deny-egress, the namespace's pods reach anything: the
    // Deployment is denied (the gate evaluates the rendered set together).
    let mut r = rendered("");
    r.objects
        .retain(|o| o["metadata"]["name"] != "default-deny-egress");
    assert_eq!(templates(&r.objects), ["gantryegress:web"]);

    // A default deny that gained a rule is no longer a deny.
    let mut r = rendered("");
    let deny = r
        .objects
        .iter_mut()
        .find(|o| o["metadata"]["name"] == "default-deny-egress")
        .unwrap();
    deny["spec"]["egress"] = json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]);
    assert_eq!(templates(&r.objects), ["gantryegress:web"]);

    // The app's egress opened to the internet, or to everything, without
    // the opt-in.
    for rule in [
        json!({"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}),
        json!({"ports": [{"protocol": "TCP", "port": 443}]}),
    ] {
        let mut r = rendered("");
        let np = r
            .objects
            .iter_mut()
            .find(|o| o["metadata"]["name"] == "web-allow-egress")
            .unwrap();
        np["spec"]["egress"]
            .as_array_mut()
            .unwrap()
            .push(rule.clone());
        assert_eq!(
            templates(&r.objects),
            ["gantryegress:web-allow-egress"],
            "{rule}"
        );
    }

    // The opt-in is what admits the internet rule.
    let mut r = rendered(INTERNET);
    let np = r
        .objects
        .iter_mut()
        .find(|o| o["metadata"]["name"] == "web-allow-egress")
        .unwrap();
    np["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    assert_eq!(templates(&r.objects), ["gantryegress:web-allow-egress"]);
}
