//! Validated names: everything that becomes part of a blob name, a label or a
//! Kubernetes field passes through one of these types first.
//!
//! Validation happens at the edge (when a webhook or message is parsed), so the
//! rest of the code can only hold names that are already safe.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// What kind of name (app, digest, commit sha, run id, ...).
    pub kind: &'static str,
    /// The rejected value, truncated to 100 characters.
    pub value: String,
    /// What rule it breaks.
    pub reason: &'static str,
}

fn name_error(kind: &'static str, value: &str, reason: &'static str) -> NameError {
    NameError {
        kind,
        value: value.chars().take(100).collect(),
        reason,
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn parse(value: &str) -> Result<Self, NameError> {
                $check(value).map_err(|reason| name_error($kind, value, reason))?;
                Ok($name(value.to_string()))
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// `[a-z0-9-]`, 1–63 characters, starting and ending alphanumeric: a DNS label,
/// so an app name is also a valid Kubernetes namespace and label value.
fn check_dns_label(v: &str) -> Result<(), &'static str> {
    if v.is_empty() || v.len() > 63 {
        return Err("must be 1-63 characters");
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only [a-z0-9-] allowed");
    }
    if v.starts_with('-') || v.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn check_digest(v: &str) -> Result<(), &'static str> {
    let hex = v.strip_prefix("sha256:").ok_or("must start with sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("must be sha256: followed by 64 lowercase hex digits");
    }
    Ok(())
}

fn check_sha(v: &str) -> Result<(), &'static str> {
    if v.len() != 40 || !v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("must be 40 lowercase hex digits");
    }
    Ok(())
}

fn check_run_id(v: &str) -> Result<(), &'static str> {
    if v.len() != 26 || !v.bytes().all(|b| CROCKFORD.contains(&b)) {
        return Err("must be 26 characters of Crockford base32 (lowercase)");
    }
    Ok(())
}

/// Lowercase Crockford base32: sorts in the same order as the numbers it encodes.
pub(crate) const CROCKFORD: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

name_type!(
    /// An application name from `gantry.toml`: a DNS label (`[a-z0-9-]`, ≤ 63).
    AppName, "app name", check_dns_label
);
name_type!(
    /// An image digest, `sha256:` and 64 lowercase hex digits.
    Digest, "digest", check_digest
);
name_type!(
    /// A full git commit SHA-1, 40 lowercase hex digits.
    CommitSha, "commit sha", check_sha
);
name_type!(
    /// A run id: 26 lowercase Crockford base32 characters, time-sortable (ULID layout).
    RunId, "run id", check_run_id
);

impl RunId {
    /// Milliseconds since the Unix epoch encoded in the id's first 10 characters.
    pub fn timestamp_ms(&self) -> u64 {
        self.0.as_bytes()[..10].iter().fold(0u64, |acc, b| {
            let v = CROCKFORD.iter().position(|c| c == b).unwrap_or(0) as u64;
            (acc << 5) | v
        })
    }
}

/// A key for an event claim (`dedup/{source}/{key}`): a GitHub delivery GUID or an
/// Event Grid event id.
///
/// Ids that are already safe (`[A-Za-z0-9-]`, ≤ 100) are kept readable; anything
/// else is replaced by `h-` and its SHA-256, so no outside string ever becomes a
/// path segment unchecked.
pub fn event_key(id: &str) -> String {
    use sha2::Digest as _;
    if !id.is_empty()
        && id.len() <= 100
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        id.to_ascii_lowercase()
    } else {
        format!("h-{}", hex::encode(sha2::Sha256::digest(id.as_bytes())))
    }
}

/// The key of a Defender alert in blob names and MessageIds
/// (`apps/{app}/security/{key}.json`): the id itself when it is already
/// `[a-z0-9-]`, at most 50 characters and not starting with `h-`; otherwise
/// `h-` and the first 40 hex digits (160 bits) of its SHA-256. Exact (no case
/// folding), so two different ids never share a key, and short enough that
/// `security:{key}:{app}` fits Service Bus's 128-character MessageId.
pub fn security_key(id: &str) -> String {
    use sha2::Digest as _;
    if !id.is_empty()
        && id.len() <= 50
        && !id.starts_with("h-")
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        id.to_string()
    } else {
        let hash = hex::encode(sha2::Sha256::digest(id.as_bytes()));
        format!("h-{}", &hash[..40])
    }
}

/// Is `v` a plausible abbreviated commit sha (7–40 lowercase hex digits)?
pub fn is_short_sha(v: &str) -> bool {
    (7..=40).contains(&v.len()) && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        assert!(AppName::parse("web").is_ok());
        assert!(AppName::parse("web-2").is_ok());
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "we_b",
            "web/../x",
            "a.b",
            &"a".repeat(64),
        ] {
            assert!(AppName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn digests() {
        let good = format!("sha256:{}", "ab".repeat(32));
        assert!(Digest::parse(&good).is_ok());
        assert!(Digest::parse(&good.to_uppercase()).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "ab".repeat(32))).is_err());
        assert!(Digest::parse(&format!("sha256:{}", "ab".repeat(31))).is_err());
        assert!(Digest::parse(&format!("sha256:{}/..", "ab".repeat(32))).is_err());
    }

    #[test]
    fn shas() {
        assert!(CommitSha::parse(&"a1".repeat(20)).is_ok());
        assert!(CommitSha::parse(&"A1".repeat(20)).is_err());
        assert!(CommitSha::parse("abc1234").is_err());
        assert!(is_short_sha("abc1234"));
        assert!(!is_short_sha("abc123"));
        assert!(!is_short_sha("latest1"));
    }

    #[test]
    fn deserialize_validates() {
        let err = serde_json::from_str::<AppName>("\"../etc\"").unwrap_err();
        assert!(err.to_string().contains("invalid app name"), "{err}");
    }

    #[test]
    fn security_keys_are_safe_and_exact() {
        assert_eq!(security_key("abc-123"), "abc-123");
        let k = security_key("2517538088322968242_44b3c5a1-2c8e-4d0b-9b11-5a7f0c3e9d21");
        assert!(k.starts_with("h-") && k.len() == 42, "{k}");
        assert_ne!(security_key("ABC"), security_key("abc"));
        assert_ne!(security_key("h-x"), "h-x");
        assert!(security_key("../x").starts_with("h-"));
        assert!(security_key("").starts_with("h-"));
    }

    #[test]
    fn event_keys_are_safe() {
        assert_eq!(
            event_key("72D3162E-CC78-11E3-81AB-4C9367DC0958"),
            "72d3162e-cc78-11e3-81ab-4c9367dc0958"
        );
        let k = event_key("../../runs/web/x");
        assert!(k.starts_with("h-") && k.len() == 66, "{k}");
        assert!(event_key("").starts_with("h-"));
    }
}
