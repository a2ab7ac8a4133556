//! Service Bus semantics of the embedded queue, driven by a manual clock so lock
//! expiry, scheduling and the dedup window need no sleeping.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use gantry_bus::{
    BusError, Clock, EmbeddedBus, MessageBus, MessageState, OutMessage, QueueOptions, QueueStats,
};
use time::OffsetDateTime;

/// A clock that moves only when told to.
struct ManualClock(Mutex<OffsetDateTime>);

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(ManualClock(Mutex::new(
            time::macros::datetime!(2026-03-01 12:00:00 UTC),
        )))
    }

    fn advance(&self, by: Duration) {
        let mut now = self.0.lock().expect("clock");
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.0.lock().expect("clock")
    }
}

fn options() -> QueueOptions {
    QueueOptions {
        lock_duration: Duration::from_secs(30),
        max_delivery_count: 3,
        duplicate_detection_window: Duration::from_secs(600),
    }
}

async fn open(dir: &Path, clock: &Arc<ManualClock>) -> Result<EmbeddedBus> {
    Ok(EmbeddedBus::open_with_clock(dir, options(), clock.clone()).await?)
}

fn message(queue: &str, body: &str) -> OutMessage {
    OutMessage {
        queue: queue.to_string(),
        body: body.as_bytes().to_vec(),
        message_id: None,
        session_id: None,
        scheduled_enqueue_time: None,
        properties: BTreeMap::new(),
    }
}

fn body(received: &gantry_bus::Received) -> String {
    String::from_utf8_lossy(&received.body).into_owned()
}

#[tokio::test]
async fn received_message_is_invisible_until_completed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "one").with_property("run-id", "r1"))
        .await?;

    let got = bus.receive("scan").await?.context("a message")?;
    assert_eq!(body(&got), "one");
    assert_eq!(got.delivery_count, 1);
    assert_eq!(got.sequence_number, 1);
    assert_eq!(got.properties.get("run-id").map(String::as_str), Some("r1"));
    assert_eq!(got.locked_until, clock.now() + Duration::from_secs(30));
    assert!(
        bus.receive("scan").await?.is_none(),
        "locked message must be invisible"
    );
    assert_eq!(
        bus.stats("scan").await,
        QueueStats {
            active: 0,
            scheduled: 0,
            locked: 1,
            dead_lettered: 0
        }
    );

    bus.complete(&got.lock).await?;
    assert!(bus.receive("scan").await?.is_none());
    assert_eq!(bus.stats("scan").await, QueueStats::default());
    // Settling twice is an error, like a lost lock on Service Bus.
    let again = bus.complete(&got.lock).await;
    assert!(matches!(again, Err(BusError::Settle { .. })), "{again:?}");
    Ok(())
}

#[tokio::test]
async fn lock_expiry_redelivers_and_rejects_the_stale_lock() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("policy", "p")).await?;

    let first = bus.receive("policy").await?.context("first delivery")?;
    assert_eq!(bus.next_due("policy").await, Some(first.locked_until));
    clock.advance(Duration::from_secs(29));
    assert!(bus.receive("policy").await?.is_none(), "lock still held");
    clock.advance(Duration::from_secs(1));

    let stale = bus.complete(&first.lock).await;
    assert!(matches!(stale, Err(BusError::Settle { .. })), "{stale:?}");
    let second = bus.receive("policy").await?.context("redelivery")?;
    assert_eq!(second.delivery_count, 2);
    assert_eq!(second.message_id, first.message_id);
    assert_ne!(second.lock, first.lock);
    // The old token cannot settle the new delivery either.
    assert!(bus.abandon(&first.lock).await.is_err());
    bus.complete(&second.lock).await?;
    Ok(())
}

#[tokio::test]
async fn renewing_extends_the_lock() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "r")).await?;
    let got = bus.receive("scan").await?.context("message")?;
    clock.advance(Duration::from_secs(20));
    let until = bus.renew_lock(&got.lock).await?;
    assert_eq!(until, clock.now() + Duration::from_secs(30));
    clock.advance(Duration::from_secs(20));
    assert!(
        bus.receive("scan").await?.is_none(),
        "renewed lock still held"
    );
    bus.complete(&got.lock).await?;
    Ok(())
}

