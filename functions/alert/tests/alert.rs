//! `alert` invoked through the custom-handler envelope (`POST /alert`), as the
//! Functions host (or `gantry dev`) invokes it, over the embedded store and
//! queue, with one local HTTP fake (axum on `127.0.0.1:0`) recording every
//! request and standing in for the Teams Workflows webhook, the Slack
//! incoming webhook, a generic webhook and the GitHub REST API.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use axum::Router;
use axum::body::Body;
use fn_alert::{DedupRecord, fingerprint, record_blob};
use gantry_bus::{EmbeddedBus, MessageBus, QueueOptions};
use gantry_pipeline::{
    Alert, AppName, Config, Digest, NotificationOutcome, Run, RunId, RunStatus, RunStore, Severity,
};
use gantry_runtime::{Deps, Secret, Secrets};
use gantry_store::StateStore;
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::{self, DIGEST, SHA};
use hmac::{KeyInit, Mac};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const TEAMS_PATH: &str = "/teams/workflows/sig-TEAMSSECRETPATH";
const SLACK_PATH: &str = "/slack/services/T000/B000/SLACKSECRETPATH";
const HOOK_PATH: &str = "/hook/HOOKSECRETPATH";
const HOOK_SECRET: &str = "hook-signing-secret-0123";
const GH_TOKEN: &str = "ghs_TOKENSECRET0123456789";

/// Every secret value a test configures: none may show up anywhere.
const SECRETS: &[&str] = &[
    "TEAMSSECRETPATH",
    "SLACKSECRETPATH",
    "HOOKSECRETPATH",
    HOOK_SECRET,
    GH_TOKEN,
];

/// One request the fake received.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    query: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Recorded {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// The fake: records requests; answers each path with the next scripted
/// status (default 200; a GitHub deployment 201 with an id). `echo` makes an
/// error answer repeat the request path and headers, as a careless endpoint
/// might, so the test can check they are scrubbed.
#[derive(Default)]
struct Fake {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<HashMap<String, VecDeque<u16>>>,
    /// GitHub deployments created so far, as GitHub lists them.
    deployments: Mutex<Vec<Value>>,
}

impl Fake {
    async fn start() -> Result<(Arc<Fake>, u16)> {
        let fake = Arc::new(Fake::default());
        let state = fake.clone();
        let app = Router::new().fallback(move |req: Request<Body>| {
            let fake = state.clone();
            async move { fake.answer(req).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((fake, port))
    }

    async fn answer(&self, req: Request<Body>) -> (StatusCode, String) {
        let path = req.uri().path().to_string();
        let method = req.method().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let headers: HashMap<String, String> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Recorded {
                method: method.clone(),
                query,
                path: path.clone(),
                headers: headers.clone(),
                body: body.clone(),
            });
        let scripted = {
            let mut script = self.script.lock().unwrap_or_else(|p| p.into_inner());
            script
                .iter_mut()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .and_then(|(_, q)| {
                    if q.len() > 1 {
                        q.pop_front()
                    } else {
                        q.front().copied()
                    }
                })
        };
        match scripted {
            Some(code) if code >= 400 => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                format!(
                    "refused {path} (auth {:?})",
                    headers.get("authorization").cloned().unwrap_or_default()
                ),
            ),
            Some(code) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "ok".into(),
            ),
            None if path.ends_with("/deployments") && method == "GET" => {
                let list = self
                    .deployments
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                (StatusCode::OK, Value::Array(list).to_string())
            }
            None if path.ends_with("/deployments") => {
                let mut list = self.deployments.lock().unwrap_or_else(|p| p.into_inner());
                let mut created: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                created["id"] = json!(42 + list.len());
                list.push(created.clone());
                (StatusCode::CREATED, created.to_string())
            }
            None if path.contains("/statuses") => (StatusCode::CREATED, "{}".into()),
            None => (StatusCode::OK, "1".into()),
        }
    }

