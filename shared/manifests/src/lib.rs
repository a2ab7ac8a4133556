//! Renders one app's Kubernetes manifests for one image digest.
//!
//! `policy-enforce` evaluates exactly these objects and `deploy` applies exactly
//! these objects, so what was checked is what runs. Objects are plain
//! [`serde_json::Value`]s (no `k8s-openapi`: the build stays light and `deploy`
//! applies them as dynamic objects).
//!
//! # What is rendered, in [`APPLY_ORDER`]
//!
//! 1. `Namespace` with Pod Security Admission `restricted` (enforce, audit, warn;
//!    version `latest`).
//! 2. `ResourceQuota` sized for a rolling update (formula below), no
//!    `NodePort` Services, and `LoadBalancer` Services only for the app's own
//!    Service in a load balancer exposure mode (`1`, else `0`).
//! 3. `LimitRange`: containers default to the app's requests and limits and
//!    may not exceed its limits.
//! 4. Four `NetworkPolicy` objects (see below).
//! 5. `SecretProviderClass` (only with `[apps.keyvault]`): the Key Vault
//!    secrets as a Secrets Store CSI volume, read with workload identity.
//! 6. `ServiceAccount` without an automounted token (annotated with the
//!    workload identity's client id when Key Vault secrets are declared).
//! 7. `Deployment`: the image by digest only, non-root with a read-only root
//!    filesystem, no capabilities, `RuntimeDefault` seccomp, probes, and a
//!    zero-downtime rolling update (`maxUnavailable: 0`, `maxSurge: 1`); Key
//!    Vault secrets mounted read-only at `/mnt/secrets`, `{ENV}_FILE` naming
//!    each file.
//! 8. `Service` (port 80 → the app port, named `http`): ClusterIP, or a
//!    LoadBalancer (internal or public) per `[apps.expose]`.
//! 9. `Ingress` (only in `ingress` mode).
//!
//! Namespace-scoped objects assume one app per namespace (the default: the
//! namespace is the app name); the ResourceQuota and LimitRange are sized for
//! this app alone. Exposure, Key Vault and egress: `docs/exposure.md`.
//!
//! # NetworkPolicy shape: four objects
//!
//! `default-deny-ingress` and `default-deny-egress` select every pod in the
//! namespace (`podSelector: {}`) and allow nothing; `{app}-allow-http` selects
//! only the app's pods and allows TCP to the app port from exactly the path
//! the exposure mode opens; `{app}-allow-egress` allows the app's declared
//! egress (DNS by default). One object cannot express this: a policy's
//! `podSelector` applies to all its rules, so a single policy would either
//! open the app's paths on every pod in the namespace or leave other pods
//! un-denied. Separate objects also keep the namespace-wide baseline readable
//! on its own. The allow objects are rendered even when they allow nothing,
//! so the set of objects does not depend on the settings (gantry applies, it
//! never deletes: an object that stopped being rendered would stay in force).
//!
//! # ResourceQuota formula
//!
//! With `maxUnavailable: 0` and `maxSurge: 1` a rollout runs up to
//! `replicas + 1` pods, and the pod it just scaled down is still counted by the
//! quota during its termination grace period while the controller already
//! creates the next one. So the quota leaves room for
//! `slots = replicas + MAX_SURGE + TERMINATING_HEADROOM` pods (`replicas + 2`),
//! and each total is `slots × per-pod value`:
//! `pods = slots`, `requests.cpu = slots × cpu_request`,
//! `limits.cpu = slots × cpu_limit`, and the same for memory. Quantities are
//! computed exactly in millicores and bytes ([`quantity`]); a total beyond
//! Kubernetes' 64-bit range is a [`RenderError`] naming the resource field.
//!
//! # The hash excludes provenance
//!
//! [`Rendered::hash`] identifies *what runs*: it is the SHA-256 of the canonical
//! JSON (keys sorted, compact, one object per line, apply order) of every object
//! with the provenance annotations [`PROVENANCE_ANNOTATIONS`] (run id, commit,
//! verdicts) removed. The digest annotation stays (the digest is in the image
//! anyway). So re-rendering the same config and digest — a retrigger, or the
//! rollback to the previous good digest recorded in `apps/{app}/deployed.json` —
//! gives the same hash, which lets `deploy` confirm that a rollback restores
//! exactly what ran before and lets `cluster-audit` detect drift by
//! re-rendering without the historical run's verdict text. Any change to the
//! config, the digest or this renderer changes the hash. The provenance
//! annotations are still applied (they are on the pod template, so a new run
//! rolls the pods and `kubectl describe` shows which run they came from).
//!
//! # Determinism
//!
//! Same input → byte-identical YAML and hash: maps are emitted with sorted
//! keys, env variables are sorted by name, and nothing reads the clock or the
//! environment.

pub mod quantity;
mod yaml;

use gantry_pipeline::exposure::{EgressConfig, ExposeConfig, ExposeMode, KeyVaultConfig};
use gantry_pipeline::{AppConfig, CommitSha, Digest, RunId};
use serde_json::{Map, Value, json};
use sha2::Digest as _;