#[tokio::test]
async fn unknown_lock_tokens_fail_to_settle() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    let forged: gantry_bus::LockToken = "scan:1:00ff".parse()?;
    assert!(matches!(
        bus.complete(&forged).await,
        Err(BusError::Settle { .. })
    ));
    let unknown_queue: gantry_bus::LockToken = "nope:1:00ff".parse()?;
    assert!(matches!(
        bus.complete(&unknown_queue).await,
        Err(BusError::Settle { .. })
    ));
    assert!("garbage".parse::<gantry_bus::LockToken>().is_err());

    bus.send(message("scan", "x")).await?;
    let got = bus.receive("scan").await?.context("message")?;
    let round_trip: gantry_bus::LockToken = got.lock.to_string().parse()?;
    assert_eq!(round_trip, got.lock);
    bus.complete(&round_trip).await?;
    Ok(())
}

#[tokio::test]
async fn abandon_redelivers_then_dead_letters_after_max_deliveries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("alerts", "flaky").with_id("a-1")).await?;

    for attempt in 1..=3 {
        let got = bus.receive("alerts").await?.context("delivery")?;
        assert_eq!(got.delivery_count, attempt);
        bus.abandon(&got.lock).await?;
    }
    assert!(
        bus.receive("alerts").await?.is_none(),
        "dead-lettered after 3 deliveries"
    );
    let dead = bus.dead_letters("alerts").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "MaxDeliveryCountExceeded");
    assert_eq!(dead[0].delivery_count, 3);
    assert_eq!(dead[0].message_id, "a-1");
    assert_eq!(dead[0].body, "flaky");
    assert_eq!(bus.stats("alerts").await.dead_lettered, 1);
    Ok(())
}

#[tokio::test]
async fn lock_expiry_counts_as_a_failed_delivery() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "hangs")).await?;
    for _ in 0..3 {
        bus.receive("scan").await?.context("delivery")?;
        clock.advance(Duration::from_secs(31));
    }
    assert!(bus.receive("scan").await?.is_none());
    let dead = bus.dead_letters("scan").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "MaxDeliveryCountExceeded");
    Ok(())
}

#[tokio::test]
async fn explicit_dead_letter_keeps_reason_and_description() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("registry-events", "{bad")).await?;
    let got = bus.receive("registry-events").await?.context("message")?;
    bus.dead_letter(&got.lock, "InvalidPayload", "not JSON")
        .await?;
    let dead = bus.dead_letters("registry-events").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "InvalidPayload");
    assert_eq!(dead[0].description, "not JSON");
    assert_eq!(dead[0].dead_lettered_time, clock.now());
    assert!(bus.peek("registry-events").await.is_empty());
    assert!(bus.complete(&got.lock).await.is_err(), "already settled");
    Ok(())
}

#[tokio::test]
async fn scheduled_message_waits_for_its_time() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    let at = clock.now() + Duration::from_secs(90);
    bus.send(
        message("deploy", "verify")
            .with_session("web")
            .scheduled_at(at),
    )
    .await?;

    assert!(bus.receive("deploy").await?.is_none());
    assert_eq!(bus.next_due("deploy").await, Some(at));
    assert_eq!(bus.stats("deploy").await.scheduled, 1);
    assert_eq!(bus.peek("deploy").await[0].state, MessageState::Scheduled);
    clock.advance(Duration::from_secs(89));
    assert!(bus.receive("deploy").await?.is_none(), "one second early");
    clock.advance(Duration::from_secs(1));
    let got = bus.receive("deploy").await?.context("due now")?;
    assert_eq!(body(&got), "verify");
    assert_eq!(got.session_id.as_deref(), Some("web"));
    Ok(())
}

#[tokio::test]
async fn duplicate_message_id_is_dropped_within_the_window() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "first").with_id("evt-1")).await?;
    clock.advance(Duration::from_secs(599));
    bus.send(message("scan", "dup").with_id("evt-1")).await?;
    assert_eq!(
        bus.peek("scan").await.len(),
        1,
        "duplicate dropped silently"
    );

    // Dedup is per queue.
    bus.send(message("policy", "other queue").with_id("evt-1"))
        .await?;
    assert_eq!(bus.peek("policy").await.len(), 1);

    // Completing the original does not forget its id: the window runs from the send.
    let got = bus.receive("scan").await?.context("first")?;
    bus.complete(&got.lock).await?;
    bus.send(message("scan", "dup again").with_id("evt-1"))
        .await?;
    assert!(bus.peek("scan").await.is_empty());

    clock.advance(Duration::from_secs(1));
    bus.send(message("scan", "after window").with_id("evt-1"))
        .await?;
    let views = bus.peek("scan").await;
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].body, "after window");
    Ok(())
}

