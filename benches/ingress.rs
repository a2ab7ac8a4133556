//! Ingress benchmark: what a signed GitHub `push` costs on its way into gantry.
//!
//! Run with `cargo bench --bench ingress`. It prints one markdown table measured
//! in one run on this machine; `docs/benchmarks.md` explains every row.
//!
//! Load is **open loop**: requests are sent on a fixed schedule whatever the
//! server does, and each latency is measured from the request's *scheduled*
//! send time to the end of its response. A slow response therefore cannot delay
//! (and so hide) the requests behind it — no coordinated omission.
//!
//! Scenarios, all at the same rate with the same ~10 KB body:
//! * a bare axum "hello" server in a separate process (this binary re-executed
//!   with `GANTRY_BENCH_ROLE=hello`), the floor of HTTP on this machine;
//! * `POST /api/github` of the real `gantry dev` binary with its embedded store;
//! * a raw `BlobStore::create` of 10 KB against Azurite;
//! * `POST /api/github` of `gantry dev --storage <Azurite>`;
//! * the last two again at a lower rate (Azurite, one Node.js thread, saturates
//!   first), each Azurite scenario on a fresh Azurite;
//!
//! plus process start → first 200 on `/api/health`, and the gantry process's
//! resident memory idle and at peak.
//!
//! Tunables (environment): `GANTRY_BENCH_RATE` (requests/s, default 200),
//! `GANTRY_BENCH_SECS` (measured seconds, 10), `GANTRY_BENCH_WARMUP_SECS` (1),
//! `GANTRY_BENCH_STARTS` (start-up samples, 10), `GANTRY_BENCH_TIMEOUT_SECS`
//! (per request, 10), `GANTRY_BENCH_AZURITE_LOW_RATE` (requests/s of the
//! lower-rate Azurite pair, 50; 0 skips it).

#![allow(missing_docs)]

use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gantry_store::StateStore as _;
use gantry_store::blob::BlobStore;
use serde_json::Value;