/// Kinds in the order they are applied: cluster-scoped and namespace policy
/// objects first, so the workload is admitted under its quota, limits and
/// network policy; what the pod refers to (its SecretProviderClass and
/// ServiceAccount) before the Deployment, so its first pods can start; the
/// Service after the Deployment, so it never points at pods that were
/// refused; the Ingress last, as it routes to the Service. Several objects of
/// one kind (the NetworkPolicies) are applied together at that kind's
/// position.
pub const APPLY_ORDER: [&str; 9] = [
    "Namespace",
    "ResourceQuota",
    "LimitRange",
    "NetworkPolicy",
    "SecretProviderClass",
    "ServiceAccount",
    "Deployment",
    "Service",
    "Ingress",
];

/// The file-name prefix ([`object_file_name`]) of each kind of
/// [`APPLY_ORDER`]: its apply stage. SecretProviderClass shares stage 5 with
/// ServiceAccount (both are what the pod refers to; `secretproviderclass`
/// sorts before `serviceaccount`), so the files of the kinds that existed
/// before it keep their names in GitOps repositories.
pub const FILE_STAGES: [u8; 9] = [1, 2, 3, 4, 5, 5, 6, 7, 8];

/// Value of `app.kubernetes.io/managed-by` on everything gantry renders.
pub const MANAGED_BY: &str = "gantry";

/// Extra pods a rollout may create above `replicas` (`maxSurge`).
pub const MAX_SURGE: u32 = 1;

/// Pods still counted by the quota while terminating during a rollout.
pub const TERMINATING_HEADROOM: u32 = 1;

/// UID, GID and fsGroup of the app's processes.
///
/// A fixed numeric id lets the kubelet verify `runAsNonRoot` even when the
/// image's `USER` is a name; 10001 is above the system (< 1000) and usual
/// login (1000–) ranges, so it matches no account in common base images nor,
/// after an escape, a real user on the node. `fsGroup` makes the `/tmp`
/// volume writable for it.
pub const RUN_AS_ID: i64 = 10001;

/// Annotation values are capped at this many bytes for the verdict summary:
/// annotations share a 256 KiB budget per object and are shown by `kubectl`.
pub const VERDICTS_MAX_BYTES: usize = 1024;

/// Size limit of the `/tmp` emptyDir: enough for temp files, bounded so a
/// misbehaving pod cannot fill the node's disk.
pub const TMP_SIZE_LIMIT: &str = "128Mi";

/// Annotation holding the run id.
pub const ANNOTATION_RUN_ID: &str = "gantry.dev/run-id";
/// Annotation holding the image digest.
pub const ANNOTATION_DIGEST: &str = "gantry.dev/digest";
/// Annotation holding the commit SHA.
pub const ANNOTATION_COMMIT: &str = "gantry.dev/commit";
/// Annotation holding the one-line verdict summary.
pub const ANNOTATION_VERDICTS: &str = "gantry.dev/verdicts";

/// Service annotation gantry renders when the app sets `allow_public = true`;
/// the `public-lb` built-in policy admits a public LoadBalancer only with it.
pub const ANNOTATION_ALLOW_PUBLIC: &str = "gantry.dev/allow-public";
/// NetworkPolicy annotation gantry renders on `{app}-allow-egress` when the
/// app sets `[apps.egress] allow_internet = true` (egress to `0.0.0.0/0` or
/// `::/0`); the `egress` built-in policy denies such egress without it.
pub const ANNOTATION_ALLOW_INTERNET_EGRESS: &str = "gantry.dev/allow-internet-egress";
/// AKS: make a LoadBalancer Service an internal load balancer.
pub const ANNOTATION_LB_INTERNAL: &str = "service.beta.kubernetes.io/azure-load-balancer-internal";
/// AKS: the subnet of an internal load balancer's frontend IP.
pub const ANNOTATION_LB_INTERNAL_SUBNET: &str =
    "service.beta.kubernetes.io/azure-load-balancer-internal-subnet";
/// Workload identity: the managed identity's client id, on the ServiceAccount.
pub const ANNOTATION_WI_CLIENT_ID: &str = "azure.workload.identity/client-id";
/// Workload identity: the pod label the webhook acts on.
pub const LABEL_WI_USE: &str = "azure.workload.identity/use";
/// The Secrets Store CSI driver's name.
pub const CSI_DRIVER: &str = "secrets-store.csi.k8s.io";
/// Name of the pod volume holding the Key Vault secrets.
pub const SECRETS_VOLUME: &str = "secrets-store";
/// The namespace label every namespace carries (set by the API server).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Annotations that describe *which run* produced the objects rather than
/// *what runs*; they are left out of [`Rendered::hash`].
pub const PROVENANCE_ANNOTATIONS: [&str; 3] =
    [ANNOTATION_RUN_ID, ANNOTATION_COMMIT, ANNOTATION_VERDICTS];

