//! Constraints: which objects a template applies to (`spec.match`), with what
//! parameters and what enforcement action — Gatekeeper's match semantics.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Place, PolicyError};
use crate::yaml::str_at;

/// What happens to an object that violates a constraint
/// (`spec.enforcementAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementAction {
    /// Block (the default).
    Deny,
    /// Record only: the violation is reported but never blocks.
    Dryrun,
    /// Report as a warning; does not block.
    Warn,
}

impl EnforcementAction {
    /// Only `deny` blocks a deployment; `dryrun` and `warn` are reported.
    pub fn is_blocking(self) -> bool {
        self == Self::Deny
    }

    /// The Gatekeeper spelling (`deny`, `dryrun`, `warn`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Dryrun => "dryrun",
            Self::Warn => "warn",
        }
    }
}

impl std::fmt::Display for EnforcementAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a document is a Constraint (any kind in `constraints.gatekeeper.sh`).
pub(crate) fn is_constraint(doc: &Value) -> bool {
    str_at(doc, &["apiVersion"]).starts_with("constraints.gatekeeper.sh/")
}

/// A loaded constraint.
#[derive(Debug, Clone)]
pub(crate) struct Constraint {
    pub kind: String,
    pub name: String,
    /// Index of its template in the set.
    pub template: usize,
    pub action: EnforcementAction,
    pub matcher: Matcher,
    /// `spec.parameters` (an empty object when absent, so that templates can
    /// read `input.parameters.x` without tripping over null).
    pub parameters: regorus::Value,
}

/// `spec.match`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Matcher {
    kinds: Vec<KindSelector>,
    namespaces: Vec<String>,
    excluded_namespaces: Vec<String>,
    label_selector: Option<Selector>,
    namespace_selector: Option<Selector>,
    scope: Scope,
    name: Option<String>,
}

#[derive(Debug, Clone)]
struct KindSelector {
    groups: Vec<String>,
    kinds: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Scope {
    #[default]
    All,
    Cluster,
    Namespaced,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, Default)]
struct Selector {
    match_labels: BTreeMap<String, String>,
    expressions: Vec<Requirement>,
}

#[derive(Debug, Clone)]
struct Requirement {
    key: String,
    op: Operator,
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// What matching needs to know about the object under review.
#[derive(Debug)]
pub(crate) struct Subject<'a> {
    pub group: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    /// `metadata.namespace`, when set.
    pub namespace: Option<&'a str>,
    pub labels: Option<&'a Map<String, Value>>,
}

impl Subject<'_> {
    fn is_namespace(&self) -> bool {
        self.kind == "Namespace" && self.group.is_empty()
    }
}

impl Constraint {
    /// Reads a constraint document; `template` resolves its kind to a template
    /// index and schema.
    pub(crate) fn from_doc<'t>(
        place: &Place,
        doc: &Value,
        template: impl Fn(&str) -> Option<(usize, Option<&'t Value>)>,
    ) -> Result<Self, PolicyError> {
        let kind = str_at(doc, &["kind"]).to_string();
        let name = str_at(doc, &["metadata", "name"]).to_string();
        let fail = |message: String| PolicyError::LoadConstraint {
            place: place.clone(),
            kind: if kind.is_empty() {
                "?".into()
            } else {
                kind.clone()
            },
            constraint: if name.is_empty() {
                "?".into()
            } else {
                name.clone()
            },
            message,
        };
        if kind.is_empty() {
            return Err(fail("kind is missing".into()));
        }
        if name.is_empty() {
            return Err(fail("metadata.name is missing".into()));
        }
        let (template, schema) = template(&kind)
            .ok_or_else(|| fail(format!("no ConstraintTemplate defines the kind {kind}")))?;
        let spec = doc.get("spec").unwrap_or(&Value::Null);
        let action = match spec.get("enforcementAction") {
            None | Some(Value::Null) => EnforcementAction::Deny,
            Some(v) => match v.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("deny") | Some("") => EnforcementAction::Deny,
                Some("dryrun") => EnforcementAction::Dryrun,
                Some("warn") => EnforcementAction::Warn,
                _ => {
                    return Err(fail(format!(
                        "spec.enforcementAction {v} is not one of deny, dryrun, warn"
                    )));
                }
            },
        };
        let matcher = match spec.get("match") {
            None | Some(Value::Null) => Matcher::default(),
            Some(m) => Matcher::from_value(m).map_err(|e| fail(format!("spec.match{e}")))?,
        };
        let parameters = match spec.get("parameters") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(p) => p.clone(),
        };
        if let Some(schema) = schema {
            check_schema(schema, &parameters, "spec.parameters").map_err(fail)?;
        }
        Ok(Self {
            kind,
            name,
            template,
            action,
            matcher,
            parameters: regorus::Value::from(parameters),
        })
    }
}