/// Re-executing this binary with this variable set to `hello` runs the bare
/// axum server instead of the benchmark.
const ROLE_ENV: &str = "GANTRY_BENCH_ROLE";
/// The secret `gantry dev` uses when `GANTRY_GITHUB_WEBHOOK_SECRET` is unset.
const DEV_SECRET: &[u8] = b"gantry-dev-webhook-secret";
/// Size of every request body (and of every raw blob put).
const BODY_BYTES: usize = 10 * 1024;
/// Stands for the pushed commit sha in the payload template; as long as a sha,
/// so substituting it keeps the body at exactly [`BODY_BYTES`].
const SHA_PLACEHOLDER: &str = "@@@@@@@@@@@@@@after-sha@@@@@@@@@@@@@@@@@";
/// How long a freshly started server may take to answer its health check.
const START_DEADLINE: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    if std::env::var(ROLE_ENV).as_deref() == Ok("hello") {
        return hello_server();
    }
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and
    // a minute of load plus Azurite has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("ingress: benchmark only; run it with `cargo bench --bench ingress`");
        return Ok(());
    }
    let settings = Settings::from_env()?;
    eprintln!(
        "ingress: {} req/s for {} s after {} s warm-up per scenario",
        settings.rate,
        settings.duration.as_secs_f64(),
        settings.warmup.as_secs_f64()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the load generator's runtime")?;
    let report = runtime.block_on(run_all(&settings));
    drop(runtime);
    println!("{}", report?);
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings

#[derive(Clone, Copy)]
struct Settings {
    rate: f64,
    /// Rate of the second, lower-rate pair of Azurite scenarios (0: none).
    azurite_low_rate: f64,
    warmup: Duration,
    duration: Duration,
    starts: usize,
    timeout: Duration,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let rate: f64 = env_or("GANTRY_BENCH_RATE", 200.0)?;
        if !(rate.is_finite() && rate > 0.0) {
            bail!("GANTRY_BENCH_RATE must be a positive number of requests per second");
        }
        let secs = |name, default| -> Result<Duration> {
            let s: f64 = env_or(name, default)?;
            Duration::try_from_secs_f64(s).with_context(|| format!("{name} must be >= 0"))
        };
        let azurite_low_rate: f64 = env_or("GANTRY_BENCH_AZURITE_LOW_RATE", 50.0)?;
        if !(azurite_low_rate.is_finite() && azurite_low_rate >= 0.0) {
            bail!("GANTRY_BENCH_AZURITE_LOW_RATE must be a number of requests per second");
        }
        Ok(Settings {
            rate,
            azurite_low_rate,
            warmup: secs("GANTRY_BENCH_WARMUP_SECS", 1.0)?,
            duration: secs("GANTRY_BENCH_SECS", 10.0)?,
            starts: env_or("GANTRY_BENCH_STARTS", 10)?,
            timeout: secs("GANTRY_BENCH_TIMEOUT_SECS", 10.0)?,
        })
    }

    /// Requests sent in the warm-up and in the whole run.
    fn counts(&self) -> (u64, u64) {
        let warm = (self.warmup.as_secs_f64() * self.rate).round() as u64;
        let measured = (self.duration.as_secs_f64() * self.rate).round() as u64;
        (warm, warm + measured)
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} does not parse")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// Scenarios

/// One row of the latency table.
struct Row {
    scenario: String,
    rate: f64,
    measured: Measured,
}

/// Memory of one server process, in KiB.
struct Memory {
    who: String,
    idle_kib: u64,
    peak_kib: u64,
}

async fn run_all(settings: &Settings) -> Result<String> {
    let template: Arc<str> = push_template()?.into();
    let mut rows = Vec::new();
    let mut memory = Vec::new();

    eprintln!("ingress: bare axum hello (separate process)");
    let (row, mem) = hello_scenario(settings, &template).await?;
    rows.push(row);
    memory.push(mem);

    eprintln!("ingress: gantry dev, embedded store");
    let (row, mem) = gantry_scenario(settings, &template, None).await?;
    rows.push(row);
    memory.push(mem);

    let mut azurite_rates = vec![settings.rate];
    if settings.azurite_low_rate > 0.0 && settings.azurite_low_rate != settings.rate {
        azurite_rates.push(settings.azurite_low_rate);
    }
    for rate in azurite_rates {
        let at = Settings { rate, ..*settings };
        eprintln!("ingress: raw Azurite put at {rate} req/s");
        let azurite = start_azurite().await?;
        let row = raw_put_scenario(&at, &azurite, &template).await;
        stop_azurite(azurite).await;
        rows.push(row?);

        eprintln!("ingress: gantry dev --storage Azurite at {rate} req/s");
        let azurite = start_azurite().await?;
        let result = gantry_scenario(&at, &template, Some(&azurite)).await;
        stop_azurite(azurite).await;
        let (row, mem) = result?;
        rows.push(row);
        memory.push(mem);
    }

    eprintln!("ingress: start-up x{}", settings.starts);
    let starts = startup_scenario(settings.starts).await?;

    Ok(render(settings, &rows, &memory, &starts))
}

/// A fresh Azurite, so no scenario inherits another's backlog or blobs.
async fn start_azurite() -> Result<gantry_testkit::Azurite> {
    tokio::task::spawn_blocking(gantry_testkit::Azurite::start)
        .await
        .context("the Azurite starter panicked")?
        .context("starting Azurite (run `npm ci` in the workspace root first)")
}

/// Stops Azurite off the runtime's workers (dropping it waits for the process).
async fn stop_azurite(azurite: gantry_testkit::Azurite) {
    let _ = tokio::task::spawn_blocking(move || drop(azurite)).await;
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
    let (scenario, who) = match azurite {
        None => (
            "gantry dev, embedded store (`POST /api/github`)",
            "gantry dev, embedded store",
        ),
        Some(_) => (
            "gantry dev `--storage` Azurite (`POST /api/github`)",
            "gantry dev, Azurite",
        ),
    };
    let who = format!("{who}, {} req/s", settings.rate);
    Ok((
        Row {
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
        scenario: "raw Azurite put (`BlobStore::create`, 10 KB)".into(),
        rate: settings.rate,
        measured,
    })
}

/// Start → first 200 on `/api/health`, `n` times, each on a fresh state dir.
async fn startup_scenario(n: usize) -> Result<Vec<Duration>> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let port = gantry_testkit::free_port();
        let mut command = gantry_command(&dir.path().join("state"), port);
        command.stderr(Stdio::null());
        let mut server = Server::spawn(command, "gantry dev")?;
        let took = server
            .wait_healthy(&client, &format!("http://127.0.0.1:{port}/api/health"))
            .await?;
        samples.push(took);
        drop(server);
    }
    samples.sort();
    Ok(samples)
}

