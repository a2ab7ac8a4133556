//! Microsoft Defender for Cloud events on the `security-events` queue:
//! **security alerts** and **container vulnerability sub-assessments**.
//!
//! # Shapes read
//!
//! Every key is matched case-insensitively, because the same alert arrives in
//! PascalCase from workflow automation (the Logic App trigger "When a Defender
//! for Cloud alert is created or triggered", forwarded as its body) and in
//! camelCase from continuous export and the REST API. A document holding one
//! key twice in different casings is refused (which one would be meant?).
//!
//! - **Alert, flat** (workflow automation; continuous export):
//!   `SystemAlertId`, `AlertDisplayName`, `AlertType`, `Severity`
//!   (`High`/`Medium`/`Low`/`Informational`), `CompromisedEntity`,
//!   `StartTimeUtc`, `TimeGenerated`, `AlertUri`, `ResourceIdentifiers[]`
//!   (`Type: AzureResource`, `AzureResourceId`), `Entities[]`,
//!   `ExtendedProperties{}`. The Log Analytics spellings `AlertName`,
//!   `AlertSeverity`, `ResourceId` and `Entities`/`ExtendedProperties` as
//!   JSON text are read too.
//! - **Alert, ARM** (REST API, continuous export to Event Hubs):
//!   `{"id", "name", "type": "Microsoft.Security/Locations/alerts",
//!   "properties": {…the same fields in camelCase…}}`; the id is
//!   `properties.systemAlertId`, else `name`.
//! - **Sub-assessment** (`Microsoft.Security/assessments/subAssessments`):
//!   `{"id", "name", "type", "properties": {"id", "displayName",
//!   "status": {"code", "severity"}, "timeGenerated", "additionalData":
//!   {"assessedResourceType": "AzureContainerRegistryVulnerability",
//!   "artifactDetails": {"registryHost", "repositoryName", "digest"}, …}}}`,
//!   or the older `ContainerRegistryVulnerability` with `imageDigest`. Its
//!   findings are mapped by `gantry_scan::defender::sub_assessment_findings`,
//!   the same code the scan gate uses on Resource Graph rows.
//!
//! **Entities** are serialised with references (`"$id": "3"` defines one,
//! `{"$ref": "3"}` points at it; a definition may sit inline inside another
//! entity). All of them are collected, then read by `Type`:
//! `K8s-cluster` (`CloudResource` → `azure-resource` `ResourceId`),
//! `K8s-namespace` (`Name`, `Cluster`), `K8s-pod` (`Namespace`),
//! `container-image` (`ImageId`, e.g. `contoso.azurecr.io/web@sha256:…`),
//! `azure-resource` (`ResourceId`).
//!
//! # Limits
//!
//! A message is at most [`MAX_MESSAGE_BYTES`] and [`MAX_EVENTS`] events (one
//! object or an array); ids at most [`MAX_ID_CHARS`] characters; at most
//! [`MAX_ENTITIES`] entities. Free text (names, descriptions) is kept but
//! truncated. Digests are only taken in their exact form
//! (`sha256:` + 64 lowercase hex digits), so what this module returns as a
//! digest is safe to validate into a blob name.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::EventError;

/// Largest message accepted: Service Bus standard tier's 256 KiB.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most events in one message (an exported batch).
pub const MAX_EVENTS: usize = 100;
/// Longest alert or sub-assessment id accepted.
pub const MAX_ID_CHARS: usize = 512;
/// Most entities read from one alert.
pub const MAX_ENTITIES: usize = 500;
/// Free text (names, property values) is cut to this many characters.
const MAX_TEXT_CHARS: usize = 1000;
/// Most extended properties kept.
const MAX_PROPERTIES: usize = 200;
/// Deepest nesting walked (entities reference each other; JSON is shallow).
const MAX_DEPTH: usize = 32;

/// Defender's alert severity, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertSeverity {
    /// `Informational`.
    Informational,
    /// `Low`.
    Low,
    /// `Medium`.
    Medium,
    /// `High`.
    High,
}

