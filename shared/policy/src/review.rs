//! What a template sees: `input.review` for one object, and `data.inventory`
//! for referential policies — shaped the way Gatekeeper shapes them.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::constraint::Subject;
use crate::yaml::{group_version, str_at};

/// One object under review.
pub(crate) struct Review<'a> {
    /// The object itself (for matching).
    object: &'a Value,
    /// `input.review` as regorus wants it.
    pub value: regorus::Value,
    group: &'a str,
    kind: &'a str,
}

impl<'a> Review<'a> {
    /// The review Gatekeeper builds for an object being created: `kind`
    /// (group/version/kind from `apiVersion`), `name`, `namespace` (omitted
    /// for cluster-scoped objects, as in an AdmissionRequest), `operation:
    /// CREATE`, `object`.
    pub(crate) fn of_object(object: &'a Value) -> Self {
        let (group, version) = group_version(str_at(object, &["apiVersion"]));
        let kind = str_at(object, &["kind"]);
        let mut review = Map::new();
        review.insert(
            "kind".into(),
            serde_json::json!({"group": group, "version": version, "kind": kind}),
        );
        review.insert("name".into(), str_at(object, &["metadata", "name"]).into());
        let namespace = str_at(object, &["metadata", "namespace"]);
        if !namespace.is_empty() {
            review.insert("namespace".into(), namespace.into());
        }
        review.insert("operation".into(), "CREATE".into());
        review.insert("dryRun".into(), false.into());
        review.insert("object".into(), object.clone());
        Self {
            object,
            value: regorus::Value::from(Value::Object(review)),
            group,
            kind,
        }
    }

    /// A gator test object that is an `AdmissionReview`: the review is its
    /// `request` as written (so UPDATE/DELETE and `oldObject` can be tested);
    /// on DELETE without `object` the old object is reviewed, as Gatekeeper
    /// does. A request without `kind` (the gatekeeper-library has such
    /// samples) gets the object's. `None` when the request has neither object.
    pub(crate) fn of_admission_review(ar: &'a Value) -> Option<Self> {
        let request = ar.get("request")?;
        let object = request
            .get("object")
            .filter(|o| !o.is_null())
            .or_else(|| request.get("oldObject").filter(|o| !o.is_null()))?;
        let mut review = request.as_object()?.clone();
        review.insert("object".into(), object.clone());
        let (group, kind) = if str_at(request, &["kind", "kind"]).is_empty() {
            let (group, version) = group_version(str_at(object, &["apiVersion"]));
            let kind = str_at(object, &["kind"]);
            review.insert(
                "kind".into(),
                serde_json::json!({"group": group, "version": version, "kind": kind}),
            );
            (group, kind)
        } else {
            (
                str_at(request, &["kind", "group"]),
                str_at(request, &["kind", "kind"]),
            )
        };
        Some(Self {
            object,
            value: regorus::Value::from(Value::Object(review)),
            group,
            kind,
        })
    }

    /// What constraint matching looks at.
    pub(crate) fn subject(&self) -> Subject<'_> {
        let namespace = str_at(self.object, &["metadata", "namespace"]);
        Subject {
            group: self.group,
            kind: self.kind,
            name: str_at(self.object, &["metadata", "name"]),
            namespace: (!namespace.is_empty()).then_some(namespace),
            labels: self
                .object
                .pointer("/metadata/labels")
                .and_then(Value::as_object),
        }
    }

    /// `Kind namespace/name`, for messages.
    pub(crate) fn describe(&self) -> String {
        let s = self.subject();
        match s.namespace {
            Some(ns) => format!("{} {ns}/{}", s.kind, s.name),
            None => format!("{} {}", s.kind, s.name),
        }
    }
}

/// The value of `data.inventory`, in Gatekeeper's layout:
/// `namespace[ns][groupversion][kind][name]` for namespaced objects and
/// `cluster[groupversion][kind][name]` for the rest (an object without
/// `metadata.namespace` counts as cluster-scoped). Later objects replace
/// earlier ones with the same key. Objects without apiVersion, kind or name
/// cannot be keyed and are left out.
pub(crate) fn inventory_data(objects: &[&Value]) -> Value {
    let mut cluster = Map::new();
    let mut namespaced = Map::new();
    for obj in objects {
        let gv = str_at(obj, &["apiVersion"]);
        let kind = str_at(obj, &["kind"]);
        let name = str_at(obj, &["metadata", "name"]);
        if gv.is_empty() || kind.is_empty() || name.is_empty() {
            continue;
        }
        let ns = str_at(obj, &["metadata", "namespace"]);
        let root = if ns.is_empty() {
            &mut cluster
        } else {
            entry(&mut namespaced, ns)
        };
        entry(entry(root, gv), kind).insert(name.to_string(), (*obj).clone());
    }
    serde_json::json!({"cluster": cluster, "namespace": namespaced})
}

fn entry<'m>(map: &'m mut Map<String, Value>, key: &str) -> &'m mut Map<String, Value> {
    let slot = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    match slot {
        Value::Object(m) => m,
        // Just made an object above.
        _ => unreachable!("slot is an object"),
    }
}

/// Labels of every Namespace among `objects`, by name (for `namespaceSelector`).
pub(crate) fn namespace_labels<'a>(
    objects: &[&'a Value],
) -> HashMap<&'a str, &'a Map<String, Value>> {
    objects
        .iter()
        .filter(|o| str_at(o, &["kind"]) == "Namespace" && str_at(o, &["apiVersion"]) == "v1")
        .filter_map(|o| {
            let labels = o.pointer("/metadata/labels").and_then(Value::as_object)?;
            Some((str_at(o, &["metadata", "name"]), labels))
        })
        .collect()
}
