//! Helpers for the end-to-end tests: start the real `gantry` binary and talk to it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub const DEV_SECRET: &str = "gantry-dev-webhook-secret";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn example(name: &str) -> Vec<u8> {
    std::fs::read(repo_root().join("examples").join(name)).expect("example exists")
}

/// A running `gantry dev`, killed on drop.
pub struct DevHost {
    child: Child,
    pub port: u16,
    pub state: PathBuf,
    pub client: reqwest::Client,
}

impl DevHost {
    pub async fn start(state: &Path, extra: &[&str]) -> Result<DevHost> {
        DevHost::start_with_env(state, extra, &[]).await
    }

    /// Like [`DevHost::start`], with extra environment variables for the
    /// child only (alert channel URLs and secrets).
    pub async fn start_with_env(
        state: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<DevHost> {
        let port = gantry_testkit::free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .arg("dev")
            .arg("--state")
            .arg(state)
            .arg("--port")
            .arg(port.to_string())
            .args(extra)
            .env_remove("GANTRY_GITHUB_WEBHOOK_SECRET")
            .env_remove("GANTRY_STORAGE")
            .env_remove("GANTRY_CONFIG")
            // The operator API accepts the development token then.
            .env_remove("GANTRY_API_TOKENS")
            .env("GANTRY_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting gantry dev")?;
        let mut host = DevHost {
            child,
            port,
            state: state.to_path_buf(),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = host.client.get(host.url("/api/health")).send().await
                && r.status().is_success()
            {
                return Ok(host);
            }
            if let Some(status) = host.child.try_wait()? {
                bail!("gantry dev exited with {status} before answering (stderr above)");
            }
            if Instant::now() > deadline {
                bail!("gantry dev did not answer /api/health within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the process exits by itself (a fault-injection crash)
    /// and returns its status.
    pub async fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("gantry dev did not exit within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// Posts a GitHub webhook exactly as GitHub would.
    pub async fn github(&self, event: &str, delivery: &str, body: &[u8]) -> Result<(u16, Value)> {
        let sig = gantry_runtime::signature::sign_sha256(DEV_SECRET.as_bytes(), body);
        let r = self
            .client
            .post(self.url("/api/github"))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sig)
            .body(body.to_vec())
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Enqueues a message on a dev queue.
    pub async fn enqueue(&self, queue: &str, message_id: Option<&str>, body: &[u8]) -> Result<u16> {
        let mut req = self
            .client
            .post(self.url(&format!("/dev/queues/{queue}")))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(id) = message_id {
            req = req.header("messageid", id);
        }
        Ok(req.send().await?.status().as_u16())
    }

    pub async fn queue(&self, queue: &str) -> Result<Value> {
        Ok(self
            .client
            .get(self.url(&format!("/dev/queues/{queue}")))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Waits until `queue` has no active or locked message (everything processed).
    pub async fn drain(&self, queue: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = self.queue(queue).await?;
            if q["stats"]["active"] == 0 && q["stats"]["locked"] == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("queue {queue} not drained: {q}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The alert de-duplication records (`alerts/*.json`) of the embedded
    /// store, once there are at least `n` of them and the `alerts` queue is
    /// drained; `None` when the state is in Blob Storage (`--storage`).
    pub async fn alert_records(&self, n: usize) -> Result<Option<Vec<Value>>> {
        let dir = self.state.join("store").join("alerts");
        if !self.state.join("store").exists() {
            return Ok(None);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let count = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
            if count >= n {
                break;
            }
            if Instant::now() > deadline {
                bail!("fewer than {n} alert records in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.drain("alerts").await?;
        let mut records = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                records.push(serde_json::from_slice(&std::fs::read(&path)?)?);
            }
        }
        Ok(Some(records))
    }

    /// Posts the example push (GitHub delivery id `delivery`) and its ACR
    /// image event (Event Grid id `event_id`), then waits for the run to
    /// settle in one of `until`.
    pub async fn push_and_image(
        &self,
        delivery: &str,
        event_id: &str,
        until: &[&str],
    ) -> Result<Value> {
        let (status, body) = self
            .github("push", delivery, &example("github-push.json"))
            .await?;
        assert_eq!(status, 202, "{body}");
        assert_eq!(
            self.enqueue(
                "registry-events",
                Some(event_id),
                &example("acr-image-pushed.json")
            )
            .await?,
            201
        );
        self.settle(until, &[]).await
    }

    /// Waits until the only run has one of `statuses`, and returns it.
    pub async fn settle(&self, statuses: &[&str], extra: &[&str]) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let runs = self.runs(extra)?;
            if let [run] = runs.as_slice()
                && statuses.contains(&run["status"].as_str().unwrap_or_default())
            {
                return Ok(run.clone());
            }
            if Instant::now() > deadline {
                bail!("no single run reached {statuses:?}: {runs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `gantry runs list --json` over the same state.
    pub fn runs(&self, extra: &[&str]) -> Result<Vec<Value>> {
        let out = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["runs", "list", "--json", "--state"])
            .arg(&self.state)
            .args(extra)
            .env_remove("GANTRY_STORAGE")
            .output()?;
        if !out.status.success() {
            bail!(
                "gantry runs list failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for DevHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
