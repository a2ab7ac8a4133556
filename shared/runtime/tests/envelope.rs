//! Contract tests of the custom-handler envelope with payloads shaped like the
//! ones the Functions host really sends, and of the runtime's reply rules.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use gantry_bus::embedded::{EmbeddedBus, QueueOptions};
use gantry_pipeline::{Config, RunStore};
use gantry_runtime::envelope::{self, InvokeRequest, InvokeResponse, MessageMeta, TimerInfo};
use gantry_runtime::{Deps, Done, FromMessage, Function, FunctionError, Invocation, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// A Service Bus trigger invocation as the host sends it to a custom handler:
/// scalars JSON-encoded a second time, numbers as strings, SDK objects as `{}`.
const SERVICE_BUS_INVOCATION: &str = r#"{
  "Data": {"message": "{\"app\":\"web\",\"n\":7}"},
  "Metadata": {
    "MessageReceiver": {}, "MessageSession": {}, "MessageActions": {}, "SessionActions": {}, "Client": {},
    "DeliveryCount": "3",
    "LockToken": "\"5f3d0c5e-6c1b-4a8e-9b7e-1f2a3b4c5d6e\"",
    "ExpiresAtUtc": "\"2026-11-27T10:05:00\"",
    "EnqueuedTimeUtc": "\"2026-11-27T10:00:00\"",
    "MessageId": "\"01jf3z9k4m:scan:1\"",
    "ContentType": "\"application/json\"",
    "SequenceNumber": "12",
    "SessionId": "\"web\"",
    "Label": null,
    "ApplicationProperties": {"run-id": "01jf3z9k4m", "app": "\"web\""},
    "UserProperties": {"legacy": "yes"},
    "sys": {"MethodName": "scan-check", "UtcNow": "2026-11-27T10:00:01.123Z", "RandGuid": "b3f4..."}
  }
}"#;

/// A timer invocation as the host sends it.
const TIMER_INVOCATION: &str = r#"{
  "Data": {"timer": {"Schedule": {"AdjustForDST": true},
    "ScheduleStatus": {"Last": "2026-11-27T09:00:00+00:00", "Next": "2026-11-27T10:00:00+00:00", "LastUpdated": "2026-11-27T09:00:00+00:00"},
    "IsPastDue": true}},
  "Metadata": {"sys": {"MethodName": "cluster-audit", "UtcNow": "2026-11-27T10:00:00.001Z", "RandGuid": "1c2d"}}
}"#;

/// A non-forwarded HTTP trigger invocation (what the host sends when
/// forwarding is off): gantry never relies on it, but must read it safely.
const HTTP_INVOCATION: &str = r#"{
  "Data": {"req": {"Url": "https://gantry.azurewebsites.net/api/health", "Method": "GET", "Query": {},
    "Headers": {"Accept": ["application/json"]}, "Params": {}, "Identities": [], "Body": null}},
  "Metadata": {"Query": {}, "Headers": {"Accept": "application/json"}, "sys": {"MethodName": "runs-api"}}
}"#;

