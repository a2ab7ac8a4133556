//! The embedded on-disk store of `gantry dev`.
//!
//! Each blob is a plain file at `dir/name`, holding exactly the blob's bytes, so a
//! developer can read the run JSON with any editor. Writes go to a temporary file
//! in `dir/.tmp/`, are fsynced and then renamed into place, so a reader (or a
//! crash) never sees half a blob.
//!
//! The ETag is the hex SHA-256 of the body. That makes compare-and-swap
//! *value-based*: `replace` succeeds when the current content is byte-for-byte the
//! content the caller read. If a blob went A → B → A in between, the caller's
//! update still applies — which is correct, because the caller computed it from
//! A and the blob *is* A: the outcome is the same as if the caller had read after
//! the last write. No update derived from stale content can slip through, which
//! is all the ETag protocol promises. Hashing needs no side metadata that could
//! drift from the file, and survives restarts and hand edits.
//!
//! Concurrency: mutations of one directory are serialized by a per-directory
//! tokio mutex shared by every [`FsStore`] opened on it *in this process*, which
//! makes create-if-absent and replace-if-match atomic. Two processes writing to
//! the same directory are not supported (`gantry dev` runs one).
//!
//! Filesystem limits that Blob Storage does not have: a name cannot be both a blob
//! and a "directory" (`a` and `a/b`), and the first segment `.tmp` is reserved.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::{Etag, Page, StateStore, StoreError, Versioned, validate_name};

/// The directory (under the store's root) holding in-flight writes.
const TMP_DIR: &str = ".tmp";

/// Most names one `list` page returns, matching Blob Storage's limit.
const MAX_PAGE: u32 = 5000;

/// An ETag-guarded blob store in a local directory.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
    lock: Arc<Mutex<()>>,
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `dir`.
    ///
    /// Synchronous on purpose: it runs once at start-up, before any request is
    /// served, and creating two directories does not warrant an async signature.
    pub fn open(dir: impl Into<PathBuf>) -> Result<FsStore, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join(TMP_DIR)).map_err(|e| {
            open_error(format!(
                "cannot create the store directory {}: {e}",
                dir.display()
            ))
        })?;
        // Canonical, so that two spellings of one directory share one lock.
        let root = std::fs::canonicalize(&dir)
            .map_err(|e| open_error(format!("cannot resolve {}: {e}", dir.display())))?;
        let lock = lock_for(&root);
        Ok(FsStore { root, lock })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Validates `name` and maps it to its file.
    fn path_of(&self, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(name)?;
        if name == TMP_DIR || name.starts_with(".tmp/") {
            return Err(StoreError::InvalidName {
                name: name.to_string(),
                reason: "the first segment .tmp is reserved by the on-disk store",
            });
        }
        Ok(self.root.join(name))
    }
}

/// One mutex per canonical directory, so that every `FsStore` on the same
/// directory in this process serializes against the others.
fn lock_for(root: &Path) -> Arc<Mutex<()>> {
    static LOCKS: OnceLock<StdMutex<HashMap<PathBuf, Weak<Mutex<()>>>>> = OnceLock::new();
    let mut locks = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(lock) = locks.get(root).and_then(Weak::upgrade) {
        return lock;
    }
    locks.retain(|_, weak| weak.strong_count() > 0);
    let lock = Arc::new(Mutex::new(()));
    locks.insert(root.to_path_buf(), Arc::downgrade(&lock));
    lock
}

fn open_error(message: String) -> StoreError {
    StoreError::Open { message }
}

fn etag_of(body: &[u8]) -> Etag {
    Etag::new(hex::encode(Sha256::digest(body)))
}

/// Whether an IO error may go away by itself. Most local failures (permissions,
/// a full disk, a name clash with a directory) need a human, so only the
/// classic "try again" kinds count.
fn io_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut
    )
}

/// Runs blocking filesystem work off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<std::io::Result<T>, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("filesystem task failed: {e}"))
}

/// Reads a blob; a missing file (or a directory standing where a blob would be,
/// which Blob Storage would also call missing) is `None`.
fn read_blob(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(body) => Ok(Some(body)),
        Err(e)
            if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
                || path.is_dir() =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Writes `body` to a fresh temporary file in `root/.tmp` and fsyncs it.
fn write_temp(root: &Path, body: &[u8]) -> std::io::Result<PathBuf> {
    let mut random = [0u8; 12];
    getrandom::fill(&mut random).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = root.join(TMP_DIR).join(hex::encode(random));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = file.write_all(body).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// Atomically puts `body` at `path`: temp file, fsync, rename, fsync the parent
/// (so the rename itself survives a power cut).
fn write_atomic(root: &Path, path: &Path, body: &[u8]) -> std::io::Result<()> {
    let parent = path.parent().unwrap_or(root);
    std::fs::create_dir_all(parent)?;
    let tmp = write_temp(root, body)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> std::io::Result<()> {
    // Directories cannot be opened for fsync on other platforms; the rename is
    // still atomic, only its durability on power loss is weaker.
    Ok(())
}

/// Collects every blob name under `root` that starts with `prefix`.
///
/// Only descends into directories whose path is compatible with the prefix, so
/// listing `runs/web/` does not walk `audit/`.
fn collect_names(root: &Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed (or replaced by a file) while we walked: nothing to list there.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                continue;
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue; // not UTF-8: not something this store wrote
            };
            if rel.is_empty() && file_name == TMP_DIR {
                continue;
            }
            let name = format!("{rel}{file_name}");
            if entry.file_type()?.is_dir() {
                let dir_prefix = format!("{name}/");
                if dir_prefix.starts_with(prefix) || prefix.starts_with(&dir_prefix) {
                    stack.push((entry.path(), dir_prefix));
                }
            } else if name.starts_with(prefix) && validate_name(&name).is_ok() {
                names.push(name);
            }
        }
    }
    Ok(names)
}

