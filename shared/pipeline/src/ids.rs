//! Time-sortable run ids (ULID layout: 48-bit millisecond timestamp + 80 random
//! bits, lowercase Crockford base32).
//!
//! Sorting by id sorts by creation time, so "newest run of an app" and "list runs
//! newest first" are plain lexicographic operations on blob names.

use std::sync::Mutex;

use crate::names::{CROCKFORD, RunId};

/// Last id issued by this process: ids created in the same millisecond increment
/// the random part, so they still sort in creation order (ULID monotonicity).
/// A clock that steps back is clamped to the last timestamp, so ids never go backwards.
static LAST: Mutex<(u64, u128)> = Mutex::new((0, 0));

/// Generates a new run id for the instant `unix_ms`.
pub fn new_run_id(unix_ms: u64) -> RunId {
    let mut random = [0u8; 16];
    // getrandom only fails when the OS has no entropy source; a run id must
    // still be unique, so fall back to the clock's nanoseconds mixed in.
    if getrandom::fill(&mut random).is_err() {
        let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as u128;
        random = nanos.to_le_bytes();
    }
    let mut rand = u128::from_le_bytes(random) & ((1u128 << 80) - 1);
    {
        let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
        let ms = unix_ms.max(last.0);
        if ms == last.0 && rand <= last.1 {
            rand = (last.1 + 1) & ((1u128 << 80) - 1);
        }
        *last = (ms, rand);
        let value = ((ms as u128) << 80) | rand;
        let mut out = [0u8; 26];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (25 - i);
            *slot = CROCKFORD[((value >> shift) & 31) as usize];
        }
        let id = String::from_utf8_lossy(&out).into_owned();
        RunId::parse(&id)
            .unwrap_or_else(|_| unreachable!("encoder emits only Crockford characters"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_unique() {
        let mut ids: Vec<RunId> = (0..1000)
            .map(|i| new_run_id(8_000_000_000_000 + i / 10))
            .collect();
        let sorted = {
            let mut s = ids.clone();
            s.sort();
            s
        };
        assert_eq!(ids, sorted, "ids issued in order must sort in order");
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        // Far in the future, so ids other tests issue concurrently never clamp these.
        assert_eq!(ids[0].timestamp_ms(), 8_000_000_000_000);
    }
}
