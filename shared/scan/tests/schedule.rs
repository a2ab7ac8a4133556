//! The re-check schedule while results are pending, and the fail-closed deadline.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gantry_scan::next_check;
use time::macros::datetime;

const MIN: time::Duration = time::Duration::minutes(1);

#[test]
fn delays_double_then_cap_at_fifteen_minutes() {
    let first_seen = datetime!(2026-11-03 09:00 UTC);
    let max_wait = Duration::from_secs(4 * 3600);
    let now = first_seen + 10 * MIN;
    let delays: Vec<i64> = (0..8)
        .map(|attempt| {
            let next = next_check(first_seen, now, attempt, max_wait).unwrap();
            (next - now).whole_minutes()
        })
        .collect();
    assert_eq!(delays, [1, 2, 4, 8, 15, 15, 15, 15]);
    // Huge attempt numbers do not overflow.
    let next = next_check(first_seen, now, u32::MAX, max_wait).unwrap();
    assert_eq!(next - now, 15 * MIN);
}

#[test]
fn never_later_than_the_deadline() {
    let first_seen = datetime!(2026-11-03 09:00 UTC);
    let max_wait = Duration::from_secs(30 * 60);
    let deadline = first_seen + 30 * MIN;
    let now = deadline - 5 * MIN;
    assert_eq!(next_check(first_seen, now, 6, max_wait), Some(deadline));
    // One second before the deadline there is still one check left: at the deadline.
    let now = deadline - time::Duration::seconds(1);
    assert_eq!(next_check(first_seen, now, 0, max_wait), Some(deadline));
}

#[test]
fn fails_closed_at_and_after_the_deadline() {
    let first_seen = datetime!(2026-11-03 09:00 UTC);
    let max_wait = Duration::from_secs(4 * 3600);
    let deadline = first_seen + time::Duration::hours(4);
    assert_eq!(next_check(first_seen, deadline, 3, max_wait), None);
    assert_eq!(
        next_check(first_seen, deadline + time::Duration::days(1), 0, max_wait),
        None
    );
    // No waiting at all: the first pending check already fails closed.
    assert_eq!(next_check(first_seen, first_seen, 0, Duration::ZERO), None);
}

#[test]
fn an_enormous_max_wait_is_no_deadline() {
    let first_seen = datetime!(2026-11-03 09:00 UTC);
    let now = first_seen + MIN;
    let next = next_check(first_seen, now, 0, Duration::MAX).unwrap();
    assert_eq!(next - now, MIN);
}
