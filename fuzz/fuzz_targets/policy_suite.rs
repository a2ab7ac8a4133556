//! gator-style `suite.yaml` through the public entry point `run_suites`: the
//! input is the suite file, next to a fixed copy of the built-in `image-tag`
//! policy (template, constraint, sample objects), so suites that name those
//! files run real cases: template compile, constraint match, evaluation,
//! assertion checks (counts, `yes`/`no`, message regexes).
//!
//! Suites name files by path and `run_suites` reads them, so inputs naming
//! device or proc files (`/dev/zero` would read forever) are skipped: a suite
//! is operator input, like the policy folder itself, not attacker input.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const MAX_LEN: usize = 4096;

const FILES: &[(&str, &str)] = &[
    (
        "template.yaml",
        include_str!("../../policies/image-tag/template.yaml"),
    ),
    (
        "samples/image-tag/constraint.yaml",
        include_str!("../../policies/image-tag/samples/image-tag/constraint.yaml"),
    ),
    (
        "samples/image-tag/example_allowed.yaml",
        include_str!("../../policies/image-tag/samples/image-tag/example_allowed.yaml"),
    ),
    (
        "samples/image-tag/example_disallowed.yaml",
        include_str!("../../policies/image-tag/samples/image-tag/example_disallowed.yaml"),
    ),
];

fn suite_file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gantry-fuzz-suite-{}", std::process::id()));
        for (name, text) in FILES {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("create the fuzz temp folder");
            }
            std::fs::write(&path, text).expect("write a policy file");
        }
        dir.join("suite.yaml")
    })
}

fn names_special_files(data: &[u8]) -> bool {
    [&b"/dev"[..], b"/proc", b"/sys", b"\\"]
        .iter()
        .any(|needle| data.windows(needle.len()).any(|w| w == *needle))
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LEN || names_special_files(data) {
        return;
    }
    let path = suite_file();
    std::fs::write(path, data).expect("write the fuzz input");
    if let Ok(report) = gantry_policy::run_suites(path) {
        let _ = report.summary();
        let _ = report.is_success();
        for failure in &report.failures {
            let _ = failure.to_string();
        }
    }
});
