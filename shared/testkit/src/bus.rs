//! A message bus that fails on purpose.

use std::sync::Mutex;

use gantry_bus::{BusError, EmbeddedBus, MessageBus, OutMessage};

/// The embedded queue, with sends to one queue that can be made to fail
/// transiently, as Service Bus does when throttled: the tests of a step use
/// it to show that a failed send is retried, never lost or doubled.
pub struct FlakyBus {
    inner: EmbeddedBus,
    /// (queue, sends still to fail)
    fail: Mutex<Option<(String, u32)>>,
}

impl FlakyBus {
    /// Wraps `inner`; nothing fails until [`FlakyBus::fail_sends`].
    pub fn new(inner: EmbeddedBus) -> FlakyBus {
        FlakyBus {
            inner,
            fail: Mutex::new(None),
        }
    }

    /// The next `sends` sends to `queue` fail with a transient
    /// `BusError::Send` ("503 ServerBusy"); sends to other queues go through.
    pub fn fail_sends(&self, queue: &str, sends: u32) {
        *self.fail.lock().unwrap_or_else(|p| p.into_inner()) = Some((queue.to_string(), sends));
    }
}

#[async_trait::async_trait]
impl MessageBus for FlakyBus {
    async fn send(&self, message: OutMessage) -> Result<(), BusError> {
        {
            let mut fail = self.fail.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((queue, left)) = fail.as_mut()
                && *queue == message.queue
                && *left > 0
            {
                *left -= 1;
                return Err(BusError::Send {
                    queue: message.queue.clone(),
                    message: "503 ServerBusy (injected by the test)".into(),
                    transient: true,
                });
            }
        }
        self.inner.send(message).await
    }
}