impl AlertSeverity {
    /// Parses Defender's spelling, case-insensitively. `Critical` (not a
    /// Defender alert level today) reads as `High` rather than failing, so a
    /// new top level never lowers an alert; anything else is `None`.
    pub fn parse(s: &str) -> Option<AlertSeverity> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" | "critical" => Some(AlertSeverity::High),
            "medium" => Some(AlertSeverity::Medium),
            "low" => Some(AlertSeverity::Low),
            "informational" | "information" | "info" => Some(AlertSeverity::Informational),
            _ => None,
        }
    }

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertSeverity::Informational => "informational",
            AlertSeverity::Low => "low",
            AlertSeverity::Medium => "medium",
            AlertSeverity::High => "high",
        }
    }
}

/// One event from the `security-events` queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DefenderEvent {
    /// A security alert.
    Alert(SecurityAlert),
    /// A container image vulnerability sub-assessment.
    SubAssessment(SubAssessment),
}

impl DefenderEvent {
    /// Defender's id of the event: `SystemAlertId`, or the sub-assessment's
    /// ARM id. Not safe as a path segment: derive keys from it.
    pub fn id(&self) -> &str {
        match self {
            DefenderEvent::Alert(a) => &a.system_alert_id,
            DefenderEvent::SubAssessment(s) => &s.id,
        }
    }
}

/// A Kubernetes namespace named by an alert, with the cluster it is in when
/// the alert says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct K8sNamespace {
    /// Namespace name.
    pub name: String,
    /// ARM id of its cluster, from the `K8s-cluster` entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// A container image named by an alert.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ContainerImage {
    /// `ImageId` as given (e.g. `contoso.azurecr.io/web@sha256:…`).
    pub image_id: String,
    /// Its digest, when it carries one in exact form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// A Defender for Cloud security alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecurityAlert {
    /// `SystemAlertId` (or the ARM `name`): unique per alert.
    pub system_alert_id: String,
    /// ARM id of the alert, when it came in ARM form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm_id: Option<String>,
    /// `AlertDisplayName` (or `AlertType` when it has none).
    pub display_name: String,
    /// `AlertType`: the detection (`K8S_…`).
    pub alert_type: String,
    /// `Severity`.
    pub severity: AlertSeverity,
    /// `CompromisedEntity`: the name of the resource most related.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compromised_entity: Option<String>,
    /// `StartTimeUtc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_utc: Option<String>,
    /// `TimeGenerated` / `TimeGeneratedUtc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_generated: Option<String>,
    /// `AlertUri`: the alert in the portal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_uri: Option<String>,
    /// Azure resource ids: `ResourceIdentifiers[].AzureResourceId`,
    /// `azure-resource` entities, `K8s-cluster` entities' resources.
    pub resource_ids: Vec<String>,
    /// `K8s-namespace` entities (and pods' namespaces).
    pub namespaces: Vec<K8sNamespace>,
    /// `container-image` entities.
    pub images: Vec<ContainerImage>,
    /// `ExtendedProperties`, values as text.
    pub extended_properties: BTreeMap<String, String>,
}

impl SecurityAlert {
    /// Every image digest the alert names: its images', then any in
    /// `ExtendedProperties` values. Sorted, each once.
    pub fn digests(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        for image in &self.images {
            if let Some(d) = &image.digest {
                out.insert(d.clone());
            }
        }
        for value in self.extended_properties.values() {
            out.extend(find_digests(value));
        }
        out.into_iter().collect()
    }
}

/// A container image vulnerability sub-assessment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubAssessment {
    /// ARM id of the sub-assessment.
    pub id: String,
    /// `properties.id`: the vulnerability id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vuln_id: Option<String>,
    /// `properties.displayName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// `properties.status.code`: `Healthy`, `Unhealthy`, `NotApplicable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<String>,
    /// `properties.status.severity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_severity: Option<String>,
    /// `properties.timeGenerated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_generated: Option<String>,
    /// `additionalData.assessedResourceType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assessed_resource_type: Option<String>,
    /// `additionalData.artifactDetails.registryHost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_host: Option<String>,
    /// `additionalData.artifactDetails.repositoryName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The image digest (`artifactDetails.digest`, older `imageDigest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `properties.additionalData` as sent (for the findings mapping).
    pub additional_data: Value,
}