// --- spec.match --------------------------------------------------------------

fn strings(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what}: expected a list of strings"))
            })
            .collect(),
        _ => Err(format!("{what}: expected a list of strings")),
    }
}

impl Matcher {
    fn from_value(m: &Value) -> Result<Self, String> {
        if !m.is_object() {
            return Err(": expected an object".into());
        }
        let mut kinds = Vec::new();
        if let Some(list) = m.get("kinds").filter(|v| !v.is_null()) {
            let list = list.as_array().ok_or(".kinds: expected a list")?;
            for (i, k) in list.iter().enumerate() {
                kinds.push(KindSelector {
                    groups: strings(
                        k.get("apiGroups").unwrap_or(&Value::Null),
                        &format!(".kinds[{i}].apiGroups"),
                    )?,
                    kinds: strings(
                        k.get("kinds").unwrap_or(&Value::Null),
                        &format!(".kinds[{i}].kinds"),
                    )?,
                });
            }
        }
        let scope = match str_at(m, &["scope"]) {
            "Cluster" => Scope::Cluster,
            "Namespaced" => Scope::Namespaced,
            // Gatekeeper treats `*`, unset and typos alike: everything.
            _ => Scope::All,
        };
        let name = Some(str_at(m, &["name"]).to_string()).filter(|n| !n.is_empty());
        Ok(Self {
            kinds,
            namespaces: strings(m.get("namespaces").unwrap_or(&Value::Null), ".namespaces")?,
            excluded_namespaces: strings(
                m.get("excludedNamespaces").unwrap_or(&Value::Null),
                ".excludedNamespaces",
            )?,
            label_selector: selector(m.get("labelSelector"), ".labelSelector")?,
            namespace_selector: selector(m.get("namespaceSelector"), ".namespaceSelector")?,
            scope,
            name,
        })
    }

    /// Gatekeeper's match: every criterion that is set must hold.
    /// `namespace_labels` finds the labels of a Namespace by name (from the
    /// objects and inventory being evaluated), for `namespaceSelector`.
    pub(crate) fn matches<'a>(
        &self,
        s: &Subject<'_>,
        namespace_labels: impl Fn(&str) -> Option<&'a Map<String, Value>>,
    ) -> bool {
        // kinds: empty lists are wildcards, like `*`.
        if !self.kinds.is_empty() {
            let any = self.kinds.iter().any(|k| {
                let kind_ok = k.kinds.is_empty() || k.kinds.iter().any(|x| x == "*" || x == s.kind);
                let group_ok =
                    k.groups.is_empty() || k.groups.iter().any(|g| g == "*" || g == s.group);
                kind_ok && group_ok
            });
            if !any {
                return false;
            }
        }
        let is_namespace = s.is_namespace();
        let has_namespace = s.namespace.is_some_and(|n| !n.is_empty());
        match self.scope {
            Scope::Cluster if !is_namespace && has_namespace => return false,
            Scope::Namespaced if is_namespace || !has_namespace => return false,
            _ => {}
        }
        // The namespace an object is "in": a Namespace is in itself; a
        // cluster-scoped object is in none, and namespace criteria skip it.
        let namespace = if is_namespace {
            Some(s.name)
        } else {
            s.namespace.filter(|n| !n.is_empty())
        };
        if let Some(ns) = namespace {
            if !self.namespaces.is_empty() && !self.namespaces.iter().any(|w| wildcard(w, ns)) {
                return false;
            }
            if self.excluded_namespaces.iter().any(|w| wildcard(w, ns)) {
                return false;
            }
        }
        if let Some(sel) = &self.label_selector
            && !sel.matches(s.labels)
        {
            return false;
        }
        if let Some(sel) = &self.namespace_selector {
            let labels = if is_namespace {
                s.labels
            } else if let Some(ns) = namespace {
                // A namespace gantry does not know about has no labels.
                namespace_labels(ns)
            } else {
                // Non-Namespace cluster-scoped objects always match.
                return self.name_matches(s.name);
            };
            if !sel.matches(labels) {
                return false;
            }
        }
        self.name_matches(s.name)
    }

    fn name_matches(&self, name: &str) -> bool {
        self.name.as_deref().is_none_or(|w| wildcard(w, name))
    }
}

