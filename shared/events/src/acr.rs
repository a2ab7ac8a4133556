//! Azure Container Registry events (`Microsoft.ContainerRegistry.ImagePushed` /
//! `ImageDeleted`) as delivered through Event Grid to Service Bus, in either the
//! Event Grid schema or the CloudEvents 1.0 schema, one event or an array per
//! message. Both are normalised into [`RegistryEvent`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{EventError, decode};

/// `data.target` of an ACR event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Manifest media type.
    #[serde(default)]
    pub media_type: Option<String>,
    /// Manifest digest.
    pub digest: String,
    /// Repository within the registry.
    pub repository: String,
    /// Tag, absent when pushed or deleted by digest.
    #[serde(default)]
    pub tag: Option<String>,
}

/// `data.request` of an ACR event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Registry login server, e.g. `contoso.azurecr.io`.
    #[serde(default)]
    pub host: Option<String>,
}

/// `data` of an ACR event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Data {
    /// `push` or `delete`.
    #[serde(default)]
    pub action: Option<String>,
    /// What was pushed or deleted.
    pub target: Target,
    /// The registry request.
    #[serde(default)]
    pub request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventGridEvent {
    id: String,
    event_type: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    event_time: Option<String>,
    data: Value,
}

#[derive(Deserialize)]
struct CloudEvent {
    specversion: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    data: Value,
}

/// What happened in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryAction {
    /// `Microsoft.ContainerRegistry.ImagePushed`
    ImagePushed,
    /// `Microsoft.ContainerRegistry.ImageDeleted`
    ImageDeleted,
    /// Any other type (chart events, ...): recorded and ignored.
    Other(String),
}

/// One registry event, whichever schema it came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegistryEvent {
    /// Event id (Event Grid `id` / CloudEvents `id`): the de-duplication key.
    pub id: String,
    /// What happened.
    pub action: RegistryAction,
    /// Registry login server (`contoso.azurecr.io`), from the request host or,
    /// failing that, from the registry resource id.
    pub registry: String,
    /// Repository.
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest as sent (validated by the caller before use).
    pub digest: String,
    /// When the registry says it happened.
    pub time: Option<String>,
}

const PUSHED: &str = "Microsoft.ContainerRegistry.ImagePushed";
const DELETED: &str = "Microsoft.ContainerRegistry.ImageDeleted";

/// One item of a registry message: decoded on its own, so one bad event never
/// takes the valid ones in the same message down with it.
#[derive(Debug)]
pub struct Item {
    /// Position in the message (0 for a single event).
    pub index: usize,
    /// The item's `id`, when it has one (the rejection key of a bad item).
    pub id: Option<String>,
    /// The item as received, re-serialised (kept for rejection records).
    pub raw: String,
    /// The decoded event, or why it could not be decoded.
    pub event: Result<RegistryEvent, EventError>,
}

/// Decodes a Service Bus message body holding one event or an array of events,
/// in the Event Grid or CloudEvents 1.0 schema. The outer error means the body
/// as a whole is unusable (not JSON, empty array); each item carries its own result.
pub fn decode_registry_events(body: &[u8]) -> Result<Vec<Item>, EventError> {
    let value: Value = decode("registry event", body)?;
    let items = match value {
        Value::Array(items) => items,
        single => vec![single],
    };
    if items.is_empty() {
        return Err(EventError::Decode {
            what: "registry event",
            message: "empty array".into(),
        });
    }
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(index, item)| Item {
            index,
            id: item.get("id").and_then(Value::as_str).map(str::to_string),
            raw: item.to_string(),
            event: decode_one(item),
        })
        .collect())
}