/// Why the manifests could not be rendered. Every variant names the input
/// field at fault, in `gantry.toml` spelling (`resources.cpu_limit`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A resource quantity does not parse or is out of range.
    #[error("{field}: {value:?} is not a usable Kubernetes quantity: {reason}")]
    Quantity {
        /// The field, e.g. `resources.memory_limit`.
        field: &'static str,
        /// The rejected text.
        value: String,
        /// What is wrong with it.
        reason: quantity::QuantityError,
    },
    /// A value breaks a rule the manifests depend on.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, e.g. `replicas` or `registry_image`.
        field: &'static str,
        /// What rule it breaks.
        message: String,
    },
    /// A value cannot be written as YAML (nested deeper than the emitter allows).
    #[error("cannot write YAML: {message}")]
    Yaml {
        /// What went wrong.
        message: String,
    },
    /// The run has no image yet, so there is nothing to render.
    #[error("run {run} has no image")]
    NoImage {
        /// The run.
        run: RunId,
    },
}

/// Everything one render needs.
#[derive(Debug, Clone, Copy)]
pub struct RenderInput<'a> {
    /// The app as configured in `gantry.toml`.
    pub app: &'a AppConfig,
    /// The manifest digest to run (the only image reference rendered).
    pub digest: &'a Digest,
    /// `registry-host/repository` without tag or digest, normally `app.image`
    /// (taken separately so the run's recorded image is what gets rendered).
    pub registry_image: &'a str,
    /// The run that deploys it (annotation `gantry.dev/run-id`).
    pub run_id: Option<&'a RunId>,
    /// The commit it was built from (annotation `gantry.dev/commit`).
    pub commit: Option<&'a CommitSha>,
    /// One-line verdict summary (annotation `gantry.dev/verdicts`, cut to
    /// [`VERDICTS_MAX_BYTES`]).
    pub verdicts: Option<&'a str>,
}

/// The rendered manifests.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The objects, in apply order ([`APPLY_ORDER`]).
    pub objects: Vec<Value>,
    /// [`manifest_hash`] of `objects`: SHA-256 hex of their canonical JSON
    /// without provenance annotations.
    pub hash: String,
}

/// Renders the app's objects for `run`'s recorded image, with the run's
/// provenance (id, commit, scan verdict summary). Every step that renders a run
/// (the policy gate, deploy, rollback) goes through here, so a run always
/// renders to the hash its policy gate checked while `gantry.toml` is unchanged.
pub fn render_run(app: &AppConfig, run: &gantry_pipeline::Run) -> Result<Rendered, RenderError> {
    let image = run.image.as_ref().ok_or_else(|| RenderError::NoImage {
        run: run.id.clone(),
    })?;
    render(&RenderInput {
        app,
        digest: &image.digest,
        registry_image: &format!("{}/{}", image.registry, image.repository),
        run_id: Some(&run.id),
        commit: run.source.commit.as_ref(),
        verdicts: run
            .steps
            .get(gantry_pipeline::run::steps::SCAN)
            .and_then(|s| s.summary.as_deref()),
    })
}

/// Renders the app's objects for `input.digest`, validating every input the
/// objects depend on first.
pub fn render(input: &RenderInput) -> Result<Rendered, RenderError> {
    let app = input.app;
    let name = app.name.as_str();
    let ns = app.namespace().as_str();
    check_inputs(input)?;
    let res = Resources::parse(app)?;
    let slots = u64::from(app.replicas) + u64::from(MAX_SURGE) + u64::from(TERMINATING_HEADROOM);
    let image = format!("{}@{}", input.registry_image, input.digest);
    let annotations = provenance(input);

    let mut objects = vec![
        namespace(name, ns),
        resource_quota(name, ns, &res, slots, app.expose.mode.is_load_balancer())?,
        limit_range(name, ns, app),
        // Sorted by name, as their files list.
        deny_all(name, ns, "Egress"),
        deny_all(name, ns, "Ingress"),
        allow_egress(name, ns, &app.egress),
        allow_http(name, ns, app),
    ];
    if let Some(kv) = &app.keyvault {
        objects.push(secret_provider_class(name, ns, kv));
    }
    objects.push(service_account(name, ns, app.keyvault.as_ref()));
    objects.push(deployment(app, ns, &image, &annotations));
    objects.push(service(name, ns, app));
    if app.expose.mode == ExposeMode::Ingress {
        objects.push(ingress(name, ns, &app.expose));
    }
    add_app_labels(&mut objects, app)?;
    let hash = manifest_hash(&objects);
    Ok(Rendered { objects, hash })
}

/// Writes `objects` as multi-document YAML: each object starts with a `---`
/// line; keys are sorted and strings quoted so the text parses back to the
/// identical JSON (see the emitter's rules in the source).
pub fn to_yaml(objects: &[Value]) -> Result<String, RenderError> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        yaml::write_document(&mut out, object).map_err(|yaml::TooDeep| RenderError::Yaml {
            message: format!("value nested deeper than {} levels", yaml::MAX_DEPTH),
        })?;
    }
    Ok(out)
}

