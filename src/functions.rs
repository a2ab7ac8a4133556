//! The function registry: every function this binary hosts. `function.json`
//! folders, `host.json` and this list are checked against each other in tests.

use gantry_runtime::Function;

/// Every function, in a stable order.
pub fn all() -> Vec<Function> {
    vec![
        fn_github_webhook::function(),
        fn_registry_push::function(),
        fn_runs_api::function(),
    ]
}
