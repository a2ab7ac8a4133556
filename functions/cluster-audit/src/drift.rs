//! Drift: does a live object still hold every field gantry set?
//!
//! The comparison is a *subset* check of the rendered object against the
//! live one: every field gantry renders must be present with the same value;
//! fields gantry does not set (status, `metadata.uid`, `resourceVersion`,
//! `managedFields`, defaults the API server fills in, labels added by other
//! controllers) are ignored, because they are not gantry's to judge. The
//! provenance annotations (run id, commit, verdicts) are ignored too: they
//! say which run applied the object, not what runs.
//!
//! One exception: a Deployment's `spec.replicas` last written through the
//! `scale` subresource ([`replicas_scaled`]). That is how autoscalers
//! (HorizontalPodAutoscaler, KEDA) and `kubectl scale` change the replica
//! count: scaling, not a change of what runs. A hand edit of the object
//! (`kubectl edit`, `apply`) writes the main resource and is still drift.

use gantry_manifests::PROVENANCE_ANNOTATIONS;
use serde_json::Value;

/// One field gantry set that the live object no longer holds as set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Field path, e.g. `spec.template.spec.containers[0].image`.
    pub path: String,
    /// The value gantry rendered (compact JSON, shortened).
    pub rendered: String,
    /// The live value, `None` when the field is missing.
    pub live: Option<String>,
}

/// Longest value shown in a difference (images with digests are ~100).
const MAX_SHOWN: usize = 160;

fn show(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if text.len() <= MAX_SHOWN {
        return text;
    }
    let mut cut = MAX_SHOWN;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The fields of `rendered` that `live` lacks or holds with another value,
/// in key order.
pub fn differences(rendered: &Value, live: &Value) -> Vec<Difference> {
    let mut out = Vec::new();
    walk(&mut String::new(), rendered, Some(live), false, &mut out);
    out
}

/// The field path of a Deployment's replica count, as [`differences`] names it.
pub const REPLICAS: &str = "spec.replicas";

/// Whether `live`'s `spec.replicas` is owned by a writer that went through
/// the `scale` subresource: an entry of `metadata.managedFields` with
/// `subresource: scale` whose `fieldsV1` holds `f:spec` → `f:replicas`.
/// Server-side field ownership is the API server's own record of who set a
/// field, so nothing has to be configured per app.
pub fn replicas_scaled(live: &Value) -> bool {
    live["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|entries| {
            entries.iter().any(|entry| {
                entry["subresource"] == "scale"
                    && entry["fieldsV1"]["f:spec"]
                        .as_object()
                        .is_some_and(|spec| spec.contains_key("f:replicas"))
            })
        })
}

fn push_key(path: &str, key: &str) -> String {
    // Label and annotation keys contain dots and slashes: bracket them so the
    // path stays readable and unambiguous.
    if key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    } else {
        format!("{path}[{key}]")
    }
}

fn walk(
    path: &mut String,
    want: &Value,
    have: Option<&Value>,
    in_annotations: bool,
    out: &mut Vec<Difference>,
) {
    let Some(have) = have.filter(|h| !h.is_null() || want.is_null()) else {
        out.push(Difference {
            path: path.clone(),
            rendered: show(want),
            live: None,
        });
        return;
    };
    match (want, have) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                if in_annotations && PROVENANCE_ANNOTATIONS.contains(&key.as_str()) {
                    continue;
                }
                let mut child = push_key(path, key);
                walk(&mut child, value, have.get(key), key == "annotations", out);
            }
        }
        (Value::Array(want), Value::Array(have)) if want.len() == have.len() => {
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                let mut child = format!("{path}[{i}]");
                walk(&mut child, w, Some(h), false, out);
            }
        }
        (Value::Number(w), Value::Number(h)) if w.as_f64() == h.as_f64() => {}
        (w, h) if w == h => {}
        (w, h) => out.push(Difference {
            path: path.clone(),
            rendered: show(w),
            live: Some(show(h)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_fields_and_provenance() {
        let rendered = json!({
            "metadata": {"name": "web", "labels": {"app.kubernetes.io/name": "web"},
                          "annotations": {"gantry.dev/run-id": "a", "gantry.dev/digest": "d"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "i@d"}]}}}
        });
        let live = json!({
            "metadata": {"name": "web", "uid": "x", "labels": {"app.kubernetes.io/name": "web", "extra": "1"},
                          "annotations": {"gantry.dev/run-id": "b", "gantry.dev/digest": "d"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "i@d", "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"replicas": 2}
        });
        assert_eq!(differences(&rendered, &live), vec![]);

        let drifted = json!({
            "metadata": {"name": "web", "labels": {},
                          "annotations": {"gantry.dev/digest": "other"}},
            "spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "web", "image": "evil"}]}}}
        });
        let found: Vec<String> = differences(&rendered, &drifted)
            .into_iter()
            .map(|d| format!("{} {} {:?}", d.path, d.rendered, d.live))
            .collect();
        assert_eq!(
            found,
            vec![
                "metadata.annotations[gantry.dev/digest] d Some(\"other\")",
                "metadata.labels[app.kubernetes.io/name] web None",
                "spec.replicas 2 Some(\"5\")",
                "spec.template.spec.containers[0].image i@d Some(\"evil\")",
            ]
        );
    }

    #[test]
    fn replicas_written_through_scale_are_recognised() {
        let with = |entries: Value| json!({"metadata": {"managedFields": entries}});
        // The HPA controller scales through the subresource.
        let hpa = with(json!([
            {"manager": "gantry", "operation": "Apply", "fieldsV1": {"f:spec": {"f:replicas": {}}}},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "scale",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]));
        assert!(replicas_scaled(&hpa));
        // A hand edit of the Deployment itself owns the field without it.
        let edit = with(json!([
            {"manager": "kubectl-edit", "operation": "Update",
             "fieldsV1": {"f:spec": {"f:replicas": {}}}}
        ]));
        assert!(!replicas_scaled(&edit));
        // A scale entry about something else, or no managedFields at all.
        let other = with(json!([
            {"manager": "x", "subresource": "scale", "fieldsV1": {"f:spec": {"f:paused": {}}}}
        ]));
        assert!(!replicas_scaled(&other));
        assert!(!replicas_scaled(&json!({"metadata": {}})));
    }

    #[test]
    fn list_length_change_is_one_difference() {
        let rendered = json!({"spec": {"ports": [{"port": 80}]}});
        let live = json!({"spec": {"ports": [{"port": 80}, {"port": 22}]}});
        let d = differences(&rendered, &live);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].path, "spec.ports");
    }
}
