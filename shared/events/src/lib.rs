//! Typed events gantry receives.
//!
//! Payloads are *signals, not orders* (DESIGN.md §1): these types only carry
//! what gantry correlates on. Unknown fields are ignored (providers add fields
//! all the time), but every field gantry uses is required and typed, so a
//! malformed event fails here with an error naming the field.

pub mod acr;
pub mod defender;
pub mod github;

/// Why an event could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The payload is not JSON of the expected shape.
    #[error("decoding {what} failed: {message}")]
    Decode {
        /// Which event type was expected.
        what: &'static str,
        /// The parser's message (names the field and position).
        message: String,
    },
}

impl EventError {
    /// Bad input never gets better by retrying.
    pub fn is_transient(&self) -> bool {
        false
    }
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, EventError> {
    serde_json::from_slice(bytes).map_err(|e| EventError::Decode {
        what,
        message: e.to_string(),
    })
}
