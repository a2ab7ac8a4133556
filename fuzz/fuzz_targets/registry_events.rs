//! ACR events (Event Grid and CloudEvents 1.0, one or an array) as they come
//! off the `registry-events` queue: the outer error and each item's error are
//! both fine, a panic is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(items) = gantry_events::acr::decode_registry_events(data) {
        for item in items {
            // Touch what registry-push reads so the decoded values are used.
            if let Ok(event) = item.event {
                let _ = format!("{event:?}");
            }
        }
    }
});