#[tokio::test]
async fn messages_without_id_get_unique_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "a")).await?;
    bus.send(message("scan", "b")).await?;
    let views = bus.peek("scan").await;
    assert_eq!(views.len(), 2, "no id means no dedup");
    assert!(!views[0].message_id.is_empty());
    assert_ne!(views[0].message_id, views[1].message_id);
    Ok(())
}

#[tokio::test]
async fn non_session_queue_is_fifo_by_sequence_number() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    for i in 0..5 {
        bus.send(message("scan", &format!("m{i}"))).await?;
    }
    let mut seen = Vec::new();
    while let Some(got) = bus.receive("scan").await? {
        seen.push((got.sequence_number, body(&got)));
    }
    let expected: Vec<(i64, String)> = (0..5).map(|i| (i + 1, format!("m{i}"))).collect();
    assert_eq!(seen, expected, "all five in flight at once, in order");
    Ok(())
}

#[tokio::test]
async fn session_messages_are_delivered_one_at_a_time_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    for (session, text) in [("web", "w1"), ("api", "a1"), ("web", "w2"), ("api", "a2")] {
        bus.send(message("deploy", text).with_session(session))
            .await?;
    }

    // Both sessions proceed in parallel, but only their heads.
    let w1 = bus.receive("deploy").await?.context("web head")?;
    let a1 = bus.receive("deploy").await?.context("api head")?;
    assert_eq!((body(&w1).as_str(), body(&a1).as_str()), ("w1", "a1"));
    assert!(bus.receive("deploy").await?.is_none(), "both sessions busy");

    // An abandoned head stays at the head.
    bus.abandon(&w1.lock).await?;
    let w1_again = bus.receive("deploy").await?.context("web head again")?;
    assert_eq!(body(&w1_again), "w1");
    assert_eq!(w1_again.delivery_count, 2);
    bus.complete(&w1_again.lock).await?;
    let w2 = bus.receive("deploy").await?.context("web next")?;
    assert_eq!(body(&w2), "w2");

    // A dead-lettered head frees its session too.
    bus.dead_letter(&a1.lock, "Test", "drop it").await?;
    let a2 = bus.receive("deploy").await?.context("api next")?;
    assert_eq!(body(&a2), "a2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_receivers_never_hold_two_messages_of_one_session() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open(dir.path(), QueueOptions::default()).await?;
    let sessions = ["web", "api", "worker"];
    for i in 0..8 {
        for session in sessions {
            bus.send(message("deploy", &format!("{session}-{i}")).with_session(session))
                .await?;
        }
    }
    let total = 8 * sessions.len();

    #[derive(Default)]
    struct Observed {
        in_flight: HashMap<String, usize>,
        max_sessions_in_flight: usize,
        order: HashMap<String, Vec<i64>>,
        done: usize,
    }
    let observed = Arc::new(Mutex::new(Observed::default()));
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (bus, observed) = (bus.clone(), observed.clone());
        workers.push(tokio::spawn(async move {
            loop {
                if observed.lock().expect("lock").done == total {
                    return Ok::<(), anyhow::Error>(());
                }
                let Some(got) = bus.receive("deploy").await? else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let session = got.session_id.clone().context("session")?;
                {
                    let mut seen = observed.lock().expect("lock");
                    let count = seen.in_flight.entry(session.clone()).or_default();
                    *count += 1;
                    ensure!(*count == 1, "two messages of session {session} in flight");
                    let busy = seen.in_flight.values().filter(|n| **n > 0).count();
                    seen.max_sessions_in_flight = seen.max_sessions_in_flight.max(busy);
                    seen.order
                        .entry(session.clone())
                        .or_default()
                        .push(got.sequence_number);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
                {
                    let mut seen = observed.lock().expect("lock");
                    *seen.in_flight.entry(session).or_default() -= 1;
                    seen.done += 1;
                }
                bus.complete(&got.lock).await?;
            }
        }));
    }
    for worker in workers {
        worker.await??;
    }
    let seen = observed.lock().expect("lock");
    for (session, order) in &seen.order {
        assert_eq!(order.len(), 8, "{session}");
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "{session} out of order: {order:?}"
        );
    }
    assert!(
        seen.max_sessions_in_flight > 1,
        "sessions should proceed in parallel"
    );
    Ok(())
}

