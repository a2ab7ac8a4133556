//! The custom-handler invocation envelope the Functions host POSTs for queue
//! and timer triggers, decoded the way `gantry_runtime` does it: the JSON
//! `InvokeRequest`, the loose `Metadata` (double-encoded scalars, numbers as
//! strings), the trigger `Data` as text and as base64, and timer info.
#![no_main]

use gantry_runtime::envelope::{self, InvokeRequest, MessageMeta, TimerInfo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = serde_json::from_slice::<InvokeRequest>(data) else {
        return;
    };
    let _ = MessageMeta::from_metadata(&request.metadata);
    for key in request.metadata.keys() {
        let _ = envelope::meta_str(&request.metadata, key);
        let _ = envelope::meta_u64(&request.metadata, key);
    }
    // The binding names gantry uses, plus whatever the input carries.
    let mut bindings: Vec<&str> = vec!["message", "timer"];
    bindings.extend(request.data.keys().map(String::as_str));
    for binding in bindings {
        let _ = envelope::message_bytes(&request.data, binding, false);
        let _ = envelope::message_bytes(&request.data, binding, true);
        let _ = TimerInfo::from_data(&request.data, binding);
    }
});
