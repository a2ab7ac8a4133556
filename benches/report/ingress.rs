//! Ingress: what a signed GitHub `push` costs on its way into gantry, next to
//! the floor (a bare axum server) and the storage it writes to (Azurite), plus
//! the resident memory of each server idle and at peak.
//!
//! Load is **open loop** ([`open_loop`]). Scenarios, all at the same rate with
//! the same 10 KB body:
//! * a bare axum "hello" server in a separate process (this binary re-executed
//!   with `GANTRY_BENCH_ROLE=hello`), the floor of HTTP on this machine;
//! * `POST /api/github` of the real `gantry dev` binary with its embedded store;
//! * a raw `BlobStore::create` of 10 KB against Azurite;
//! * `POST /api/github` of `gantry dev --storage <Azurite>`;
//! * the last two again at a lower rate (Azurite, one Node.js thread, saturates
//!   first), each Azurite scenario on a fresh Azurite.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gantry_store::StateStore as _;
use gantry_store::blob::BlobStore;
use serde_json::Value;

use crate::common::{
    BoxedOutcome, DEV_SECRET, Headline, Measured, ROLE_ENV, Section, Server, Settings,
    gantry_command, mib, ms, nonce, open_loop, percentile, proc_status_kib, start_azurite,
    stop_azurite,
};

/// Size of every request body (and of every raw blob put).
const BODY_BYTES: usize = 10 * 1024;
/// Stands for the pushed commit sha in the payload template; as long as a sha,
/// so substituting it keeps the body at exactly [`BODY_BYTES`].
const SHA_PLACEHOLDER: &str = "@@@@@@@@@@@@@@after-sha@@@@@@@@@@@@@@@@@";

pub async fn run(settings: &Settings) -> Result<Section> {
    let template: Arc<str> = push_template()?.into();
    let mut rows = Vec::new();
    let mut memory = Vec::new();

    eprintln!("report: ingress: bare axum hello (separate process)");
    let (row, mem) = hello_scenario(settings, &template).await?;
    rows.push(row);
    memory.push(mem);

    eprintln!("report: ingress: gantry dev, embedded store");
    let (row, mem) = gantry_scenario(settings, &template, None).await?;
    rows.push(row);
    memory.push(mem);

    let mut azurite_rates = vec![settings.rate];
    if settings.azurite_low_rate > 0.0 && settings.azurite_low_rate != settings.rate {
        azurite_rates.push(settings.azurite_low_rate);
    }
    for rate in azurite_rates {
        let at = Settings { rate, ..*settings };
        eprintln!("report: ingress: raw Azurite put at {rate} req/s");
        let azurite = start_azurite().await?;
        let row = raw_put_scenario(&at, &azurite, &template).await;
        stop_azurite(azurite).await;
        rows.push(row?);

        eprintln!("report: ingress: gantry dev --storage Azurite at {rate} req/s");
        let azurite = start_azurite().await?;
        let result = gantry_scenario(&at, &template, Some(&azurite)).await;
        stop_azurite(azurite).await;
        let (row, mem) = result?;
        rows.push(row);
        memory.push(mem);
    }
    Ok(render(settings, &rows, &memory))
}

/// One row of the latency table.
struct Row {
    kind: Kind,
    scenario: String,
    rate: f64,
    measured: Measured,
}

/// Which server/operation a row measures (picks the summary's cells).
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Hello,
    GantryEmbedded,
    RawPut,
    GantryAzurite,
}

/// Memory of one server process, in KiB.
struct Memory {
    who: String,
    idle_kib: u64,
    peak_kib: u64,
}