#[tokio::test]
async fn state_survives_reopening_the_directory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let scheduled_at = clock.now() + Duration::from_secs(300);
    {
        let bus = open(dir.path(), &clock).await?;
        bus.send(message("scan", "retried").with_id("s-1")).await?;
        bus.send(message("scan", "plain").with_property("k", "v"))
            .await?;
        bus.send(message("scan", "later").scheduled_at(scheduled_at))
            .await?;
        bus.send(message("alerts", "poison")).await?;
        let got = bus.receive("scan").await?.context("retried")?;
        bus.abandon(&got.lock).await?;
        let poison = bus.receive("alerts").await?.context("poison")?;
        bus.dead_letter(&poison.lock, "Bad", "cannot parse").await?;
    }

    let bus = open(dir.path(), &clock).await?;
    let views = bus.peek("scan").await;
    let summary: Vec<(i64, &str, u32)> = views
        .iter()
        .map(|v| (v.sequence_number, v.body.as_str(), v.delivery_count))
        .collect();
    assert_eq!(
        summary,
        vec![(1, "retried", 1), (2, "plain", 0), (3, "later", 0)]
    );
    assert_eq!(views[1].properties.get("k").map(String::as_str), Some("v"));
    assert_eq!(views[2].scheduled_enqueue_time, Some(scheduled_at));
    assert_eq!(views[0].enqueued_time, clock.now());

    let dead = bus.dead_letters("alerts").await;
    assert_eq!((dead.len(), dead[0].reason.as_str()), (1, "Bad"));
    assert_eq!(dead[0].description, "cannot parse");

    // The dedup id survived, and sequence numbers continue.
    bus.send(message("scan", "dup").with_id("s-1")).await?;
    assert_eq!(bus.peek("scan").await.len(), 3);
    bus.send(message("scan", "new")).await?;
    assert_eq!(
        bus.peek("scan").await.last().map(|v| v.sequence_number),
        Some(4)
    );

    let got = bus.receive("scan").await?.context("retried again")?;
    assert_eq!((body(&got).as_str(), got.delivery_count), ("retried", 2));
    Ok(())
}

#[tokio::test]
async fn sequence_numbers_are_not_reused_after_the_queue_drains() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    {
        let bus = open(dir.path(), &clock).await?;
        bus.send(message("scan", "a")).await?;
        let got = bus.receive("scan").await?.context("a")?;
        bus.complete(&got.lock).await?;
    }
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "b")).await?;
    assert_eq!(bus.peek("scan").await[0].sequence_number, 2);
    Ok(())
}

#[tokio::test]
async fn locks_do_not_survive_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let old_lock = {
        let bus = open(dir.path(), &clock).await?;
        bus.send(message("policy", "in flight")).await?;
        bus.receive("policy").await?.context("message")?.lock
    };
    let bus = open(dir.path(), &clock).await?;
    let got = bus
        .receive("policy")
        .await?
        .context("deliverable again at once")?;
    assert_eq!(got.delivery_count, 2, "the lost delivery still counts");
    assert!(bus.complete(&old_lock).await.is_err());
    bus.complete(&got.lock).await?;
    Ok(())
}

#[tokio::test]
async fn a_lost_lock_on_the_last_delivery_dead_letters_on_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    {
        let bus = open(dir.path(), &clock).await?;
        bus.send(message("scan", "crashes the worker")).await?;
        for _ in 0..2 {
            let got = bus.receive("scan").await?.context("delivery")?;
            bus.abandon(&got.lock).await?;
        }
        bus.receive("scan").await?.context("last delivery")?;
    }
    let bus = open(dir.path(), &clock).await?;
    assert!(bus.receive("scan").await?.is_none());
    assert_eq!(
        bus.dead_letters("scan").await[0].reason,
        "MaxDeliveryCountExceeded"
    );
    Ok(())
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_up_on_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    {
        let bus = open(dir.path(), &clock).await?;
        bus.send(message("scan", "dead")).await?;
        let got = bus.receive("scan").await?.context("message")?;
        bus.dead_letter(&got.lock, "Bad", "x").await?;
    }
    let queue = dir.path().join("scan");
    let name = "00000000000000000001.json";
    // A crash between writing the dead letter and removing the live copy...
    std::fs::copy(
        queue.join("deadletter").join(name),
        queue.join("messages").join(name),
    )?;
    // ...and one in the middle of writing a temp file (never renamed into place).
    std::fs::write(
        dir.path().join(".tmp").join("123-0.tmp"),
        b"{\"sequence_num",
    )?;

    let bus = open(dir.path(), &clock).await?;
    assert!(
        bus.peek("scan").await.is_empty(),
        "dead letter wins over the live copy"
    );
    assert_eq!(bus.dead_letters("scan").await.len(), 1);
    assert!(!queue.join("messages").join(name).exists());
    assert_eq!(std::fs::read_dir(dir.path().join(".tmp"))?.count(), 0);
    Ok(())
}

