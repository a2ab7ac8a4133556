//! One conformance suite for every `StateStore`.
//!
//! Each case is an async function over `Arc<dyn StateStore>`; the `conformance!`
//! macro instantiates all of them against `FsStore` (a temp dir) and against
//! `BlobStore` on a real Azurite (one per test binary, a fresh container per
//! test). Azurite missing is a failure, not a skip: CI installs it.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use gantry_store::{
    BlobStore, Etag, FsStore, MAX_NAME_LEN, Page, StateStore, StoreError, Versioned,
};
use gantry_testkit::{Azurite, free_port, unique_name};
use tokio::sync::Barrier;

type Store = Arc<dyn StateStore>;

// ---------------------------------------------------------------------------
// Fixtures

fn fs_store() -> anyhow::Result<(Store, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let store = FsStore::open(dir.path().join("state"))?;
    Ok((Arc::new(store), dir))
}

async fn azurite_store() -> anyhow::Result<BlobStore> {
    let azurite = Azurite::shared().context("Azurite is required for these tests")?;
    let store = BlobStore::connect(&azurite.connection_string(), &unique_name("t"), None)?
        .with_timeout(Duration::from_secs(20));
    store.ensure_container().await?;
    Ok(store)
}

fn is_conflict<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Conflict { .. }))
}

/// Lists everything under `prefix`, `max` names per page, checking page sizes.
async fn list_all(store: &Store, prefix: &str, max: u32) -> anyhow::Result<(Vec<String>, usize)> {
    let mut names = Vec::new();
    let mut pages = 0;
    let mut continuation: Option<String> = None;
    loop {
        let Page { names: page, next } = store.list(prefix, continuation.as_deref(), max).await?;
        pages += 1;
        ensure!(
            page.len() <= max as usize,
            "page of {} > max {max}",
            page.len()
        );
        ensure!(pages < 10_000, "listing does not terminate");
        names.extend(page);
        match next {
            Some(next) => continuation = Some(next),
            None => return Ok((names, pages)),
        }
    }
}

// ---------------------------------------------------------------------------
// The cases

async fn get_missing_is_none(store: Store) -> anyhow::Result<()> {
    ensure!(store.get("runs/web/nothing.json").await?.is_none());
    ensure!(store.get("nothing").await?.is_none());
    Ok(())
}

async fn create_then_get(store: Store) -> anyhow::Result<()> {
    let body = br#"{"id":"01J","status":"running"}"#;
    let etag = store.create("runs/web/01J.json", body).await?;
    let got = store
        .get("runs/web/01J.json")
        .await?
        .context("created blob missing")?;
    ensure!(got.body == body, "body differs");
    ensure!(
        got.etag == etag,
        "get ETag {} != create ETag {}",
        got.etag,
        etag
    );
    ensure!(
        !etag.as_str().starts_with('"'),
        "ETag not normalised: {etag}"
    );

    // Names with every allowed character, and an empty body.
    let odd = "scans/sha256:0123abc_DEF-1.2.json";
    let etag = store.create(odd, b"").await?;
    let got = store.get(odd).await?.context("empty blob missing")?;
    ensure!(
        got == Versioned {
            body: Vec::new(),
            etag
        }
    );
    Ok(())
}

async fn create_twice_conflicts(store: Store) -> anyhow::Result<()> {
    store.create("dedup/github/d1", b"first").await?;
    let second = store.create("dedup/github/d1", b"second").await;
    ensure!(is_conflict(&second), "second create: {second:?}");
    let second = second.expect_err("checked above");
    ensure!(second.is_transient(), "Conflict must be transient");
    let got = store.get("dedup/github/d1").await?.context("missing")?;
    ensure!(got.body == b"first", "loser overwrote the winner");
    Ok(())
}

async fn create_race_has_one_winner(store: Store) -> anyhow::Result<()> {
    const TASKS: usize = 8;
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let body = format!("claimed by {i}");
            (
                i,
                store.create("dedup/eventgrid/race", body.as_bytes()).await,
            )
        }));
    }
    let (mut winners, mut conflicts) = (Vec::new(), 0);
    for task in tasks {
        match task.await? {
            (i, Ok(etag)) => winners.push((i, etag)),
            (_, Err(StoreError::Conflict { .. })) => conflicts += 1,
            (i, Err(e)) => anyhow::bail!("task {i}: unexpected error {e}"),
        }
    }
    ensure!(winners.len() == 1, "{} winners", winners.len());
    ensure!(conflicts == TASKS - 1, "{conflicts} conflicts");
    let (winner, etag) = &winners[0];
    let got = store
        .get("dedup/eventgrid/race")
        .await?
        .context("missing")?;
    ensure!(got.body == format!("claimed by {winner}").as_bytes());
    ensure!(&got.etag == etag);
    Ok(())
}