/// Gatekeeper's name globs: `kube-*` (prefix), `*-system` (suffix),
/// `*mid*` (contains), else equality.
pub(crate) fn wildcard(pattern: &str, candidate: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (Some(_), Some(_)) if pattern.len() >= 2 => {
            candidate.contains(&pattern[1..pattern.len() - 1])
        }
        (Some(_), Some(_)) => true, // "*"
        (Some(suffix), None) => candidate.ends_with(suffix),
        (None, Some(prefix)) => candidate.starts_with(prefix),
        (None, None) => pattern == candidate,
    }
}

fn selector(v: Option<&Value>, what: &str) -> Result<Option<Selector>, String> {
    let v = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let mut sel = Selector::default();
    match v.get("matchLabels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            for (k, val) in labels {
                let val = val
                    .as_str()
                    .ok_or_else(|| format!("{what}.matchLabels.{k}: expected a string"))?;
                sel.match_labels.insert(k.clone(), val.to_string());
            }
        }
        Some(_) => return Err(format!("{what}.matchLabels: expected an object")),
    }
    if let Some(exprs) = v.get("matchExpressions").filter(|e| !e.is_null()) {
        let exprs = exprs
            .as_array()
            .ok_or_else(|| format!("{what}.matchExpressions: expected a list"))?;
        for (i, e) in exprs.iter().enumerate() {
            let at = format!("{what}.matchExpressions[{i}]");
            let key = str_at(e, &["key"]).to_string();
            if key.is_empty() {
                return Err(format!("{at}.key is missing"));
            }
            let op = match str_at(e, &["operator"]) {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(format!(
                        "{at}.operator {other:?} is not one of In, NotIn, Exists, DoesNotExist"
                    ));
                }
            };
            let values = strings(
                e.get("values").unwrap_or(&Value::Null),
                &format!("{at}.values"),
            )?;
            if matches!(op, Operator::In | Operator::NotIn) && values.is_empty() {
                return Err(format!("{at}.values must be non-empty for In and NotIn"));
            }
            sel.expressions.push(Requirement { key, op, values });
        }
    }
    Ok(Some(sel))
}

impl Selector {
    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.match_labels
            .iter()
            .all(|(k, v)| get(k) == Some(v.as_str()))
            && self.expressions.iter().all(|r| {
                let value = get(&r.key);
                match r.op {
                    Operator::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
                    // Kubernetes: NotIn also matches objects without the label.
                    Operator::NotIn => value.is_none_or(|v| !r.values.iter().any(|x| x == v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

// --- parameters schema -----------------------------------------------------------

/// A small structural check of constraint parameters against the template's
/// `openAPIV3Schema`: `type`, `properties`, `items`, `additionalProperties`
/// (as a schema) and `enum`. Unknown properties are allowed (Kubernetes
/// prunes them rather than rejecting). Enough for gator's `invalid: true`
/// tests and to catch a string where a list was meant.
pub(crate) fn check_schema(schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if value.is_null() {
        return Ok(());
    }
    if let Some(ty) = schema.get("type").and_then(Value::as_str) {
        let ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            _ => true,
        };
        if !ok {
            return Err(format!("{at}: expected {ty}, got {}", json_type(value)));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!(
            "{at}: {value} is not one of {}",
            Value::from(allowed.clone())
        ));
    }
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|v| v.is_object());
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => check_schema(s, v, &format!("{at}.{k}"))?,
                    None => {
                        if let Some(s) = extra {
                            check_schema(s, v, &format!("{at}.{k}"))?;
                        }
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(s) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check_schema(s, v, &format!("{at}[{i}]"))?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards_follow_gatekeeper() {
        assert!(wildcard("kube-*", "kube-system"));
        assert!(!wildcard("kube-*", "gatekeeper-system"));
        assert!(wildcard("*-system", "gatekeeper-system"));
        assert!(wildcard("*tek*", "gatekeeper-system"));
        assert!(wildcard("*", "anything"));
        assert!(wildcard("web", "web"));
        assert!(!wildcard("web", "web2"));
    }

    #[test]
    fn schema_check_reports_the_path() {
        let schema = json!({"type": "object", "properties": {"labels": {"type": "array",
            "items": {"type": "object", "properties": {"key": {"type": "string"}}}}}});
        assert!(check_schema(&schema, &json!({"labels": [{"key": "a"}]}), "p").is_ok());
        let err = check_schema(&schema, &json!({"labels": [{"key": 3}]}), "p").unwrap_err();
        assert_eq!(err, "p.labels[0].key: expected string, got number");
        assert!(check_schema(&schema, &json!({"labels": "x"}), "p").is_err());
        assert!(check_schema(&schema, &json!({"other": 1}), "p").is_ok());
    }
}
