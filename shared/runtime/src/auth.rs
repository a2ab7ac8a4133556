//! Bearer tokens of the operator API (`GANTRY_API_TOKENS`).
//!
//! The setting holds `name:scope:sha256hex` entries, comma-separated: only the
//! SHA-256 of each token, never the token. A request's `Authorization: Bearer
//! <token>` is hashed and compared in constant time against every configured
//! hash. Without any configured token every authenticated route answers 401.
//!
//! In Azure, App Service Authentication ("Easy Auth") may sit in front of the
//! Function App. The platform then validates the caller's Entra ID token and
//! injects `X-MS-CLIENT-PRINCIPAL-ID` / `-NAME` / `X-MS-CLIENT-PRINCIPAL`
//! (base64 JSON with `claims`), stripping any a client sent — but only when
//! it is enabled. So those headers are trusted only when [`AppServiceAuth`]
//! is configured (`WEBSITE_AUTH_ENABLED=True`, set by the platform, and
//! `GANTRY_API_PRINCIPALS=<object id>:<scope>,...`); otherwise they are
//! ignored and anyone could have sent them.

use base64::Engine as _;
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

/// Header App Service Authentication sets to the caller's id (the Entra
/// object id for Microsoft Entra ID).
pub const PRINCIPAL_ID_HEADER: &str = "x-ms-client-principal-id";
/// Header with the caller's human-readable name (UPN, e-mail).
pub const PRINCIPAL_NAME_HEADER: &str = "x-ms-client-principal-name";
/// Header with the base64 JSON `{"auth_typ", "claims": [{"typ", "val"}], ...}`.
pub const PRINCIPAL_HEADER: &str = "x-ms-client-principal";
/// App roles (in the `roles` claim) that grant a scope without a mapping.
pub const ROLE_READ: &str = "Gantry.Read";
/// See [`ROLE_READ`].
pub const ROLE_OPERATE: &str = "Gantry.Operate";

/// Trust in App Service Authentication headers: present only when the
/// platform feature is on (`WEBSITE_AUTH_ENABLED=True`) and gantry was told
/// which principals may do what (`GANTRY_API_PRINCIPALS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppServiceAuth {
    /// Object id (`X-MS-CLIENT-PRINCIPAL-ID`) → scope.
    pub principals: Vec<(String, Scope)>,
}

impl AppServiceAuth {
    /// Builds the trust from the environment values: `None` (headers
    /// ignored) unless `website_auth_enabled` is `True` (any case). An
    /// unparsable `principals` value is an error naming the entry.
    pub fn from_settings(
        website_auth_enabled: Option<&str>,
        principals: Option<&str>,
    ) -> Result<Option<AppServiceAuth>, String> {
        if !website_auth_enabled.is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let mut out = Vec::new();
        for (i, entry) in principals
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let bad = |why: &str| {
                format!(
                    "GANTRY_API_PRINCIPALS entry {}: {why} (expected <object id>:read|operate)",
                    i + 1
                )
            };
            let Some((id, scope)) = entry.rsplit_once(':') else {
                return Err(bad("no ':'"));
            };
            let id = id.trim();
            if id.is_empty()
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return Err(bad("the id must be non-empty [A-Za-z0-9-_.@]"));
            }
            let scope = match scope.trim() {
                "read" => Scope::Read,
                "operate" => Scope::Operate,
                _ => return Err(bad("the scope must be read or operate")),
            };
            out.push((id.to_ascii_lowercase(), scope));
        }
        Ok(Some(AppServiceAuth { principals: out }))
    }
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A bearer token from `GANTRY_API_TOKENS`.
    Token,
    /// App Service Authentication principal headers.
    AppService,
}

/// An authenticated caller: its name is what the audit trail records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name, or `aad:<name or object id>` for App Service
    /// Authentication callers (so the two can never be confused).
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// How it was authenticated.
    pub via: AuthMethod,
}

fn forbidden(who: &str, has: Scope, needed: Scope) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{who} has scope {}; this route needs {}",
            has.as_str(),
            needed.as_str()
        ),
    )
}