async fn replace_is_guarded_by_etag(store: Store) -> anyhow::Result<()> {
    let name = "apps/web/deployed.json";
    let v1 = store.create(name, b"v1").await?;
    let v2 = store.replace(name, b"v2", &v1).await?;
    ensure!(store.get(name).await?.context("missing")?.body == b"v2");

    let stale = store.replace(name, b"v3 from a stale read", &v1).await;
    ensure!(is_conflict(&stale), "stale replace: {stale:?}");
    let got = store.get(name).await?.context("missing")?;
    ensure!(
        got.body == b"v2" && got.etag == v2,
        "stale replace changed the blob"
    );

    let missing = store.replace("apps/web/never.json", b"x", &v2).await;
    ensure!(is_conflict(&missing), "replace of missing: {missing:?}");
    ensure!(
        store.get("apps/web/never.json").await?.is_none(),
        "replace created a blob"
    );

    // An ETag as HTTP quotes it means the same version.
    let quoted = Etag::new(format!("\"{}\"", v2.as_str()));
    store.replace(name, b"v3", &quoted).await?;
    ensure!(store.get(name).await?.context("missing")?.body == b"v3");
    Ok(())
}

async fn etag_changes_with_content(store: Store) -> anyhow::Result<()> {
    let name = "alerts/abc.json";
    let mut seen = HashSet::new();
    let mut etag = store.create(name, b"0").await?;
    seen.insert(etag.clone());
    for i in 1..5 {
        etag = store
            .replace(name, format!("{i}").as_bytes(), &etag)
            .await?;
        ensure!(seen.insert(etag.clone()), "ETag repeated for new content");
        ensure!(store.get(name).await?.context("missing")?.etag == etag);
    }
    Ok(())
}