fn decode_one(item: Value) -> Result<RegistryEvent, EventError> {
    let err = |message: String| EventError::Decode {
        what: "registry event",
        message,
    };
    let (id, event_type, resource, time, data) = if item.get("specversion").is_some() {
        let ce: CloudEvent =
            serde_json::from_value(item).map_err(|e| err(format!("CloudEvents: {e}")))?;
        if !ce.specversion.starts_with("1.") {
            return Err(err(format!(
                "unsupported CloudEvents specversion {:?}",
                ce.specversion
            )));
        }
        (ce.id, ce.event_type, ce.source, ce.time, ce.data)
    } else {
        let eg: EventGridEvent =
            serde_json::from_value(item).map_err(|e| err(format!("Event Grid: {e}")))?;
        (eg.id, eg.event_type, eg.topic, eg.event_time, eg.data)
    };
    let action = match event_type.as_str() {
        PUSHED => RegistryAction::ImagePushed,
        DELETED => RegistryAction::ImageDeleted,
        _ => RegistryAction::Other(event_type.clone()),
    };
    if let RegistryAction::Other(_) = action {
        // Not an image event: keep what we can for the record, nothing more is required.
        return Ok(RegistryEvent {
            id,
            action,
            registry: String::new(),
            repository: String::new(),
            tag: None,
            digest: String::new(),
            time,
        });
    }
    let data: Data = serde_json::from_value(data).map_err(|e| err(format!("data: {e}")))?;
    let registry = data
        .request
        .and_then(|r| r.host)
        .filter(|h| !h.is_empty())
        .or_else(|| registry_from_resource_id(resource.as_deref()?))
        .ok_or_else(|| err("no registry host in data.request.host or the topic/source".into()))?;
    let registry = registry.to_ascii_lowercase();
    if !valid_registry_host(&registry) {
        return Err(err(format!(
            "registry host {registry:?} is not a host name"
        )));
    }
    if !valid_repository(&data.target.repository) {
        return Err(err(format!(
            "data.target.repository {:?} is not an OCI repository name",
            data.target.repository
        )));
    }
    let tag = data.target.tag.filter(|t| !t.is_empty());
    if let Some(t) = &tag
        && !valid_tag(t)
    {
        return Err(err(format!("data.target.tag {t:?} is not an OCI tag")));
    }
    Ok(RegistryEvent {
        id,
        action,
        registry,
        repository: data.target.repository,
        tag,
        digest: data.target.digest,
        time,
    })
}

/// A registry host name, optionally with a port (`contoso.azurecr.io`,
/// `localhost:5000`).
fn valid_registry_host(host: &str) -> bool {
    let (name, port) = host.split_once(':').unwrap_or((host, "1"));
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
}

/// An OCI distribution repository name: slash-separated components of
/// `[a-z0-9]+` joined by `.`, `_`, `__` or dashes; at most 255 characters.
/// (So no `..`, no empty component, nothing a path could be made of.)
fn valid_repository(repo: &str) -> bool {
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(x))
            && !c.contains("..")
            && !c.contains("___")
            && !c.contains("._")
            && !c.contains("_.")
            && !c.contains(".-")
            && !c.contains("-.")
    };
    !repo.is_empty() && repo.len() <= 255 && repo.split('/').all(component)
}

/// An OCI tag: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|x| x.is_ascii_alphanumeric() || b"._-".contains(x))
}