    /// Answers requests to `prefix` with `codes` in turn (the last one repeats).
    fn script(&self, prefix: &str, codes: &[u16]) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(prefix.to_string(), codes.iter().copied().collect());
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn to(&self, prefix: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect()
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<FsStore>,
    bus: EmbeddedBus,
    runs: RunStore,
    router: Router,
    fake: Arc<Fake>,
    port: u16,
}

/// `[alerts]` channels on the fake: `ops` (teams), `chat` (slack), `hook`
/// (webhook), `gh` (github); `routes` and `settings` are appended.
fn config_text(port: u16, settings: &str, routes: &str) -> String {
    format!(
        r#"
[[apps]]
name = "web"
repo = "contoso/web"
image = "contoso.azurecr.io/web"
namespace = "web-prod"

[[apps]]
name = "api"
repo = "contoso/api"
image = "contoso.azurecr.io/api"

[alerts]
{settings}

[[alerts.channels]]
name = "ops"
kind = "teams"
url_env = "TEAMS_URL"

[[alerts.channels]]
name = "chat"
kind = "slack"
url_env = "SLACK_URL"

[[alerts.channels]]
name = "hook"
kind = "webhook"
url_env = "HOOK_URL"
secret_env = "HOOK_SECRET"

[[alerts.channels]]
name = "gh"
kind = "github"
token_env = "GH_TOKEN"
api_url = "http://127.0.0.1:{port}/gh"

{routes}
"#
    )
}

impl Harness {
    async fn new(settings: &str, routes: &str) -> Result<Harness> {
        Harness::with_env(settings, routes, |_| {}).await
    }

    async fn with_env(
        settings: &str,
        routes: &str,
        edit: impl FnOnce(&mut BTreeMap<String, Secret>),
    ) -> Result<Harness> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus = EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?;
        let runs = RunStore::new(store.clone());
        let (fake, port) = Fake::start().await?;
        let config = Config::parse(&config_text(port, settings, routes), "test.toml")?;
        let base = format!("http://127.0.0.1:{port}");
        let mut named = BTreeMap::new();
        for (k, v) in [
            ("TEAMS_URL", format!("{base}{TEAMS_PATH}")),
            ("SLACK_URL", format!("{base}{SLACK_PATH}")),
            ("HOOK_URL", format!("{base}{HOOK_PATH}")),
            ("HOOK_SECRET", HOOK_SECRET.to_string()),
            ("GH_TOKEN", GH_TOKEN.to_string()),
        ] {
            named.insert(k.to_string(), Secret::new(v.into_bytes()));
        }
        edit(&mut named);
        let deps = Deps {
            runs: runs.clone(),
            bus: Arc::new(bus.clone()) as Arc<dyn MessageBus>,
            config: Arc::new(config),
            secrets: Secrets {
                named,
                ..Secrets::default()
            },
            services: Default::default(),
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_alert::function()]);
        Ok(Harness {
            _dir: dir,
            store,
            bus,
            runs,
            router,
            fake,
            port,
        })
    }

    /// A run of `app` from a GitHub push, stored, in `status`.
    async fn run(&self, app: &str, status: RunStatus) -> Result<Run> {
        let run = fixtures::run(app, status)?;
        ensure!(self.runs.create(&run).await?);
        Ok(run)
    }

    /// Delivers `body` as an `alerts` message; returns status and log line.
    async fn deliver_raw(&self, body: &[u8], message_id: &str) -> Result<(StatusCode, String)> {
        let envelope = gantry_runtime::envelope::host_request_for_message(
            "message",
            false,
            body,
            message_id,
            1,
            None,
            "2026-11-27T10:04:12.1234567Z",
            &BTreeMap::new(),
        );
        let request = Request::post("/alert")
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&envelope)?))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let reply: Value = serde_json::from_slice(&bytes)?;
        let line = reply["Logs"][0].as_str().context("log")?.to_string();
        Ok((status, line))
    }

    /// Delivers `alert` with MessageId `id` and expects 200.
    async fn deliver(&self, alert: &Alert, id: &str) -> Result<String> {
        let (status, line) = self.deliver_raw(&serde_json::to_vec(alert)?, id).await?;
        ensure!(status == StatusCode::OK, "{status}: {line}");
        Ok(line)
    }

    async fn blob(&self, name: &str) -> Result<Option<Value>> {
        Ok(match self.store.get(name).await? {
            Some(b) => Some(serde_json::from_slice(&b.body)?),
            None => None,
        })
    }

    async fn record(&self, alert: &Alert) -> Result<DedupRecord> {
        let blob = self
            .store
            .get(&record_blob(&fingerprint(alert)))
            .await?
            .context("no dedup record")?;
        Ok(serde_json::from_slice(&blob.body)?)
    }

    async fn stored(&self, run: &Run) -> Result<Run> {
        self.runs.get(&run.app, &run.id).await?.context("run gone")
    }

    /// Every blob's text, concatenated (for "no secret anywhere").
    async fn everything(&self) -> Result<String> {
        let mut out = String::new();
        for name in self.runs.list_all("").await? {
            if let Some(b) = self.store.get(&name).await? {
                out.push_str(&name);
                out.push_str(&String::from_utf8_lossy(&b.body));
            }
        }
        for m in self.bus.peek("alerts").await {
            out.push_str(&m.body);
        }
        Ok(out)
    }
}

