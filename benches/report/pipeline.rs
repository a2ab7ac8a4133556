//! Full pipeline on Azurite: how many runs per second `gantry dev --storage
//! <Azurite>` takes from a signed push to `deployed`, next to the ceiling
//! Azurite itself sets (raw writes/s ÷ the writes one run makes).
//!
//! One run = a signed GitHub `push` (webhook) + the ACR `ImagePushed` event
//! of its image (registry-events queue) → registry-push → scan-check (a clean
//! local Trivy report) → policy-enforce (built-in policies) → deploy
//! (directory target) → verify, plus the `deployed` alert. Every run is its
//! own app, so no run supersedes another and every one deploys.
//!
//! Three measurements, each on a fresh Azurite:
//! 1. **Counting**: a few runs through a counting reverse proxy in front of
//!    Azurite give the storage requests per run (writes, reads, lists) and
//!    the average written body.
//! 2. **Throughput**: `GANTRY_BENCH_PIPELINE_RUNS` runs (default 200) sent
//!    by 8 concurrent senders, straight to Azurite; the clock runs from the
//!    first push to the moment every app's manifests are written and every
//!    queue is idle; then every run is read back and must be `deployed`.
//! 3. **Baseline**: raw `BlobStore::create`s of the average written size by
//!    16 concurrent writers for 5 s: Azurite's writes/s on this machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use gantry_pipeline::{RunStatus, RunStore};
use gantry_store::StateStore as _;
use gantry_store::blob::BlobStore;
use serde_json::Value;

use crate::common::{
    DEV_SECRET, Headline, Section, Server, env_or, gantry_command, mib, nonce, per_s,
    proc_status_kib, start_azurite, stop_azurite,
};

/// The example Trivy report's digest (replaced by each run's own).
const EXAMPLE_DIGEST: &str =
    "sha256:b5b2b2c507a0944348e0303114d8d93aaaa081732b86451d9bce1f432a537bc7";
/// Runs of the counting pass.
const COUNTED_RUNS: usize = 20;
/// Concurrent senders of pushes and image events.
const SENDERS: usize = 8;
/// Concurrent writers of the raw-write baseline.
const RAW_WRITERS: usize = 16;
/// Length of the raw-write baseline.
const RAW_SECS: Duration = Duration::from_secs(5);

