//! Governance audits of the cluster gantry deploys to (`[governance]`,
//! issue 8), run once per sweep after the apps:
//!
//! - **Required labels**: every managed Deployment carries each of
//!   `required_labels` with a non-empty value. Managed: in a managed
//!   namespace, and labelled `app.kubernetes.io/managed-by=gantry` *or* named
//!   after an app of that namespace — so a Deployment whose labels someone
//!   removed by hand (the managed-by label included) is still found.
//! - **Mandatory DaemonSets**: each `[[governance.daemonsets]]` exists and is
//!   fully scheduled and ready (`desiredNumberScheduled > 0` and
//!   `numberReady == desiredNumberScheduled`).
//! - **Quota and LimitRange**: each managed namespace has at least one
//!   ResourceQuota and one LimitRange.
//! - **Quota usage**: per ResourceQuota and resource in `status.hard`, the
//!   ratio `status.used / status.hard` at or above `quota_warn_ratio`.
//!
//! Managed namespaces are those of the apps with a deployed version
//! (`apps/{app}/deployed.json`): an app never deployed has no namespace yet,
//! and reporting it as lacking a quota would be noise.
//!
//! Findings are kept in `audit/state/_cluster.json` and alerted once with
//! MessageId `audit:_cluster:{sha256(fp)[..24]}:{n}`, exactly like an app's.
//! A failed cluster read records `error` there and leaves the open findings
//! as they were (not re-checked is not resolved).

use std::collections::{BTreeMap, BTreeSet};

use gantry_kube::{Cluster, KubeError};
use gantry_manifests::quantity;
use gantry_pipeline::config::DeployTarget;
use gantry_pipeline::findings;
use gantry_pipeline::runs::blobs;
use gantry_pipeline::{Alert, AppName, PipelineError, Severity};
use gantry_runtime::Deps;
use serde_json::{Value, json};

use crate::{AppState, AuditError, Finding, now_rfc3339, settle};

/// `app.kubernetes.io/managed-by`.
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Runs the governance audit; `Ok` is the line for the log, `Err` only for
/// state and alert failures.
pub async fn sweep(deps: &Deps) -> Result<String, AuditError> {
    if deps.config.deploy.target == DeployTarget::Directory {
        return Ok(
            "skipped: the deploy target is a directory, there is no cluster to govern".into(),
        );
    }
    let name = findings::cluster_state_blob();
    let record = |source: PipelineError| AuditError::RecordState {
        name: name.clone(),
        source,
    };
    let mut state: AppState = match deps.runs.raw().get(&name).await {
        Ok(Some(v)) => serde_json::from_slice(&v.body).unwrap_or_else(|e| {
            tracing::warn!(blob = %name, error = %e, "audit state unreadable; starting afresh");
            AppState::default()
        }),
        Ok(None) => AppState::default(),
        Err(e) => return Err(record(e.into())),
    };
    let managed = managed_namespaces(deps).await.map_err(&record)?;
    let checked = if managed.is_empty() && deps.config.governance.daemonsets.is_empty() {
        // Nothing to look at: no client is built (no kubeconfig needed), and
        // findings of namespaces no longer managed resolve.
        Ok((
            Vec::new(),
            vec!["nothing to govern (no deployed app, no mandatory DaemonSet)".into()],
        ))
    } else {
        match gantry_context::cluster(deps).await {
            Ok(cluster) => check(deps, &cluster, &managed).await,
            Err(e) => Err(e),
        }
    };
    let (found, notes) = match checked {
        Ok(c) => c,
        Err(e) => {
            let why = e.to_string();
            state.error = Some(why.clone());
            state.checked_at = Some(now_rfc3339());
            deps.runs.put_json(&name, &state).await.map_err(&record)?;
            return Ok(format!("not checked: {why}"));
        }
    };
    let (new, resolved) = settle(deps, findings::CLUSTER_SCOPE, &mut state, found, |f| {
        let mut alert = Alert::new(f.kind, f.severity, format!("governance: {}", f.reason));
        alert.app = f.app.clone();
        alert.step = Some("audit".into());
        alert.detail = f.detail.clone();
        alert
    })
    .await?;
    state.error = None;
    state.checked_at = Some(now_rfc3339());
    deps.runs.put_json(&name, &state).await.map_err(&record)?;
    let mut line = format!(
        "{} open findings ({new} new, {resolved} resolved) in {} namespaces",
        state.open.len(),
        managed.len()
    );
    for n in notes {
        line.push_str("; ");
        line.push_str(&n);
    }
    Ok(line)
}