/// The alert `steps::block` sends for a scan block of `run`.
fn blocked(run: &Run) -> Result<Alert> {
    let mut a = Alert::new(
        "scan-blocked",
        Severity::High,
        format!(
            "{}: 2 critical vulnerabilities <CVE-2024-3094> & more",
            run.app
        ),
    );
    a.app = Some(run.app.clone());
    a.run_id = Some(run.id.clone());
    a.step = Some("scan".into());
    a.digest = Some(Digest::parse(DIGEST)?);
    Ok(a)
}

fn id_of(run_id: &RunId, key: &str) -> String {
    format!("{run_id}:alert:{key}")
}

fn assert_no_secret(text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "secret {s:?} leaked into: {text}");
    }
}

fn window_ms(record: &DedupRecord) -> Result<i64> {
    let w = record.window_start.context("window")?;
    Ok(i64::try_from(w.unix_timestamp_nanos() / 1_000_000)?)
}

#[tokio::test]
async fn each_channel_gets_its_exact_body_signature_and_headers() -> Result<()> {
    let h = Harness::new(
        "",
        "[[alerts.routes]]\nmin_severity = \"high\"\nchannels = [\"ops\", \"chat\", \"hook\", \"gh\"]\n",
    )
    .await?;
    let run = h.run("web", RunStatus::Blocked).await?;
    let alert = blocked(&run)?;
    let line = h.deliver(&alert, &id_of(&run.id, "scan-blocked")).await?;
    assert!(
        line.contains("ops=sent chat=sent hook=sent gh=sent"),
        "{line}"
    );
    let fp = fingerprint(&alert);
    let record = h.record(&alert).await?;
    assert_eq!(record.count, 1);
    let delivery = format!("{}-{}", &fp[..32], window_ms(&record)?);
    let reason = alert.reason.clone();
    let facts = json!([
        {"title": "App", "value": "web"},
        {"title": "Step", "value": "scan"},
        {"title": "Run", "value": run.id.to_string()},
        {"title": "Digest", "value": DIGEST},
        {"title": "Repository", "value": "contoso/web"},
        {"title": "Commit", "value": SHA},
    ]);

    let teams = h.fake.to("/teams");
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0].path, TEAMS_PATH);
    assert_eq!(teams[0].headers["content-type"], "application/json");
    assert_eq!(
        teams[0].json(),
        json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [
                        {"type": "TextBlock", "text": "[HIGH] scan-blocked (web)", "weight": "Bolder", "size": "Medium", "color": "Attention", "wrap": true},
                        {"type": "TextBlock", "text": reason, "wrap": true},
                        {"type": "FactSet", "facts": facts},
                    ],
                },
            }],
        })
    );

    let slack = h.fake.to("/slack");
    assert_eq!(slack.len(), 1);
    let mrkdwn_fields: Vec<Value> = facts
        .as_array()
        .context("facts")?
        .iter()
        .map(|f| {
            json!({"type": "mrkdwn", "text": format!("*{}*\n{}", f["title"].as_str().unwrap_or(""), f["value"].as_str().unwrap_or(""))})
        })
        .collect();
    assert_eq!(
        slack[0].json(),
        json!({
            "text": format!("[HIGH] scan-blocked (web): {reason}"),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "[HIGH] scan-blocked (web)"}},
                {"type": "section", "text": {"type": "mrkdwn", "text": "web: 2 critical vulnerabilities &lt;CVE-2024-3094&gt; &amp; more"}},
                {"type": "section", "fields": mrkdwn_fields},
            ],
        })
    );

    let hook = h.fake.to("/hook");
    assert_eq!(hook.len(), 1);
    // The signature is over the exact bytes received: recompute it here.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(HOOK_SECRET.as_bytes())?;
    mac.update(&hook[0].body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(hook[0].headers["x-gantry-signature-256"], expected);
    assert_eq!(hook[0].headers["x-gantry-event"], "alert");
    assert_eq!(hook[0].headers["x-gantry-delivery"], delivery);
    assert_eq!(
        hook[0].json(),
        json!({
            "event": "alert",
            "delivery": delivery,
            "fingerprint": fp,
            "count": 1,
            "alert": {
                "kind": "scan-blocked",
                "severity": "high",
                "app": "web",
                "run_id": run.id.to_string(),
                "step": "scan",
                "digest": DIGEST,
                "reason": reason,
            },
            "run": {
                "id": run.id.to_string(),
                "status": "blocked",
                "repo": "contoso/web",
                "commit": SHA,
                "ref": "refs/heads/main",
            },
        })
    );

    let gh = h.fake.to("/gh");
    assert_eq!(
        gh.len(),
        1,
        "a scan block is a commit status, no deployment"
    );
    assert_eq!(gh[0].path, format!("/gh/repos/contoso/web/statuses/{SHA}"));
    assert_eq!(gh[0].headers["authorization"], format!("Bearer {GH_TOKEN}"));
    assert_eq!(gh[0].headers["accept"], "application/vnd.github+json");
    assert_eq!(gh[0].headers["x-github-api-version"], "2022-11-28");
    assert!(gh[0].headers.contains_key("user-agent"));
    assert_eq!(
        gh[0].json(),
        json!({"state": "failure", "context": "gantry/scan", "description": reason})
    );

    // On the run: one sent entry per channel, count 1, no secret.
    let stored = h.stored(&run).await?;
    let sent: Vec<(&str, NotificationOutcome)> = stored
        .notifications
        .iter()
        .map(|n| (n.channel.as_deref().unwrap_or(""), n.outcome))
        .collect();
    assert_eq!(
        sent,
        [
            ("ops", NotificationOutcome::Sent),
            ("chat", NotificationOutcome::Sent),
            ("hook", NotificationOutcome::Sent),
            ("gh", NotificationOutcome::Sent),
        ]
    );
    assert!(
        stored
            .notifications
            .iter()
            .all(|n| n.count == 1 && n.attempts == 1)
    );
    assert_no_secret(&h.everything().await?);
    assert_no_secret(&line);
    Ok(())
}

