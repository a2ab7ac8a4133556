//! Contract between the code and the Functions host: `host.json`, every
//! `functions/<name>/function.json`, each function crate, and the registry the
//! binary reports (`gantry functions --json`) must agree, in both directions.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn registry() -> Result<BTreeMap<String, Value>> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["functions", "--json"])
        .output()?;
    assert!(out.status.success());
    let list: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .into_iter()
        .map(|f| (f["name"].as_str().unwrap_or_default().to_string(), f))
        .collect())
}

fn folders() -> Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("functions"))? {
        let dir = entry?.path();
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        out.insert(name, read_json(&dir.join("function.json"))?);
    }
    Ok(out)
}

#[test]
fn host_json_runs_gantry_serve_with_forwarding() -> Result<()> {
    let host = read_json(&root().join("host.json"))?;
    assert_eq!(host["version"], "2.0");
    let ch = &host["customHandler"];
    assert_eq!(ch["description"]["defaultExecutablePath"], "gantry");
    assert_eq!(ch["description"]["arguments"], serde_json::json!(["serve"]));
    assert_eq!(ch["enableForwardingHttpRequest"], true);
    assert_eq!(host["extensions"]["http"]["routePrefix"], "api");
    assert!(
        host["extensionBundle"]["id"]
            .as_str()
            .is_some_and(|s| s.contains("ExtensionBundle"))
    );
    // The host completes on 2xx and abandons on failure: gantry's error classes rely on it.
    assert_eq!(
        host["extensions"]["serviceBus"]["autoCompleteMessages"],
        true
    );
    Ok(())
}

#[test]
fn every_function_has_a_folder_and_every_folder_a_function() -> Result<()> {
    let registry = registry()?;
    let folders = folders()?;
    assert_eq!(
        registry.keys().collect::<Vec<_>>(),
        folders.keys().collect::<Vec<_>>(),
        "registry (gantry functions) and functions/ folders differ"
    );
    for (name, f) in &registry {
        let cargo =
            std::fs::read_to_string(root().join("functions").join(name).join("Cargo.toml"))?;
        assert!(
            cargo.contains(&format!("name = \"fn-{name}\"")),
            "{name}: package must be fn-{name}"
        );
        let bindings = folders[name]["bindings"].as_array().context("bindings")?;
        match f["trigger"].as_str() {
            Some("http") => {
                // Forwarding needs exactly one httpTrigger in and one http out.
                assert_eq!(bindings.len(), 2, "{name}");
                let trigger = bindings
                    .iter()
                    .find(|b| b["type"] == "httpTrigger")
                    .context("httpTrigger")?;
                assert!(
                    bindings
                        .iter()
                        .any(|b| b["type"] == "http" && b["direction"] == "out"),
                    "{name}"
                );
                assert_eq!(trigger["route"], f["route"], "{name}: route");
                assert_eq!(trigger["methods"], f["methods"], "{name}: methods");
                assert_eq!(
                    trigger["authLevel"], "anonymous",
                    "{name}: gantry authenticates itself"
                );
            }
            Some("serviceBus") => {
                assert_eq!(bindings.len(), 1, "{name}");
                let b = &bindings[0];
                assert_eq!(b["type"], "serviceBusTrigger", "{name}");
                assert_eq!(b["direction"], "in");
                assert_eq!(b["queueName"], f["queue"], "{name}: queue");
                assert_eq!(
                    b["name"], f["binding"],
                    "{name}: binding name is the Data key"
                );
                assert_eq!(b["isSessionsEnabled"], f["sessions"], "{name}: sessions");
                assert_eq!(
                    b["connection"], "ServiceBusConnection",
                    "{name}: connection setting"
                );
                let queue = f["queue"].as_str().context("queue")?;
                assert!(
                    gantry_bus::QUEUES.contains(&queue),
                    "{name}: unknown queue {queue}"
                );
                assert_eq!(
                    gantry_bus::SESSION_QUEUES.contains(&queue),
                    f["sessions"] == true,
                    "{name}: sessions must match the queue"
                );
            }
            Some("timer") => {
                assert_eq!(bindings.len(), 1, "{name}");
                assert_eq!(bindings[0]["type"], "timerTrigger");
                assert_eq!(bindings[0]["direction"], "in");
                assert_eq!(
                    bindings[0]["name"],
                    gantry_runtime::TIMER_BINDING,
                    "{name}: binding name is the Data key"
                );
                assert_eq!(bindings[0]["schedule"], f["schedule"]);
                // Every instance start would run a sweep otherwise.
                assert_eq!(bindings[0]["runOnStartup"], false, "{name}");
            }
            other => panic!("{name}: unknown trigger {other:?}"),
        }
    }
    Ok(())
}

/// The Functions host orders routes by function name, not by precedence, so
/// HTTP routes must not overlap: runs-api is constrained to its own areas.
#[test]
fn http_routes_do_not_overlap() -> Result<()> {
    let route = folders()?["runs-api"]["bindings"][0]["route"]
        .as_str()
        .context("route")?
        .to_string();
    let inner = route
        .split("regex(^(")
        .nth(1)
        .and_then(|s| s.split(")$)").next())
        .context("runs-api route has a regex constraint")?;
    let areas: Vec<&str> = inner.split('|').collect();
    assert_eq!(areas, fn_runs_api::AREAS);
    assert!(
        !areas.contains(&"github"),
        "runs-api must never match /api/github"
    );
    Ok(())
}