fn gantry_command(state: &Path, port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gantry"));
    command
        .arg("dev")
        .arg("--state")
        .arg(state)
        .arg("--port")
        .arg(port.to_string())
        .env("GANTRY_LOG", "warn")
        // Everything else comes from the flags: nothing from the caller's shell.
        .env_remove("GANTRY_GITHUB_WEBHOOK_SECRET")
        .env_remove("GANTRY_CONFIG")
        .env_remove("GANTRY_STATE")
        .env_remove("GANTRY_STORAGE")
        .env_remove("GANTRY_CONTAINER")
        .env_remove("FUNCTIONS_CUSTOMHANDLER_PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // `gantry dev` reads ./gantry.toml when present: run it beside its state so
    // it always uses the embedded example configuration (which tracks
    // contoso/web on main), whatever the caller's working directory holds.
    if let Some(dir) = state.parent() {
        command.current_dir(dir);
    }
    command
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

type BoxedOutcome = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Latencies of the measured (post-warm-up) requests.
struct Measured {
    sent: u64,
    /// Successful latencies, sorted.
    ok: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    /// Worst delay between a request's scheduled time and its hand-off to the
    /// runtime: the load generator's own imprecision (included in latencies).
    max_send_lag: Duration,
}

/// Sends request `i` at `start + i / rate` for every `i`, on a dedicated
/// thread that sleeps to each send time and hands the request to the runtime
/// without waiting for earlier responses. Latency runs from the scheduled
/// time to the end of the response body.
async fn open_loop<F, Fut>(settings: &Settings, mut make: F) -> Result<Measured>
where
    F: FnMut(u64) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (warm, total) = settings.counts();
    let period = 1.0 / settings.rate;
    let timeout = settings.timeout;
    let (handles, max_send_lag) = tokio::task::spawn_blocking(move || {
        let start = Instant::now() + Duration::from_millis(20);
        let mut handles = Vec::with_capacity(total as usize);
        let mut max_lag = Duration::ZERO;
        for i in 0..total {
            let request = make(i);
            let scheduled = start + Duration::from_secs_f64(i as f64 * period);
            let now = Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if i >= warm {
                max_lag = max_lag.max(scheduled.elapsed());
            }
            handles.push(runtime.spawn(async move {
                let outcome = match tokio::time::timeout(timeout, request).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!("no response within {} s", timeout.as_secs_f64())),
                };
                (scheduled.elapsed(), outcome)
            }));
        }
        (handles, max_lag)
    })
    .await
    .context("the load scheduler panicked")?;

    let mut measured = Measured {
        sent: total - warm,
        ok: Vec::with_capacity(handles.len()),
        errors: 0,
        first_error: None,
        max_send_lag,
    };
    for (i, handle) in handles.into_iter().enumerate() {
        let (latency, outcome) = handle.await.context("a request task panicked")?;
        if (i as u64) < warm {
            continue;
        }
        match outcome {
            Ok(()) => measured.ok.push(latency),
            Err(e) => {
                measured.errors += 1;
                measured.first_error.get_or_insert(e);
            }
        }
    }
    measured.ok.sort();
    if let Some(e) = &measured.first_error {
        eprintln!("ingress:   {} errors, first: {e}", measured.errors);
    }
    Ok(measured)
}

