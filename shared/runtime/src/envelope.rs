//! The custom-handler invocation envelope (what the Functions host POSTs to
//! `/{FunctionName}` for non-HTTP triggers, and what it expects back).
//!
//! The host is loose with types: `Metadata` scalars may arrive JSON-encoded a
//! second time (`"MessageId": "\"abc\""`), numbers as strings, and `Data` may
//! be a string, an object, or base64 when the binding says `dataType: binary`.
//! Everything here decodes defensively and never panics on odd input.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The request body the host sends for a non-HTTP trigger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvokeRequest {
    /// Trigger and input binding data, by binding name.
    #[serde(rename = "Data", default)]
    pub data: Map<String, Value>,
    /// Trigger metadata (MessageId, DeliveryCount, sys, ...).
    #[serde(rename = "Metadata", default)]
    pub metadata: Map<String, Value>,
}

/// The response body the host expects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InvokeResponse {
    /// Output binding values by name (gantry sends its own messages, so empty).
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    /// Lines the host writes to its log for this invocation.
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    /// `$return` binding value.
    #[serde(rename = "ReturnValue")]
    pub return_value: Value,
}

/// Unwraps a value that may be JSON-encoded once more: `"\"abc\""` → `abc`.
fn unquote(value: &Value) -> Option<Value> {
    match value {
        Value::String(s) => {
            let t = s.trim();
            if ((t.starts_with('"') && t.ends_with('"') && t.len() >= 2)
                || t.starts_with('{')
                || t.starts_with('['))
                && let Ok(inner) = serde_json::from_str::<Value>(t)
            {
                return Some(inner);
            }
            Some(value.clone())
        }
        Value::Null => None,
        other => Some(other.clone()),
    }
}

/// A metadata scalar as a string, however the host encoded it.
pub fn meta_str(metadata: &Map<String, Value>, key: &str) -> Option<String> {
    match unquote(metadata.get(key)?)? {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A metadata integer, accepting `3`, `"3"` and `"\"3\""`.
pub fn meta_u64(metadata: &Map<String, Value>, key: &str) -> Option<u64> {
    match unquote(metadata.get(key)?)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Message metadata gantry uses, decoded from a Service Bus trigger's `Metadata`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MessageMeta {
    /// `MessageId` (de-duplication key).
    pub message_id: Option<String>,
    /// `DeliveryCount`: 1 on the first delivery.
    pub delivery_count: u32,
    /// `SessionId`, on session queues.
    pub session_id: Option<String>,
    /// `EnqueuedTimeUtc` as sent.
    pub enqueued_time: Option<String>,
    /// Application properties (`ApplicationProperties` or the older `UserProperties`).
    pub properties: BTreeMap<String, String>,
}

impl MessageMeta {
    /// Decodes the metadata of a Service Bus trigger.
    pub fn from_metadata(metadata: &Map<String, Value>) -> MessageMeta {
        let mut properties = BTreeMap::new();
        for key in ["ApplicationProperties", "UserProperties"] {
            if let Some(Value::Object(map)) = metadata.get(key).and_then(unquote) {
                for (k, v) in &map {
                    if let Some(s) = meta_str(&map, k) {
                        properties.insert(k.clone(), s);
                    } else {
                        properties.insert(k.clone(), v.to_string());
                    }
                }
            }
        }
        MessageMeta {
            message_id: meta_str(metadata, "MessageId"),
            delivery_count: meta_u64(metadata, "DeliveryCount")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1),
            session_id: meta_str(metadata, "SessionId").filter(|s| !s.is_empty()),
            enqueued_time: meta_str(metadata, "EnqueuedTimeUtc"),
            properties,
        }
    }
}

/// Why the trigger data could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

/// The raw message bytes of binding `binding` in `Data`.
///
/// - a string is the body text, unless it is itself a JSON string literal (the
///   host double-encoded it), which is unwrapped once;
/// - an object or array is the body already parsed by the host: re-serialised;
/// - with `binary`, a string is base64 of the body.
pub fn message_bytes(
    data: &Map<String, Value>,
    binding: &str,
    binary: bool,
) -> Result<Vec<u8>, DataError> {
    let value = data
        .get(binding)
        .ok_or_else(|| DataError(format!("Data has no binding named {binding:?}")))?;
    match value {
        Value::String(s) if binary => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| DataError(format!("Data.{binding} is not valid base64: {e}"))),
        Value::String(s) => {
            let t = s.trim_start();
            if t.starts_with('"')
                && let Ok(Value::String(inner)) = serde_json::from_str::<Value>(t)
            {
                return Ok(inner.into_bytes());
            }
            Ok(s.clone().into_bytes())
        }
        Value::Object(_) | Value::Array(_) => serde_json::to_vec(value)
            .map_err(|e| DataError(format!("re-encoding Data.{binding}: {e}"))),
        Value::Null => Err(DataError(format!("Data.{binding} is null"))),
        other => Ok(other.to_string().into_bytes()),
    }
}