async fn list_pages_over_a_thousand_blobs(store: Store) -> anyhow::Result<()> {
    // 1,000 names across ten "directories", so the prefix (which ends
    // mid-segment) spans several of them, plus decoys on either side of it.
    let wanted: Vec<String> = (0..1000)
        .map(|i| format!("index/commits/web/abc{}/{:02}", i / 100, i % 100))
        .collect();
    let decoys = [
        "index/commits/web/abd0/00",
        "index/commits/web/ab",
        "index/commits/webx/abc0/00",
        "index/commits/api/abc0/00",
        "index/digests/web/abc0",
        "a",
    ];
    futures::stream::iter(wanted.iter().map(String::as_str).chain(decoys))
        .map(|name| {
            let store = store.clone();
            async move { store.create(name, name.as_bytes()).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;

    let (names, pages) = list_all(&store, "index/commits/web/abc", 100).await?;
    ensure!(names.len() == wanted.len(), "listed {} names", names.len());
    let mut sorted = names.clone();
    sorted.sort();
    ensure!(names == sorted, "names not in lexicographic order");
    let unique: BTreeSet<_> = names.iter().collect();
    ensure!(unique.len() == names.len(), "a name was listed twice");
    let expected: BTreeSet<_> = wanted.iter().collect();
    ensure!(unique == expected, "listed names differ from created ones");
    ensure!(
        (10..=11).contains(&pages),
        "{pages} pages for 1,000 names at 100 each"
    );

    // The whole store, in one odd-sized page size.
    let (all, _) = list_all(&store, "", 333).await?;
    ensure!(
        all.len() == wanted.len() + decoys.len(),
        "listed {} in all",
        all.len()
    );
    ensure!(
        all.windows(2).all(|w| w[0] < w[1]),
        "full listing not sorted"
    );

    // A prefix nothing matches, and a continuation past the end.
    let empty = store.list("index/commits/zzz", None, 10).await?;
    ensure!(empty.names.is_empty() && empty.next.is_none(), "{empty:?}");
    let short = store.list("index/commits/web/ab", None, 5000).await?;
    ensure!(
        short.names.len() == 1002 && short.next.is_none(),
        "one page of 1,002 expected, got {} (next {:?})",
        short.names.len(),
        short.next
    );
    Ok(())
}

async fn concurrent_appends_do_not_interleave(store: Store) -> anyhow::Result<()> {
    const TASKS: usize = 8;
    const LINES: usize = 25;
    let name = "audit/2026-11-03.jsonl";
    let line = |t: usize, n: usize| {
        // Long enough that a torn write would show.
        format!(
            "{{\"task\":{t},\"n\":{n},\"pad\":\"{}\"}}\n",
            "x".repeat(200 + t)
        )
    };
    let barrier = Arc::new(Barrier::new(TASKS));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (store, barrier) = (store.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for n in 0..LINES {
                store.append(name, line(t, n).as_bytes()).await?;
            }
            Ok::<_, StoreError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let body = store.get(name).await?.context("audit blob missing")?.body;
    let text = String::from_utf8(body)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    ensure!(lines.len() == TASKS * LINES, "{} lines", lines.len());
    let got: HashSet<&str> = lines.iter().copied().collect();
    ensure!(got.len() == lines.len(), "a line appears twice");
    for t in 0..TASKS {
        let mut last = None;
        for n in 0..LINES {
            let expected = line(t, n);
            let at = lines.iter().position(|l| *l == expected);
            ensure!(at.is_some(), "line {t}/{n} missing or torn");
            // One task's appends land in the order it made them.
            ensure!(at > last, "task {t}'s lines out of order");
            last = at;
        }
    }

    // Appending to an existing blob continues it.
    store.append("audit/small.jsonl", b"a\n").await?;
    store.append("audit/small.jsonl", b"b\n").await?;
    store.append("audit/small.jsonl", b"").await?;
    ensure!(
        store
            .get("audit/small.jsonl")
            .await?
            .context("missing")?
            .body
            == b"a\nb\n"
    );
    Ok(())
}

async fn invalid_names_are_rejected(store: Store) -> anyhow::Result<()> {
    let long = "a".repeat(MAX_NAME_LEN + 1);
    let bad = [
        "",
        "/a",
        "a/",
        "a//b",
        "..",
        "../x",
        "a/../b",
        "./a",
        "a/./b",
        "a b",
        "a?b",
        "a#b",
        "a\\b",
        "a\nb",
        "é",
        "a%2Fb",
        long.as_str(),
    ];
    let etag = Etag::new("0");
    for name in bad {
        let shown: String = name.chars().take(20).collect();
        let invalid = |r: &Result<_, StoreError>| matches!(r, Err(StoreError::InvalidName { .. }));
        let get = store.get(name).await.map(|_| ());
        ensure!(invalid(&get), "get {shown:?}: {get:?}");
        let create = store.create(name, b"x").await.map(|_| ());
        ensure!(invalid(&create), "create {shown:?}: {create:?}");
        let replace = store.replace(name, b"x", &etag).await.map(|_| ());
        ensure!(invalid(&replace), "replace {shown:?}: {replace:?}");
        let append = store.append(name, b"x").await;
        ensure!(invalid(&append), "append {shown:?}: {append:?}");
        if let Err(e) = &append {
            ensure!(!e.is_transient(), "InvalidName must not be transient");
        }
    }
    let (all, _) = list_all(&store, "", 100).await?;
    ensure!(all.is_empty(), "invalid names wrote {all:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Instantiation

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod fs_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let (store, _dir) = super::fs_store()?;
                    super::$case(store).await
                }
            )*
        }

        mod blob_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() -> anyhow::Result<()> {
                    let store = super::azurite_store().await?;
                    super::$case(std::sync::Arc::new(store)).await
                }
            )*
        }

        /// The same suite against a real storage account: `GANTRY_TEST_BLOB_URL`
        /// (`https://acct.blob.core.windows.net`), `GANTRY_TEST_BLOB_CONTAINER`
        /// (default `gantry`, must exist), credential from the Azure CLI / azd
        /// login, or the managed identity when `GANTRY_TEST_MANAGED_IDENTITY` is
        /// set. Runs under a unique prefix and leaves its blobs behind: use a
        /// scratch container.
        mod live_blob_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs GANTRY_TEST_BLOB_URL and an Azure login"]
                async fn $case() -> anyhow::Result<()> {
                    let store = super::live_store()?;
                    super::$case(store).await
                }
            )*
        }
    };
}

conformance!(
    get_missing_is_none,
    create_then_get,
    create_twice_conflicts,
    create_race_has_one_winner,
    replace_is_guarded_by_etag,
    etag_changes_with_content,
    list_pages_over_a_thousand_blobs,
    concurrent_appends_do_not_interleave,
    invalid_names_are_rejected,
);

// ---------------------------------------------------------------------------
// Store-specific tests