/// A realistic ~10 KB push: `examples/github-push.json` with `commits` padded
/// and the pushed sha left as [`SHA_PLACEHOLDER`].
fn push_template() -> Result<String> {
    let mut push: Value = serde_json::from_str(include_str!("../examples/github-push.json"))
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

/// Distinguishes the shas and delivery ids of one load run from any other.
fn nonce() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Processes

/// A server child process, killed when dropped (also on an early `?`).
struct Server {
    child: Child,
    what: &'static str,
    /// For the hello server: it exits when this pipe closes, so it cannot
    /// outlive a benchmark that dies without running destructors.
    _stdin: Option<ChildStdin>,
    spawned: Instant,
}

impl Server {
    fn spawn(mut command: Command, what: &'static str) -> Result<Server> {
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("spawning the {what}"))?;
        let stdin = child.stdin.take();
        Ok(Server {
            child,
            what,
            _stdin: stdin,
            spawned,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `url` every millisecond until it answers 200; returns the time
    /// since the process was spawned.
    async fn wait_healthy(&mut self, client: &reqwest::Client, url: &str) -> Result<Duration> {
        loop {
            let response = client.get(url).send().await;
            if response.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
                return Ok(self.spawned.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} exited with {status} before answering", self.what);
            }
            if self.spawned.elapsed() > START_DEADLINE {
                bail!(
                    "the {} did not answer 200 on {url} within {} s",
                    self.what,
                    START_DEADLINE.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`.
fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .with_context(|| format!("no {field} in {path}"))
}

/// The bare axum server of the baseline row: `GET`/`POST /` answer `hello`.
fn hello_server() -> Result<()> {
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

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn render(settings: &Settings, rows: &[Row], memory: &[Memory], starts: &[Duration]) -> String {
    let mut out = String::new();
    let cell = |d: Option<Duration>| d.map_or_else(|| "–".to_string(), ms);
    let _ = writeln!(
        out,
        "\n### Ingress, open loop, {} s measured after {} s warm-up, {} B bodies\n",
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
    let _ = writeln!(out, "\n| measurement | value |");
    let _ = writeln!(out, "|---|---|");
    let _ = writeln!(
        out,
        "| gantry dev start → first 200 on `/api/health` ({} starts) | median {} ms, max {} ms |",
        starts.len(),
        cell(percentile(starts, 0.50)),
        cell(starts.last().copied()),
    );
    for m in memory {
        let _ = writeln!(
            out,
            "| RSS of {}: idle (VmRSS after start) / peak (VmHWM after load) | {} / {} |",
            m.who,
            mib(m.idle_kib),
            mib(m.peak_kib)
        );
    }
    if let Some(worst) = rows.iter().max_by_key(|r| r.measured.max_send_lag) {
        let _ = writeln!(
            out,
            "| load generator: worst send lag behind schedule (included in latencies) | {} ms ({}) |",
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
    let _ = writeln!(out, "\nMachine: {}", machine());
    out
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or("unknown".to_string(), |kib| {
            format!("{:.1} GiB", kib as f64 / 1048576.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let profile = if cfg!(debug_assertions) {
        "debug (numbers are meaningless)"
    } else {
        "release (cargo bench profile)"
    };
    format!(
        "nproc {cpus}, {model}, {memory} RAM, Linux {}, temp dir {} on {}, profile {profile}",
        kernel.trim(),
        std::env::temp_dir().display(),
        filesystem_of(&std::env::temp_dir()),
    )
}

/// The filesystem type holding `path` (the embedded store's fsyncs land there).
fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_string()))
        })
        .max()
        .map_or_else(|| "unknown".to_string(), |(_, kind)| kind)
}