/// Decodes one `security-events` message: one event or an array of them.
pub fn decode(bytes: &[u8]) -> Result<Vec<DefenderEvent>, EventError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(bad(format!(
            "message of {} bytes is larger than {MAX_MESSAGE_BYTES}",
            bytes.len()
        )));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    check_keys(&value, 0, "$")?;
    let items: Vec<&Value> = match &value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    if items.is_empty() {
        return Err(bad("an empty array holds no event".into()));
    }
    if items.len() > MAX_EVENTS {
        return Err(bad(format!(
            "{} events in one message, at most {MAX_EVENTS}",
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            decode_one(v).map_err(|e| match e {
                EventError::Decode { message, .. } if value.is_array() => {
                    bad(format!("event [{i}]: {message}"))
                }
                e => e,
            })
        })
        .collect()
}

fn bad(message: String) -> EventError {
    EventError::Decode {
        what: "Defender for Cloud event",
        message,
    }
}

/// Refuses documents with one key in two casings, and nesting past
/// [`MAX_DEPTH`], before anything is read from them.
fn check_keys(value: &Value, depth: usize, at: &str) -> Result<(), EventError> {
    if depth > MAX_DEPTH {
        return Err(bad(format!("{at}: nested deeper than {MAX_DEPTH} levels")));
    }
    match value {
        Value::Object(map) => {
            let mut seen = HashMap::with_capacity(map.len());
            for (key, v) in map {
                if let Some(other) = seen.insert(key.to_ascii_lowercase(), key) {
                    return Err(bad(format!(
                        "{at}: key {key:?} appears twice ({other:?}) in different casing"
                    )));
                }
                check_keys(v, depth + 1, &format!("{at}.{key}"))?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                check_keys(v, depth + 1, &format!("{at}[{i}]"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The value under `key`, matched case-insensitively (unambiguous after
/// [`check_keys`]). `null` counts as absent.
fn get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    entry(obj, key).map(|(_, v)| v)
}

/// Like [`get`], with the key as the document spells it (for errors).
fn entry<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<(&'a str, &'a Value)> {
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.as_str(), v))
}

/// A string field; present but not a string is an error naming it.
fn text(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, EventError> {
    let Some((key, value)) = entry(obj, key) else {
        return Ok(None);
    };
    match value {
        Value::String(s) => {
            let s = s.trim();
            Ok((!s.is_empty()).then(|| truncate(s)))
        }
        other => Err(bad(format!(
            "{key}: expected a string, found {}",
            kind(other)
        ))),
    }
}

/// An id field: a string of at most [`MAX_ID_CHARS`] without control characters.
fn id_field(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, EventError> {
    let Some((key, value)) = entry(obj, key) else {
        return Ok(None);
    };
    match value {
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() {
                return Ok(None);
            }
            if s.chars().count() > MAX_ID_CHARS {
                return Err(bad(format!("{key}: longer than {MAX_ID_CHARS} characters")));
            }
            if s.chars().any(char::is_control) {
                return Err(bad(format!("{key}: contains control characters")));
            }
            Ok(Some(s.to_string()))
        }
        other => Err(bad(format!(
            "{key}: expected a string, found {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_TEXT_CHARS).collect()
}

/// A field that is JSON, or JSON held in a string (Log Analytics' form of
/// `Entities` and `ExtendedProperties`).
fn json_field(obj: &Map<String, Value>, key: &str) -> Result<Option<Value>, EventError> {
    match get(obj, key) {
        None => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => {
            let v: Value = serde_json::from_str(s)
                .map_err(|e| bad(format!("{key}: text that is not JSON: {e}")))?;
            check_keys(&v, 0, key)?;
            Ok(Some(v))
        }
        Some(v) => Ok(Some(v.clone())),
    }
}

fn decode_one(value: &Value) -> Result<DefenderEvent, EventError> {
    let Some(top) = value.as_object() else {
        return Err(bad(format!("expected an object, found {}", kind(value))));
    };
    // ARM form: the fields are under `properties`, beside id, name and type.
    let arm = get(top, "properties").and_then(Value::as_object);
    let props = arm.unwrap_or(top);
    let arm_type = match arm {
        Some(_) => text(top, "type")?,
        None => None,
    };
    let arm_id = match arm {
        Some(_) => id_field(top, "id")?,
        None => None,
    };
    let is_sub_assessment = arm_type
        .as_deref()
        .is_some_and(|t| t.to_ascii_lowercase().ends_with("/subassessments"))
        || arm_id
            .as_deref()
            .is_some_and(|i| i.to_ascii_lowercase().contains("/subassessments/"))
        || get(props, "additionalData")
            .and_then(Value::as_object)
            .is_some_and(|d| get(d, "assessedResourceType").is_some());
    if is_sub_assessment {
        return sub_assessment(arm_id, props).map(DefenderEvent::SubAssessment);
    }
    let is_alert = arm_type
        .as_deref()
        .is_some_and(|t| t.to_ascii_lowercase().ends_with("/alerts"))
        || get(props, "systemAlertId").is_some()
        || get(props, "alertType").is_some();
    if !is_alert {
        return Err(bad(
            "neither a security alert (no SystemAlertId or AlertType) nor a sub-assessment".into(),
        ));
    }
    let name = match arm {
        Some(_) => id_field(top, "name")?,
        None => None,
    };
    alert(arm_id, name, props).map(DefenderEvent::Alert)
}

fn alert(
    arm_id: Option<String>,
    arm_name: Option<String>,
    props: &Map<String, Value>,
) -> Result<SecurityAlert, EventError> {
    let system_alert_id = id_field(props, "systemAlertId")?
        .or(arm_name)
        .ok_or_else(|| bad("SystemAlertId: missing".into()))?;
    let severity_text = match text(props, "severity")? {
        Some(s) => s,
        None => text(props, "alertSeverity")?.ok_or_else(|| bad("Severity: missing".into()))?,
    };
    let severity = AlertSeverity::parse(&severity_text).ok_or_else(|| {
        bad(format!(
            "Severity: {severity_text:?} is not High, Medium, Low or Informational"
        ))
    })?;
    let alert_type = text(props, "alertType")?;
    let display_name = match text(props, "alertDisplayName")? {
        Some(n) => Some(n),
        None => text(props, "alertName")?,
    };
    let (display_name, alert_type) = match (display_name, alert_type) {
        (Some(n), Some(t)) => (n, t),
        (Some(n), None) => (n.clone(), n),
        (None, Some(t)) => (t.clone(), t),
        (None, None) => return Err(bad("AlertDisplayName and AlertType: both missing".into())),
    };

    let mut resource_ids = BTreeSet::new();
    if let Some(id) = id_field(props, "resourceId")? {
        resource_ids.insert(id);
    }
    match get(props, "resourceIdentifiers") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(obj) = item.as_object() else {
                    return Err(bad(format!("ResourceIdentifiers[{i}]: expected an object")));
                };
                if let Some(id) = id_field(obj, "azureResourceId")? {
                    resource_ids.insert(id);
                }
            }
        }
        Some(other) => {
            return Err(bad(format!(
                "ResourceIdentifiers: expected an array, found {}",
                kind(other)
            )));
        }
    }

    let mut namespaces = BTreeSet::new();
    let mut images = BTreeSet::new();
    if let Some(entities) = json_field(props, "entities")? {
        let Value::Array(list) = &entities else {
            return Err(bad(format!(
                "Entities: expected an array, found {}",
                kind(&entities)
            )));
        };
        let graph = Entities::collect(list)?;
        for entity in &graph.all {
            let Some(entity_type) = text(entity, "type")? else {
                continue;
            };
            match entity_type.to_ascii_lowercase().as_str() {
                "azure-resource" => {
                    if let Some(id) = id_field(entity, "resourceId")? {
                        resource_ids.insert(id);
                    }
                }
                "k8s-cluster" => {
                    if let Some(id) = graph.cluster_id(entity)? {
                        resource_ids.insert(id);
                    }
                }
                "k8s-namespace" => {
                    if let Some(ns) = graph.namespace(entity)? {
                        namespaces.insert(ns);
                    }
                }
                "k8s-pod" => {
                    if let Some(ns) = get(entity, "namespace").and_then(|v| graph.resolve(v))
                        && let Some(ns) = graph.namespace(ns)?
                    {
                        namespaces.insert(ns);
                    }
                }
                "container-image" => {
                    let image_id = match id_field(entity, "imageId")? {
                        Some(i) => Some(i),
                        None => id_field(entity, "name")?,
                    };
                    let digest = match id_field(entity, "digest")? {
                        Some(d) => find_digests(&d).into_iter().next(),
                        None => None,
                    }
                    .or_else(|| {
                        image_id
                            .as_deref()
                            .and_then(|i| find_digests(i).into_iter().next())
                    });
                    if let Some(image_id) = image_id.or_else(|| digest.clone()) {
                        images.insert(ContainerImage { image_id, digest });
                    }
                }
                _ => {}
            }
        }
    }

    let mut extended_properties = BTreeMap::new();
    if let Some(props_value) = json_field(props, "extendedProperties")? {
        let Value::Object(map) = props_value else {
            return Err(bad(format!(
                "ExtendedProperties: expected an object, found {}",
                kind(&props_value)
            )));
        };
        for (key, value) in map.iter().take(MAX_PROPERTIES) {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Null => continue,
                other => other.to_string(),
            };
            extended_properties.insert(truncate(key), truncate(&text));
        }
    }
    // Some Kubernetes alerts name the namespace only here.
    for (key, value) in &extended_properties {
        if key.eq_ignore_ascii_case("namespace") && !value.trim().is_empty() {
            namespaces.insert(K8sNamespace {
                name: value.trim().to_string(),
                cluster: None,
            });
        }
    }

    Ok(SecurityAlert {
        system_alert_id,
        arm_id,
        display_name,
        alert_type,
        severity,
        compromised_entity: text(props, "compromisedEntity")?,
        start_time_utc: text(props, "startTimeUtc")?,
        time_generated: match text(props, "timeGenerated")? {
            Some(t) => Some(t),
            None => text(props, "timeGeneratedUtc")?,
        },
        alert_uri: text(props, "alertUri")?,
        resource_ids: resource_ids.into_iter().collect(),
        namespaces: namespaces.into_iter().collect(),
        images: images.into_iter().collect(),
        extended_properties,
    })
}

/// An alert's entities: every object with a `Type`, wherever it sits (a
/// definition may be inline inside another entity), and `$id` → entity for
/// resolving `{"$ref"}`.
struct Entities<'a> {
    all: Vec<&'a Map<String, Value>>,
    by_id: HashMap<&'a str, &'a Map<String, Value>>,
}

impl<'a> Entities<'a> {
    fn collect(list: &'a [Value]) -> Result<Entities<'a>, EventError> {
        let mut graph = Entities {
            all: Vec::new(),
            by_id: HashMap::new(),
        };
        for v in list {
            graph.walk(v)?;
        }
        Ok(graph)
    }

    fn walk(&mut self, v: &'a Value) -> Result<(), EventError> {
        match v {
            Value::Object(obj) => {
                if get(obj, "type").is_some() && get(obj, "$ref").is_none() {
                    if self.all.len() >= MAX_ENTITIES {
                        return Err(bad(format!("Entities: more than {MAX_ENTITIES}")));
                    }
                    self.all.push(obj);
                    if let Some(id) = get(obj, "$id").and_then(Value::as_str) {
                        self.by_id.insert(id, obj);
                    }
                }
                for child in obj.values() {
                    self.walk(child)?;
                }
            }
            Value::Array(items) => {
                for child in items {
                    self.walk(child)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The entity `v` is or points at.
    fn resolve(&self, v: &'a Value) -> Option<&'a Map<String, Value>> {
        let obj = v.as_object()?;
        match get(obj, "$ref").and_then(Value::as_str) {
            Some(r) => self.by_id.get(r).copied(),
            None => Some(obj),
        }
    }

    /// ARM id of a `K8s-cluster` entity: its own `ResourceId`/`AzureResourceId`
    /// or its `CloudResource`'s `ResourceId`.
    fn cluster_id(&self, cluster: &'a Map<String, Value>) -> Result<Option<String>, EventError> {
        for key in ["resourceId", "azureResourceId"] {
            if let Some(id) = id_field(cluster, key)? {
                return Ok(Some(id));
            }
        }
        match get(cluster, "cloudResource").and_then(|v| self.resolve(v)) {
            Some(resource) => id_field(resource, "resourceId"),
            None => Ok(None),
        }
    }

    /// A `K8s-namespace` entity with the ARM id of its `Cluster`.
    fn namespace(&self, ns: &'a Map<String, Value>) -> Result<Option<K8sNamespace>, EventError> {
        let Some(name) = id_field(ns, "name")? else {
            return Ok(None);
        };
        let cluster = match get(ns, "cluster").and_then(|v| self.resolve(v)) {
            Some(c) => self.cluster_id(c)?,
            None => None,
        };
        Ok(Some(K8sNamespace { name, cluster }))
    }
}

fn sub_assessment(
    arm_id: Option<String>,
    props: &Map<String, Value>,
) -> Result<SubAssessment, EventError> {
    let id = arm_id.ok_or_else(|| bad("sub-assessment id: missing".into()))?;
    let status = match get(props, "status") {
        None => None,
        Some(Value::Object(s)) => Some(s),
        Some(other) => {
            return Err(bad(format!(
                "properties.status: expected an object, found {}",
                kind(other)
            )));
        }
    };
    let additional_data = match get(props, "additionalData") {
        None => Value::Null,
        Some(v @ Value::Object(_)) => v.clone(),
        Some(other) => {
            return Err(bad(format!(
                "properties.additionalData: expected an object, found {}",
                kind(other)
            )));
        }
    };
    let data = additional_data.as_object();
    let artifact = data
        .and_then(|d| get(d, "artifactDetails"))
        .and_then(Value::as_object);
    let digest_text = match artifact {
        Some(a) => id_field(a, "digest")?,
        None => None,
    };
    let digest_text = match (digest_text, data) {
        (Some(d), _) => Some(d),
        (None, Some(d)) => id_field(d, "imageDigest")?,
        (None, None) => None,
    };
    let digest = match digest_text {
        None => None,
        Some(d) => Some(exact_digest(&d).ok_or_else(|| {
            bad(format!(
                "artifactDetails.digest: {d:?} is not sha256:<64 hex>"
            ))
        })?),
    };
    Ok(SubAssessment {
        id,
        vuln_id: id_field(props, "id")?,
        display_name: text(props, "displayName")?,
        status_code: match status {
            Some(s) => text(s, "code")?,
            None => None,
        },
        status_severity: match status {
            Some(s) => text(s, "severity")?,
            None => None,
        },
        time_generated: text(props, "timeGenerated")?,
        assessed_resource_type: match data {
            Some(d) => text(d, "assessedResourceType")?,
            None => None,
        },
        registry_host: match artifact {
            Some(a) => id_field(a, "registryHost")?,
            None => None,
        },
        repository: match artifact {
            Some(a) => id_field(a, "repositoryName")?,
            None => None,
        },
        digest,
        additional_data,
    })
}

/// `s` if it is exactly `sha256:` and 64 lowercase hex digits.
fn exact_digest(s: &str) -> Option<String> {
    let hex = s.trim().strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| format!("sha256:{hex}"))
}

/// Every `sha256:` + 64 lowercase hex digits in `s` (e.g. in
/// `contoso.azurecr.io/web@sha256:…`), not part of a longer hex run.
pub fn find_digests(s: &str) -> Vec<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = s[from..].find("sha256:") {
        let start = from + pos + "sha256:".len();
        let end = start + 64;
        if end <= bytes.len()
            && bytes[start..end]
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            && !bytes.get(end).is_some_and(u8::is_ascii_hexdigit)
        {
            out.push(s[start - 7..end].to_string());
        }
        from = start;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn digests_are_found_only_in_exact_form() {
        assert_eq!(find_digests(&format!("contoso.azurecr.io/web@{D}")), [D]);
        assert!(find_digests(&D.to_uppercase()).is_empty());
        assert!(find_digests(&format!("{D}0")).is_empty());
        assert!(find_digests("sha256:abc").is_empty());
        assert_eq!(find_digests(&format!("{D} and {D}")).len(), 2);
    }

    #[test]
    fn severities_parse_case_insensitively_and_never_lower() {
        assert_eq!(AlertSeverity::parse("HIGH"), Some(AlertSeverity::High));
        assert_eq!(AlertSeverity::parse("Critical"), Some(AlertSeverity::High));
        assert_eq!(
            AlertSeverity::parse("informational"),
            Some(AlertSeverity::Informational)
        );
        assert_eq!(AlertSeverity::parse("severe"), None);
        assert!(AlertSeverity::High > AlertSeverity::Medium);
    }

    #[test]
    fn references_resolve_across_entities() {
        let body = serde_json::json!({
            "SystemAlertId": "a1", "AlertType": "K8S_X", "Severity": "Low",
            "Entities": [
                {"$id": "2", "ResourceId": "/subscriptions/s/resourceGroups/r/providers/Microsoft.ContainerService/managedClusters/aks", "Type": "azure-resource"},
                {"$id": "3", "CloudResource": {"$ref": "2"}, "Type": "K8s-cluster"},
                {"$id": "4", "Type": "K8s-pod", "Name": "p",
                 "Namespace": {"$id": "5", "Name": "web", "Cluster": {"$ref": "3"}, "Type": "K8s-namespace"}},
                {"$id": "6", "Type": "container-image", "ImageId": format!("contoso.azurecr.io/web@{D}")}
            ]
        });
        let events = decode(body.to_string().as_bytes()).expect("decodes");
        let DefenderEvent::Alert(a) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(
            a.namespaces,
            [K8sNamespace {
                name: "web".into(),
                cluster: Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.ContainerService/managedClusters/aks".into())
            }]
        );
        assert_eq!(a.digests(), [D]);
        assert_eq!(a.display_name, "K8S_X");
    }

    #[test]
    fn malformed_events_name_the_problem() {
        for (body, needle) in [
            ("[]".to_string(), "empty"),
            ("42".to_string(), "expected an object"),
            (r#"{"foo": 1}"#.to_string(), "neither"),
            (
                r#"{"SystemAlertId": "a", "AlertType": "t"}"#.to_string(),
                "Severity: missing",
            ),
            (
                r#"{"SystemAlertId": "a", "AlertType": "t", "Severity": "Severe"}"#.to_string(),
                "Severity",
            ),
            (
                r#"{"SystemAlertId": "a", "systemAlertId": "b", "AlertType": "t", "Severity": "High"}"#
                    .to_string(),
                "different casing",
            ),
            (
                r#"{"SystemAlertId": 7, "AlertType": "t", "Severity": "High"}"#.to_string(),
                "SystemAlertId: expected a string",
            ),
            (
                format!(
                    r#"{{"SystemAlertId": "{}", "AlertType": "t", "Severity": "High"}}"#,
                    "x".repeat(600)
                ),
                "longer than",
            ),
            (
                r#"{"SystemAlertId": "a", "AlertType": "t", "Severity": "High", "Entities": {}}"#
                    .to_string(),
                "Entities: expected an array",
            ),
            (
                r#"{"id": "/x/subAssessments/1", "type": "Microsoft.Security/assessments/subAssessments", "properties": {"additionalData": {"assessedResourceType": "AzureContainerRegistryVulnerability", "artifactDetails": {"digest": "sha256:XYZ"}}}}"#
                    .to_string(),
                "artifactDetails.digest",
            ),
        ] {
            let err = decode(body.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(
            decode(&big)
                .unwrap_err()
                .to_string()
                .contains("larger than")
        );
    }
}