#[async_trait]
impl StateStore for FsStore {
    async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError> {
        let path = self.path_of(name)?;
        let err = |message: String, transient| StoreError::Get {
            name: name.to_string(),
            message,
            transient,
        };
        // Held so that a read never sees half of a concurrent append.
        let _guard = self.lock.lock().await;
        let body = blocking(move || read_blob(&path))
            .await
            .map_err(|m| err(m, false))?
            .map_err(|e| err(e.to_string(), io_transient(&e)))?;
        Ok(body.map(|body| Versioned {
            etag: etag_of(&body),
            body,
        }))
    }

    async fn create(&self, name: &str, body: &[u8]) -> Result<Etag, StoreError> {
        let path = self.path_of(name)?;
        let err = |message: String, transient| StoreError::Put {
            name: name.to_string(),
            message,
            transient,
        };
        let etag = etag_of(body);
        let body = body.to_vec();
        let root = self.root.clone();
        let _guard = self.lock.lock().await;
        let created = blocking(move || {
            if std::fs::symlink_metadata(&path).is_ok() {
                return Ok(false);
            }
            write_atomic(&root, &path, &body).map(|()| true)
        })
        .await
        .map_err(|m| err(m, false))?
        .map_err(|e| err(e.to_string(), io_transient(&e)))?;
        if created {
            Ok(etag)
        } else {
            Err(StoreError::Conflict {
                name: name.to_string(),
            })
        }
    }

    async fn replace(&self, name: &str, body: &[u8], etag: &Etag) -> Result<Etag, StoreError> {
        let path = self.path_of(name)?;
        let err = |message: String, transient| StoreError::Put {
            name: name.to_string(),
            message,
            transient,
        };
        let new_etag = etag_of(body);
        let expected = etag.clone();
        let body = body.to_vec();
        let root = self.root.clone();
        let _guard = self.lock.lock().await;
        let replaced = blocking(move || {
            match read_blob(&path)? {
                Some(current) if etag_of(&current) == expected => {}
                _ => return Ok(false),
            }
            write_atomic(&root, &path, &body).map(|()| true)
        })
        .await
        .map_err(|m| err(m, false))?
        .map_err(|e| err(e.to_string(), io_transient(&e)))?;
        if replaced {
            Ok(new_etag)
        } else {
            Err(StoreError::Conflict {
                name: name.to_string(),
            })
        }
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<&str>,
        max: u32,
    ) -> Result<Page, StoreError> {
        let err = |message: String, transient| StoreError::List {
            prefix: prefix.to_string(),
            message,
            transient,
        };
        let max = max.clamp(1, MAX_PAGE) as usize;
        let root = self.root.clone();
        let owned_prefix = prefix.to_string();
        // No lock: renames are atomic, so a concurrent write shows up either whole
        // or not at all, and the temp directory is never listed.
        let mut names = blocking(move || collect_names(&root, &owned_prefix))
            .await
            .map_err(|m| err(m, false))?
            .map_err(|e| err(e.to_string(), io_transient(&e)))?;
        names.sort_unstable();
        let start = match continuation {
            Some(after) => names.partition_point(|n| n.as_str() <= after),
            None => 0,
        };
        let mut page: Vec<String> = names.drain(start..).take(max + 1).collect();
        let next = if page.len() > max {
            page.truncate(max);
            page.last().cloned()
        } else {
            None
        };
        Ok(Page { names: page, next })
    }

    async fn append(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(name)?;
        let err = |message: String, transient| StoreError::Append {
            name: name.to_string(),
            message,
            transient,
        };
        let data = data.to_vec();
        let root = self.root.clone();
        let _guard = self.lock.lock().await;
        blocking(move || {
            std::fs::create_dir_all(path.parent().unwrap_or(&root))?;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)?;
            // One write_all under the lock: appends never interleave in-process,
            // and O_APPEND keeps each at the end even if a human edits the file.
            file.write_all(&data)?;
            file.sync_data()
        })
        .await
        .map_err(|m| err(m, false))?
        .map_err(|e| err(e.to_string(), io_transient(&e)))
    }
}