/// Roles in the `X-MS-CLIENT-PRINCIPAL` claims (claim type `roles`, or the
/// `role_typ` the payload names).
fn principal_roles(headers: &HeaderMap) -> Vec<String> {
    let Some(raw) = headers.get(PRINCIPAL_HEADER).and_then(|v| v.to_str().ok()) else {
        return Vec::new();
    };
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(raw.trim()) else {
        return Vec::new();
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    let role_typ = value["role_typ"].as_str().unwrap_or("roles").to_string();
    value["claims"]
        .as_array()
        .map(|claims| {
            claims
                .iter()
                .filter(|c| {
                    c["typ"]
                        .as_str()
                        .is_some_and(|t| t == "roles" || t == role_typ)
                })
                .filter_map(|c| c["val"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The App Service Authentication principal of a request, when that trust
/// is configured and the platform identified a caller.
fn app_service_principal(
    trust: &AppServiceAuth,
    headers: &HeaderMap,
    needed: Scope,
) -> Option<Result<Principal, ApiError>> {
    let id = headers
        .get(PRINCIPAL_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())?;
    let display = headers
        .get(PRINCIPAL_NAME_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(id);
    let name = format!("aad:{display}");
    let mapped = trust
        .principals
        .iter()
        .find(|(p, _)| p.eq_ignore_ascii_case(id))
        .map(|(_, s)| *s);
    let roles = principal_roles(headers);
    let by_role = if roles.iter().any(|r| r == ROLE_OPERATE) {
        Some(Scope::Operate)
    } else if roles.iter().any(|r| r == ROLE_READ) {
        Some(Scope::Read)
    } else {
        None
    };
    let Some(scope) = mapped.max(by_role) else {
        return Some(Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "principal {display:?} ({id}) is not in GANTRY_API_PRINCIPALS and has no {ROLE_READ}/{ROLE_OPERATE} role"
            ),
        )));
    };
    if scope < needed {
        return Some(Err(forbidden(
            &format!("principal {display:?}"),
            scope,
            needed,
        )));
    }
    Some(Ok(Principal {
        name,
        scope,
        via: AuthMethod::AppService,
    }))
}

/// Authenticates a request and checks its scope. With App Service
/// Authentication trusted ([`Secrets::app_service`]) and a platform
/// principal on the request, that principal decides (mapped or role →
/// its scope, else 403). Otherwise the bearer token: 401 when missing or
/// unknown (or when no token is configured), 403 when its scope is below
/// `needed`. Returns the principal to record in the audit trail.
pub fn authorize(
    secrets: &Secrets,
    headers: &HeaderMap,
    needed: Scope,
) -> Result<Principal, ApiError> {
    if let Some(trust) = &secrets.app_service
        && let Some(result) = app_service_principal(trust, headers, needed)
    {
        return result;
    }
    let found = authorize_token(secrets, headers, needed)?;
    Ok(Principal {
        name: found.name.clone(),
        scope: found.scope,
        via: AuthMethod::Token,
    })
}

/// The bearer-token half of [`authorize`]: returns the matching token.
pub fn authorize_token<'a>(
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
        return Err(forbidden(
            &format!("token {:?}", found.name),
            found.scope,
            needed,
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

    fn easy_auth(id: &str, name: &str, roles: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(PRINCIPAL_ID_HEADER, id.parse().unwrap());
        h.insert(PRINCIPAL_NAME_HEADER, name.parse().unwrap());
        let claims: Vec<_> = roles
            .iter()
            .map(|r| serde_json::json!({"typ": "roles", "val": r}))
            .collect();
        let payload = serde_json::json!({"auth_typ": "aad", "claims": claims,
            "name_typ": "name", "role_typ": "roles"});
        h.insert(
            PRINCIPAL_HEADER,
            base64::engine::general_purpose::STANDARD
                .encode(payload.to_string())
                .parse()
                .unwrap(),
        );
        h
    }

    const OID: &str = "6f1c2a7e-0000-4000-8000-00000000beef";

    #[test]
    fn principal_headers_are_ignored_unless_app_service_auth_is_enabled() {
        // Mapping configured but WEBSITE_AUTH_ENABLED unset: anyone could
        // have sent the headers, so they count for nothing.
        let trust = AppServiceAuth::from_settings(None, Some(&format!("{OID}:operate"))).unwrap();
        assert_eq!(trust, None);
        let s = Secrets {
            app_service: trust,
            ..secrets(&format!("ann:read:{HASH}"))
        };
        let e = authorize(&s, &easy_auth(OID, "ann@contoso.com", &[]), Scope::Read).unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(
            AppServiceAuth::from_settings(Some("False"), Some(&format!("{OID}:operate")))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_mapped_principal_gets_its_scope_and_an_unmapped_one_403() {
        let trust = AppServiceAuth::from_settings(
            Some("True"),
            Some(&format!("{}:operate, reader-app:read", OID.to_uppercase())),
        )
        .unwrap();
        let s = Secrets {
            app_service: trust,
            ..secrets(&format!("ann:read:{HASH}"))
        };
        let p = authorize(&s, &easy_auth(OID, "ann@contoso.com", &[]), Scope::Operate).unwrap();
        assert_eq!(p.name, "aad:ann@contoso.com");
        assert_eq!((p.scope, p.via), (Scope::Operate, AuthMethod::AppService));
        let e = authorize(&s, &easy_auth("reader-app", "ci", &[]), Scope::Operate).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(authorize(&s, &easy_auth("reader-app", "ci", &[]), Scope::Read).is_ok());
        let e = authorize(&s, &easy_auth("someone-else", "eve", &[]), Scope::Read).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        // An app role grants without a mapping.
        let p = authorize(
            &s,
            &easy_auth("someone-else", "eve", &[ROLE_OPERATE]),
            Scope::Operate,
        )
        .unwrap();
        assert_eq!(p.name, "aad:eve");
        // Without platform headers, the bearer token still works.
        let p = authorize(&s, &bearer("test"), Scope::Read).unwrap();
        assert_eq!((p.name.as_str(), p.via), ("ann", AuthMethod::Token));
        assert!(
            AppServiceAuth::from_settings(Some("true"), Some("x:admin"))
                .unwrap_err()
                .contains("entry 1")
        );
    }
}