pub async fn run() -> Result<Section> {
    let runs: usize = env_or("GANTRY_BENCH_PIPELINE_RUNS", 200)?;
    ensure!(runs > 0, "GANTRY_BENCH_PIPELINE_RUNS must be at least 1");

    eprintln!("report: pipeline: counting storage requests of {COUNTED_RUNS} runs");
    let azurite = start_azurite().await?;
    let counted = counting_pass(&azurite).await;
    stop_azurite(azurite).await;
    let counted = counted?;

    eprintln!("report: pipeline: {runs} runs on Azurite");
    let azurite = start_azurite().await?;
    let pass = Pass::start(&azurite.connection_string(), runs).await;
    let result = match pass {
        Ok(pass) => pass.drive(|| {}).await,
        Err(e) => Err(e),
    };
    stop_azurite(azurite).await;
    let throughput = result?;

    eprintln!("report: pipeline: raw Azurite writes, {RAW_WRITERS} writers");
    let azurite = start_azurite().await?;
    let raw = raw_writes(&azurite, counted.average_write_bytes()).await;
    stop_azurite(azurite).await;
    let raw = raw?;

    let writes = counted.per_run(&counted.writes);
    let runs_per_s = throughput.runs as f64 / throughput.wall.as_secs_f64();
    let ceiling = raw / writes;
    let mut out = String::new();
    let _ = writeln!(out, "\n### Full pipeline on Azurite (push → deployed)\n");
    let _ = writeln!(out, "| measurement | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| runs, each its own app (1 push + 1 image event each) | {} |",
        throughput.runs
    );
    let _ = writeln!(
        out,
        "| wall time, first push → all deployed and queues idle | {:.2} s |",
        throughput.wall.as_secs_f64()
    );
    let _ = writeln!(out, "| **runs/s** | **{runs_per_s:.1}** |");
    let _ = writeln!(
        out,
        "| inbound events/s (push + image) | {:.1} |",
        2.0 * runs_per_s
    );
    let _ = writeln!(
        out,
        "| runs `deployed` when read back | {} of {} |",
        throughput.deployed, throughput.runs
    );
    let _ = writeln!(
        out,
        "| messages dead-lettered | {} |",
        throughput.dead_lettered
    );
    let _ = writeln!(
        out,
        "| gantry dev RSS idle / peak | {} / {} |",
        mib(throughput.idle_kib),
        mib(throughput.peak_kib)
    );
    let _ = writeln!(
        out,
        "| storage writes per run (PUT/DELETE; counted over {COUNTED_RUNS} runs) | {writes:.1} |"
    );
    let _ = writeln!(
        out,
        "| storage reads per run (GET/HEAD of one blob) | {:.1} |",
        counted.per_run(&counted.reads)
    );
    let _ = writeln!(
        out,
        "| storage lists per run (`comp=list`) | {:.1} |",
        counted.per_run(&counted.lists)
    );
    let _ = writeln!(
        out,
        "| average written body | {:.0} B |",
        counted.average_write_bytes()
    );
    let _ = writeln!(
        out,
        "| raw Azurite creates/s ({RAW_WRITERS} writers, {:.0} B each, {} s) | {} |",
        counted.average_write_bytes(),
        RAW_SECS.as_secs(),
        per_s(raw)
    );
    let _ = writeln!(
        out,
        "| ceiling: raw writes/s ÷ writes per run | {ceiling:.1} runs/s |"
    );
    let _ = writeln!(
        out,
        "| gantry's share of the ceiling | {:.0} % |",
        100.0 * runs_per_s / ceiling
    );
    Ok(Section {
        headlines: vec![Headline::new(
            "full pipeline on Azurite, push → deployed",
            format!(
                "{runs_per_s:.1} runs/s ({:.1} inbound events/s), {} of {} deployed",
                2.0 * runs_per_s,
                throughput.deployed,
                throughput.runs
            ),
            format!(
                "Azurite {} writes/s ÷ {writes:.1} writes per run = {ceiling:.1} runs/s",
                per_s(raw)
            ),
        )],
        detail: out,
    })
}

// ---------------------------------------------------------------------------
// One pass: gantry dev on a fresh state dir, N apps, N runs.

struct Pass {
    _dir: tempfile::TempDir,
    state: PathBuf,
    port: u16,
    runs: usize,
    server: Server,
    client: reqwest::Client,
    connection: String,
    container: String,
    nonce: u32,
}

/// What the throughput pass measured.
struct Throughput {
    runs: usize,
    wall: Duration,
    deployed: usize,
    dead_lettered: u64,
    idle_kib: u64,
    peak_kib: u64,
}

fn app(i: usize) -> String {
    format!("app{i:04}")
}

impl Pass {
    /// Writes the configuration (one app per run) and the runs' clean Trivy
    /// reports, then starts gantry dev on `connection`.
    async fn start(connection: &str, runs: usize) -> Result<Pass> {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let scans = dir.path().join("scans");
        std::fs::create_dir_all(&scans)?;
        let nonce = nonce();
        let report = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples/scans")
                .join(format!("{EXAMPLE_DIGEST}.trivy.json")),
        )
        .context("reading the example Trivy report")?;
        let mut config = String::new();
        for i in 0..runs {
            let name = app(i);
            let _ = write!(
                config,
                "[[apps]]\nname = \"{name}\"\nrepo = \"contoso/{name}\"\nimage = \"contoso.azurecr.io/{name}\"\n\n"
            );
            let digest = digest(nonce, i);
            std::fs::write(
                scans.join(format!("{digest}.trivy.json")),
                report.replace(EXAMPLE_DIGEST, &digest),
            )?;
        }
        config.push_str(
            "[scan]\nsource = \"trivy\"\nthreshold = \"high\"\ntrivy_dir = \"scans\"\n\n\
             [policy]\nbuiltin = true\n\n[deploy]\ntarget = \"directory\"\n",
        );
        let config_path = dir.path().join("gantry.toml");
        std::fs::write(&config_path, config)?;