async fn hello_scenario(settings: &Settings, template: &Arc<str>) -> Result<(Row, Memory)> {
    let port = gantry_testkit::free_port();
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    let mut command = Command::new(exe);
    command
        .env(ROLE_ENV, "hello")
        .env("PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut server = Server::spawn(command, "hello server")?;
    let client = http_client(settings)?;
    server
        .wait_healthy(&client, &format!("http://127.0.0.1:{port}/"))
        .await?;
    let idle_kib = proc_status_kib(server.pid(), "VmRSS")?;
    let measured = open_loop(
        settings,
        http_load(
            client,
            format!("http://127.0.0.1:{port}/"),
            template.clone(),
            Expect::Hello,
        ),
    )
    .await?;
    let peak_kib = proc_status_kib(server.pid(), "VmHWM")?;
    Ok((
        Row {
            kind: Kind::Hello,
            scenario: "bare axum hello, separate process (`POST /`)".into(),
            rate: settings.rate,
            measured,
        },
        Memory {
            who: "bare axum hello".into(),
            idle_kib,
            peak_kib,
        },
    ))
}

async fn gantry_scenario(
    settings: &Settings,
    template: &Arc<str>,
    azurite: Option<&gantry_testkit::Azurite>,
) -> Result<(Row, Memory)> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let port = gantry_testkit::free_port();
    let log = std::fs::File::create(dir.path().join("gantry.log")).context("creating the log")?;
    let mut command = gantry_command(&dir.path().join("state"), port);
    if let Some(azurite) = azurite {
        command
            .arg("--storage")
            .arg(azurite.connection_string())
            .arg("--container")
            .arg(gantry_testkit::unique_name("bench"));
    }
    command.stderr(log);
    let mut server = Server::spawn(command, "gantry dev")?;
    let client = http_client(settings)?;
    let started = server
        .wait_healthy(&client, &format!("http://127.0.0.1:{port}/api/health"))
        .await;
    if let Err(e) = started {
        let log = std::fs::read_to_string(dir.path().join("gantry.log")).unwrap_or_default();
        return Err(e.context(format!("gantry dev's stderr:\n{log}")));
    }
    let idle_kib = proc_status_kib(server.pid(), "VmRSS")?;
    let measured = open_loop(
        settings,
        http_load(
            client,
            format!("http://127.0.0.1:{port}/api/github"),
            template.clone(),
            Expect::Accepted,
        ),
    )
    .await?;
    let peak_kib = proc_status_kib(server.pid(), "VmHWM")?;
    drop(server);
    let (kind, scenario, who) = match azurite {
        None => (
            Kind::GantryEmbedded,
            "gantry dev, embedded store (`POST /api/github`)",
            "gantry dev, embedded store",
        ),
        Some(_) => (
            Kind::GantryAzurite,
            "gantry dev `--storage` Azurite (`POST /api/github`)",
            "gantry dev, Azurite",
        ),
    };
    let who = format!("{who}, {} req/s", settings.rate);
    Ok((
        Row {
            kind,
            scenario: scenario.into(),
            rate: settings.rate,
            measured,
        },
        Memory {
            who,
            idle_kib,
            peak_kib,
        },
    ))
}

async fn raw_put_scenario(
    settings: &Settings,
    azurite: &gantry_testkit::Azurite,
    template: &Arc<str>,
) -> Result<Row> {
    let container = gantry_testkit::unique_name("bench-raw");
    let store = BlobStore::connect(&azurite.connection_string(), &container, None)
        .context("connecting to Azurite")?
        .with_timeout(settings.timeout);
    store
        .ensure_container()
        .await
        .context("creating the container")?;
    let body: Arc<[u8]> = template
        .replace(SHA_PLACEHOLDER, &"0".repeat(40))
        .into_bytes()
        .into();
    let nonce = nonce();
    let measured = open_loop(settings, move |i| {
        let store = store.clone();
        let body = body.clone();
        let name = format!("bench/{nonce:08x}/{i}");
        async move {
            store
                .create(&name, &body)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    })
    .await?;
    Ok(Row {
        kind: Kind::RawPut,
        scenario: "raw Azurite put (`BlobStore::create`, 10 KB)".into(),
        rate: settings.rate,
        measured,
    })
}

// ---------------------------------------------------------------------------
// Load

/// What a successful response looks like.
#[derive(Clone, Copy)]
enum Expect {
    /// `200 hello`.
    Hello,
    /// `202` with `"status":"accepted"`: the push created a run. A 202
    /// `ignored` (wrong repository or branch) would be fast and meaningless.
    Accepted,
}

fn http_client(settings: &Settings) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(4096)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .timeout(settings.timeout)
        .build()
        .context("building the HTTP client")
}

