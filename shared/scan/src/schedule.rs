//! When to look again for results that are not there yet.
//!
//! Defender scans an image "within a few hours" of its push, and CI may upload a
//! Trivy report after the push event arrives. Until results exist the scan step
//! is *pending*: it schedules its own message again (Service Bus
//! `ScheduledEnqueueTimeUtc`) at the time [`next_check`] returns. Pending never
//! turns into clean: once `max_wait` has passed since the image was first seen,
//! [`next_check`] returns `None` and the step fails closed (the image is blocked
//! with "no scan results").

use std::time::Duration;

use time::OffsetDateTime;

/// Delay before the first re-check (attempt 0).
pub const FIRST_DELAY: Duration = Duration::from_secs(60);

/// Longest delay between two checks: a result that arrives is noticed within
/// this long, without querying Resource Graph every minute for hours.
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);

/// When to check again for results of an image first seen at `first_seen`.
///
/// `attempt` counts the checks already found pending, from 0. The delay doubles
/// from [`FIRST_DELAY`]: 1 min, 2, 4, 8, then [`MAX_DELAY`] (15 min) for every
/// later attempt. The result is never later than `first_seen + max_wait`, so
/// the last check happens exactly at the deadline.
///
/// Returns `None` once `now >= first_seen + max_wait`: the caller must then
/// stop waiting and fail closed. Callers check first and ask for the next time
/// only when the check was still pending, so the check made *at* the deadline
/// still counts.
pub fn next_check(
    first_seen: OffsetDateTime,
    now: OffsetDateTime,
    attempt: u32,
    max_wait: Duration,
) -> Option<OffsetDateTime> {
    // A deadline past the end of the calendar is no deadline at all.
    let deadline = first_seen
        .checked_add(to_time(max_wait))
        .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
    if now >= deadline {
        return None;
    }
    // 2^attempt saturates long before it matters: anything past 2^4 is capped.
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    let delay = FIRST_DELAY.saturating_mul(factor).min(MAX_DELAY);
    let next = now.checked_add(to_time(delay)).unwrap_or(deadline);
    Some(next.min(deadline))
}

/// std → time duration, saturating (a `max_wait` of centuries is "forever").
fn to_time(d: Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}