        let state = dir.path().join("state");
        let port = gantry_testkit::free_port();
        let container = gantry_testkit::unique_name("pipeline");
        let log = std::fs::File::create(dir.path().join("gantry.log"))?;
        let mut command = gantry_command(&state, port);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--storage")
            .arg(connection)
            .arg("--container")
            .arg(&container)
            .stderr(Stdio::from(log));
        let mut server = Server::spawn(command, "gantry dev")?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .timeout(Duration::from_secs(30))
            .build()?;
        if let Err(e) = server
            .wait_healthy(&client, &format!("http://127.0.0.1:{port}/api/health"))
            .await
        {
            let log = std::fs::read_to_string(dir.path().join("gantry.log")).unwrap_or_default();
            return Err(e.context(format!("gantry dev's stderr:\n{log}")));
        }
        Ok(Pass {
            _dir: dir,
            state,
            port,
            runs,
            server,
            client,
            connection: connection.to_string(),
            container,
            nonce,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Sends every run's push and image event, waits for all deploys (then
    /// calls `on_done`), checks every run, and returns the timings.
    async fn drive(self, on_done: impl FnOnce()) -> Result<Throughput> {
        let idle_kib = proc_status_kib(self.server.pid(), "VmRSS")?;
        let push: Value = serde_json::from_str(include_str!("../../examples/github-push.json"))?;
        let acr: Value =
            serde_json::from_str(include_str!("../../examples/acr-image-pushed.json"))?;
        let (push, acr) = (Arc::new(push), Arc::new(acr));
        let permits = Arc::new(tokio::sync::Semaphore::new(SENDERS));
        let mut tasks = tokio::task::JoinSet::new();
        let t0 = Instant::now();
        for i in 0..self.runs {
            let permit = permits.clone().acquire_owned().await?;
            let (client, push, acr) = (self.client.clone(), push.clone(), acr.clone());
            let (github, queue) = (
                self.url("/api/github"),
                self.url("/dev/queues/registry-events"),
            );
            let nonce = self.nonce;
            tasks.spawn(async move {
                let result = send_run(&client, &github, &queue, &push, &acr, nonce, i).await;
                drop(permit);
                result
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.context("a sender panicked")??;
        }
        let dead_lettered = self.wait_done().await?;
        let wall = t0.elapsed();
        on_done();
        let peak_kib = proc_status_kib(self.server.pid(), "VmHWM")?;

        // Every run must have reached `deployed`.
        let store = BlobStore::connect(&self.connection, &self.container, None)?;
        let runs = RunStore::new(Arc::new(store));
        let all = runs.list(None, None, usize::MAX).await?;
        let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
        for run in &all {
            *statuses.entry(format!("{:?}", run.status)).or_default() += 1;
        }
        let deployed = all
            .iter()
            .filter(|r| r.status == RunStatus::Deployed)
            .count();
        if deployed != self.runs {
            eprintln!("report: pipeline: run statuses {statuses:?}");
        }
        Ok(Throughput {
            runs: self.runs,
            wall,
            deployed,
            dead_lettered,
            idle_kib,
            peak_kib,
        })
    }

    /// Waits until every app's manifests are in the deploy directory and no
    /// queue holds an active, scheduled or locked message; returns the
    /// dead-letter count. Polls files and the embedded bus only, never the
    /// store, so the wait adds no load to Azurite.
    async fn wait_done(&self) -> Result<u64> {
        let deploy = self.state.join("deploy");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let written = std::fs::read_dir(&deploy)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .filter(|e| {
                            std::fs::read_dir(e.path()).is_ok_and(|mut d| d.next().is_some())
                        })
                        .count()
                })
                .unwrap_or(0);
            if written >= self.runs {
                let queues: Value = self
                    .client
                    .get(self.url("/dev/queues"))
                    .send()
                    .await?
                    .json()
                    .await?;
                let busy: u64 = queues
                    .as_object()
                    .into_iter()
                    .flat_map(|q| q.values())
                    .map(|s| {
                        ["active", "scheduled", "locked"]
                            .iter()
                            .map(|k| s[k].as_u64().unwrap_or(0))
                            .sum::<u64>()
                    })
                    .sum();
                if busy == 0 {
                    return Ok(queues
                        .as_object()
                        .into_iter()
                        .flat_map(|q| q.values())
                        .map(|s| s["dead_lettered"].as_u64().unwrap_or(0))
                        .sum());
                }
            }
            if Instant::now() > deadline {
                bail!("{written} of {} apps deployed after 600 s", self.runs);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn digest(nonce: u32, i: usize) -> String {
    format!("sha256:{nonce:08x}{i:056x}")
}

/// Run `i`: its signed push, then its image event.
async fn send_run(
    client: &reqwest::Client,
    github: &str,
    queue: &str,
    push: &Value,
    acr: &Value,
    nonce: u32,
    i: usize,
) -> Result<()> {
    let name = app(i);
    let sha = format!("{nonce:08x}{i:032x}");
    let mut push = push.clone();
    push["repository"]["full_name"] = format!("contoso/{name}").into();
    push["repository"]["name"] = name.clone().into();
    push["after"] = sha.clone().into();
    push["head_commit"]["id"] = sha.clone().into();
    push["commits"] = Value::Array(vec![push["head_commit"].clone()]);
    let body = serde_json::to_vec(&push)?;
    let response = client
        .post(github)
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header(
            "x-github-delivery",
            format!("{nonce:08x}-0000-4000-8000-{i:012x}"),
        )
        .header(
            "x-hub-signature-256",
            gantry_runtime::signature::sign_sha256(DEV_SECRET, &body),
        )
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    ensure!(
        status == 202 && text.contains(r#""status":"accepted""#),
        "push of {name}: HTTP {status}: {text}"
    );

    let mut event = acr.clone();
    let event_id = format!("{nonce:08x}-1111-4000-8000-{i:012x}");
    let e = &mut event[0];
    e["id"] = event_id.clone().into();
    e["subject"] = format!("{name}:{sha}").into();
    e["data"]["id"] = format!("{nonce:08x}-2222-4000-8000-{i:012x}").into();
    e["data"]["target"]["digest"] = digest(nonce, i).into();
    e["data"]["target"]["repository"] = name.clone().into();
    e["data"]["target"]["tag"] = sha.into();
    let response = client
        .post(queue)
        .header("content-type", "application/json")
        .header("messageid", event_id)
        .body(serde_json::to_vec(&event)?)
        .send()
        .await?;
    let status = response.status();
    ensure!(
        status == 201,
        "image event of {name}: HTTP {status}: {}",
        response.text().await?
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Counting: a reverse proxy in front of Azurite.

#[derive(Default)]
struct Counts {
    writes: AtomicU64,
    written_bytes: AtomicU64,
    reads: AtomicU64,
    lists: AtomicU64,
}

/// Requests per run of the counting pass.
struct Counted {
    runs: usize,
    writes: u64,
    written_bytes: u64,
    reads: u64,
    lists: u64,
}

impl Counted {
    fn per_run(&self, n: &u64) -> f64 {
        *n as f64 / self.runs as f64
    }

    fn average_write_bytes(&self) -> f64 {
        self.written_bytes as f64 / self.writes.max(1) as f64
    }
}

struct Proxy {
    upstream: String,
    client: reqwest::Client,
    counts: Counts,
}

/// Forwards one request to Azurite unchanged (Shared Key signs the path,
/// query and headers, not the host) and counts it.
async fn forward(
    State(proxy): State<Arc<Proxy>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let is_list = uri.query().is_some_and(|q| q.contains("comp=list"));
    match method {
        Method::PUT | Method::POST | Method::DELETE => {
            proxy.counts.writes.fetch_add(1, Ordering::Relaxed);
            proxy
                .counts
                .written_bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
        }
        _ if is_list => {
            proxy.counts.lists.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            proxy.counts.reads.fetch_add(1, Ordering::Relaxed);
        }
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = proxy
        .client
        .request(method, format!("{}{path}", proxy.upstream))
        .body(body);
    for (name, value) in &headers {
        if !matches!(name.as_str(), "host" | "connection" | "transfer-encoding") {
            request = request.header(name, value);
        }
    }
    match request.send().await {
        Ok(upstream) => {
            let status = upstream.status();
            let mut out = HeaderMap::new();
            for (name, value) in upstream.headers() {
                if !matches!(
                    name.as_str(),
                    "connection" | "transfer-encoding" | "content-length"
                ) {
                    out.append(name, value.clone());
                }
            }
            let body = upstream.bytes().await.unwrap_or_default();
            (status, out, body).into_response()
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn counting_pass(azurite: &gantry_testkit::Azurite) -> Result<Counted> {
    let proxy = Arc::new(Proxy {
        upstream: format!("http://127.0.0.1:{}", azurite.port()),
        client: reqwest::Client::builder().no_proxy().build()?,
        counts: Counts::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy_port = listener.local_addr()?.port();
    let app = axum::Router::new()
        .fallback(forward)
        .with_state(proxy.clone());
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let connection = azurite.connection_string().replace(
        &format!("127.0.0.1:{}/", azurite.port()),
        &format!("127.0.0.1:{proxy_port}/"),
    );
    ensure!(
        connection != azurite.connection_string(),
        "the connection string names no 127.0.0.1:{} endpoint",
        azurite.port()
    );
    let pass = Pass::start(&connection, COUNTED_RUNS).await?;
    // What start-up did (the container) is not the runs' work.
    let snapshot = |c: &Counts| {
        [
            c.writes.load(Ordering::Relaxed),
            c.written_bytes.load(Ordering::Relaxed),
            c.reads.load(Ordering::Relaxed),
            c.lists.load(Ordering::Relaxed),
        ]
    };
    let before = snapshot(&proxy.counts);
    // `drive` reads every run back at the end: count up to the moment the
    // pipeline is done, not the check.
    let mut at_done = None;
    let result = pass
        .drive(|| at_done = Some(snapshot(&proxy.counts)))
        .await?;
    ensure!(
        result.deployed == COUNTED_RUNS,
        "only {} of {COUNTED_RUNS} counted runs deployed",
        result.deployed
    );
    let at_done = at_done.context("the pipeline never finished")?;
    serving.abort();
    let d = |k: usize| at_done[k] - before[k];
    Ok(Counted {
        runs: COUNTED_RUNS,
        writes: d(0),
        written_bytes: d(1),
        reads: d(2),
        lists: d(3),
    })
}

// ---------------------------------------------------------------------------
// Baseline: raw creates.

/// Creates/s of `bytes`-sized blobs by [`RAW_WRITERS`] closed-loop writers.
async fn raw_writes(azurite: &gantry_testkit::Azurite, bytes: f64) -> Result<f64> {
    let store = BlobStore::connect(
        &azurite.connection_string(),
        &gantry_testkit::unique_name("raw"),
        None,
    )?;
    store.ensure_container().await?;
    let body: Arc<[u8]> = vec![b'x'; bytes.round().max(1.0) as usize].into();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + RAW_SECS;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let nonce = nonce();
    for w in 0..RAW_WRITERS {
        let (store, body, count) = (store.clone(), body.clone(), count.clone());
        tasks.spawn(async move {
            let mut i = 0u64;
            while Instant::now() < stop {
                store
                    .create(&format!("raw/{nonce:08x}/{w}/{i}"), &body)
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a writer panicked")??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}