#[tokio::test]
async fn message_files_are_json_with_the_sequence_number_as_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(message("scan", "hello").with_id("m-1")).await?;
    let path = dir.path().join("scan/messages/00000000000000000001.json");
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    assert_eq!(stored["message_id"], "m-1");
    assert_eq!(stored["delivery_count"], 0);
    assert_eq!(stored["body"], "aGVsbG8=");
    let dedup = std::fs::read_to_string(dir.path().join("scan/dedup.jsonl"))?;
    assert!(dedup.contains("\"m-1\""), "{dedup}");
    Ok(())
}

#[tokio::test]
async fn send_validates_the_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    let unknown = bus.send(message("nope", "x")).await;
    assert!(
        matches!(unknown, Err(BusError::InvalidMessage { .. })),
        "{unknown:?}"
    );
    let no_session = bus.send(message("deploy", "x")).await;
    assert!(matches!(no_session, Err(BusError::InvalidMessage { .. })));
    let bad_property = bus
        .send(message("scan", "x").with_property("Run Id", "1"))
        .await;
    assert!(matches!(bad_property, Err(BusError::InvalidMessage { .. })));
    assert!(bus.receive("nope").await.is_err());
    assert_eq!(bus.stats("nope").await, QueueStats::default());
    Ok(())
}

#[tokio::test]
async fn views_serialise_for_the_dev_endpoints() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new();
    let bus = open(dir.path(), &clock).await?;
    bus.send(
        message("deploy", "{\"app\":\"web\"}")
            .with_session("web")
            .with_id("d-1"),
    )
    .await?;
    let got = bus.receive("deploy").await?.context("message")?;
    let view = serde_json::to_value(bus.peek("deploy").await)?;
    assert_eq!(view[0]["state"], "locked");
    assert_eq!(view[0]["session_id"], "web");
    assert_eq!(view[0]["body"], "{\"app\":\"web\"}");
    assert_eq!(view[0]["enqueued_time"], "2026-03-01T12:00:00Z");
    assert_eq!(view[0]["locked_until"], "2026-03-01T12:00:30Z");
    let stats = serde_json::to_value(bus.stats("deploy").await)?;
    assert_eq!(
        stats,
        serde_json::json!({"active": 0, "scheduled": 0, "locked": 1, "dead_lettered": 0})
    );
    bus.dead_letter(&got.lock, "R", "D").await?;
    let dead = serde_json::to_value(bus.dead_letters("deploy").await)?;
    assert_eq!(dead[0]["reason"], "R");
    assert_eq!(dead[0]["description"], "D");
    Ok(())
}

#[tokio::test]
async fn notified_wakes_a_waiting_dispatcher_and_real_time_scheduling_works() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bus = EmbeddedBus::open(dir.path(), QueueOptions::default()).await?;

    // Dispatcher pattern: register first, then look, then wait.
    let wake = bus.notified();
    assert!(bus.receive("scan").await?.is_none());
    let sender = bus.clone();
    tokio::spawn(async move { sender.send(message("scan", "ping")).await });
    tokio::time::timeout(Duration::from_secs(5), wake)
        .await
        .context("send should notify")?;
    assert!(bus.receive("scan").await?.is_some());

    // With the wall clock: a message scheduled 150 ms ahead arrives after it.
    let at = OffsetDateTime::now_utc() + Duration::from_millis(150);
    bus.send(message("policy", "soon").scheduled_at(at)).await?;
    assert!(bus.receive("policy").await?.is_none());
    let due = bus.next_due("policy").await.context("due time")?;
    let wait = (due - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    tokio::time::sleep(wait.try_into()?).await;
    assert!(bus.receive("policy").await?.is_some());
    Ok(())
}
