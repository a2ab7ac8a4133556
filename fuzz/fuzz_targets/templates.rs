//! ConstraintTemplate (and Constraint) loading through the public entry point
//! `PolicySet::load(false, Some(file))`: multi-document YAML, template shape
//! checks, the Rego rewrite (renaming packages, `input.review` and
//! `data.inventory` references), regorus compilation of the rewritten
//! modules, then the constraints against the templates just loaded.
//!
//! `load` reads a path, so each input is written to one file in a private
//! temporary folder first. Compiling Rego is the slow part, so inputs are
//! kept tiny (4 KiB: `-max_len=4096` in `scripts/fuzz`); nothing is evaluated.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use gantry_policy::PolicySet;
use libfuzzer_sys::fuzz_target;

const MAX_LEN: usize = 4096;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("gantry-fuzz-templates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz temp folder");
        dir.join("policy.yaml")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LEN {
        return;
    }
    let path = file();
    std::fs::write(path, data).expect("write the fuzz input");
    if let Ok(set) = PolicySet::load(false, Some(path)) {
        let _ = set.templates();
        let _ = set.constraints();
    }
});