#[tokio::test]
async fn a_deploy_outcome_is_a_commit_status_and_a_github_deployment() -> Result<()> {
    let h = Harness::new("", "[[alerts.routes]]\nchannels = [\"gh\"]\n").await?;
    let run = h.run("web", RunStatus::Deployed).await?;
    let mut alert = Alert::new(
        "deployed",
        Severity::Info,
        format!("web deployed web@{DIGEST}"),
    );
    alert.app = Some(run.app.clone());
    alert.run_id = Some(run.id.clone());
    alert.step = Some("deploy".into());
    alert.digest = Some(Digest::parse(DIGEST)?);
    h.deliver(&alert, &id_of(&run.id, "deployed")).await?;
    let gh = h.fake.requests();
    let calls: Vec<String> = gh
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [
            format!("POST /gh/repos/contoso/web/statuses/{SHA}"),
            "GET /gh/repos/contoso/web/deployments".into(),
            "POST /gh/repos/contoso/web/deployments".into(),
            "POST /gh/repos/contoso/web/deployments/42/statuses".into(),
        ]
    );
    assert_eq!(
        gh[1].query,
        format!("sha={SHA}&environment=web-prod&task=deploy"),
        "looks for this run's deployment first"
    );
    let gh: Vec<Recorded> = gh.into_iter().filter(|r| r.method == "POST").collect();
    let description =
        "web deployed web@sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
    assert_eq!(
        gh[0].json(),
        json!({"state": "success", "context": "gantry/deploy", "description": description})
    );
    assert_eq!(
        gh[1].json(),
        json!({
            "ref": SHA,
            "environment": "web-prod",
            "auto_merge": false,
            "required_contexts": [],
            "description": description,
            "payload": {"run_id": run.id.to_string(), "digest": DIGEST},
        })
    );
    assert_eq!(
        gh[2].json(),
        json!({"state": "success", "environment": "web-prod", "description": description})
    );
    for r in &gh {
        assert_eq!(r.headers["authorization"], format!("Bearer {GH_TOKEN}"));
        assert_eq!(r.headers["x-github-api-version"], "2022-11-28");
    }
    Ok(())
}

