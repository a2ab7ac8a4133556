//! Defender for Cloud security alerts and sub-assessments (both casings) as
//! they come off the `security-events` queue.
#![no_main]

use gantry_events::defender::{self, DefenderEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(events) = defender::decode(data) {
        for event in &events {
            let _ = event.id();
            if let DefenderEvent::Alert(alert) = event {
                // Digest extraction scans free text from the alert: fuzz it too.
                let _ = alert.digests();
            }
        }
    }
    // Also on arbitrary text directly (the alert's entities and descriptions).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = defender::find_digests(text);
    }
});