/// A stable file name for `obj` in a GitOps directory:
/// `{apply stage (FILE_STAGES), two digits}-{kind lowercase}-{name}.yaml`,
/// e.g. `01-namespace-web.yaml`, so a directory listing is also the apply
/// order. Kinds outside [`APPLY_ORDER`] get `99`. The name is reduced to
/// `[a-z0-9.-]` (never a path separator or `..`), `unnamed` when missing.
pub fn object_file_name(obj: &Value) -> String {
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    let position = APPLY_ORDER
        .iter()
        .position(|k| *k == kind)
        .map_or(99, |i| FILE_STAGES[i]);
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c.to_ascii_lowercase() {
                c @ ('a'..='z' | '0'..='9' | '-') => c,
                '.' => '.',
                _ => '-',
            })
            .collect::<String>()
            .trim_matches(['.', '-'])
            .replace("..", "-")
    };
    let kind = Some(clean(kind))
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(clean)
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unnamed".into());
    format!("{position:02}-{kind}-{name}.yaml")
}

/// SHA-256 hex over the canonical JSON of `objects` (sorted keys, compact, one
/// line per object, in the given order) with [`PROVENANCE_ANNOTATIONS`]
/// removed from every `annotations` map. Public so objects read back from a
/// GitOps directory can be compared with a render.
pub fn manifest_hash(objects: &[Value]) -> String {
    let mut hasher = sha2::Sha256::new();
    for object in objects {
        let mut object = canonical(object);
        strip_provenance(&mut object);
        hasher.update(object.to_string().as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

/// A copy of `v` whose maps iterate in sorted key order whatever serde_json's
/// `preserve_order` feature says, so its `Display` is canonical.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

fn strip_provenance(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "annotations"
                    && let Value::Object(annotations) = value
                {
                    for p in PROVENANCE_ANNOTATIONS {
                        annotations.remove(p);
                    }
                }
                strip_provenance(value);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_provenance),
        _ => {}
    }
}

/// The app's resources, parsed and checked once.
struct Resources {
    cpu_request: u64,
    cpu_limit: u64,
    memory_request: u64,
    memory_limit: u64,
}

impl Resources {
    fn parse(app: &AppConfig) -> Result<Resources, RenderError> {
        let r = &app.resources;
        let q = |field: &'static str,
                 value: &str,
                 parse: fn(&str) -> Result<u64, quantity::QuantityError>| {
            parse(value).map_err(|reason| RenderError::Quantity {
                field,
                value: value.to_string(),
                reason,
            })
        };
        let res = Resources {
            cpu_request: q(
                "resources.cpu_request",
                &r.cpu_request,
                quantity::parse_cpu_millis,
            )?,
            cpu_limit: q(
                "resources.cpu_limit",
                &r.cpu_limit,
                quantity::parse_cpu_millis,
            )?,
            memory_request: q(
                "resources.memory_request",
                &r.memory_request,
                quantity::parse_bytes,
            )?,
            memory_limit: q(
                "resources.memory_limit",
                &r.memory_limit,
                quantity::parse_bytes,
            )?,
        };
        // The API server refuses a request above its limit, and a zero limit
        // would make the LimitRange forbid every container: fail at render
        // time, naming the field, instead of at apply time.
        for (field, request, limit, limit_field) in [
            (
                "resources.cpu_request",
                res.cpu_request,
                res.cpu_limit,
                "resources.cpu_limit",
            ),
            (
                "resources.memory_request",
                res.memory_request,
                res.memory_limit,
                "resources.memory_limit",
            ),
        ] {
            if limit == 0 {
                return Err(invalid(limit_field, "must be greater than zero".into()));
            }
            if request > limit {
                return Err(invalid(field, format!("must not exceed {limit_field}")));
            }
        }
        Ok(res)
    }
}

/// Adds `[apps.labels]` to every object's labels and to the Deployment's pod
/// template (never to selectors: a Deployment's selector is immutable, and a
/// changed owner label must not orphan the pods). Done after the objects are
/// built so the per-kind builders stay about their kind; with no app labels
/// nothing changes (nor does the manifest hash).
fn add_app_labels(objects: &mut [Value], app: &AppConfig) -> Result<(), RenderError> {
    for (key, value) in &app.labels {
        if !gantry_pipeline::governance::is_label_key(key)
            || !gantry_pipeline::governance::is_label_value(value)
            || gantry_pipeline::governance::GANTRY_LABELS.contains(&key.as_str())
        {
            return Err(invalid(
                "labels",
                format!("{key:?} = {value:?} is not a label gantry can add"),
            ));
        }
    }
    if app.labels.is_empty() {
        return Ok(());
    }
    for object in objects.iter_mut() {
        let mut targets = vec!["/metadata/labels"];
        if object["kind"] == "Deployment" {
            targets.push("/spec/template/metadata/labels");
        }
        for pointer in targets {
            if let Some(Value::Object(labels)) = object.pointer_mut(pointer) {
                for (key, value) in &app.labels {
                    labels.insert(key.clone(), Value::String(value.clone()));
                }
            }
        }
    }
    Ok(())
}

fn invalid(field: &'static str, message: String) -> RenderError {
    RenderError::Invalid { field, message }
}

/// Checks what the objects embed verbatim. `gantry.toml` parsing checks most
/// of it already; this repeats the checks because an `AppConfig` can be built
/// in code, and the image reference is a security property, not a formality.
fn check_inputs(input: &RenderInput) -> Result<(), RenderError> {
    let app = input.app;
    if !valid_registry_image(input.registry_image) {
        return Err(invalid(
            "registry_image",
            format!(
                "{:?} must be `registry-host/repository` in lowercase, without tag or digest",
                input.registry_image
            ),
        ));
    }
    if app.port == 0 {
        return Err(invalid("port", "must be 1-65535".into()));
    }
    if app.replicas == 0 {
        return Err(invalid("replicas", "must be at least 1".into()));
    }
    if !app.health_path.starts_with('/')
        || app.health_path.len() > 200
        || !app.health_path.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            "health_path",
            format!("{:?} must be an absolute URL path", app.health_path),
        ));
    }
    for key in app.env.keys() {
        let ok = !key.is_empty()
            && key.len() <= 128
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err(invalid(
                "env",
                format!("{key:?} is not a valid variable name"),
            ));
        }
    }
    gantry_pipeline::exposure::validate(
        &app.expose,
        app.allow_public,
        app.keyvault.as_ref(),
        &app.egress,
        &app.env,
    )
    .map_err(|(field, message)| invalid(field, message))?;
    Ok(())
}

