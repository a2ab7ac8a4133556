//! `gantry.toml`: `Config::parse` on any UTF-8 text (TOML syntax, then the
//! semantic checks: names, durations, AKS ids, alert routes, ...).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = gantry_pipeline::Config::parse(text, "fuzz/gantry.toml") {
        // The accessors the functions call on every event must hold up on
        // whatever configuration passed validation.
        for app in &config.apps {
            let _ = config.scan_settings(app);
            let _ = app.image_parts();
            let _ = app.namespace();
            let _ = app.tracks_ref("refs/heads/main");
        }
    }
});