/// Builds request `i` (on the scheduler thread, before its send time): a
/// unique commit sha and delivery id, signed like GitHub signs.
fn http_load(
    client: reqwest::Client,
    url: String,
    template: Arc<str>,
    expect: Expect,
) -> impl FnMut(u64) -> BoxedOutcome + Send + 'static {
    let nonce = nonce();
    move |i| {
        let sha = format!("{nonce:08x}{i:032x}");
        let delivery = format!("{nonce:08x}-0000-4000-8000-{i:012x}");
        let body = template.replace(SHA_PLACEHOLDER, &sha);
        let signature = gantry_runtime::signature::sign_sha256(DEV_SECRET, body.as_bytes());
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", signature)
            .body(body);
        Box::pin(async move {
            let response = request
                .send()
                .await
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
            let status = response.status().as_u16();
            let text = response
                .text()
                .await
                .map_err(|e| format!("{:#}", anyhow::Error::from(e)))?;
            let ok = match expect {
                Expect::Hello => status == 200 && text == "hello",
                Expect::Accepted => status == 202 && text.contains(r#""status":"accepted""#),
            };
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                ))
            }
        })
    }
}

/// A realistic ~10 KB push: `examples/github-push.json` with `commits` padded
/// and the pushed sha left as [`SHA_PLACEHOLDER`].
fn push_template() -> Result<String> {
    let mut push: Value = serde_json::from_str(include_str!("../../examples/github-push.json"))
        .context("parsing examples/github-push.json")?;
    let first = push["commits"][0].clone();
    let files = ["src/main.rs", "src/health.rs", "Cargo.toml", "Cargo.lock"];
    let commit = |k: usize, id: &str| {
        let mut c = first.clone();
        c["id"] = Value::from(id);
        c["url"] = Value::from(format!("https://github.com/contoso/web/commit/{id}"));
        c["message"] = Value::from(format!(
            "Change {k} of the benchmark push\n\nSigned-off-by: Mona Lisa <mona@contoso.com>"
        ));
        c["modified"] = Value::from(vec![files[k % files.len()], files[(k + 1) % files.len()]]);
        c
    };
    let size = |push: &Value| serde_json::to_string(push).map(|s| s.len());
    // The pushed commit is the newest: last in `commits` and the head commit.
    let head = commit(0, SHA_PLACEHOLDER);
    push["after"] = Value::from(SHA_PLACEHOLDER);
    push["head_commit"] = head.clone();
    let mut commits = vec![head];
    loop {
        let mut next = commits.clone();
        next.insert(0, commit(next.len(), &format!("{:040x}", next.len())));
        push["commits"] = Value::from(next.clone());
        if size(&push)? > BODY_BYTES {
            break;
        }
        commits = next;
    }
    push["commits"] = Value::from(commits.clone());
    let deficit = BODY_BYTES.saturating_sub(size(&push)?);
    // Pad the oldest commit's message with plain letters (one byte each in JSON).
    let oldest = &mut commits[0]["message"];
    let padded = format!(
        "{}{}",
        oldest.as_str().unwrap_or_default(),
        "x".repeat(deficit)
    );
    *oldest = Value::from(padded);
    push["commits"] = Value::from(commits);
    let body = serde_json::to_string(&push)?;
    anyhow::ensure!(
        body.len() == BODY_BYTES,
        "payload is {} bytes, not {BODY_BYTES}",
        body.len()
    );
    Ok(body)
}

