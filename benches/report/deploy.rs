//! Deploy-stage benchmark (issue 4): time from a `deploy` message being
//! available on the embedded queue to the first server-side apply request
//! (the Namespace PATCH) reaching the Kubernetes API server.
//!
//! Everything is real except the cluster: FsStore + EmbeddedBus in a temp
//! folder, a dispatcher like `gantry dev`'s (receive with peek-lock → the
//! Functions invocation envelope → `POST /deploy` on the router →
//! complete/abandon), `fn-deploy` with `[deploy] target = "kubernetes"`, and a
//! `kube::Client` talking plain HTTP to a fake API server on 127.0.0.1 (axum)
//! that echoes applies with `metadata.generation` and timestamps every
//! Namespace PATCH on arrival.
//!
//! Runs per mode:
//! `GANTRY_BENCH_DEPLOY_RUNS` (default 300); dispatcher concurrency:
//! `GANTRY_BENCH_DEPLOY_CONCURRENCY` (default 4, as `gantry dev`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use gantry_bus::embedded::{EmbeddedBus, QueueOptions, Received};
use gantry_bus::{MessageBus, OutMessage};
use gantry_kube::Cluster;
use gantry_pipeline::{AppName, Config, Run, RunStatus, RunStore, Step, StepRequest};
use gantry_runtime::{Deps, Secrets, Services};
use gantry_store::fs::FsStore;
use gantry_testkit::fixtures::{self, DIGEST};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tower::ServiceExt as _;

use crate::common::{Headline, Section, Stats, env_or, ms};

const SCAN_SUMMARY: &str = "trivy: 0 critical, 0 high, 3 medium (threshold high)";
const WARMUP: usize = 20;

/// Something that happened to one app's deploy, with when it happened.
#[derive(Debug)]
enum Event {
    /// The fake API server received the Namespace PATCH of this app.
    NamespacePatch(String, Instant),
    /// The dispatcher received the app's message from the queue.
    Received(String, Instant),
    /// The invocation returned (status) and the message was settled.
    Settled(String, Instant, StatusCode),
}

/// Fake API server: every request is answered at once; a PATCH echoes the
/// applied object with `metadata.generation` (2 for a Deployment).
async fn api(
    State(events): State<mpsc::UnboundedSender<Event>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    if method != Method::PATCH {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404})),
        )
            .into_response();
    }
    // /api/v1/namespaces/{name}: the Namespace, always the first apply.
    if let ["api", "v1", "namespaces", name] = segments.as_slice() {
        let _ = events.send(Event::NamespacePatch((*name).to_string(), arrived));
    }
    let mut object: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let generation = if object["kind"] == "Deployment" { 2 } else { 1 };
    object["metadata"]["generation"] = json!(generation);
    object["metadata"]["resourceVersion"] = json!("100");
    axum::Json(object).into_response()
}