/// `host[:port]/repo[/repo...]`: the colon is only allowed in the host, so no
/// tag can slip into the rendered image reference, and `@` is never allowed.
fn valid_registry_image(v: &str) -> bool {
    let Some((host, repo)) = v.split_once('/') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':')
        });
    let repo_ok = !repo.is_empty()
        && repo.split('/').all(|seg| {
            !seg.is_empty()
                && seg.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        });
    host_ok && repo_ok
}

/// The provenance annotations that were given, plus the digest. Values are
/// strings (the API server rejects anything else in annotations).
fn provenance(input: &RenderInput) -> Value {
    let mut a = Map::new();
    a.insert(ANNOTATION_DIGEST.into(), input.digest.as_str().into());
    if let Some(run_id) = input.run_id {
        a.insert(ANNOTATION_RUN_ID.into(), run_id.as_str().into());
    }
    if let Some(commit) = input.commit {
        a.insert(ANNOTATION_COMMIT.into(), commit.as_str().into());
    }
    if let Some(verdicts) = input.verdicts {
        a.insert(ANNOTATION_VERDICTS.into(), one_line(verdicts).into());
    }
    Value::Object(a)
}

/// The verdict summary as one line (control characters become spaces) of at
/// most [`VERDICTS_MAX_BYTES`] bytes, cut on a character boundary and marked
/// with `...` when shortened.
fn one_line(s: &str) -> String {
    let line: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.len() <= VERDICTS_MAX_BYTES {
        return line;
    }
    let mut cut = VERDICTS_MAX_BYTES - 3;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &line[..cut])
}

/// `app.kubernetes.io/name` and `managed-by`: on every object.
fn common_labels(name: &str) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    })
}

/// What the Deployment selects and the Service and NetworkPolicy target.
/// `managed-by` is left out on purpose: a Deployment's selector is immutable,
/// so it holds only the app's identity.
fn selector_labels(name: &str) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": name,
    })
}

/// The labels of the Deployment and its pods: identity plus `managed-by`.
fn workload_labels(name: &str) -> Value {
    json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    })
}

fn metadata(object_name: &str, ns: &str, labels: Value) -> Value {
    json!({ "name": object_name, "namespace": ns, "labels": labels })
}

fn namespace(name: &str, ns: &str) -> Value {
    let mut labels = common_labels(name);
    if let Value::Object(map) = &mut labels {
        for mode in ["enforce", "audit", "warn"] {
            map.insert(
                format!("pod-security.kubernetes.io/{mode}"),
                "restricted".into(),
            );
            map.insert(
                format!("pod-security.kubernetes.io/{mode}-version"),
                "latest".into(),
            );
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": ns, "labels": labels },
    })
}

fn resource_quota(
    name: &str,
    ns: &str,
    res: &Resources,
    slots: u64,
    load_balancer: bool,
) -> Result<Value, RenderError> {
    let total = |field: &'static str, per_pod: u64| -> Result<u64, RenderError> {
        per_pod
            .checked_mul(slots)
            .filter(|t| *t <= i64::MAX as u64)
            .ok_or_else(|| {
                invalid(
                    field,
                    format!("{slots} pods × this value overflows the quota's 64-bit range"),
                )
            })
    };
    let cpu_request = total("resources.cpu_request", res.cpu_request)?;
    let cpu_limit = total("resources.cpu_limit", res.cpu_limit)?;
    let memory_request = total("resources.memory_request", res.memory_request)?;
    let memory_limit = total("resources.memory_limit", res.memory_limit)?;
    Ok(json!({
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": metadata(name, ns, common_labels(name)),
        "spec": {
            "hard": {
                "pods": slots.to_string(),
                "requests.cpu": quantity::format_millis(cpu_request),
                "limits.cpu": quantity::format_millis(cpu_limit),
                "requests.memory": quantity::format_bytes(memory_request),
                "limits.memory": quantity::format_bytes(memory_limit),
                // Exactly the app's own LoadBalancer Service, when its
                // exposure mode asks for one; none otherwise.
                "services.loadbalancers": if load_balancer { "1" } else { "0" },
                "services.nodeports": "0",
            },
        },
    }))
}