/// The bare axum server of the baseline row: `GET`/`POST /` answer `hello`.
pub fn hello_server() -> Result<()> {
    let port: u16 = std::env::var("PORT")
        .context("PORT is not set")?
        .parse()
        .context("PORT is not a port")?;
    // Exit when the benchmark closes our stdin (or dies).
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|| async { "hello" })
                // Read the body, as gantry does, so both sides move the same bytes.
                .post(|_body: axum::body::Bytes| async { "hello" }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{port}"))?;
        axum::serve(listener, app).await.context("serving")
    })
}

// ---------------------------------------------------------------------------
// Report

fn render(settings: &Settings, rows: &[Row], memory: &[Memory]) -> Section {
    let mut out = String::new();
    let cell = |d: Option<Duration>| d.map_or_else(|| "–".to_string(), ms);
    let _ = writeln!(
        out,
        "\n### Ingress: signed push, open loop, {} s measured after {} s warm-up, {} B bodies\n",
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64(),
        BODY_BYTES
    );
    let _ = writeln!(
        out,
        "| scenario | rate (req/s) | requests | errors | p50 (ms) | p99 (ms) | max (ms) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let m = &row.measured;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.rate,
            m.sent,
            m.errors,
            cell(percentile(&m.ok, 0.50)),
            cell(percentile(&m.ok, 0.99)),
            cell(m.ok.last().copied()),
        );
    }
    let _ = writeln!(
        out,
        "\n| memory | idle (VmRSS after start) | peak (VmHWM after load) |"
    );
    let _ = writeln!(out, "|---|---:|---:|");
    for m in memory {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            m.who,
            mib(m.idle_kib),
            mib(m.peak_kib)
        );
    }
    if let Some(worst) = rows.iter().max_by_key(|r| r.measured.max_send_lag) {
        let _ = writeln!(
            out,
            "\nLoad generator: worst send lag behind schedule {} ms ({}), included in the latencies.",
            ms(worst.measured.max_send_lag),
            worst.scenario
        );
    }
    for row in rows {
        if let Some(e) = &row.measured.first_error {
            let _ = writeln!(
                out,
                "\nFirst error of \"{}\" at {} req/s: {e}",
                row.scenario, row.rate
            );
        }
    }

    // Summary: p50 / p99 (errors) of each kind, at each rate it ran.
    let summary = |kind: Kind, label: &str| -> String {
        rows.iter()
            .filter(|r| r.kind == kind)
            .map(|r| {
                let m = &r.measured;
                let errors = if m.errors > 0 {
                    format!(", **{} of {} failed**", m.errors, m.sent)
                } else {
                    String::new()
                };
                format!(
                    "{label} @{} req/s: {} / {} ms{errors}",
                    r.rate,
                    cell(percentile(&m.ok, 0.50)),
                    cell(percentile(&m.ok, 0.99)),
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let gantry = [
        summary(Kind::GantryEmbedded, "embedded store"),
        summary(Kind::GantryAzurite, "Azurite"),
    ]
    .join("; ");
    let baseline = [
        summary(Kind::Hello, "bare axum"),
        summary(Kind::RawPut, "raw Azurite put"),
    ]
    .join("; ");
    let rss = |pick: &dyn Fn(&Memory) -> bool| -> String {
        memory
            .iter()
            .filter(|m| pick(m))
            .map(|m| format!("{}: {} / {}", m.who, mib(m.idle_kib), mib(m.peak_kib)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Section {
        headlines: vec![
            Headline::new(
                "signed 10 KB webhook, p50 / p99, open loop",
                gantry,
                baseline,
            ),
            Headline::new(
                "RSS idle / peak under the webhook load",
                rss(&|m| m.who.starts_with("gantry")),
                rss(&|m| !m.who.starts_with("gantry")),
            ),
        ],
        detail: out,
    }
}