#[test]
fn service_bus_metadata_decodes_double_encoded_scalars() {
    let req: InvokeRequest = serde_json::from_str(SERVICE_BUS_INVOCATION).expect("parses");
    let meta = MessageMeta::from_metadata(&req.metadata);
    assert_eq!(meta.message_id.as_deref(), Some("01jf3z9k4m:scan:1"));
    assert_eq!(meta.delivery_count, 3);
    assert_eq!(meta.session_id.as_deref(), Some("web"));
    assert_eq!(meta.enqueued_time.as_deref(), Some("2026-11-27T10:00:00"));
    assert_eq!(
        meta.properties.get("run-id").map(String::as_str),
        Some("01jf3z9k4m")
    );
    assert_eq!(meta.properties.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        meta.properties.get("legacy").map(String::as_str),
        Some("yes")
    );
    let body = envelope::message_bytes(&req.data, "message", false).expect("body");
    assert_eq!(body, br#"{"app":"web","n":7}"#);
}

#[test]
fn data_as_string_object_double_encoded_or_base64() {
    let data = |v: serde_json::Value| v.as_object().expect("object").clone();
    let expected = br#"{"a":1}"#.to_vec();
    let as_text = data(serde_json::json!({"message": "{\"a\":1}"}));
    let as_object = data(serde_json::json!({"message": {"a": 1}}));
    let double = data(serde_json::json!({"message": "\"{\\\"a\\\":1}\""}));
    let base64 = data(serde_json::json!({"message": "eyJhIjoxfQ=="}));
    assert_eq!(
        envelope::message_bytes(&as_text, "message", false).expect("text"),
        expected
    );
    assert_eq!(
        envelope::message_bytes(&as_object, "message", false).expect("object"),
        expected
    );
    assert_eq!(
        envelope::message_bytes(&double, "message", false).expect("double"),
        expected
    );
    assert_eq!(
        envelope::message_bytes(&base64, "message", true).expect("base64"),
        expected
    );
    let bad = envelope::message_bytes(
        &data(serde_json::json!({"message": "%%%"})),
        "message",
        true,
    )
    .unwrap_err();
    assert!(bad.0.contains("base64"), "{bad:?}");
    let missing = envelope::message_bytes(&as_text, "msg", false).unwrap_err();
    assert!(missing.0.contains("msg"), "{missing:?}");
    let null = envelope::message_bytes(
        &data(serde_json::json!({"message": null})),
        "message",
        false,
    )
    .unwrap_err();
    assert!(null.0.contains("null"), "{null:?}");
}

#[test]
fn metadata_numbers_in_every_spelling() {
    for raw in [
        r#"{"DeliveryCount": 4}"#,
        r#"{"DeliveryCount": "4"}"#,
        r#"{"DeliveryCount": "\"4\""}"#,
    ] {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(raw).expect("json");
        assert_eq!(envelope::meta_u64(&map, "DeliveryCount"), Some(4), "{raw}");
    }
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"DeliveryCount": "four", "MessageId": null}"#).expect("json");
    assert_eq!(envelope::meta_u64(&map, "DeliveryCount"), None);
    assert_eq!(
        MessageMeta::from_metadata(&map).delivery_count,
        1,
        "defaults to first delivery"
    );
    assert_eq!(MessageMeta::from_metadata(&map).message_id, None);
}

#[test]
fn timer_and_http_payloads_decode() {
    let req: InvokeRequest = serde_json::from_str(TIMER_INVOCATION).expect("parses");
    let timer = TimerInfo::from_data(&req.data, "timer").expect("timer");
    assert!(timer.is_past_due);
    assert_eq!(
        timer.schedule_status.and_then(|s| s.next).as_deref(),
        Some("2026-11-27T10:00:00+00:00")
    );
    let req: InvokeRequest = serde_json::from_str(HTTP_INVOCATION).expect("parses");
    let meta = MessageMeta::from_metadata(&req.metadata);
    assert_eq!(meta.message_id, None);
    assert!(
        req.data["req"]["Url"]
            .as_str()
            .expect("url")
            .ends_with("/api/health")
    );
}