fn limit_range(name: &str, ns: &str, app: &AppConfig) -> Value {
    let r = &app.resources;
    let limits = json!({ "cpu": r.cpu_limit, "memory": r.memory_limit });
    json!({
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": metadata(name, ns, common_labels(name)),
        "spec": {
            "limits": [{
                "type": "Container",
                "default": limits,
                "defaultRequest": { "cpu": r.cpu_request, "memory": r.memory_request },
                "max": limits,
            }],
        },
    })
}

/// `default-deny-{ingress,egress}`: selects every pod in the namespace
/// (`podSelector: {}`) and allows nothing in that direction.
fn deny_all(name: &str, ns: &str, direction: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(
            &format!("default-deny-{}", direction.to_ascii_lowercase()),
            ns,
            common_labels(name),
        ),
        // No rules: every pod selected (all of them) gets nothing.
        "spec": { "podSelector": {}, "policyTypes": [direction] },
    })
}

fn ip_block(cidr: &str) -> Value {
    json!({ "ipBlock": { "cidr": cidr } })
}

fn namespace_peer(ns: &str) -> Value {
    json!({ "namespaceSelector": { "matchLabels": { NAMESPACE_NAME_LABEL: ns } } })
}

/// `{app}-allow-http`: TCP to the app port, from exactly the path the
/// exposure mode opens (see `docs/exposure.md`):
/// - `cluster`: pods of any namespace (`namespaceSelector: {}`), or of
///   `from_namespaces`; nothing from outside the cluster.
/// - `internal-lb` / `public-lb`: the `ipBlock`s of the effective source
///   ranges (the Service keeps client addresses: `externalTrafficPolicy: Local`).
/// - `ingress`: pods of `controller_namespace` and/or the gateway subnet
///   (`source_ranges`) for gateways outside the cluster (AGIC, AGC).
fn allow_http(name: &str, ns: &str, app: &AppConfig) -> Value {
    let e = &app.expose;
    let from: Vec<Value> = match e.mode {
        ExposeMode::Cluster if e.from_namespaces.is_empty() => {
            vec![json!({ "namespaceSelector": {} })]
        }
        ExposeMode::Cluster => {
            let mut names: Vec<&str> = e.from_namespaces.iter().map(|n| n.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            vec![json!({ "namespaceSelector": { "matchExpressions": [{
                "key": NAMESPACE_NAME_LABEL, "operator": "In", "values": names,
            }] } })]
        }
        ExposeMode::InternalLb | ExposeMode::PublicLb => e
            .effective_source_ranges()
            .iter()
            .map(|c| ip_block(c))
            .collect(),
        ExposeMode::Ingress => e
            .controller_namespace
            .iter()
            .map(|n| namespace_peer(n.as_str()))
            .chain(e.source_ranges.iter().map(|c| ip_block(c)))
            .collect(),
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(&format!("{name}-allow-http"), ns, common_labels(name)),
        "spec": {
            "podSelector": { "matchLabels": selector_labels(name) },
            "policyTypes": ["Ingress"],
            "ingress": [{ "from": from, "ports": [{ "protocol": "TCP", "port": app.port }] }],
        },
    })
}

/// `{app}-allow-egress`: the app's declared egress, nothing else (the
/// namespace's `default-deny-egress` denies the rest). Always rendered, even
/// with no rule, so removing the last declared rule also removes it from the
/// cluster on the next apply.
fn allow_egress(name: &str, ns: &str, egress: &EgressConfig) -> Value {
    let mut rules = Vec::new();
    if egress.dns {
        rules.push(json!({
            "to": [{
                "namespaceSelector": { "matchLabels": { NAMESPACE_NAME_LABEL: "kube-system" } },
                "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } },
            }],
            "ports": [{ "protocol": "UDP", "port": 53 }, { "protocol": "TCP", "port": 53 }],
        }));
    }
    if !egress.cidrs.is_empty() {
        let mut rule =
            json!({ "to": egress.cidrs.iter().map(|c| ip_block(c)).collect::<Vec<_>>() });
        if !egress.ports.is_empty() {
            let mut ports = egress.ports.clone();
            ports.sort_unstable();
            ports.dedup();
            rule["ports"] = ports
                .into_iter()
                .map(|p| json!({ "protocol": "TCP", "port": p }))
                .collect();
        }
        rules.push(rule);
    }
    for (cidr, ranges) in egress.service_rules() {
        let ports: Vec<Value> = ranges
            .into_iter()
            .map(|(first, last)| {
                if first == last {
                    json!({ "protocol": "TCP", "port": first })
                } else {
                    json!({ "protocol": "TCP", "port": first, "endPort": last })
                }
            })
            .collect();
        rules.push(json!({ "to": [ip_block(&cidr)], "ports": ports }));
    }
    let mut policy = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(&format!("{name}-allow-egress"), ns, common_labels(name)),
        "spec": {
            "podSelector": { "matchLabels": selector_labels(name) },
            "policyTypes": ["Egress"],
            "egress": rules,
        },
    });
    // Validation guarantees a /0 in `cidrs` exactly when this is set.
    if egress.allow_internet {
        policy["metadata"]["annotations"] = json!({ ANNOTATION_ALLOW_INTERNET_EGRESS: "true" });
    }
    policy
}

