//! What every section of the report shares: settings, child processes,
//! open-loop load, percentiles and formatting.

use std::future::Future;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Re-executing this binary with this variable set to `hello` runs the bare
/// axum server instead of the benchmark.
pub const ROLE_ENV: &str = "GANTRY_BENCH_ROLE";
/// The secret `gantry dev` uses when `GANTRY_GITHUB_WEBHOOK_SECRET` is unset.
pub const DEV_SECRET: &[u8] = b"gantry-dev-webhook-secret";
/// How long a freshly started server may take to answer its health check.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// One section's contribution to the summary table at the top.
pub struct Headline {
    /// What is measured.
    pub what: String,
    /// gantry's figure.
    pub gantry: String,
    /// The baseline(s) measured in the same run.
    pub baseline: String,
}

impl Headline {
    pub fn new(
        what: impl Into<String>,
        gantry: impl Into<String>,
        baseline: impl Into<String>,
    ) -> Headline {
        Headline {
            what: what.into(),
            gantry: gantry.into(),
            baseline: baseline.into(),
        }
    }
}

/// What a section returns: its rows for the summary and its detail tables.
pub struct Section {
    pub headlines: Vec<Headline>,
    pub detail: String,
}

// ---------------------------------------------------------------------------
// Settings

/// The load settings (environment, see `docs/benchmarks.md`).
#[derive(Clone, Copy)]
pub struct Settings {
    pub rate: f64,
    /// Rate of the second, lower-rate pair of Azurite scenarios (0: none).
    pub azurite_low_rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub starts: usize,
    pub timeout: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Settings> {
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

/// `name` parsed from the environment, or `default` when unset.
pub fn env_or<T: FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} does not parse")),
        Err(_) => Ok(default),
    }
}

// ---------------------------------------------------------------------------
// Azurite

/// A fresh in-memory Azurite, so no scenario inherits another's backlog or blobs.
pub async fn start_azurite() -> Result<gantry_testkit::Azurite> {
    tokio::task::spawn_blocking(gantry_testkit::Azurite::start)
        .await
        .context("the Azurite starter panicked")?
        .context("starting Azurite (run `npm ci` in the workspace root first)")
}

/// Stops Azurite off the runtime's workers (dropping it waits for the process).
pub async fn stop_azurite(azurite: gantry_testkit::Azurite) {
    let _ = tokio::task::spawn_blocking(move || drop(azurite)).await;
}

// ---------------------------------------------------------------------------
// Processes

/// A server child process, killed when dropped (also on an early `?`).
pub struct Server {
    child: Child,
    what: &'static str,
    /// For the hello servers: they exit when this pipe closes, so they cannot
    /// outlive a benchmark that dies without running destructors.
    _stdin: Option<ChildStdin>,
    spawned: Instant,
}

impl Server {
    pub fn spawn(mut command: Command, what: &'static str) -> Result<Server> {
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `url` every millisecond until it answers 200; returns the time
    /// since the process was spawned.
    pub async fn wait_healthy(&mut self, client: &reqwest::Client, url: &str) -> Result<Duration> {
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

/// `gantry dev` on `state` and `port`, configured only by its flags.
pub fn gantry_command(state: &Path, port: u16) -> Command {
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
        .env_remove("GANTRY_API_TOKENS")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("FUNCTIONS_CUSTOMHANDLER_PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // `gantry dev` reads ./gantry.toml when present: run it beside its state so
    // it uses the embedded example configuration (or the `--config` given),
    // whatever the caller's working directory holds.
    if let Some(dir) = state.parent() {
        command.current_dir(dir);
    }
    command
}

/// A `kB` field (`VmRSS`, `VmHWM`) of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
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

/// Distinguishes the shas, delivery ids and blob names of one load run from
/// any other.
pub fn nonce() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Open-loop load

/// One request of a load run, built before its send time.
pub type BoxedOutcome = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Latencies of the measured (post-warm-up) requests.
pub struct Measured {
    pub sent: u64,
    /// Successful latencies, sorted.
    pub ok: Vec<Duration>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Worst delay between a request's scheduled time and its hand-off to the
    /// runtime: the load generator's own imprecision (included in latencies).
    pub max_send_lag: Duration,
}

/// Sends request `i` at `start + i / rate` for every `i`, on a dedicated
/// thread that sleeps to each send time and hands the request to the runtime
/// without waiting for earlier responses. Latency runs from the scheduled
/// time to the end of the response body, so a stall cannot hide the requests
/// queued behind it (no coordinated omission).
pub async fn open_loop<F, Fut>(settings: &Settings, mut make: F) -> Result<Measured>
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
        eprintln!("report:   {} errors, first: {e}", measured.errors);
    }
    Ok(measured)
}

// ---------------------------------------------------------------------------
// Closed-loop micro measurements

/// Latencies of `n` calls of one operation, timed one by one.
pub struct Stats {
    pub n: usize,
    pub total: Duration,
    /// Sorted.
    pub samples: Vec<Duration>,
}

impl Stats {
    pub fn from_samples(samples: Vec<Duration>, total: Duration) -> Stats {
        let mut samples = samples;
        samples.sort();
        Stats {
            n: samples.len(),
            total,
            samples,
        }
    }

    pub fn per_second(&self) -> f64 {
        self.n as f64 / self.total.as_secs_f64().max(1e-9)
    }

    pub fn p(&self, q: f64) -> Duration {
        percentile(&self.samples, q).unwrap_or_default()
    }

    pub fn max(&self) -> Duration {
        self.samples.last().copied().unwrap_or_default()
    }
}

/// Runs `f` `n` times after `min(n, 100)` warm-up calls; times each call.
pub fn measure(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Stats> {
    for _ in 0..n.min(100) {
        f()?;
    }
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed());
    }
    Ok(Stats::from_samples(samples, start.elapsed()))
}

// ---------------------------------------------------------------------------
// Formatting

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// A rate with thousands separators, no decimals.
pub fn per_s(v: f64) -> String {
    let whole = v.round() as u64;
    let digits = whole.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// This machine, as the report's header states it.
pub fn machine() -> String {
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
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        "nproc {cpus}, {model}, {memory} RAM, Linux {}, temp dir {} on {}, profile {profile}, \
         load average at start {load}",
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