#[test]
fn host_request_round_trips_through_the_decoder() {
    let mut props = BTreeMap::new();
    props.insert("run-id".to_string(), "01abc".to_string());
    let req = envelope::host_request_for_message(
        "message",
        false,
        b"{\"x\":1}",
        "id-1",
        2,
        Some("web"),
        "2026-11-27T10:00:00Z",
        &props,
    );
    let json = serde_json::to_string(&req).expect("serialises");
    assert!(
        json.contains(r#""MessageId":"\"id-1\"""#),
        "double-encoded like the host: {json}"
    );
    let back: InvokeRequest = serde_json::from_str(&json).expect("parses");
    let meta = MessageMeta::from_metadata(&back.metadata);
    assert_eq!(meta.message_id.as_deref(), Some("id-1"));
    assert_eq!(meta.delivery_count, 2);
    assert_eq!(meta.session_id.as_deref(), Some("web"));
    assert_eq!(meta.properties, props);
    assert_eq!(
        envelope::message_bytes(&back.data, "message", false).expect("body"),
        b"{\"x\":1}"
    );
}

#[test]
fn response_uses_host_field_names() {
    let value = serde_json::to_value(InvokeResponse {
        logs: vec!["done".into()],
        ..Default::default()
    })
    .expect("serialises");
    assert_eq!(
        value,
        serde_json::json!({"Outputs": {}, "Logs": ["done"], "ReturnValue": null})
    );
}

// --- runtime reply rules, through the real router -------------------------

#[derive(Debug)]
struct Probe {
    mode: String,
}

impl FromMessage for Probe {
    fn from_message(body: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let mode = v["mode"]
            .as_str()
            .ok_or("missing field `mode`")?
            .to_string();
        Ok(Probe { mode })
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("storage timed out")]
    Transient,
    #[error("digest is not sha256")]
    Permanent,
}

impl FunctionError for ProbeError {
    fn is_transient(&self) -> bool {
        matches!(self, ProbeError::Transient)
    }
}

async fn probe(inv: Invocation<Probe>, _deps: Arc<Deps>) -> Result<Done, ProbeError> {
    match inv.event.mode.as_str() {
        "transient" => Err(ProbeError::Transient),
        "permanent" => Err(ProbeError::Permanent),
        _ => Ok(Done(format!(
            "ok after {} deliveries",
            inv.meta.delivery_count
        ))),
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    router: axum::Router,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FsStore::open(dir.path().join("store")).expect("store"));
    let bus = EmbeddedBus::open(dir.path().join("queues"), QueueOptions::default())
        .await
        .expect("bus");
    let deps = Arc::new(Deps {
        runs: RunStore::new(store.clone()),
        bus: Arc::new(bus.clone()),
        config: Arc::new(Config::parse("", "test").expect("config")),
        secrets: Secrets::default(),
        services: Default::default(),
    });
    let router = gantry_runtime::app(deps, &[Function::queue("probe", "scan", false, probe)]);
    Harness {
        _dir: dir,
        store,
        bus,
        router,
    }
}

async fn invoke(router: &axum::Router, body: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::post("/probe")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

fn envelope_for(body: &str, id: &str) -> String {
    let req = envelope::host_request_for_message(
        "message",
        false,
        body.as_bytes(),
        id,
        1,
        None,
        "2026-11-27T10:00:00Z",
        &BTreeMap::new(),
    );
    serde_json::to_string(&req).expect("serialises")
}

#[tokio::test]
async fn success_is_200_with_logs() {
    let h = harness().await;
    let (status, body) = invoke(
        &h.router,
        SERVICE_BUS_INVOCATION
            .replace(r#"{\"app\":\"web\",\"n\":7}"#, r#"{\"mode\":\"ok\"}"#)
            .as_str(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["Logs"][0], "ok after 3 deliveries");
    assert_eq!(body["ReturnValue"], serde_json::Value::Null);
    assert!(
        h.store
            .list("", None, 100)
            .await
            .expect("list")
            .names
            .is_empty(),
        "success writes nothing here"
    );
}

#[tokio::test]
async fn transient_failure_is_non_2xx_and_records_nothing() {
    let h = harness().await;
    let (status, body) = invoke(&h.router, &envelope_for(r#"{"mode":"transient"}"#, "m-1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["Logs"][0]
            .as_str()
            .expect("log")
            .contains("storage timed out")
    );
    assert!(
        h.store
            .list("", None, 100)
            .await
            .expect("list")
            .names
            .is_empty()
    );
    assert_eq!(h.bus.stats("alerts").await.active, 0);
}

#[tokio::test]
async fn permanent_failure_is_recorded_alerted_and_acknowledged() {
    let h = harness().await;
    for body in [r#"{"mode":"permanent"}"#, r#"{"nomode":1}"#, "not json"] {
        let id = format!("m-{}", body.len());
        let (status, reply) = invoke(&h.router, &envelope_for(body, &id)).await;
        assert_eq!(status, StatusCode::OK, "acknowledged: {reply}");
        assert!(
            reply["Logs"][0]
                .as_str()
                .expect("log")
                .starts_with("rejected")
        );
        let record = h
            .store
            .get(&format!("rejected/probe/{id}.json"))
            .await
            .expect("get")
            .expect("recorded");
        let record: serde_json::Value = serde_json::from_slice(&record.body).expect("json");
        assert_eq!(record["function"], "probe");
        assert_eq!(record["message_id"], id.as_str());
        assert!(!record["reason"].as_str().expect("reason").is_empty());
    }
    let reasons: Vec<String> = h
        .bus
        .peek("alerts")
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(reasons.len(), 3, "one alert per rejected message");
    assert!(reasons.iter().any(|r| r.contains("digest is not sha256")));
    assert!(reasons.iter().any(|r| r.contains("missing field `mode`")));
    let audit = h.store.list("audit/", None, 10).await.expect("list").names;
    assert_eq!(audit.len(), 1, "audit trail written");
}

#[tokio::test]
async fn malformed_envelope_and_unknown_routes_are_json_errors() {
    let h = harness().await;
    let (status, body) = invoke(&h.router, "{not an envelope").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "bad_envelope");
    let resp = h
        .router
        .clone()
        .oneshot(Request::get("/nope").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(body["error"]["code"], "not_found");
    assert!(
        h.store
            .list("", None, 100)
            .await
            .expect("list")
            .names
            .is_empty()
    );
}

/// A timer function: answers by the schedule's `Next` (a test knob).
async fn tick(inv: Invocation<TimerInfo>, _deps: Arc<Deps>) -> Result<Done, ProbeError> {
    let next = inv
        .event
        .schedule_status
        .and_then(|s| s.next)
        .unwrap_or_default();
    match next.as_str() {
        "transient" => Err(ProbeError::Transient),
        "permanent" => Err(ProbeError::Permanent),
        _ => Ok(Done(format!("tick past_due={}", inv.event.is_past_due))),
    }
}

#[tokio::test]
async fn timer_functions_answer_by_outcome_and_record_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(FsStore::open(dir.path().join("store")).expect("store"));
    let bus = EmbeddedBus::open(dir.path().join("queues"), QueueOptions::default())
        .await
        .expect("bus");
    let deps = Arc::new(Deps {
        runs: RunStore::new(store.clone()),
        bus: Arc::new(bus.clone()),
        config: Arc::new(Config::parse("", "test").expect("config")),
        secrets: Secrets::default(),
        services: Default::default(),
    });
    let timer = Function::timer("tick", "0 */15 * * * *", tick);
    assert_eq!(
        timer.trigger,
        gantry_runtime::Trigger::Timer {
            schedule: "0 */15 * * * *"
        }
    );
    let router = gantry_runtime::app(deps, &[timer]);
    let post = |body: String| {
        let router = router.clone();
        async move {
            let req = Request::post("/tick")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("request");
            let resp = router.oneshot(req).await.expect("infallible");
            let status = resp.status();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            (status, value)
        }
    };
    // The host's own payload.
    let (status, reply) = post(TIMER_INVOCATION.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["Logs"][0], "tick past_due=true");
    // What gantry dev sends.
    let dev =
        gantry_runtime::host_request_for_timer("0 */15 * * * *", false, "2026-11-27T10:00:00Z");
    let (status, reply) = post(serde_json::to_string(&dev).expect("json")).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["Logs"][0], "tick past_due=false");

    let with_next = |next: &str| {
        TIMER_INVOCATION.replace(
            "\"Next\": \"2026-11-27T10:00:00+00:00\"",
            &format!("\"Next\": \"{next}\""),
        )
    };
    let (status, reply) = post(with_next("transient")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
    let (status, reply) = post(with_next("permanent")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{reply}");
    assert!(
        reply["Logs"][0]
            .as_str()
            .unwrap_or("")
            .contains("digest is not sha256")
    );

    let (status, reply) = post("{not json".into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    let (status, reply) = post(r#"{"Data": {"myTimer": {}}, "Metadata": {}}"#.into()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(reply["error"]["code"], "bad_timer");

    // No message, so nothing is recorded as rejected and nothing alerted.
    assert!(
        store
            .list("rejected/", None, 100)
            .await
            .expect("list")
            .names
            .is_empty()
    );
    assert!(bus.peek("alerts").await.is_empty());
}
