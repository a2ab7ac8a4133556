//! Bearer tokens of the operator API (`GANTRY_API_TOKENS`).
//!
//! The setting holds `name:scope:sha256hex` entries, comma-separated: only the
//! SHA-256 of each token, never the token. A request's `Authorization: Bearer
//! <token>` is hashed and compared in constant time against every configured
//! hash. Without any configured token every authenticated route answers 401.

use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use crate::{ApiError, Secrets};

/// What a token may do; `Operate` includes `Read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Read runs.
    Read,
    /// Also approve, reject, retrigger and roll back.
    Operate,
}

impl Scope {
    /// As written in `GANTRY_API_TOKENS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Operate => "operate",
        }
    }
}

/// One configured token: its name (the principal in the audit trail), its
/// scope and the SHA-256 of the token. `Debug` never shows the hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Principal name.
    pub name: String,
    /// Scope.
    pub scope: Scope,
    hash: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Parses `GANTRY_API_TOKENS`. An empty value is no tokens. An error names
/// the entry by its 1-based position and what is wrong, never its hash.
pub fn parse_api_tokens(value: &str) -> Result<Vec<ApiToken>, String> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut tokens: Vec<ApiToken> = Vec::new();
    for (i, entry) in value.split(',').enumerate() {
        let position = i + 1;
        let bad = |why: &str| {
            format!("GANTRY_API_TOKENS entry {position}: {why} (expected name:scope:sha256hex)")
        };
        let mut parts = entry.trim().split(':');
        let (Some(name), Some(scope), Some(hash), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("not three ':'-separated fields"));
        };
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(bad("the name must be non-empty [A-Za-z0-9-_.@]"));
        }
        if tokens.iter().any(|t| t.name == name) {
            return Err(bad(&format!("duplicate name {name:?}")));
        }
        let scope = match scope {
            "read" => Scope::Read,
            "operate" => Scope::Operate,
            _ => return Err(bad("the scope must be read or operate")),
        };
        let hash: [u8; 32] = hex::decode(hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| bad("the hash must be 64 hex digits (sha256 of the token)"))?;
        tokens.push(ApiToken {
            name: name.to_string(),
            scope,
            hash,
        });
    }
    Ok(tokens)
}

/// Checks the request's bearer token: 401 when missing or unknown (or when no
/// token is configured), 403 when its scope is below `needed`. Returns the
/// matching token (its name is the principal).
pub fn authorize<'a>(
    secrets: &'a Secrets,
    headers: &HeaderMap,
    needed: Scope,
) -> Result<&'a ApiToken, ApiError> {
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let Some(token) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        return Err(unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
        ));
    };
    let hash = Sha256::digest(token.as_bytes());
    // Compare against every hash (no early exit) so timing tells nothing.
    let mut found = None;
    for t in &secrets.api_tokens {
        if crate::signature::constant_time_eq(&t.hash, &hash) {
            found = Some(t);
        }
    }
    let Some(found) = found else {
        return Err(unauthorized("invalid bearer token"));
    };
    if found.scope < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has scope {}; this route needs {}",
                found.name,
                found.scope.as_str(),
                needed.as_str()
            ),
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    fn secrets(value: &str) -> Secrets {
        Secrets {
            api_tokens: parse_api_tokens(value).unwrap(),
            ..Secrets::default()
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn parses_entries_and_hides_the_hash() {
        let tokens = parse_api_tokens(&format!(
            " ann:operate:{HASH} , bob:read:{}",
            HASH.to_uppercase()
        ))
        .unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            (tokens[0].name.as_str(), tokens[0].scope),
            ("ann", Scope::Operate)
        );
        assert_eq!(
            (tokens[1].name.as_str(), tokens[1].scope),
            ("bob", Scope::Read)
        );
        assert!(!format!("{tokens:?}").contains("9f86"));
        assert!(parse_api_tokens("").unwrap().is_empty());
    }

    #[test]
    fn errors_name_the_position_never_the_hash() {
        for (value, position, why) in [
            (format!("ann:admin:{HASH}"), 1, "scope"),
            (format!("ann:read:{HASH},bob:read"), 2, "three"),
            (format!("ann:read:{HASH},:read:{HASH}"), 2, "name"),
            (
                format!("ann:read:{HASH},ann:operate:{HASH}"),
                2,
                "duplicate",
            ),
            (format!("ann:read:{}", &HASH[2..]), 1, "64 hex"),
            (format!("ann:read:{HASH}:x"), 1, "three"),
            (format!("ann:read:{HASH},"), 2, "three"),
        ] {
            let e = parse_api_tokens(&value).unwrap_err();
            assert!(e.contains(&format!("entry {position}:")), "{e}");
            assert!(e.contains(why), "{e}");
            assert!(!e.contains(&HASH[2..20]), "{e}");
        }
    }

    #[test]
    fn authorizes_by_hash_and_scope() {
        let s = secrets(&format!("ann:read:{HASH}"));
        assert_eq!(
            authorize(&s, &bearer("test"), Scope::Read).unwrap().name,
            "ann"
        );
        let e = authorize(&s, &bearer("test"), Scope::Operate).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        let e = authorize(&s, &bearer("nope"), Scope::Read).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let e = authorize(&s, &HeaderMap::new(), Scope::Read).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let e = authorize(&Secrets::default(), &bearer("test"), Scope::Read).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }
}