/// Receive → envelope → `POST /deploy` → complete/abandon, as `gantry dev`
/// does (without lock renewal: invocations here take milliseconds).
async fn dispatch(
    bus: Arc<EmbeddedBus>,
    router: Router,
    concurrency: usize,
    events: mpsc::UnboundedSender<Event>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let notified = bus.notified();
        match bus.receive("deploy").await {
            Ok(Some(message)) => {
                let app = message.session_id.clone().unwrap_or_default();
                let _ = events.send(Event::Received(app.clone(), Instant::now()));
                let (bus, router, events) = (bus.clone(), router.clone(), events.clone());
                tokio::spawn(async move {
                    let status = deliver(&bus, router, message).await;
                    let _ = events.send(Event::Settled(app, Instant::now(), status));
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                let wait = match bus.next_due("deploy").await {
                    Some(due) => {
                        let ms = (due - OffsetDateTime::now_utc())
                            .whole_milliseconds()
                            .clamp(1, 1000);
                        Duration::from_millis(u64::try_from(ms).unwrap_or(1))
                    }
                    None => Duration::from_secs(1),
                };
                tokio::select! {
                    _ = notified => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                drop(permit);
                eprintln!("receiving failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn deliver(bus: &EmbeddedBus, router: Router, message: Received) -> StatusCode {
    let enqueued = message
        .enqueued_time
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let envelope = gantry_runtime::envelope::host_request_for_message(
        "message",
        false,
        &message.body,
        &message.message_id,
        message.delivery_count,
        message.session_id.as_deref(),
        &enqueued,
        &message.properties,
    );
    let body = serde_json::to_vec(&envelope).unwrap_or_default();
    let status = match Request::post("/deploy")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
    {
        Ok(req) => match router.oneshot(req).await {
            Ok(resp) => resp.status(),
            Err(never) => match never {},
        },
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let settled = if status.is_success() {
        bus.complete(&message.lock).await
    } else {
        bus.abandon(&message.lock).await
    };
    if let Err(e) = settled {
        eprintln!("settling failed: {e}");
    }
    status
}

struct Bench {
    _dir: tempfile::TempDir,
    bus: Arc<EmbeddedBus>,
    runs: RunStore,
    config: Arc<Config>,
    cluster: Arc<Cluster>,
    router: Router,
    concurrency: usize,
    tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
}

fn app_name(i: usize) -> String {
    format!("app{i:03}")
}

impl Bench {
    async fn new(apps: usize, concurrency: usize) -> Result<Bench> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(FsStore::open(dir.path().join("store"))?);
        let bus =
            Arc::new(EmbeddedBus::open(dir.path().join("bus"), QueueOptions::default()).await?);
        let runs = RunStore::new(store);
        let mut text = String::new();
        for i in 0..apps {
            let name = app_name(i);
            text.push_str(&format!(
                "[[apps]]\nname = \"{name}\"\nrepo = \"contoso/{name}\"\nimage = \"contoso.azurecr.io/{name}\"\nreplicas = 2\n\n"
            ));
        }
        // Verify checks are scheduled far beyond the benchmark.
        text.push_str("[deploy]\ntarget = \"kubernetes\"\nverify_interval = \"10m\"\n");
        let config = Arc::new(Config::parse(&text, "bench.toml")?);

        let (tx, events) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = Router::new().fallback(api).with_state(tx.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, server).await {
                eprintln!("fake API server: {e}");
            }
        });
        let kube_config = kube::Config::new(format!("http://127.0.0.1:{port}").parse()?);
        let cluster = Arc::new(Cluster::new(kube::Client::try_from(kube_config)?));

        let services = Services::default();
        services.insert(fn_deploy::CLUSTER_KEY, cluster.clone());
        let deps = Deps {
            runs: runs.clone(),
            bus: bus.clone() as Arc<dyn MessageBus>,
            config: config.clone(),
            secrets: Secrets::default(),
            services,
        };
        let router = gantry_runtime::app(Arc::new(deps), &[fn_deploy::function()]);
        Ok(Bench {
            _dir: dir,
            bus,
            runs,
            config,
            cluster,
            router,
            concurrency,
            tx,
            events,
        })
    }

    /// Starts the dispatcher (at most once per bench).
    fn start_dispatcher(&self) {
        tokio::spawn(dispatch(
            self.bus.clone(),
            self.router.clone(),
            self.concurrency,
            self.tx.clone(),
        ));
    }

    fn render(&self, run: &Run) -> Result<gantry_manifests::Rendered> {
        let image = run.image.as_ref().context("image")?;
        Ok(gantry_manifests::render(&gantry_manifests::RenderInput {
            app: self.config.app(run.app.as_str()).context("app")?,
            digest: &image.digest,
            registry_image: &format!("{}/{}", image.registry, image.repository),
            run_id: Some(&run.id),
            commit: run.source.commit.as_ref(),
            verdicts: Some(SCAN_SUMMARY),
        })?)
    }

    /// A new (newest) run of `app` waiting for its deploy step, as
    /// policy-enforce leaves it: scan and policy passed, manifest hash recorded.
    async fn recorded(&self, app: &str) -> Result<Run> {
        let mut run = fixtures::with_image(fixtures::run(app, RunStatus::Deploying)?, DIGEST)?;
        let hash = self.render(&run)?.hash;
        fixtures::gates_passed(&mut run, SCAN_SUMMARY, &hash);
        run.steps.insert("deploy".into(), Step::pending(1));
        ensure!(self.runs.create(&run).await?, "run {} existed", run.id);
        Ok(run)
    }

    /// Sends the `deploy` message policy-enforce would send for `run`;
    /// returns (call start, call returned).
    async fn enqueue(&self, run: &Run) -> Result<(Instant, Instant)> {
        let request = StepRequest {
            app: run.app.clone(),
            run_id: run.id.clone(),
            digest: run.image.as_ref().context("image")?.digest.clone(),
            attempt: 1,
            phase: None,
        };
        let message = OutMessage {
            queue: "deploy".into(),
            body: serde_json::to_vec(&request)?,
            message_id: Some(request.message_id("deploy")),
            session_id: Some(run.app.to_string()),
            scheduled_enqueue_time: None,
            properties: BTreeMap::new(),
        };
        let t0 = Instant::now();
        self.bus.send(message).await?;
        Ok((t0, Instant::now()))
    }

    /// Collects events until every app in `pending` has had its Namespace
    /// PATCH and its message settled.
    async fn wait(&mut self, pending: &[String]) -> Result<HashMap<String, Timings>> {
        let mut out: HashMap<String, Timings> = HashMap::new();
        let done = |out: &HashMap<String, Timings>| {
            pending.iter().all(|a| {
                out.get(a)
                    .is_some_and(|t| t.patch.is_some() && t.settled.is_some())
            })
        };
        while !done(&out) {
            let event = tokio::time::timeout(Duration::from_secs(30), self.events.recv())
                .await
                .context("no progress for 30 s")?
                .context("event channel closed")?;
            match event {
                Event::NamespacePatch(app, at) => {
                    out.entry(app).or_default().patch.get_or_insert(at);
                }
                Event::Received(app, at) => {
                    out.entry(app).or_default().received.get_or_insert(at);
                }
                Event::Settled(app, at, status) => {
                    if !status.is_success() {
                        bail!("deploy of {app} answered {status}");
                    }
                    out.entry(app).or_default().settled = Some(at);
                }
            }
        }
        Ok(out)
    }
}

#[derive(Default, Debug)]
struct Timings {
    received: Option<Instant>,
    patch: Option<Instant>,
    settled: Option<Instant>,
}

fn stats(samples: Vec<Duration>) -> Stats {
    let total = samples.iter().sum();
    Stats::from_samples(samples, total)
}

fn cell(d: Duration) -> String {
    format!("{} ms", ms(d))
}

fn row(out: &mut String, name: &str, n: usize, samples: Vec<Duration>) -> Stats {
    let s = stats(samples);
    let _ = writeln!(
        out,
        "| {name} | {n} | {} | {} | {} |",
        cell(s.p(0.5)),
        cell(s.p(0.99)),
        cell(s.max())
    );
    s
}

/// Per-run latencies: t0 → Namespace PATCH, and its parts.
#[derive(Default)]
struct Samples {
    send: Vec<Duration>,
    to_receive: Vec<Duration>,
    handler: Vec<Duration>,
    total: Vec<Duration>,
    settled: Vec<Duration>,
}

impl Samples {
    fn push(&mut self, t0: Instant, sent: Option<Instant>, t: &Timings) -> Result<()> {
        let received = t.received.context("not received")?;
        let patch = t.patch.context("no PATCH")?;
        let settled = t.settled.context("not settled")?;
        if let Some(sent) = sent {
            self.send.push(sent - t0);
        }
        self.to_receive.push(received - t0);
        self.handler.push(patch - received);
        self.total.push(patch - t0);
        self.settled.push(settled - t0);
        Ok(())
    }

    /// Writes the rows; returns the headline latency (available → first PATCH).
    fn print(self, out: &mut String, mode: &str, n: usize) -> Stats {
        let total = row(
            out,
            &format!("{mode}: **message available → first apply PATCH**"),
            n,
            self.total,
        );
        if !self.send.is_empty() {
            row(
                out,
                &format!("{mode}: `send` call (append + fsync)"),
                n,
                self.send,
            );
        }
        row(
            out,
            &format!("{mode}: available → received by dispatcher"),
            n,
            self.to_receive,
        );
        row(
            out,
            &format!("{mode}: received → first PATCH (envelope, checks, render, HTTP)"),
            n,
            self.handler,
        );
        row(
            out,
            &format!(
                "{mode}: available → settled (every apply, run → verifying, verify scheduled)"
            ),
            n,
            self.settled,
        );
        total
    }
}

async fn sequential(out: &mut String, n: usize, concurrency: usize) -> Result<(Bench, Stats)> {
    let mut bench = Bench::new(1, concurrency).await?;
    bench.start_dispatcher();
    let app = app_name(0);
    let mut samples = Samples::default();
    for i in 0..WARMUP + n {
        let run = bench.recorded(&app).await?;
        let (t0, sent) = bench.enqueue(&run).await?;
        let timings = bench.wait(std::slice::from_ref(&app)).await?;
        if i >= WARMUP {
            samples.push(t0, Some(sent), &timings[&app])?;
        }
    }
    let headline = samples.print(out, "sequential", n);
    Ok((bench, headline))
}

/// Returns the burst's summary line.
async fn burst(out: &mut String, n: usize, concurrency: usize) -> Result<String> {
    let mut bench = Bench::new(n, concurrency).await?;
    // One run per app, all messages on the queue before the dispatcher starts:
    // at t0 all n are available at once (a backlog, e.g. after a host restart).
    // No warm-up; the first deploys pay for cold connections and caches.
    let mut apps = Vec::with_capacity(n);
    for i in 0..n {
        let run = bench.recorded(&app_name(i)).await?;
        bench.enqueue(&run).await?;
        apps.push(run.app.to_string());
    }
    let t0 = Instant::now();
    bench.start_dispatcher();
    let timings = bench.wait(&apps).await?;
    let wall = t0.elapsed();
    let mut samples = Samples::default();
    for app in &apps {
        samples.push(t0, None, &timings[app])?;
    }
    samples.print(out, &format!("burst, {n} apps"), n);
    Ok(format!(
        "burst: {n} deploys settled in {:.0} ms ({:.0}/s) with dispatcher concurrency {concurrency}",
        wall.as_secs_f64() * 1e3,
        n as f64 / wall.as_secs_f64()
    ))
}

/// The parts of the handler on their own, against the sequential bench's
/// store (one app with `WARMUP + n` runs).
async fn parts(out: &mut String, bench: &Bench, n: usize) -> Result<()> {
    let app = AppName::parse(&app_name(0))?;
    let ids = bench.runs.list_ids(Some(&app)).await?;
    let (_, last) = ids.last().context("no runs")?;
    let run = bench.runs.get(&app, last).await?.context("run")?;
    let objects = bench.render(&run)?.objects;
    let mut list = Vec::with_capacity(n);
    let mut get = Vec::with_capacity(n);
    let mut render = Vec::with_capacity(n);
    let mut apply = Vec::with_capacity(n);
    let mut write = Vec::with_capacity(n);
    let name = gantry_pipeline::runs::blobs::run(&app, last);
    for _ in 0..n {
        // What `step::start` costs: read the run, replace it (etag, fsync).
        let t = Instant::now();
        let current = bench.runs.raw().get(&name).await?.context("run blob")?;
        bench
            .runs
            .raw()
            .replace(&name, &current.body, &current.etag)
            .await?;
        write.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(bench.runs.list_ids(Some(&app)).await?);
        list.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(bench.runs.get(&app, last).await?);
        get.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(bench.render(&run)?);
        render.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(bench.cluster.apply(&objects).await?);
        apply.push(t.elapsed());
    }
    row(
        out,
        &format!("part: `RunStore::list_ids` (app with {} runs)", ids.len()),
        n,
        list,
    );
    row(out, "part: `RunStore::get` (one run)", n, get);
    row(
        out,
        "part: run blob get + replace (as `step::start`)",
        n,
        write,
    );
    row(out, "part: `gantry_manifests::render`", n, render);
    row(
        out,
        &format!(
            "part: `Cluster::apply`, {} objects over loopback HTTP",
            objects.len()
        ),
        n,
        apply,
    );
    Ok(())
}

pub async fn run() -> Result<Section> {
    let n: usize = env_or("GANTRY_BENCH_DEPLOY_RUNS", 300)?;
    let concurrency: usize = env_or("GANTRY_BENCH_DEPLOY_CONCURRENCY", 4)?;
    let (n, concurrency) = (n.max(1), concurrency.max(1));
    eprintln!("report: deploy: {n} sequential runs, then a burst of {n} apps");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Deploy stage: `deploy` message available → first apply PATCH (fake API server)\n"
    );
    let _ = writeln!(out, "| scenario | runs | p50 | p99 | max |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let (bench, headline) = sequential(&mut out, n, concurrency).await?;
    let summary = burst(&mut out, n, concurrency).await?;
    let _ = writeln!(out, "\n{summary}\n");
    let _ = writeln!(
        out,
        "| part (sequential store) | iterations | p50 | p99 | max |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    parts(&mut out, &bench, n).await?;
    Ok(Section {
        headlines: vec![Headline::new(
            "queue → first apply request (deploy message available → Namespace PATCH)",
            format!(
                "p50 {} / p99 {} ms",
                ms(headline.p(0.5)),
                ms(headline.p(0.99))
            ),
            "–".to_string(),
        )],
        detail: out,
    })
}