/// The key (and any SAS signed with it) must never show up in an error or in
/// `Debug` output, whatever went wrong.
#[tokio::test]
async fn connection_string_errors_do_not_leak_the_key() -> anyhow::Result<()> {
    const KEY: &str = "c2VjcmV0LWtleS1tYXRlcmlhbC10aGF0LW11c3Qtbm90LWxlYWs=";
    let leaks = |text: &str| {
        text.contains(KEY)
            || text.contains("c2VjcmV0")
            || text
                .split("sig=")
                .skip(1)
                .any(|rest| !rest.starts_with("<redacted>"))
    };

    // Malformed settings fail at connect with Open.
    let bad_key =
        "AccountName=acct;AccountKey=c2VjcmV0!!not-base64;BlobEndpoint=http://127.0.0.1:9/acct";
    let remote_http =
        format!("AccountName=acct;AccountKey={KEY};BlobEndpoint=http://192.0.2.1/acct");
    let no_name = format!("AccountKey={KEY}");
    let not_a_setting = KEY.to_string();
    for setting in [bad_key.to_string(), remote_http, no_name, not_a_setting] {
        let e = BlobStore::connect(&setting, "gantry", None).expect_err("must not connect");
        ensure!(matches!(e, StoreError::Open { .. }), "{e:?}");
        ensure!(!e.is_transient());
        let (text, debug) = (e.to_string(), format!("{e:?}"));
        ensure!(!leaks(&text) && !leaks(&debug), "leaked: {text} / {debug}");
    }

    // A well-formed setting pointing at a closed port: a transient IO error that
    // would quote the request URL, SAS included, if not redacted.
    let port = free_port();
    let closed = format!(
        "DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={KEY};BlobEndpoint=http://127.0.0.1:{port}/acct;"
    );
    let store = BlobStore::connect(&closed, "gantry", None)?;
    ensure!(!leaks(&format!("{store:?}")), "Debug leaks: {store:?}");
    let e = store
        .get("runs/web/x.json")
        .await
        .expect_err("nothing listens");
    ensure!(
        e.is_transient(),
        "connection refused must be transient: {e}"
    );
    ensure!(
        !leaks(&e.to_string()) && !leaks(&format!("{e:?}")),
        "leaked: {e:?}"
    );
    let e = store
        .create("runs/web/x.json", b"x")
        .await
        .expect_err("nothing listens");
    ensure!(!leaks(&format!("{e:?}")), "leaked: {e:?}");

    // The right account with the wrong key: Azurite answers 403. An
    // infrastructure fault (rotated key, role not yet assigned): transient, so
    // the event is retried and finally dead-lettered instead of acknowledged.
    let azurite = Azurite::shared()?;
    let wrong = azurite
        .connection_string()
        .replace(gantry_testkit::ACCOUNT_KEY, KEY);
    let store = BlobStore::connect(&wrong, "gantry", None)?;
    let e = store.get("runs/web/x.json").await.expect_err("wrong key");
    ensure!(e.is_transient(), "403 must be retried: {e}");
    ensure!(e.to_string().contains("403"), "{e}");
    ensure!(
        !leaks(&e.to_string()) && !leaks(&format!("{e:?}")),
        "leaked: {e:?}"
    );
    Ok(())
}

/// `UseDevelopmentStorage=true` and a `BlobEndpoint` without a trailing-slash
/// problem both reach Azurite; `ensure_container` is idempotent.
#[tokio::test]
async fn blob_connection_string_forms() -> anyhow::Result<()> {
    let azurite = Azurite::shared()?;
    let container = unique_name("forms");
    let with_slash = format!(
        "AccountName={};AccountKey={};BlobEndpoint={}/",
        gantry_testkit::ACCOUNT,
        gantry_testkit::ACCOUNT_KEY,
        azurite.blob_endpoint()
    );
    let store = BlobStore::connect(&with_slash, &container, None)?;
    store.ensure_container().await?;
    store.ensure_container().await?;
    store.create("a/b", b"x").await?;
    ensure!(store.get("a/b").await?.context("missing")?.body == b"x");

    // UseDevelopmentStorage=true points at Azurite's default port, where nothing
    // of ours listens: it must fail as a transient error, not at connect.
    let dev = BlobStore::connect("UseDevelopmentStorage=true", &container, None)?;
    if azurite.port() != 10000 {
        let e = dev.get("a/b").await.expect_err("no Azurite on 10000");
        ensure!(e.is_transient(), "{e}");
    }
    Ok(())
}

/// A missing container is a configuration error, not an empty store.
#[tokio::test]
async fn blob_missing_container_is_an_error() -> anyhow::Result<()> {
    let azurite = Azurite::shared()?;
    let store = BlobStore::connect(&azurite.connection_string(), &unique_name("none"), None)?;
    let get = store.get("a").await;
    ensure!(
        matches!(
            get,
            Err(StoreError::Get {
                transient: false,
                ..
            })
        ),
        "{get:?}"
    );
    let create = store.create("a", b"x").await;
    ensure!(
        matches!(
            create,
            Err(StoreError::Put {
                transient: false,
                ..
            })
        ),
        "{create:?}"
    );
    let replace = store.replace("a", b"x", &Etag::new("0x1")).await;
    ensure!(
        matches!(
            replace,
            Err(StoreError::Put {
                transient: false,
                ..
            })
        ),
        "{replace:?}"
    );
    Ok(())
}

