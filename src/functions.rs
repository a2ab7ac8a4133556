//! The function registry: every function this binary hosts. `function.json`
//! folders, `host.json` and this list are checked against each other in tests
//! (through `gantry functions --json`).

use anyhow::Result;
use gantry_runtime::{Function, Trigger};

/// Every function, in a stable order.
pub fn all() -> Vec<Function> {
    vec![
        fn_github_webhook::function(),
        fn_registry_push::function(),
        fn_runs_api::function(),
        fn_scan_check::function(),
        fn_policy_enforce::function(),
        fn_deploy::function(),
        fn_alert::function(),
        fn_security_event::function(),
        fn_cluster_audit::function(),
    ]
}

fn describe(f: &Function) -> serde_json::Value {
    match &f.trigger {
        Trigger::Http { route, methods } => {
            serde_json::json!({"name": f.name, "trigger": "http", "route": route, "methods": methods})
        }
        Trigger::Queue {
            queue,
            binding,
            sessions,
        } => serde_json::json!({
            "name": f.name, "trigger": "serviceBus", "queue": queue, "binding": binding, "sessions": sessions
        }),
        Trigger::Timer { schedule } => {
            serde_json::json!({"name": f.name, "trigger": "timer", "schedule": schedule})
        }
    }
}

/// `gantry functions`.
pub fn print(json: bool) -> Result<()> {
    let list: Vec<_> = all().iter().map(describe).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!("{:<16}  {:<10}  DETAIL", "FUNCTION", "TRIGGER");
    for f in &list {
        let detail = match f["trigger"].as_str() {
            Some("http") => format!(
                "/api/{} {}",
                f["route"].as_str().unwrap_or(""),
                f["methods"]
            ),
            Some("serviceBus") => format!(
                "queue {} sessions={}",
                f["queue"].as_str().unwrap_or(""),
                f["sessions"]
            ),
            _ => format!("schedule {}", f["schedule"]),
        };
        println!(
            "{:<16}  {:<10}  {}",
            f["name"].as_str().unwrap_or(""),
            f["trigger"].as_str().unwrap_or(""),
            detail
        );
    }
    Ok(())
}