/// The `objects` parameter of an Azure SecretProviderClass: a YAML document
/// with an `array` of YAML strings, one per secret (the provider's format).
/// Names are validated as `[0-9A-Za-z-]`, so they need no quoting.
fn keyvault_objects(kv: &KeyVaultConfig) -> String {
    let mut out = String::from("array:\n");
    for s in &kv.secrets {
        out.push_str("  - |\n");
        out.push_str(&format!("    objectName: {}\n", s.name));
        out.push_str("    objectType: secret\n");
    }
    out
}

/// The Key Vault secrets as a CSI volume source, read with the app's
/// workload identity (`clientID`). No `secretObjects`: that would sync the
/// values into a Kubernetes Secret; the pod reads the mounted files instead.
fn secret_provider_class(name: &str, ns: &str, kv: &KeyVaultConfig) -> Value {
    json!({
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": metadata(name, ns, common_labels(name)),
        "spec": {
            "provider": "azure",
            "parameters": {
                "usePodIdentity": "false",
                "clientID": kv.client_id,
                "keyvaultName": kv.vault_name,
                "tenantId": kv.tenant_id,
                "objects": keyvault_objects(kv),
            },
        },
    })
}

/// The ServiceAccount never automounts its token. With Key Vault secrets it
/// names the managed identity federated with it; the workload identity
/// webhook then projects its own short-lived, audience-bound token into the
/// pod, independent of `automountServiceAccountToken`.
fn service_account(name: &str, ns: &str, kv: Option<&KeyVaultConfig>) -> Value {
    let mut sa = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(name, ns, common_labels(name)),
        "automountServiceAccountToken": false,
    });
    if let Some(kv) = kv {
        sa["metadata"]["annotations"] = json!({ ANNOTATION_WI_CLIENT_ID: kv.client_id });
    }
    sa
}

fn deployment(app: &AppConfig, ns: &str, image: &str, annotations: &Value) -> Value {
    let name = app.name.as_str();
    let r = &app.resources;
    // Plain variables and, per Key Vault secret, `{ENV}_FILE` = the path of
    // its mounted file (never the value), sorted by name together.
    let mut env: Vec<(String, String)> = app
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(kv) = &app.keyvault {
        env.extend(kv.secrets.iter().map(|s| (s.file_env(), s.file_path())));
    }
    env.sort();
    let env: Vec<Value> = env
        .into_iter()
        .map(|(k, v)| json!({ "name": k, "value": v }))
        .collect();
    let probe = |period: u32, initial_delay: u32| {
        json!({
            "httpGet": { "path": app.health_path, "port": app.port, "scheme": "HTTP" },
            "initialDelaySeconds": initial_delay,
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        })
    };
    let mut container = json!({
        "name": name,
        "image": image,
        // By digest the content cannot change, so a cached copy is the same image.
        "imagePullPolicy": "IfNotPresent",
        "ports": [{ "name": "http", "containerPort": app.port, "protocol": "TCP" }],
        "resources": {
            "requests": { "cpu": r.cpu_request, "memory": r.memory_request },
            "limits": { "cpu": r.cpu_limit, "memory": r.memory_limit },
        },
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": { "drop": ["ALL"] },
        },
        "livenessProbe": probe(10, 10),
        "readinessProbe": probe(5, 0),
        "volumeMounts": [{ "name": "tmp", "mountPath": "/tmp" }],
    });
    if !env.is_empty()
        && let Value::Object(c) = &mut container
    {
        c.insert("env".into(), Value::Array(env));
    }
    let mut volumes = vec![json!({ "name": "tmp", "emptyDir": { "sizeLimit": TMP_SIZE_LIMIT } })];
    let mut pod_labels = workload_labels(name);
    if app.keyvault.is_some() {
        container["volumeMounts"]
            .as_array_mut()
            .into_iter()
            .for_each(|mounts| {
                mounts.push(json!({
                    "name": SECRETS_VOLUME,
                    "mountPath": gantry_pipeline::exposure::SECRETS_MOUNT_PATH,
                    "readOnly": true,
                }));
            });
        volumes.push(json!({
            "name": SECRETS_VOLUME,
            "csi": {
                "driver": CSI_DRIVER,
                "readOnly": true,
                "volumeAttributes": { "secretProviderClass": name },
            },
        }));
        pod_labels[LABEL_WI_USE] = "true".into();
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": workload_labels(name),
            "annotations": annotations,
        },
        "spec": {
            "replicas": app.replicas,
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": 300,
            "selector": { "matchLabels": selector_labels(name) },
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxUnavailable": 0, "maxSurge": MAX_SURGE },
            },
            "template": {
                "metadata": { "labels": pod_labels, "annotations": annotations },
                "spec": {
                    "serviceAccountName": name,
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": RUN_AS_ID,
                        "runAsGroup": RUN_AS_ID,
                        "fsGroup": RUN_AS_ID,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    })
}

