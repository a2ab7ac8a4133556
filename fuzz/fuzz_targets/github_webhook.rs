//! The GitHub webhook as `github-webhook` handles it: the `X-Hub-Signature-256`
//! check over the exact body bytes, then the payload decode by `X-GitHub-Event`.
//!
//! Input layout: first byte picks the event header (push, ping, workflow_run,
//! anything else); if the rest holds a `\n`, the bytes before it are the
//! signature header (so malformed `sha256=` values get fuzzed) and the rest is
//! the body. Both the signature check and the decode run on every input.
#![no_main]

use gantry_events::github::GithubEvent;
use gantry_runtime::signature::{constant_time_eq, sign_sha256, verify_sha256};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-webhook-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let event = match selector % 4 {
        0 => "push",
        1 => "ping",
        2 => "workflow_run",
        _ => "check_suite",
    };
    let (header, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&rest[..i]).into_owned(),
            &rest[i + 1..],
        ),
        None => (String::new(), rest),
    };
    let _ = verify_sha256(SECRET, body, &header);
    // A correct signature must always verify, whatever the body.
    let good = sign_sha256(SECRET, body);
    assert!(verify_sha256(SECRET, body, &good));
    assert!(constant_time_eq(good.as_bytes(), good.as_bytes()));
    if let Ok(GithubEvent::WorkflowRun(run)) = GithubEvent::decode(event, body) {
        let _ = run.failed();
    }
});
