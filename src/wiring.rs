//! Builds stores, buses and credentials from settings (flags or app settings).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use azure_core::credentials::TokenCredential;
use gantry_pipeline::Config;
use gantry_runtime::{Secret, Secrets};
use gantry_store::StateStore;
use sha2::Digest as _;

/// The default development webhook secret, used by `gantry dev` and
/// `gantry send` when `GANTRY_GITHUB_WEBHOOK_SECRET` is not set. Never used by
/// `gantry serve`.
pub const DEV_WEBHOOK_SECRET: &str = "gantry-dev-webhook-secret";

/// The development operator API token: accepted by `gantry dev` (operate
/// scope, principal `dev`) when `GANTRY_API_TOKENS` is not set, and sent by
/// the CLI to a loopback URL when no `--token`/`GANTRY_TOKEN` is given.
/// Never accepted by `gantry serve`.
pub const DEV_API_TOKEN: &str = "gantry-dev-token";

/// The Entra ID credential: the Function App's managed identity in Azure
/// (user-assigned when `AZURE_CLIENT_ID` is set), a developer login elsewhere.
pub fn azure_credential() -> Result<Arc<dyn TokenCredential>> {
    let in_azure = std::env::var_os("IDENTITY_ENDPOINT").is_some()
        || std::env::var_os("MSI_ENDPOINT").is_some();
    if in_azure {
        let options = std::env::var("AZURE_CLIENT_ID")
            .ok()
            .filter(|s| !s.is_empty())
            .map(|id| azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: Some(azure_identity::UserAssignedId::ClientId(id)),
                ..Default::default()
            });
        Ok(azure_identity::ManagedIdentityCredential::new(options)
            .context("creating the managed identity credential")?)
    } else {
        Ok(azure_identity::DeveloperToolsCredential::new(None)
            .context("creating the developer credential")?)
    }
}

fn is_connection_string(setting: &str) -> bool {
    setting.contains('=') && !setting.starts_with("http")
}

/// Opens Blob Storage from a URL (Entra ID) or a connection string (account SAS).
pub async fn open_blob_store(setting: &str, container: &str) -> Result<Arc<dyn StateStore>> {
    let credential = if is_connection_string(setting) {
        None
    } else {
        Some(azure_credential()?)
    };
    let store = gantry_store::blob::BlobStore::connect(setting, container, credential)?;
    if is_connection_string(setting) {
        // Emulators and development accounts: create the container on first use.
        // In Azure the container comes from infra and the identity may not create it.
        store
            .ensure_container()
            .await
            .context("creating the state container")?;
    }
    Ok(Arc::new(store))
}

/// Opens the store for `dev` and `runs`: Blob Storage when `storage` is given,
/// else the embedded store under `state/store`.
pub async fn open_store(args: &crate::StoreArgs) -> Result<Arc<dyn StateStore>> {
    match &args.storage {
        Some(setting) => open_blob_store(setting, &args.container).await,
        None => Ok(Arc::new(
            gantry_store::fs::FsStore::open(args.state.join("store")).with_context(|| {
                format!("opening the embedded store in {}", args.state.display())
            })?,
        )),
    }
}

/// Loads `gantry.toml` from `path`, or the embedded example when `None`.
pub fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::parse(
            gantry_pipeline::config::EMBEDDED_EXAMPLE,
            "<embedded gantry.toml>",
        )?,
    })
}

/// The webhook secret from the environment. `dev_default` fills in the
/// development secret when none is set (only `gantry dev` and `gantry send`).
pub fn webhook_secret(dev_default: bool) -> Option<Secret> {
    std::env::var("GANTRY_GITHUB_WEBHOOK_SECRET")
        .ok()
        .filter(|s| !s.is_empty())
        .filter(|s| resolved("GANTRY_GITHUB_WEBHOOK_SECRET", s))
        .or_else(|| dev_default.then(|| DEV_WEBHOOK_SECRET.to_string()))
        .map(|s| Secret::new(s.into_bytes()))
}

/// Whether a secret setting holds a value rather than a Key Vault reference
/// the platform could not resolve. App Service then passes the reference text
/// itself (`@Microsoft.KeyVault(SecretUri=...)`), which is no secret at all:
/// used as the webhook HMAC key, anyone reading the app settings' shape could
/// sign a delivery. Treated as unset (fail closed), with an error naming only
/// the setting.
fn resolved(name: &str, value: &str) -> bool {
    let unresolved = value.trim_start().starts_with("@Microsoft.KeyVault(");
    if unresolved {
        tracing::error!(
            setting = name,
            "Key Vault reference not resolved (missing secret or role): treated as unset"
        );
    }
    !unresolved
}

/// Reads secrets from the environment (see [`webhook_secret`]). A malformed
/// `GANTRY_API_TOKENS` is an error naming the entry (never its hash); unset,
/// no token is configured and every operator API call answers 401.
pub fn secrets(dev_default: bool) -> Result<Secrets> {
    let tokens = std::env::var("GANTRY_API_TOKENS")
        .ok()
        .filter(|s| resolved("GANTRY_API_TOKENS", s))
        .unwrap_or_default();
    // The platform sets WEBSITE_AUTH_ENABLED when App Service Authentication
    // is on; only then are its principal headers trustworthy.
    let app_service = gantry_runtime::auth::AppServiceAuth::from_settings(
        std::env::var("WEBSITE_AUTH_ENABLED").ok().as_deref(),
        std::env::var("GANTRY_API_PRINCIPALS").ok().as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let mut api_tokens =
        gantry_runtime::auth::parse_api_tokens(&tokens).map_err(anyhow::Error::msg)?;
    // `gantry dev` only: with no token configured, accept the development
    // token (operate scope, principal `dev`), like the development webhook
    // secret, so `gantry runs ...` works against it out of the box.
    if dev_default && api_tokens.is_empty() {
        api_tokens = gantry_runtime::auth::parse_api_tokens(&format!(
            "dev:operate:{}",
            hex::encode(sha2::Sha256::digest(DEV_API_TOKEN.as_bytes()))
        ))
        .map_err(anyhow::Error::msg)?;
    }
    Ok(Secrets {
        github_webhook: webhook_secret(dev_default),
        api_tokens,
        app_service,
        named: Default::default(),
    })
}

/// The values of the environment variables `[[alerts.channels]]` name, for
/// [`Secrets::named`]. A variable that is unset or empty is left out (the
/// channel then fails with a record naming the variable) and logged by name.
pub fn named_secrets(config: &Config) -> std::collections::BTreeMap<String, Secret> {
    let mut out = std::collections::BTreeMap::new();
    for name in config.alerts.env_names() {
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => {
                out.insert(name.to_string(), Secret::new(value.into_bytes()));
            }
            _ => tracing::warn!(
                variable = name,
                "an alert channel names this environment variable but it is not set"
            ),
        }
    }
    out
}

/// Outbound services for `gantry dev`: a developer credential only when an
/// Azure API is configured (so a plain `gantry dev` needs no Azure login).
pub fn services(needs_azure: &bool) -> Result<gantry_runtime::Services> {
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let credential = if *needs_azure {
        Some(azure_credential()?)
    } else {
        None
    };
    Ok(gantry_runtime::Services::new(credential, http))
}

#[cfg(test)]
mod tests {
    #[test]
    fn unresolved_key_vault_references_are_not_secrets() {
        assert!(!super::resolved(
            "GANTRY_GITHUB_WEBHOOK_SECRET",
            "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/gantry-github-webhook-secret)"
        ));
        assert!(super::resolved(
            "GANTRY_GITHUB_WEBHOOK_SECRET",
            "a-real-secret"
        ));
    }
}
