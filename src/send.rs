//! `gantry send`: posts a sample event to a running `gantry dev`.
//!
//! GitHub payloads go to `/api/github`, signed with the webhook secret exactly
//! as GitHub signs them; registry and Defender events go to their queue through
//! `/dev/queues/{queue}` (with the event id as `MessageId`, as Event Grid does).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Flags of `gantry send`.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// JSON file with the event (see examples/).
    file: PathBuf,
    /// Queue to send to instead of detecting it from the payload.
    #[arg(long)]
    queue: Option<String>,
    /// GitHub event name (`push`, `ping`, `workflow_run`); detected when omitted.
    #[arg(long)]
    event: Option<String>,
    /// `X-GitHub-Delivery` to use (a fresh GUID when omitted). Reuse one to redeliver.
    #[arg(long)]
    delivery: Option<String>,
    /// Base URL of the dev host.
    #[arg(long, default_value = "http://127.0.0.1:7071")]
    url: String,
}

enum Target {
    Github(String),
    Queue(String),
}

fn detect(payload: &Value) -> Option<Target> {
    let first = match payload {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let event_type = first
        .get("eventType")
        .or_else(|| first.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if event_type.starts_with("Microsoft.ContainerRegistry.") {
        return Some(Target::Queue("registry-events".into()));
    }
    let lower = |k: &str| {
        first.get(k).is_some()
            || first
                .get(
                    k[..1]
                        .to_uppercase()
                        .chars()
                        .chain(k[1..].chars())
                        .collect::<String>(),
                )
                .is_some()
    };
    if lower("alertType")
        || lower("alertDisplayName")
        || event_type.starts_with("Microsoft.Security")
    {
        return Some(Target::Queue("security-events".into()));
    }
    if first.get("zen").is_some() {
        return Some(Target::Github("ping".into()));
    }
    if first.get("workflow_run").is_some() {
        return Some(Target::Github("workflow_run".into()));
    }
    if first.get("pusher").is_some() && first.get("ref").is_some() {
        return Some(Target::Github("push".into()));
    }
    None
}

fn new_guid() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

pub async fn run(args: SendArgs) -> Result<()> {
    let bytes =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let payload: Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not JSON", args.file.display()))?;
    let target = match (&args.queue, &args.event) {
        (Some(q), _) => Target::Queue(q.clone()),
        (None, Some(e)) => Target::Github(e.clone()),
        (None, None) => detect(&payload).context(
            "cannot tell what kind of event this is; pass --event <github-event> or --queue <queue>",
        )?,
    };
    let client = reqwest::Client::new();
    let base = args.url.trim_end_matches('/');
    let response = match target {
        Target::Github(event) => {
            let secret = crate::wiring::webhook_secret(true).context("no webhook secret")?;
            let signature = gantry_runtime::signature::sign_sha256(secret.expose(), &bytes);
            let delivery = args.delivery.clone().unwrap_or_else(new_guid);
            println!("POST {base}/api/github  event={event} delivery={delivery}");
            client
                .post(format!("{base}/api/github"))
                .header("content-type", "application/json")
                .header("x-github-event", event)
                .header("x-github-delivery", delivery)
                .header("x-hub-signature-256", signature)
                .header("user-agent", "GitHub-Hookshot/gantry-send")
                .body(bytes)
                .send()
                .await
        }
        Target::Queue(queue) => {
            let first = match &payload {
                Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
                other => other.clone(),
            };
            let mut request = client
                .post(format!("{base}/dev/queues/{queue}"))
                .header("content-type", "application/json");
            if let Some(id) = first.get("id").and_then(Value::as_str) {
                request = request.header("messageid", id);
            }
            println!("POST {base}/dev/queues/{queue}");
            request.body(bytes).send().await
        }
    }
    .with_context(|| format!("posting to {base} (is `gantry dev` running?)"))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text);
    if !status.is_success() {
        bail!("the dev host answered {status}");
    }
    Ok(())
}