/// ETags from listings come unquoted, from downloads quoted: both normalise.
#[test]
fn etags_normalise_quotes() {
    assert_eq!(Etag::new("\"0x8DC\""), Etag::new("0x8DC"));
    assert_eq!(Etag::new("\"0x8DC\"").as_str(), "0x8DC");
}

/// The on-disk store keeps plain bodies, hex SHA-256 ETags, atomic writes that
/// leave nothing in `.tmp`, and reserves `.tmp` as a name.
#[tokio::test]
async fn fs_layout_is_human_readable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("state");
    let store = FsStore::open(&root)?;
    let etag = store.create("runs/web/01J.json", b"{\"a\":1}").await?;
    let on_disk = std::fs::read(root.join("runs/web/01J.json"))?;
    ensure!(on_disk == b"{\"a\":1}", "file holds more than the body");
    ensure!(
        etag.as_str() == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862",
        "ETag is not hex SHA-256: {etag}"
    );
    store.replace("runs/web/01J.json", b"{}", &etag).await?;
    store.append("audit/d.jsonl", b"x\n").await?;
    ensure!(
        std::fs::read_dir(root.join(".tmp"))?.next().is_none(),
        ".tmp not empty"
    );

    for reserved in [".tmp", ".tmp/x"] {
        let r = store.create(reserved, b"x").await;
        ensure!(
            matches!(r, Err(StoreError::InvalidName { .. })),
            "{reserved}: {r:?}"
        );
    }
    let listed = store.list("", None, 100).await?;
    ensure!(
        listed.names == ["audit/d.jsonl", "runs/web/01J.json"],
        "{listed:?}"
    );

    // A second handle on the same directory shares the lock: still one winner.
    let other = FsStore::open(root.join("../state"))?;
    let (a, b) = tokio::join!(store.create("dedup/x", b"a"), other.create("dedup/x", b"b"));
    ensure!(a.is_ok() != b.is_ok(), "two handles: {a:?} / {b:?}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Live

/// Scopes a store to a unique prefix, so the suite (which expects an empty
/// store) can run in a shared container.
struct Prefixed {
    inner: Store,
    prefix: String,
}

#[async_trait]
impl StateStore for Prefixed {
    async fn get(&self, name: &str) -> Result<Option<Versioned>, StoreError> {
        self.inner.get(&self.full(name)).await
    }
    async fn create(&self, name: &str, body: &[u8]) -> Result<Etag, StoreError> {
        self.inner.create(&self.full(name), body).await
    }
    async fn replace(&self, name: &str, body: &[u8], etag: &Etag) -> Result<Etag, StoreError> {
        self.inner.replace(&self.full(name), body, etag).await
    }
    async fn list(
        &self,
        prefix: &str,
        continuation: Option<&str>,
        max: u32,
    ) -> Result<Page, StoreError> {
        let page = self
            .inner
            .list(&self.full(prefix), continuation, max)
            .await?;
        Ok(Page {
            names: page
                .names
                .into_iter()
                .map(|n| n[self.prefix.len()..].to_string())
                .collect(),
            next: page.next,
        })
    }
    async fn append(&self, name: &str, data: &[u8]) -> Result<(), StoreError> {
        self.inner.append(&self.full(name), data).await
    }
}

impl Prefixed {
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

fn live_store() -> anyhow::Result<Store> {
    let url = std::env::var("GANTRY_TEST_BLOB_URL").context("set GANTRY_TEST_BLOB_URL")?;
    let container =
        std::env::var("GANTRY_TEST_BLOB_CONTAINER").unwrap_or_else(|_| "gantry".to_string());
    let credential: Arc<dyn azure_core::credentials::TokenCredential> =
        if std::env::var_os("GANTRY_TEST_MANAGED_IDENTITY").is_some() {
            azure_identity::ManagedIdentityCredential::new(None)?
        } else {
            azure_identity::DeveloperToolsCredential::new(None)?
        };
    let store = BlobStore::connect(&url, &container, Some(credential))?;
    Ok(Arc::new(Prefixed {
        inner: Arc::new(store),
        prefix: format!("gantry-conformance/{}/", unique_name("run")),
    }))
}
