//! The one error type of the pipeline crate.

use gantry_store::StoreError;

use crate::names::NameError;

/// Why a pipeline operation failed. Variants are named after the operation.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading or writing state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored blob does not parse: someone wrote it by hand or a bug did.
    #[error("decoding {name} failed: {message}")]
    Decode {
        /// The blob.
        name: String,
        /// The parser's message.
        message: String,
    },
    /// Too many writers raced for the same blob; the caller should retry later.
    #[error("updating {name} failed: still contended after {attempts} attempts")]
    Contention {
        /// The blob.
        name: String,
        /// How many compare-and-swap attempts were made.
        attempts: u32,
    },
    /// A name from outside failed validation.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Reading `gantry.toml` failed.
    #[error("reading configuration {path} failed: {message}")]
    ReadConfig {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// `gantry.toml` is not valid; the message names the key.
    #[error("configuration {path} is invalid: {message}")]
    ParseConfig {
        /// The file (or `<embedded>`).
        path: String,
        /// What is wrong, naming the key.
        message: String,
    },
    /// A run update was refused by the caller's own rule (e.g. an illegal transition).
    #[error("updating run {run} refused: {reason}")]
    UpdateRefused {
        /// The run id.
        run: String,
        /// Why.
        reason: String,
    },
}

impl PipelineError {
    /// Whether retrying (or redelivering the triggering message) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Store(e) => e.is_transient(),
            PipelineError::Contention { .. } => true,
            PipelineError::Decode { .. }
            | PipelineError::Name(_)
            | PipelineError::ReadConfig { .. }
            | PipelineError::ParseConfig { .. }
            | PipelineError::UpdateRefused { .. } => false,
        }
    }
}