/// Builds the request the Functions host would send for a Service Bus message:
/// the body as a string in `Data.{binding}` (base64 if `binary`) and the
/// metadata scalars JSON-encoded a second time, exactly as seen from the host.
/// `gantry dev` dispatches through this, so dev and Azure share one code path.
#[allow(clippy::too_many_arguments)]
pub fn host_request_for_message(
    binding: &str,
    binary: bool,
    body: &[u8],
    message_id: &str,
    delivery_count: u32,
    session_id: Option<&str>,
    enqueued_time: &str,
    properties: &BTreeMap<String, String>,
) -> InvokeRequest {
    let mut data = Map::new();
    let body_value = if binary {
        Value::String(base64::engine::general_purpose::STANDARD.encode(body))
    } else {
        Value::String(String::from_utf8_lossy(body).into_owned())
    };
    data.insert(binding.to_string(), body_value);
    let quoted = |s: &str| Value::String(Value::String(s.to_string()).to_string());
    let mut metadata = Map::new();
    metadata.insert("MessageId".into(), quoted(message_id));
    metadata.insert(
        "DeliveryCount".into(),
        Value::String(delivery_count.to_string()),
    );
    if let Some(s) = session_id {
        metadata.insert("SessionId".into(), quoted(s));
    }
    metadata.insert("EnqueuedTimeUtc".into(), quoted(enqueued_time));
    let props: Map<String, Value> = properties
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    metadata.insert("ApplicationProperties".into(), Value::Object(props));
    metadata.insert(
        "sys".into(),
        serde_json::json!({"MethodName": binding, "UtcNow": enqueued_time}),
    );
    InvokeRequest { data, metadata }
}

/// `Data.{binding}` of a timer trigger (what `cluster-audit` receives).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TimerInfo {
    /// Whether the invocation is late (the host was down at the scheduled time).
    #[serde(default)]
    pub is_past_due: bool,
    /// Last and next occurrences, when the host tracks them.
    #[serde(default)]
    pub schedule_status: Option<ScheduleStatus>,
}

impl TimerInfo {
    /// A timer occurrence as `gantry dev` or a test fires it (on time, no
    /// schedule status).
    pub fn now() -> TimerInfo {
        TimerInfo::default()
    }
}

/// Schedule bookkeeping of a timer trigger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ScheduleStatus {
    /// Previous occurrence.
    #[serde(default)]
    pub last: Option<String>,
    /// Next occurrence.
    #[serde(default)]
    pub next: Option<String>,
    /// When the host last updated the status.
    #[serde(default)]
    pub last_updated: Option<String>,
}

impl TimerInfo {
    /// Decodes `Data.{binding}` of a timer invocation (object or JSON string).
    pub fn from_data(data: &Map<String, Value>, binding: &str) -> Result<TimerInfo, DataError> {
        let bytes = message_bytes(data, binding, false)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| DataError(format!("Data.{binding} is not timer info: {e}")))
    }
}
