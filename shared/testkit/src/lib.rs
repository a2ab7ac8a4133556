//! Test harness shared by gantry's crates: a throw-away Azurite (the Blob
//! Storage emulator) on a free loopback port, and example runs
//! ([`fixtures`]).
//!
//! Used only as a dev-dependency. Tests that need Azurite must *fail* when it is
//! missing rather than skip: CI installs it with `npm ci` (the version is pinned
//! in the workspace's `package-lock.json`), so a skip would hide a broken setup.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

pub mod bus;
pub mod fixtures;

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";

/// Azurite's well-known development key. Public by design (it is in Microsoft's
/// documentation); it protects nothing but the emulator.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long Azurite may take to accept connections. It starts in about two
/// seconds here; the margin covers a loaded 2-core CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `azurite-blob` as a child of a tiny `sh` watchdog.
///
/// The watchdog kills Azurite as soon as its stdin reaches end-of-file, which
/// happens both when [`Azurite`] is dropped and when the test process dies in
/// any way (the kernel closes the pipe). That matters for [`Azurite::shared`]:
/// statics are never dropped, and a leaked node process would keep CI's run
/// open and hold the port.
const WATCHDOG: &str = r#""$0" "$@" </dev/null & child=$!
cat >/dev/null
kill "$child" 2>/dev/null
wait "$child""#;

/// A running Azurite blob service, stopped when dropped.
#[derive(Debug)]
pub struct Azurite {
    port: u16,
    child: Child,
    /// Held open for the watchdog; dropping it stops Azurite.
    stdin: Option<ChildStdin>,
}

impl Azurite {
    /// Starts Azurite with in-memory persistence on a free loopback port and
    /// waits until it accepts connections.
    ///
    /// Blocking (a couple of seconds): call it once per test binary, through
    /// [`Azurite::shared`], rather than per test.
    pub fn start() -> anyhow::Result<Azurite> {
        let bin = azurite_bin()?;
        // free_port() can race with another process grabbing the port between our
        // probe and Azurite's bind; a fresh port on the next attempt resolves that.
        let mut last_err = None;
        for _ in 0..3 {
            match Self::start_on(&bin, free_port(), None) {
                Ok(azurite) => return Ok(azurite),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("Azurite did not start")))
    }

    /// One Azurite for the whole test process, started on first use.
    ///
    /// Tests share it and isolate themselves with a fresh container each. The
    /// watchdog (see the crate docs) stops it when the process exits.
    pub fn shared() -> anyhow::Result<&'static Azurite> {
        static SHARED: OnceLock<Result<Azurite, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| Azurite::start().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Starts Azurite persisting to the directory `location` instead of
    /// memory, on `port` when given (else a free one).
    ///
    /// For outage tests: drop the instance to stop it (the watchdog's `kill`
    /// is a SIGTERM, on which Azurite saves its metadata), then start it again
    /// with the same `location` and [`Azurite::port`] and the blobs are back.
    pub fn start_persistent(location: &Path, port: Option<u16>) -> anyhow::Result<Azurite> {
        let bin = azurite_bin()?;
        std::fs::create_dir_all(location)
            .with_context(|| format!("creating {}", location.display()))?;
        match port {
            Some(port) => Self::start_on(&bin, port, Some(location)),
            None => Self::start_on(&bin, free_port(), Some(location)),
        }
    }

    fn start_on(bin: &Path, port: u16, location: Option<&Path>) -> anyhow::Result<Azurite> {
        let port_arg = port.to_string();
        let persistence: Vec<std::ffi::OsString> = match location {
            Some(dir) => vec!["--location".into(), dir.as_os_str().to_owned()],
            None => vec!["--inMemoryPersistence".into()],
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port_arg])
            .args(&persistence)
            .args([
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
                // Azurite otherwise sends usage telemetry to Application Insights:
                // tests must not talk to anything beyond loopback.
                "--disableTelemetry",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawning sh to run {}", bin.display()))?;
        let stdin = child.stdin.take();
        let mut azurite = Azurite { port, child, stdin };

        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(azurite);
            }
            if let Some(status) = azurite.child.try_wait()? {
                bail!(
                    "{} exited with {status} before listening on port {port} \
                     (its stderr is above; is `node` on PATH? run `npm ci` in the workspace root)",
                    bin.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Azurite did not accept connections on 127.0.0.1:{port} within {} s",
                    START_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The loopback port Azurite listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The blob service URL of the development account, without a trailing
    /// slash (the SDK would otherwise build `//container` paths, which fail).
    pub fn blob_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// A storage connection string for this instance, the form operators put in
    /// gantry's configuration.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={};",
            self.blob_endpoint()
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        // Closing stdin asks the watchdog to stop Azurite and wait for it; kill the
        // watchdog only if that does not happen promptly.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The OS picks it; there is a small window in which another process can take
/// it, so callers that bind later should be ready to retry.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

/// A name unique within this machine for a while, for containers and blob
/// prefixes that isolate one test from another.
///
/// Lower-case letters, digits and hyphens only, so it is a valid container name
/// as long as `prefix` is (at most 63 characters in total for containers).
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Finds `azurite-blob`: `GANTRY_AZURITE_BIN` if set, else
/// `node_modules/.bin/azurite-blob` in the directory holding the workspace's
/// `package.json`.
fn azurite_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("GANTRY_AZURITE_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.exists() {
            bail!(
                "GANTRY_AZURITE_BIN points to {}, which does not exist",
                bin.display()
            );
        }
        return Ok(bin);
    }
    let start = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = start
        .ancestors()
        .find(|dir| dir.join("package.json").is_file())
        .with_context(|| {
            format!(
                "no package.json above {}: cannot locate Azurite (set GANTRY_AZURITE_BIN)",
                start.display()
            )
        })?;
    let bin = root.join("node_modules").join(".bin").join("azurite-blob");
    match bin.metadata() {
        Ok(_) => Ok(bin),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "Azurite is not installed: {} is missing. Run `npm ci` in {} \
             (tests that need Azurite fail rather than skip)",
            bin.display(),
            root.display()
        ),
        Err(e) => Err(e).with_context(|| format!("checking {}", bin.display())),
    }
}