/// `/subscriptions/.../providers/Microsoft.ContainerRegistry/registries/{name}` →
/// `{name}.azurecr.io` (registry names are alphanumeric, so this is safe).
fn registry_from_resource_id(id: &str) -> Option<String> {
    let mut parts = id.split('/');
    while let Some(p) = parts.next() {
        if p.eq_ignore_ascii_case("registries") {
            let name = parts.next()?;
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Some(format!("{}.azurecr.io", name.to_ascii_lowercase()));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(body: &str) -> Result<Vec<RegistryEvent>, EventError> {
        decode_registry_events(body.as_bytes())?
            .into_iter()
            .map(|i| i.event)
            .collect()
    }

    fn event_grid() -> Value {
        serde_json::json!({
            "id": "831e1650-001e-001b-66ab-eeb76e069631",
            "topic": "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/Contoso",
            "subject": "web:v1",
            "eventType": "Microsoft.ContainerRegistry.ImagePushed",
            "eventTime": "2026-11-27T10:00:00.0Z",
            "data": {
                "id": "x", "action": "push",
                "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 1, "digest": "sha256:aa", "length": 1, "repository": "web", "tag": "v1"},
                "request": {"id": "r", "host": "contoso.azurecr.io", "method": "PUT"}
            },
            "dataVersion": "1.0", "metadataVersion": "1"
        })
    }

    #[test]
    fn event_grid_single_and_array() {
        let one = events(&event_grid().to_string()).expect("decodes");
        let many = decode_registry_events(
            serde_json::json!([event_grid(), event_grid()])
                .to_string()
                .as_bytes(),
        )
        .expect("decodes");
        assert_eq!(one.len(), 1);
        assert_eq!(many.len(), 2);
        assert_eq!(one[0].action, RegistryAction::ImagePushed);
        assert_eq!(one[0].registry, "contoso.azurecr.io");
        assert_eq!(one[0].tag.as_deref(), Some("v1"));
    }

    #[test]
    fn registry_host_falls_back_to_topic() {
        let mut e = event_grid();
        e["data"]["request"] = serde_json::json!({});
        let got = events(&e.to_string()).expect("decodes");
        assert_eq!(got[0].registry, "contoso.azurecr.io");
    }

    #[test]
    fn cloud_event() {
        let e = serde_json::json!({
            "specversion": "1.0", "id": "ce-1", "type": "Microsoft.ContainerRegistry.ImageDeleted",
            "source": "/subscriptions/0/resourceGroups/rg/providers/Microsoft.ContainerRegistry/registries/contoso",
            "data": {"action": "delete", "target": {"digest": "sha256:bb", "repository": "web"}}
        });
        let got = events(&e.to_string()).expect("decodes");
        assert_eq!(got[0].action, RegistryAction::ImageDeleted);
        assert_eq!(got[0].tag, None);
        assert_eq!(got[0].id, "ce-1");
    }

    #[test]
    fn one_bad_item_does_not_spoil_the_others() {
        let mut bad = event_grid();
        bad["id"] = serde_json::json!("bad-1");
        bad["data"]["target"] = serde_json::json!({});
        let items = decode_registry_events(
            serde_json::json!([event_grid(), bad])
                .to_string()
                .as_bytes(),
        )
        .expect("the message decodes");
        assert!(items[0].event.is_ok());
        assert_eq!(items[1].id.as_deref(), Some("bad-1"));
        assert_eq!(items[1].index, 1);
        assert!(
            items[1]
                .event
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("digest")
        );
    }

    #[test]
    fn names_are_checked_as_oci_names() {
        for good in ["web", "team/web", "a.b_c__d-e---f/g0", "x"] {
            assert!(valid_repository(good), "{good}");
        }
        for bad in [
            "", "../web", "web/..", "Web", "web/", "/web", "we b", "web\u{0}", "a..b", "-web",
        ] {
            assert!(!valid_repository(bad), "{bad:?}");
        }
        for good in [
            "v1",
            "3f786850e387550fdab836ed7e6dc881de23001b",
            "_x",
            "1.2.3-rc.1",
        ] {
            assert!(valid_tag(good), "{good}");
        }
        for bad in ["", ".x", "-x", "v1\n", "a/b", &"x".repeat(129)] {
            assert!(!valid_tag(bad), "{bad:?}");
        }
        for good in ["contoso.azurecr.io", "localhost:5000"] {
            assert!(valid_registry_host(good), "{good}");
        }
        for bad in [
            "",
            "contoso.azurecr.io/../x",
            "a..b",
            "host:",
            "host:99999x",
            "ho st",
        ] {
            assert!(!valid_registry_host(bad), "{bad:?}");
        }
    }

    #[test]
    fn malformed_events_name_the_problem() {
        for (body, needle) in [
            ("not json", "registry event"),
            ("[]", "empty array"),
            (
                r#"{"id":"1","eventType":"Microsoft.ContainerRegistry.ImagePushed","data":{"target":{}}}"#,
                "digest",
            ),
            (
                r#"{"specversion":"2.0","id":"1","type":"x"}"#,
                "specversion",
            ),
        ] {
            let err = events(body).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
