//! Process start → first `200`, each server started `n` times on a fresh
//! port (gantry on a fresh state directory), polled every millisecond; the
//! clock starts just before `spawn`. Baselines: the bare axum hello (this
//! binary re-executed) and a Node.js `http` hello (the runtime Azure
//! Functions' own JavaScript workers use), plus their idle memory.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::common::{
    Headline, ROLE_ENV, Section, Server, gantry_command, mib, ms, percentile, proc_status_kib,
};

/// A Node.js hello server on `PORT` that exits when its stdin closes.
const NODE_HELLO: &str = "const http = require('http');\
    http.createServer((q, s) => { q.resume(); q.on('end', () => s.end('hello')); })\
    .listen(Number(process.env.PORT), '127.0.0.1');\
    process.stdin.on('end', () => process.exit(0)); process.stdin.resume();";

/// Start-up samples (sorted) and the idle RSS after the last start.
struct Starts {
    who: String,
    samples: Vec<Duration>,
    idle_kib: u64,
}

pub async fn run(n: usize) -> Result<Section> {
    let n = n.max(1);
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let mut all = Vec::new();

    eprintln!("report: start-up: gantry dev x{n}");
    all.push(
        starts(
            n,
            "gantry dev (`GET /api/health`)".into(),
            &client,
            |port, dir| {
                let mut command = gantry_command(&dir.join("state"), port);
                command.stderr(Stdio::null());
                (command, "/api/health")
            },
        )
        .await?,
    );

    eprintln!("report: start-up: bare axum hello x{n}");
    let exe = std::env::current_exe().context("locating the benchmark binary")?;
    all.push(
        starts(n, "bare axum hello (`GET /`)".into(), &client, |port, _| {
            let mut command = Command::new(&exe);
            command
                .env(ROLE_ENV, "hello")
                .env("PORT", port.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            (command, "/")
        })
        .await?,
    );

    eprintln!("report: start-up: Node.js hello x{n}");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(version) = &node {
        let who = format!("Node.js {version} `http` hello (`GET /`)");
        all.push(
            starts(n, who, &client, |port, _| {
                let mut command = Command::new("node");
                command
                    .arg("-e")
                    .arg(NODE_HELLO)
                    .env("PORT", port.to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                (command, "/")
            })
            .await?,
        );
    } else {
        eprintln!("report: start-up: `node` not found, Node.js row skipped");
    }

    let mut out = String::new();
    let _ = writeln!(out, "\n### Start → first 200 ({n} starts each)\n");
    let _ = writeln!(
        out,
        "| server | median (ms) | min (ms) | max (ms) | RSS idle |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let cell = |d: Option<Duration>| d.map_or_else(|| "–".to_string(), ms);
    for s in &all {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            s.who,
            cell(percentile(&s.samples, 0.5)),
            cell(s.samples.first().copied()),
            cell(s.samples.last().copied()),
            mib(s.idle_kib)
        );
    }
    let median = |s: &Starts| format!("{} ms", cell(percentile(&s.samples, 0.5)));
    let baseline = all[1..]
        .iter()
        .map(|s| {
            format!(
                "{}: {}",
                s.who.split(" (").next().unwrap_or(&s.who),
                median(s)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let idle = all[1..]
        .iter()
        .map(|s| {
            format!(
                "{}: {}",
                s.who.split(" (").next().unwrap_or(&s.who),
                mib(s.idle_kib)
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Section {
        headlines: vec![
            Headline::new(
                "process start → first 200, median",
                median(&all[0]),
                baseline,
            ),
            Headline::new("RSS idle after start", mib(all[0].idle_kib), idle),
        ],
        detail: out,
    })
}

/// Starts the server `n` times; `make` builds its command for a port and a
/// fresh directory and names the path to poll.
async fn starts<F>(n: usize, who: String, client: &reqwest::Client, make: F) -> Result<Starts>
where
    F: Fn(u16, &std::path::Path) -> (Command, &'static str),
{
    let mut samples = Vec::with_capacity(n);
    let mut idle_kib = 0;
    for _ in 0..n {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let port = gantry_testkit::free_port();
        let (command, path) = make(port, dir.path());
        let mut server = Server::spawn(command, "server")?;
        let took = server
            .wait_healthy(client, &format!("http://127.0.0.1:{port}{path}"))
            .await
            .with_context(|| format!("starting {who}"))?;
        samples.push(took);
        idle_kib = proc_status_kib(server.pid(), "VmRSS")?;
        drop(server);
    }
    samples.sort();
    Ok(Starts {
        who,
        samples,
        idle_kib,
    })
}