#[tokio::test]
async fn a_retried_deploy_outcome_reuses_its_github_deployment() -> Result<()> {
    let h = Harness::new("", "[[alerts.routes]]\nchannels = [\"gh\"]\n").await?;
    h.fake
        .script("/gh/repos/contoso/web/deployments/42/statuses", &[502, 201]);
    let run = h.run("web", RunStatus::RolledBack).await?;
    let mut alert = Alert::new("rolled-back", Severity::High, "web: rollout failed");
    alert.app = Some(run.app.clone());
    alert.run_id = Some(run.id.clone());
    alert.step = Some("verify".into());
    alert.digest = Some(Digest::parse(DIGEST)?);
    let line = h.deliver(&alert, &id_of(&run.id, "rolled-back")).await?;
    assert!(line.contains("gh=retrying"), "{line}");
    let retry = h.bus.peek("alerts").await;
    assert_eq!(retry.len(), 1);
    let (_, line) = h
        .deliver_raw(retry[0].body.as_bytes(), &retry[0].message_id)
        .await?;
    assert!(line.contains("attempt 2: gh=sent"), "{line}");
    let created: Vec<Recorded> = h
        .fake
        .to("/gh/repos/contoso/web/deployments")
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/deployments"))
        .collect();
    assert_eq!(created.len(), 1, "one deployment for the run");
    let statuses = h.fake.to("/gh/repos/contoso/web/deployments/42/statuses");
    assert_eq!(statuses.len(), 2);
    assert_eq!(
        statuses[1].json(),
        json!({"state": "failure", "environment": "web-prod", "description": "web: rollout failed"})
    );
    Ok(())
}

#[tokio::test]
async fn routes_pick_channels_by_app_and_severity() -> Result<()> {
    let h = Harness::new(
        "",
        "[[alerts.routes]]\napps = [\"web\"]\nmin_severity = \"high\"\nchannels = [\"ops\"]\n\n[[alerts.routes]]\nmin_severity = \"warning\"\nchannels = [\"chat\"]\n",
    )
    .await?;
    let mut n = 0;
    let mut send = async |app: Option<&str>, severity: Severity| -> Result<(usize, usize)> {
        n += 1;
        let mut a = Alert::new(format!("probe-{n}"), severity, "probe");
        a.app = app.map(AppName::parse).transpose()?;
        let before = (h.fake.to("/teams").len(), h.fake.to("/slack").len());
        h.deliver(&a, &format!("probe:{n}")).await?;
        Ok((
            h.fake.to("/teams").len() - before.0,
            h.fake.to("/slack").len() - before.1,
        ))
    };
    assert_eq!(send(Some("web"), Severity::Critical).await?, (1, 1));
    assert_eq!(send(Some("web"), Severity::High).await?, (1, 1));
    assert_eq!(send(Some("web"), Severity::Warning).await?, (0, 1));
    assert_eq!(send(Some("web"), Severity::Info).await?, (0, 0));
    assert_eq!(send(Some("api"), Severity::Critical).await?, (0, 1));
    assert_eq!(send(None, Severity::High).await?, (0, 1));
    assert_eq!(send(None, Severity::Info).await?, (0, 0));
    assert!(h.fake.to("/hook").is_empty() && h.fake.to("/gh").is_empty());
    Ok(())
}