/// Namespace → the deployed apps in it.
async fn managed_namespaces(deps: &Deps) -> Result<BTreeMap<String, Vec<AppName>>, PipelineError> {
    let mut out: BTreeMap<String, Vec<AppName>> = BTreeMap::new();
    for app in &deps.config.apps {
        if deps
            .runs
            .raw()
            .get(&blobs::deployed(&app.name))
            .await?
            .is_some()
        {
            out.entry(app.namespace().to_string())
                .or_default()
                .push(app.name.clone());
        }
    }
    Ok(out)
}

/// The one app of a namespace, for attributing a namespace finding (several
/// apps sharing a namespace: none).
fn sole_app(apps: &[AppName]) -> Option<AppName> {
    match apps {
        [one] => Some(one.clone()),
        _ => None,
    }
}

fn text<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// Reads the cluster and returns the findings (and notes for the log line).
/// The first failed read stops: half a check would resolve findings that
/// were simply not looked at.
async fn check(
    deps: &Deps,
    cluster: &Cluster,
    managed: &BTreeMap<String, Vec<AppName>>,
) -> Result<(Vec<Finding>, Vec<String>), KubeError> {
    let g = &deps.config.governance;
    let mut found = Vec::new();
    let mut notes = Vec::new();
    for (ns, apps) in managed {
        if !g.required_labels.is_empty() {
            for d in cluster.list_deployments(ns, None).await? {
                let name = text(&d, "/metadata/name");
                let labels = d.pointer("/metadata/labels").and_then(Value::as_object);
                let label = |k: &str| {
                    labels
                        .and_then(|l| l.get(k))
                        .and_then(Value::as_str)
                        .filter(|v| !v.is_empty())
                };
                let owner = apps.iter().find(|a| a.as_str() == name).cloned();
                if owner.is_none() && label(MANAGED_BY_LABEL) != Some(gantry_manifests::MANAGED_BY)
                {
                    continue;
                }
                for key in &g.required_labels {
                    if label(key).is_none() {
                        found.push(Finding {
                            fingerprint: format!("label:{ns}/{name}:{key}"),
                            kind: "missing-label",
                            severity: Severity::Warning,
                            reason: format!(
                                "Deployment {ns}/{name} lacks the required label {key}"
                            ),
                            detail: json!({"namespace": ns, "deployment": name, "label": key}),
                            app: owner.clone().or_else(|| sole_app(apps)),
                        });
                    }
                }
            }
        }
        let quotas = cluster.list_resource_quotas(ns).await?;
        if quotas.is_empty() {
            found.push(Finding {
                fingerprint: format!("quota-missing:{ns}"),
                kind: "quota-missing",
                severity: Severity::High,
                reason: format!("namespace {ns} has no ResourceQuota"),
                detail: json!({"namespace": ns}),
                app: sole_app(apps),
            });
        }
        for q in &quotas {
            usage(
                ns,
                q,
                g.quota_warn_ratio,
                sole_app(apps),
                &mut found,
                &mut notes,
            );
        }
        if cluster.list_limit_ranges(ns).await?.is_empty() {
            found.push(Finding {
                fingerprint: format!("limitrange-missing:{ns}"),
                kind: "limitrange-missing",
                severity: Severity::High,
                reason: format!("namespace {ns} has no LimitRange"),
                detail: json!({"namespace": ns}),
                app: sole_app(apps),
            });
        }
    }
    let mut by_namespace: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for ds in &g.daemonsets {
        by_namespace
            .entry(ds.namespace.as_str())
            .or_default()
            .insert(ds.name.as_str());
    }
    for (ns, names) in by_namespace {
        let listed = cluster.list_daemonsets(ns).await?;
        for name in names {
            let id = format!("{ns}/{name}");
            let Some(ds) = listed.iter().find(|d| text(d, "/metadata/name") == name) else {
                found.push(Finding {
                    fingerprint: format!("daemonset-missing:{id}"),
                    kind: "daemonset-missing",
                    severity: Severity::High,
                    reason: format!("mandatory DaemonSet {id} does not exist"),
                    detail: json!({"namespace": ns, "name": name}),
                    app: None,
                });
                continue;
            };
            let number = |field: &str| {
                ds.pointer(&format!("/status/{field}"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            };
            let desired = number("desiredNumberScheduled");
            let ready = number("numberReady");
            let why = if desired <= 0 {
                Some(format!(
                    "mandatory DaemonSet {id} is scheduled on no node (desiredNumberScheduled {desired})"
                ))
            } else if ready < desired {
                Some(format!(
                    "mandatory DaemonSet {id} has {ready} of {desired} pods ready"
                ))
            } else {
                None
            };
            if let Some(reason) = why {
                found.push(Finding {
                    fingerprint: format!("daemonset-not-ready:{id}"),
                    kind: "daemonset-not-ready",
                    severity: Severity::High,
                    reason,
                    detail: json!({"namespace": ns, "name": name, "desired": desired, "ready": ready}),
                    app: None,
                });
            }
        }
    }
    Ok((found, notes))
}

/// A quantity as an integer in the resource's unit: bytes for memory and
/// storage, thousandths for everything else (CPU in millicores, counts such
/// as `pods` × 1000), so `used / hard` is exact in both.
fn amount(resource: &str, q: &str) -> Result<u64, quantity::QuantityError> {
    if resource.contains("memory") || resource.contains("storage") {
        quantity::parse_bytes(q)
    } else {
        quantity::parse_cpu_millis(q)
    }
}

/// The usage findings of one ResourceQuota.
fn usage(
    ns: &str,
    quota: &Value,
    warn: f64,
    app: Option<AppName>,
    found: &mut Vec<Finding>,
    notes: &mut Vec<String>,
) {
    let name = text(quota, "/metadata/name");
    let Some(hard) = quota.pointer("/status/hard").and_then(Value::as_object) else {
        // The quota controller has not computed usage yet: nothing to compare.
        return;
    };
    let used = quota.pointer("/status/used").and_then(Value::as_object);
    for (resource, limit) in hard {
        let limit_text = limit.as_str().unwrap_or("");
        let used_text = used
            .and_then(|u| u.get(resource))
            .and_then(Value::as_str)
            .unwrap_or("0");
        let (limit, used_amount) = match (amount(resource, limit_text), amount(resource, used_text))
        {
            (Ok(l), Ok(u)) => (l, u),
            (Err(e), _) | (_, Err(e)) => {
                notes.push(format!(
                    "ResourceQuota {ns}/{name}: {resource} not compared ({e})"
                ));
                continue;
            }
        };
        let ratio = if limit == 0 {
            // A zero quota (`services.loadbalancers: 0`) forbids; anything
            // used is over it, nothing used is fine.
            if used_amount == 0 {
                continue;
            }
            f64::INFINITY
        } else {
            used_amount as f64 / limit as f64
        };
        if ratio < warn {
            continue;
        }
        let percent = if ratio.is_finite() {
            format!("{:.0}%", ratio * 100.0)
        } else {
            "over".into()
        };
        found.push(Finding {
            fingerprint: format!("quota-usage:{ns}/{name}:{resource}"),
            kind: "quota-usage",
            severity: if ratio >= 1.0 {
                Severity::High
            } else {
                Severity::Warning
            },
            reason: format!(
                "namespace {ns}: ResourceQuota {name} {resource} used {used_text} of {limit_text} ({percent}, warn at {:.0}%)",
                warn * 100.0
            ),
            detail: json!({
                "namespace": ns,
                "quota": name,
                "resource": resource,
                "used": used_text,
                "hard": limit_text,
                "ratio": if ratio.is_finite() { json!(ratio) } else { Value::Null },
            }),
            app: app.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_ratio_per_resource() {
        let quota = json!({
            "metadata": {"name": "web"},
            "status": {
                "hard": {"pods": "10", "requests.cpu": "2", "requests.memory": "1Gi",
                          "services.loadbalancers": "0", "limits.cpu": "1"},
                "used": {"pods": "9", "requests.cpu": "500m", "requests.memory": "1073741824",
                          "services.loadbalancers": "0", "limits.cpu": "1500m"}
            }
        });
        let mut found = Vec::new();
        let mut notes = Vec::new();
        usage("web", &quota, 0.9, None, &mut found, &mut notes);
        let resources: Vec<&str> = found
            .iter()
            .map(|f| f.detail["resource"].as_str().unwrap_or(""))
            .collect();
        // limits.cpu 150% (high), pods 90% (at the ratio), memory 100%.
        assert_eq!(resources, ["limits.cpu", "pods", "requests.memory"]);
        assert_eq!(found[0].severity, Severity::High);
        assert_eq!(found[1].severity, Severity::Warning);
        assert!(notes.is_empty());
        assert_eq!(amount("requests.memory", "1Gi"), Ok(1 << 30));
        assert_eq!(amount("pods", "10"), Ok(10_000));
    }
}
