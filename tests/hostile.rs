//! The hostile-input catalog (docs/hostile-input.md), end to end against the
//! real binary in `gantry dev`. Every entry sends one hostile request or
//! event and checks two things: the documented answer (status and error code,
//! or for a queued event the documented rejection) and that **nothing else
//! was written**, by comparing every file of the state store before and after.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use support::{DevHost, example};

const DEV_SECRET: &str = "gantry-dev-webhook-secret";
const OPERATE: &str = "hostile-operator-token";

/// Every file under `state/store`, by relative path.
fn snapshot(state: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let root = state.join("store");
    let mut files = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(&root)?
                    .to_string_lossy()
                    .replace('\\', "/");
                // The embedded store's own temporary files are not state.
                if !name.contains(".tmp") {
                    files.insert(name, std::fs::read(&path)?);
                }
            }
        }
    }
    Ok(files)
}

/// Paths added or changed between two snapshots.
fn changed(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(before.keys().filter(|k| !after.contains_key(*k)).cloned())
        .collect()
}

fn sign(body: &[u8]) -> String {
    gantry_runtime::signature::sign_sha256(DEV_SECRET.as_bytes(), body)
}

/// One hostile webhook request.
struct Hook {
    name: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn hook(
    name: &'static str,
    event: &str,
    delivery: &str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
) -> Hook {
    Hook {
        name,
        headers: vec![
            ("content-type", "application/json".into()),
            ("x-github-event", event.into()),
            ("x-github-delivery", delivery.into()),
            ("x-hub-signature-256", sign(&body)),
        ],
        body,
        status,
        code,
    }
}

async fn post_hook(host: &DevHost, h: &Hook) -> Result<(u16, Value)> {
    let mut request = host.client.post(host.url("/api/github"));
    for (k, v) in &h.headers {
        request = request.header(*k, v);
    }
    let response = request.body(h.body.clone()).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// Announces a `len`-byte signed push and sends only its first kilobyte, then
/// reads the answer: status and JSON body.
async fn oversize(host: &DevHost, len: usize) -> Result<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await?;
    let head = format!(
        "POST /api/github HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-github-event: push\r\nx-github-delivery: 99999999-2222-4333-8444-555555555555\r\nx-hub-signature-256: sha256={}\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n",
        "0".repeat(64)
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&[b' '; 1024]).await?;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut reply),
    )
    .await;
    let text = String::from_utf8_lossy(&reply);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    // The body may be chunked: take the JSON object inside.
    let json = body
        .find('{')
        .and_then(|a| body.rfind('}').map(|b| &body[a..=b]))
        .unwrap_or("null");
    Ok((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

fn push_with(change: impl FnOnce(&mut Value)) -> Result<Vec<u8>> {
    let mut push: Value = serde_json::from_slice(&example("github-push.json"))?;
    change(&mut push);
    Ok(serde_json::to_vec(&push)?)
}

#[tokio::test]
async fn hostile_webhooks_get_their_documented_error_and_write_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let host = DevHost::start(&state, &[]).await?;
    let push = example("github-push.json");
    let delivery = "66666666-2222-4333-8444-555555555555";

    let mut cases = vec![
        Hook {
            name: "missing signature",
            headers: vec![
                ("content-type", "application/json".into()),
                ("x-github-event", "push".into()),
                ("x-github-delivery", delivery.into()),
            ],
            body: push.clone(),
            status: 401,
            code: "missing_signature",
        },
        Hook {
            name: "sha1 signature only",
            headers: vec![
                ("content-type", "application/json".into()),
                ("x-github-event", "push".into()),
                ("x-github-delivery", delivery.into()),
                (
                    "x-hub-signature",
                    "sha1=0123456789abcdef0123456789abcdef01234567".into(),
                ),
            ],
            body: push.clone(),
            status: 401,
            code: "missing_signature",
        },
    ];
    let mut wrong = hook(
        "wrong signature",
        "push",
        delivery,
        push.clone(),
        401,
        "bad_signature",
    );
    wrong.headers[3].1 = format!("sha256={}", "0".repeat(64));
    cases.push(wrong);
    let mut other_body = hook(
        "signature of another body",
        "push",
        delivery,
        push.clone(),
        401,
        "bad_signature",
    );
    other_body.headers[3].1 = sign(b"{}");
    cases.push(other_body);
    let mut garbage = hook(
        "garbage signature",
        "push",
        delivery,
        push.clone(),
        401,
        "bad_signature",
    );
    garbage.headers[3].1 = "sha256=zz!!".into();
    cases.push(garbage);
    let mut text = hook(
        "form-encoded body",
        "push",
        delivery,
        push.clone(),
        415,
        "unsupported_media_type",
    );
    text.headers[0].1 = "application/x-www-form-urlencoded".into();
    cases.push(text);
    cases.push(hook(
        "deep JSON (100k nested arrays)",
        "push",
        delivery,
        [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
        400,
        "bad_payload",
    ));
    cases.push(hook(
        "malformed JSON",
        "push",
        delivery,
        b"{\"ref\": refs/heads/main}".to_vec(),
        400,
        "bad_payload",
    ));
    cases.push(hook(
        "truncated push",
        "push",
        delivery,
        push[..push.len() / 2].to_vec(),
        400,
        "bad_payload",
    ));
    let mut no_event = hook(
        "missing event header",
        "push",
        delivery,
        push.clone(),
        400,
        "bad_header",
    );
    no_event.headers.remove(1);
    cases.push(no_event);
    cases.push(hook(
        "path traversal in the delivery id",
        "push",
        "../../dedup/github/x",
        push.clone(),
        400,
        "bad_header",
    ));
    cases.push(hook(
        "space in the delivery id",
        "push",
        "6666 6666",
        push.clone(),
        400,
        "bad_header",
    ));
    cases.push(hook(
        "overlong delivery id",
        "push",
        &"6".repeat(10_000),
        push.clone(),
        400,
        "bad_header",
    ));
    cases.push(hook(
        "path in the event name",
        "push/../ping",
        delivery,
        push.clone(),
        400,
        "bad_header",
    ));

    // Oversize: refused from Content-Length, before the body is read (the
    // answer comes while the client would still be sending).
    {
        let before = snapshot(&state)?;
        let (status, body) = oversize(&host, 26 * 1024 * 1024).await?;
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["error"]["code"], "payload_too_large", "{body}");
        ensure!(changed(&before, &snapshot(&state)?).is_empty());
    }
    for case in &cases {
        let before = snapshot(&state)?;
        let (status, body) = post_hook(&host, case).await?;
        assert_eq!(status, case.status, "{}: {body}", case.name);
        assert_eq!(body["error"]["code"], case.code, "{}: {body}", case.name);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{}: no message", case.name);
        assert!(
            !message.contains(DEV_SECRET),
            "{}: the secret leaked",
            case.name
        );
        let after = snapshot(&state)?;
        ensure!(
            changed(&before, &after).is_empty(),
            "{}: wrote {:?}",
            case.name,
            changed(&before, &after)
        );
    }
    Ok(())
}

#[tokio::test]
async fn signed_but_meaningless_webhooks_are_ignored_without_a_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let host = DevHost::start(&state, &[]).await?;
    let cases = [
        ("unknown event type", "fork", example("github-push.json")),
        (
            "path traversal in the branch",
            "push",
            push_with(|p| p["ref"] = "refs/heads/../main".into())?,
        ),
        (
            "control character in the branch",
            "push",
            push_with(|p| p["ref"] = "refs/heads/ma\u{0}in".into())?,
        ),
        (
            "path traversal in the repository",
            "push",
            push_with(|p| p["repository"]["full_name"] = "contoso/web/../../api".into())?,
        ),
        (
            "a commit sha that is not one",
            "push",
            push_with(|p| p["after"] = "../../../../etc/passwd".into())?,
        ),
    ];
    for (i, (name, event, body)) in cases.iter().enumerate() {
        let delivery = format!("77777777-2222-4333-8444-55555555555{i}");
        let (status, reply) =
            post_hook(&host, &hook(name, event, &delivery, body.clone(), 0, "")).await?;
        // Signed, so GitHub gets a success or a 400 (it must not retry a
        // payload that will never work); never a run.
        assert!(
            status == 202 || status == 200 || status == 400,
            "{name}: {status} {reply}"
        );
        if status == 400 {
            assert_eq!(reply["error"]["code"], "bad_payload", "{name}: {reply}");
        } else {
            assert_eq!(reply["status"], "ignored", "{name}: {reply}");
        }
        let files = snapshot(&state)?;
        let written: Vec<_> = files
            .keys()
            .filter(|k| k.starts_with("runs/") || k.starts_with("index/"))
            .collect();
        assert!(written.is_empty(), "{name}: {written:?}");
        assert!(
            files.keys().all(|k| !k.contains("..") && !k.contains('\0')),
            "{name}: {:?}",
            files.keys()
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_replayed_delivery_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let host = DevHost::start(&state, &[]).await?;
    let push = example("github-push.json");
    let delivery = "88888888-2222-4333-8444-555555555555";
    let (status, body) = host.github("push", delivery, &push).await?;
    assert_eq!(status, 202, "{body}");
    let before = snapshot(&state)?;
    for _ in 0..3 {
        let (status, body) = host.github("push", delivery, &push).await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "duplicate", "{body}");
    }
    // The replay is audited at most; no run, index or claim changes.
    let changed: Vec<_> = changed(&before, &snapshot(&state)?)
        .into_iter()
        .filter(|k| !k.starts_with("audit/"))
        .collect();
    assert!(changed.is_empty(), "{changed:?}");
    Ok(())
}

/// A registry event hostile in one field: `(name, event)`.
/// Each gets its own event id, so each rejection has its own record.
fn acr_with(
    name: &'static str,
    change: impl FnOnce(&mut Value),
) -> Result<(&'static str, Vec<u8>)> {
    let mut event: Value = serde_json::from_slice(&example("acr-image-pushed.json"))?;
    event[0]["id"] = format!("{:x}", name.len() * 7919 + name.as_bytes()[0] as usize).into();
    change(&mut event[0]);
    Ok((name, serde_json::to_vec(&event)?))
}

#[tokio::test]
async fn hostile_registry_events_are_rejected_with_their_reason_and_nothing_else() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let host = DevHost::start(&state, &[]).await?;
    let good = example("acr-image-pushed.json");
    let cases = [
        ("malformed JSON", b"[{\"id\": ".to_vec()),
        ("truncated event", good[..good.len() / 2].to_vec()),
        (
            "deep JSON",
            [vec![b'['; 50_000], vec![b']'; 50_000]].concat(),
        ),
        ("not an event", b"\"hello\"".to_vec()),
        acr_with("path traversal in the repository", |e| {
            e["data"]["target"]["repository"] = "web/../../api".into();
        })?,
        acr_with("control character in the tag", |e| {
            e["data"]["target"]["tag"] = "v1\u{0}\n../x".into();
        })?,
        acr_with("a digest that is not one", |e| {
            e["data"]["target"]["digest"] = "sha256:../../../etc".into();
        })?,
        acr_with("a host with a path", |e| {
            e["data"]["request"]["host"] = "contoso.azurecr.io/../evil".into();
        })?,
    ];
    for (i, (name, body)) in cases.iter().enumerate() {
        let before = snapshot(&state)?;
        let id = format!("hostile-{i}");
        let response = host
            .client
            .post(host.url("/dev/queues/registry-events"))
            .header("content-type", "application/octet-stream")
            .header("messageid", &id)
            .body(body.clone())
            .send()
            .await?;
        assert_eq!(response.status().as_u16(), 201, "{name}");
        host.drain("registry-events").await?;
        let after = snapshot(&state)?;
        let changed = changed(&before, &after);
        // The documented outcome of a permanent rejection: its record under
        // rejected/registry-push/ (with the reason), an audit line and the
        // alert's de-duplication record (alerts/); no run, index, claim or
        // anything else.
        let rejected: Vec<_> = changed
            .iter()
            .filter(|k| k.starts_with("rejected/registry-push/"))
            .collect();
        let other: Vec<_> = changed
            .iter()
            .filter(|k| {
                !k.starts_with("rejected/registry-push/")
                    && !k.starts_with("audit/")
                    && !k.starts_with("alerts/")
            })
            .collect();
        assert!(other.is_empty(), "{name}: wrote {other:?}");
        assert_eq!(rejected.len(), 1, "{name}: {changed:?}");
        let record: Value = serde_json::from_slice(&after[rejected[0].as_str()])?;
        let reason = record.to_string();
        assert!(reason.len() > 20, "{name}: {record}");
        assert!(
            rejected[0]
                .trim_start_matches("rejected/registry-push/")
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
            "{name}: unsafe rejection name {}",
            rejected[0]
        );
        // Nothing was dead-lettered: a permanent rejection is acknowledged.
        let queue = host.queue("registry-events").await?;
        assert_eq!(queue["stats"]["dead_lettered"], 0, "{name}: {queue}");
    }

    // An event id is the publisher's string (CloudEvents allows any): one
    // that is not `[A-Za-z0-9-]` is processed, and its claim is named by its
    // SHA-256, never by the string itself.
    let (_, body) = acr_with("an id with a path", |e| {
        e["id"] = "../../dedup/registry/x".into();
    })?;
    let before = snapshot(&state)?;
    assert_eq!(host.enqueue("registry-events", None, &body).await?, 201);
    host.drain("registry-events").await?;
    let claims: Vec<_> = changed(&before, &snapshot(&state)?)
        .into_iter()
        .filter(|k| k.starts_with("dedup/"))
        .collect();
    assert_eq!(claims.len(), 1, "{claims:?}");
    let key = claims[0].trim_start_matches("dedup/registry/h-");
    assert!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{claims:?}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_operator_requests_are_refused_and_write_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let tokens = format!("ops:operate:{}", {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(OPERATE.as_bytes()))
    });
    let host = DevHost::start_with_env(&state, &[], &[("GANTRY_API_TOKENS", &tokens)]).await?;
    let cases: Vec<(&str, &str, String, Option<String>, u16)> = vec![
        (
            "run id traversal",
            "GET",
            "/api/runs/..%2F..%2Fetc%2Fpasswd".into(),
            None,
            400,
        ),
        (
            "run id control char",
            "GET",
            "/api/runs/01J%00AAAA".into(),
            None,
            400,
        ),
        (
            "approve traversal",
            "POST",
            "/api/runs/..%2Fx/approve".into(),
            None,
            400,
        ),
        (
            "rollback app traversal",
            "POST",
            "/api/apps/..%2F..%2Fweb/rollback".into(),
            None,
            400,
        ),
        (
            "rollback app control char",
            "POST",
            "/api/apps/we%0Ab/rollback".into(),
            None,
            400,
        ),
        (
            "rollback digest traversal",
            "POST",
            "/api/apps/web/rollback".into(),
            Some(json!({"digest": "sha256:../../x"}).to_string()),
            400,
        ),
        (
            "rollback deep JSON",
            "POST",
            "/api/apps/web/rollback".into(),
            Some("[".repeat(100_000)),
            400,
        ),
        (
            "reject oversize reason",
            "POST",
            format!("/api/runs/{}/reject", "0".repeat(26)),
            Some(json!({"reason": "x".repeat(5000)}).to_string()),
            400,
        ),
    ];
    for (name, method, path, body, status) in cases {
        let before = snapshot(&state)?;
        let mut request = host
            .client
            .request(method.parse().context("method")?, host.url(&path))
            .bearer_auth(OPERATE);
        if let Some(b) = body {
            request = request.header("content-type", "application/json").body(b);
        }
        let response = request.send().await?;
        let got = response.status().as_u16();
        let reply: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(got, status, "{name}: {reply}");
        assert!(
            reply["error"]["code"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{name}: {reply}"
        );
        let changed = changed(&before, &snapshot(&state)?);
        assert!(changed.is_empty(), "{name}: wrote {changed:?}");
    }
    Ok(())
}