#[tokio::test]
async fn the_same_fingerprint_three_times_sends_once_and_counts_three() -> Result<()> {
    let h = Harness::new("", "[[alerts.routes]]\nchannels = [\"hook\"]\n").await?;
    // Three runs of the same image blocked by the same gate: three state
    // changes, one fingerprint.
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(h.run("web", RunStatus::Blocked).await?);
    }
    for run in &runs {
        h.deliver(&blocked(run)?, &id_of(&run.id, "scan-blocked"))
            .await?;
    }
    // A redelivery of the second message is not another state change.
    let line = h
        .deliver(&blocked(&runs[1])?, &id_of(&runs[1].id, "scan-blocked"))
        .await?;
    assert!(line.contains("already counted"), "{line}");
    // A redelivery of the notified message finds every channel done.
    let line = h
        .deliver(&blocked(&runs[0])?, &id_of(&runs[0].id, "scan-blocked"))
        .await?;
    assert!(line.contains("all done"), "{line}");
    assert_eq!(h.fake.to("/hook").len(), 1, "one notification");
    let record = h.record(&blocked(&runs[0])?).await?;
    assert_eq!(record.count, 3);
    assert_eq!(record.total, 3);
    assert_eq!(record.run_id.as_ref(), Some(&runs[0].id));
    let third = h.stored(&runs[2]).await?;
    assert_eq!(third.notifications.len(), 1, "{:?}", third.notifications);
    assert_eq!(
        third.notifications[0].outcome,
        NotificationOutcome::Deduplicated
    );
    assert_eq!(third.notifications[0].count, 3);
    assert_eq!(third.notifications[0].channel, None);
    let first = h.stored(&runs[0]).await?;
    assert_eq!(first.notifications[0].outcome, NotificationOutcome::Sent);

    // Another kind for the same digest and step is another fingerprint.
    let mut failed = blocked(&runs[2])?;
    failed.kind = "run-failed".into();
    h.deliver(&failed, &id_of(&runs[2].id, "scan-failed"))
        .await?;
    assert_eq!(h.fake.to("/hook").len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_window_of_zero_notifies_every_state_change() -> Result<()> {
    let h = Harness::new(
        "dedup_window = \"0s\"",
        "[[alerts.routes]]\nchannels = [\"hook\"]\n",
    )
    .await?;
    let run = h.run("web", RunStatus::Blocked).await?;
    h.deliver(&blocked(&run)?, "m1").await?;
    h.deliver(&blocked(&run)?, "m2").await?;
    assert_eq!(h.fake.to("/hook").len(), 2);
    assert_eq!(h.record(&blocked(&run)?).await?.total, 2);
    Ok(())
}

#[tokio::test]
async fn a_500_schedules_a_retry_for_that_channel_only_then_it_succeeds() -> Result<()> {
    let h = Harness::new(
        "retry_backoff = \"45s\"",
        "[[alerts.routes]]\nchannels = [\"ops\", \"hook\"]\n",
    )
    .await?;
    h.fake.script("/hook", &[500, 200]);
    let run = h.run("web", RunStatus::Blocked).await?;
    let alert = blocked(&run)?;
    let line = h.deliver(&alert, &id_of(&run.id, "scan-blocked")).await?;
    assert!(line.contains("ops=sent hook=retrying"), "{line}");
    let record = h.record(&alert).await?;
    let fp = fingerprint(&alert);
    let window = window_ms(&record)?;
    let queued = h.bus.peek("alerts").await;
    assert_eq!(queued.len(), 1, "{queued:#?}");
    let retry = &queued[0];
    assert_eq!(
        retry.message_id,
        format!("alert:{}-{window}:retry:2", &fp[..32])
    );
    let scheduled = retry.scheduled_enqueue_time.context("scheduled")?;
    assert_eq!(
        (scheduled - record.channels["hook"].at).whole_seconds(),
        45,
        "first retry after retry_backoff"
    );
    let body: Value = serde_json::from_str(&retry.body)?;
    assert_eq!(
        body["retry"],
        json!({"fingerprint": fp, "window": window, "channels": ["hook"], "attempt": 2})
    );
    assert_eq!(body["kind"], "scan-blocked");
    let stored = h.stored(&run).await?;
    let hook = stored
        .notifications
        .iter()
        .find(|n| n.channel.as_deref() == Some("hook"))
        .context("hook entry")?;
    assert_eq!(hook.outcome, NotificationOutcome::Retrying);
    assert!(
        hook.reason.as_deref().unwrap_or("").contains("HTTP 500"),
        "{hook:?}"
    );

    // The scheduled message, delivered when due.
    let (status, line) = h
        .deliver_raw(retry.body.as_bytes(), &retry.message_id)
        .await?;
    assert_eq!(status, StatusCode::OK, "{line}");
    assert!(line.contains("attempt 2: hook=sent"), "{line}");
    assert_eq!(h.fake.to("/hook").len(), 2);
    assert_eq!(h.fake.to("/teams").len(), 1, "teams is not sent again");
    // Both attempts carry the same delivery id.
    let hooks = h.fake.to("/hook");
    assert_eq!(
        hooks[0].headers["x-gantry-delivery"],
        hooks[1].headers["x-gantry-delivery"]
    );
    let stored = h.stored(&run).await?;
    let hook = stored
        .notifications
        .iter()
        .find(|n| n.channel.as_deref() == Some("hook"))
        .context("hook entry")?;
    assert_eq!(
        (hook.outcome, hook.attempts),
        (NotificationOutcome::Sent, 2)
    );
    // A redelivered retry sends nothing.
    let (_, line) = h
        .deliver_raw(retry.body.as_bytes(), &retry.message_id)
        .await?;
    assert!(line.contains("nothing owed"), "{line}");
    assert_eq!(h.fake.to("/hook").len(), 2);
    Ok(())
}

#[tokio::test]
async fn after_max_attempts_the_failure_is_recorded_on_the_run_and_as_rejected() -> Result<()> {
    let h = Harness::new(
        "max_attempts = 2",
        "[[alerts.routes]]\nchannels = [\"chat\", \"hook\"]\n",
    )
    .await?;
    h.fake.script("/hook", &[503]);
    h.fake.script("/slack", &[404]); // Slack: no_service, permanent
    let run = h.run("web", RunStatus::Blocked).await?;
    let alert = blocked(&run)?;
    let line = h.deliver(&alert, &id_of(&run.id, "scan-blocked")).await?;
    assert!(line.contains("chat=failed hook=retrying"), "{line}");
    let retry = h.bus.peek("alerts").await;
    assert_eq!(retry.len(), 1, "only the transient failure is retried");
    assert_eq!(
        serde_json::from_str::<Value>(&retry[0].body)?["retry"]["channels"],
        json!(["hook"])
    );
    let (_, line) = h
        .deliver_raw(retry[0].body.as_bytes(), &retry[0].message_id)
        .await?;
    assert!(line.contains("attempt 2: hook=failed"), "{line}");
    assert_eq!(h.fake.to("/hook").len(), 2);
    assert_eq!(h.fake.to("/slack").len(), 1);
    assert_eq!(h.bus.peek("alerts").await.len(), 1, "no third attempt");

    let stored = h.stored(&run).await?;
    let by_channel: BTreeMap<String, _> = stored
        .notifications
        .iter()
        .map(|n| (n.channel.clone().unwrap_or_default(), n.clone()))
        .collect();
    assert_eq!(by_channel["hook"].outcome, NotificationOutcome::Failed);
    assert_eq!(by_channel["hook"].attempts, 2);
    let hook_reason = by_channel["hook"].reason.clone().unwrap_or_default();
    assert!(
        hook_reason.starts_with("gave up after 2 attempts: webhook channel hook: HTTP 503"),
        "{hook_reason}"
    );
    assert_eq!(by_channel["chat"].outcome, NotificationOutcome::Failed);
    assert_eq!(by_channel["chat"].attempts, 1);

    let delivery = format!(
        "{}-{}",
        &fingerprint(&alert)[..32],
        window_ms(&h.record(&alert).await?)?
    );
    for channel in ["hook", "chat"] {
        let rejected = h
            .blob(&format!("rejected/alert/{delivery}-{channel}.json"))
            .await?
            .with_context(|| format!("no rejected record for {channel}"))?;
        assert_eq!(rejected["channel"], channel);
        assert_eq!(rejected["run_id"], run.id.to_string());
    }
    assert_no_secret(&h.everything().await?);
    Ok(())
}

#[tokio::test]
async fn a_bad_message_is_rejected_permanently_and_nothing_is_sent() -> Result<()> {
    let h = Harness::new("", "[[alerts.routes]]\nchannels = [\"hook\"]\n").await?;
    for (body, id) in [
        (
            &br#"{"kind":"scan-blocked","severity":"severe","reason":"r"}"#[..],
            "bad-1",
        ),
        (
            br#"{"kind":"../../x","severity":"high","reason":"r"}"#,
            "bad-2",
        ),
        (b"not json", "bad-3"),
    ] {
        let (status, line) = h.deliver_raw(body, id).await?;
        assert_eq!(status, StatusCode::OK, "acknowledged: {line}");
        assert!(line.starts_with("rejected: bad message"), "{line}");
        assert!(
            h.blob(&format!("rejected/alert/{id}.json"))
                .await?
                .is_some(),
            "rejection recorded for {id}"
        );
    }
    assert!(h.fake.requests().is_empty());
    assert!(
        h.runs.list_all("alerts/").await?.is_empty(),
        "nothing counted"
    );
    Ok(())
}

#[tokio::test]
async fn no_url_token_or_secret_reaches_a_record_log_or_reason() -> Result<()> {
    let closed = gantry_testkit::free_port();
    let h = Harness::with_env(
        "max_attempts = 1",
        "[[alerts.routes]]\nchannels = [\"ops\", \"chat\", \"hook\", \"gh\"]\n",
        |env| {
            env.remove("TEAMS_URL");
            env.insert(
                "HOOK_URL".into(),
                Secret::new(format!("http://127.0.0.1:{closed}{HOOK_PATH}").into_bytes()),
            );
        },
    )
    .await?;
    // Endpoints that echo the path and the Authorization header in their error.
    h.fake.script("/slack", &[400]);
    h.fake.script("/gh", &[401]);
    let run = h.run("web", RunStatus::Blocked).await?;
    let alert = blocked(&run)?;
    let line = h.deliver(&alert, &id_of(&run.id, "scan-blocked")).await?;
    assert!(
        line.contains("ops=failed chat=failed hook=failed gh=failed"),
        "{line}"
    );
    assert_eq!(h.fake.to("/slack").len(), 1);
    assert_eq!(h.fake.to("/gh").len(), 1);
    let stored = h.stored(&run).await?;
    let reasons: BTreeMap<String, String> = stored
        .notifications
        .iter()
        .map(|n| {
            (
                n.channel.clone().unwrap_or_default(),
                n.reason.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        reasons["ops"],
        "environment variable TEAMS_URL of channel ops is not set"
    );
    assert!(
        reasons["chat"].starts_with("slack channel chat: HTTP 400: refused ***"),
        "{}",
        reasons["chat"]
    );
    assert!(reasons["gh"].contains("HTTP 401"), "{}", reasons["gh"]);
    assert!(
        reasons["hook"].starts_with("gave up after 1 attempts: webhook channel hook:"),
        "{}",
        reasons["hook"]
    );
    assert!(
        reasons["hook"].to_lowercase().contains("refused"),
        "the cause is kept: {}",
        reasons["hook"]
    );
    for reason in reasons.values() {
        assert!(!reason.contains("127.0.0.1"), "URL in {reason}");
    }
    assert_no_secret(&serde_json::to_string(&stored)?);
    assert_no_secret(&h.everything().await?);
    assert_no_secret(&line);
    let _ = h.port;
    Ok(())
}

#[tokio::test]
async fn github_is_skipped_and_recorded_without_a_run_or_commit() -> Result<()> {
    let h = Harness::new("", "[[alerts.routes]]\nchannels = [\"gh\"]\n").await?;
    let mut alert = Alert::new("run-failed", Severity::High, "no run");
    alert.app = Some(AppName::parse("web")?);
    alert.step = Some("scan".into());
    let line = h.deliver(&alert, "orphan:1").await?;
    assert!(line.contains("gh=skipped"), "{line}");
    assert!(h.fake.requests().is_empty());
    let record = h.record(&alert).await?;
    assert_eq!(record.channels["gh"].outcome, NotificationOutcome::Skipped);
    assert_eq!(
        record.channels["gh"].reason.as_deref(),
        Some("no run with a GitHub repository and commit")
    );
    Ok(())
}
