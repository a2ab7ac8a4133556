//! The state store behind every gantry run.
//!
//! gantry keeps all of its state as small named blobs (see DESIGN.md §4). Every
//! read-modify-write is guarded by an ETag so that concurrent function instances
//! never overwrite each other silently: a writer that lost the race gets
//! [`StoreError::Conflict`], re-reads and retries.
//!
//! Two implementations share one contract (and one conformance test suite):
//! [`fs::FsStore`], the embedded on-disk store of `gantry dev`, and
//! [`blob::BlobStore`], Azure Blob Storage through the official SDK.

use async_trait::async_trait;

pub mod blob;
pub mod fs;

pub use blob::BlobStore;
pub use fs::FsStore;

/// An entity tag: an opaque version of one blob.
///
/// Normalised without surrounding quotes, because Azure returns ETags quoted from
/// uploads and downloads but unquoted from listings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Etag(String);

impl Etag {
    /// Wraps a raw ETag, stripping the quotes HTTP puts around it.
    pub fn new(raw: impl AsRef<str>) -> Self {
        Etag(raw.as_ref().trim_matches('"').to_string())
    }

    /// The ETag without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Etag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A blob's content together with the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The blob's bytes.
    pub body: Vec<u8>,
    /// The version of those bytes; pass it to [`StateStore::replace`].
    pub etag: Etag,
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Blob names in lexicographic order.
    pub names: Vec<String>,
    /// Pass to the next [`StateStore::list`] call; `None` on the last page.
    pub next: Option<String>,
}

/// Why a store operation failed.
///
/// Variants are named after the operation that failed. [`StoreError::is_transient`]
/// tells a caller whether retrying (or letting the host redeliver) can help.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name cannot be used as a blob name (empty, `..`, odd characters, too long).
    #[error("invalid blob name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Lost a race: the blob already exists (create) or changed since it was read
    /// (replace). Both HTTP 409 and 412 map here. Re-read and retry.
    #[error("lost the race on {name}: it already exists or changed since it was read")]
    Conflict {
        /// The contended blob.
        name: String,
    },
    /// Reading a blob failed.
    #[error("reading {name} failed: {message}")]
    Get {
        /// The blob.
        name: String,
        /// What went wrong (never contains credentials).
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// Creating or replacing a blob failed for a reason other than a lost race.
    #[error("writing {name} failed: {message}")]
    Put {
        /// The blob.
        name: String,
        /// What went wrong (never contains credentials).
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// Listing a prefix failed.
    #[error("listing {prefix:?} failed: {message}")]
    List {
        /// The listed prefix.
        prefix: String,
        /// What went wrong (never contains credentials).
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// Appending to a blob failed.
    #[error("appending to {name} failed: {message}")]
    Append {
        /// The blob.
        name: String,
        /// What went wrong (never contains credentials).
        message: String,
        /// Whether a retry may succeed.
        transient: bool,
    },
    /// The store could not be opened or configured.
    #[error("opening the state store failed: {message}")]
    Open {
        /// What went wrong (never contains credentials).
        message: String,
    },
}

impl StoreError {
    /// Whether retrying the operation (or redelivering the message) may succeed.
    ///
    /// A [`StoreError::Conflict`] counts as transient: the caller re-reads and retries.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::InvalidName { .. } | StoreError::Open { .. } => false,
            StoreError::Conflict { .. } => true,
            StoreError::Get { transient, .. }
            | StoreError::Put { transient, .. }
            | StoreError::List { transient, .. }
            | StoreError::Append { transient, .. } => *transient,
        }
    }
}

/// The longest blob name gantry writes; Azure allows 1,024 characters.
pub const MAX_NAME_LEN: usize = 1024;

/// Checks that `name` is safe as a blob name and as a relative file path.
///
/// Segments are separated by `/`; each must be non-empty, not `.` or `..`, and
/// made of `[A-Za-z0-9._:-]`. This is a last line of defence: callers validate
/// app names, digests and ids against stricter rules before building names.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidName {
            name: name.chars().take(200).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 1024 bytes");
    }
    for segment in name.split('/') {
        if segment.is_empty() {
            return bad("empty path segment");
        }
        if segment == "." || segment == ".." {
            return bad("relative path segment");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return bad("characters outside [A-Za-z0-9._:-]");
        }
    }
    Ok(())
}

/// A store of named blobs with optimistic concurrency.
///
/// Every implementation must pass the conformance suite in `tests/conformance.rs`.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Reads a blob and its ETag; `Ok(None)` when it does not exist.
    async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError>;

    /// Creates a blob only if it does not exist yet (`If-None-Match: *`).
    /// Returns [`StoreError::Conflict`] when it already exists.
    async fn create(&self, name: &str, body: &[u8]) -> Result<Etag, StoreError>;

    /// Replaces a blob only if it is still at `etag` (`If-Match`).
    /// Returns [`StoreError::Conflict`] when it changed or was deleted.
    async fn replace(&self, name: &str, body: &[u8], etag: &Etag) -> Result<Etag, StoreError>;

    /// Lists blob names starting with `prefix` in lexicographic order, at most
    /// `max` per page; pass the previous page's `next` to continue.
    ///
    /// `prefix` is a raw string prefix and may end mid-segment. `max` is clamped
    /// to 1..=5000 (Blob Storage's page limit), and a page may hold fewer than
    /// `max` names even when more follow: loop until `next` is `None`.
    async fn list(
        &self,
        prefix: &str,
        continuation: Option<&str>,
        max: u32,
    ) -> Result<Page, StoreError>;

    /// Appends `data` to a blob, creating it when absent. Concurrent appends never
    /// interleave within one call's data. Used for the audit trail (JSON lines).
    async fn append(&self, name: &str, data: &[u8]) -> Result<(), StoreError>;
}