/// The app's Service: port 80 → the app port, named `http`. ClusterIP in
/// `cluster` and `ingress` mode; a LoadBalancer with the AKS annotations in
/// the load balancer modes, keeping client addresses
/// (`externalTrafficPolicy: Local`) so the NetworkPolicy's `ipBlock`s see
/// them rather than a node's address.
fn service(name: &str, ns: &str, app: &AppConfig) -> Value {
    let e = &app.expose;
    let mut svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, ns, common_labels(name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{ "name": "http", "protocol": "TCP", "port": 80, "targetPort": app.port }],
        },
    });
    if !e.mode.is_load_balancer() {
        return svc;
    }
    let mut annotations = Map::new();
    if e.mode == ExposeMode::InternalLb {
        annotations.insert(ANNOTATION_LB_INTERNAL.into(), "true".into());
        if let Some(subnet) = &e.internal_subnet {
            annotations.insert(ANNOTATION_LB_INTERNAL_SUBNET.into(), subnet.as_str().into());
        }
    } else if app.allow_public {
        annotations.insert(ANNOTATION_ALLOW_PUBLIC.into(), "true".into());
    }
    svc["metadata"]["annotations"] = Value::Object(annotations);
    svc["spec"]["type"] = "LoadBalancer".into();
    svc["spec"]["externalTrafficPolicy"] = "Local".into();
    if !e.source_ranges.is_empty() {
        svc["spec"]["loadBalancerSourceRanges"] = json!(e.source_ranges);
    }
    svc
}

/// `networking.k8s.io/v1` Ingress: `host` + `path` (Prefix) → the Service's
/// port 80, through `class`. No TLS section: a TLS Secret is what gantry
/// never creates (certificates belong on the gateway; see docs/exposure.md).
fn ingress(name: &str, ns: &str, e: &ExposeConfig) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata(name, ns, common_labels(name)),
        "spec": {
            "ingressClassName": e.class,
            "rules": [{
                "host": e.host,
                "http": { "paths": [{
                    "path": e.path(),
                    "pathType": "Prefix",
                    "backend": { "service": { "name": name, "port": { "number": 80 } } },
                }] },
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_one_line_and_bounded() {
        assert_eq!(
            one_line(" scan: passed\npolicy: passed "),
            "scan: passed policy: passed"
        );
        let long = "é".repeat(2000);
        let cut = one_line(&long);
        assert!(cut.len() <= VERDICTS_MAX_BYTES, "{}", cut.len());
        assert!(cut.ends_with("..."));
        assert!(cut.trim_end_matches("...").chars().all(|c| c == 'é'));
        let exact = "a".repeat(VERDICTS_MAX_BYTES);
        assert_eq!(one_line(&exact), exact);
    }

    #[test]
    fn registry_images() {
        for ok in [
            "contoso.azurecr.io/web",
            "localhost:5000/team/web",
            "contoso.azurecr.io/a/b_c.d-e",
        ] {
            assert!(valid_registry_image(ok), "{ok}");
        }
        for bad in [
            "web",
            "contoso.azurecr.io/web:latest",
            "contoso.azurecr.io/web@sha256:00",
            "Contoso.azurecr.io/web",
            "contoso.azurecr.io/",
            "contoso.azurecr.io//web",
            "/web",
            "contoso.azurecr.io/web ",
        ] {
            assert!(!valid_registry_image(bad), "{bad}");
        }
    }

    #[test]
    fn file_names_are_safe() {
        let obj = json!({ "kind": "Secret", "metadata": { "name": "../../etc/Passwd" } });
        assert_eq!(object_file_name(&obj), "99-secret-etc-passwd.yaml");
        assert_eq!(object_file_name(&json!({})), "99-unknown-unnamed.yaml");
        let dots = json!({ "kind": "Service", "metadata": { "name": "a..b" } });
        assert_eq!(object_file_name(&dots), "07-service-a-b.yaml");
    }

    #[test]
    fn hash_ignores_provenance_only() {
        let a = json!({ "metadata": { "annotations": { ANNOTATION_RUN_ID: "1", ANNOTATION_DIGEST: "d" } } });
        let b = json!({ "metadata": { "annotations": { ANNOTATION_RUN_ID: "2", ANNOTATION_DIGEST: "d" } } });
        let c = json!({ "metadata": { "annotations": { ANNOTATION_RUN_ID: "1", ANNOTATION_DIGEST: "e" } } });
        assert_eq!(manifest_hash(std::slice::from_ref(&a)), manifest_hash(&[b]));
        assert_ne!(manifest_hash(std::slice::from_ref(&a)), manifest_hash(&[c]));
        assert_eq!(manifest_hash(&[a]).len(), 64);
    }
}
