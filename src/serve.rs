//! `gantry serve`: the Azure Functions custom handler.
//!
//! Binds `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT` before anything else (the
//! host gives a handler 30–60 s to start listening), then builds state, bus
//! and configuration from the app settings.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use gantry_bus::MessageBus;
use gantry_runtime::Deps;

pub async fn run() -> Result<()> {
    let port: u16 = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .context("FUNCTIONS_CUSTOMHANDLER_PORT is not set: `gantry serve` is started by the Functions host (use `gantry dev` locally)")?
        .parse()
        .context("FUNCTIONS_CUSTOMHANDLER_PORT is not a port number")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "custom handler listening");

    let config_path = std::env::var("GANTRY_CONFIG").unwrap_or_else(|_| "gantry.toml".into());
    let config = crate::wiring::load_config(Some(std::path::Path::new(&config_path)))?;
    let Ok(storage) = std::env::var("GANTRY_STORAGE") else {
        bail!("GANTRY_STORAGE is not set (blob service URL or connection string)");
    };
    let container = std::env::var("GANTRY_CONTAINER").unwrap_or_else(|_| "gantry".into());
    let store = crate::wiring::open_blob_store(&storage, &container).await?;
    let Ok(servicebus) = std::env::var("GANTRY_SERVICEBUS") else {
        bail!("GANTRY_SERVICEBUS is not set (fully-qualified namespace or connection string)");
    };
    let credential = if servicebus.contains('=') {
        None
    } else {
        Some(crate::wiring::azure_credential()?)
    };
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the HTTP client")?;
    let bus =
        gantry_bus::servicebus::ServiceBusRest::connect(&servicebus, credential, http.clone())?;
    let mut secrets = crate::wiring::secrets(false)?;
    secrets.named = crate::wiring::named_secrets(&config);
    if secrets.github_webhook.is_none() {
        tracing::error!(
            "GANTRY_GITHUB_WEBHOOK_SECRET is not set: every GitHub delivery will be refused"
        );
    }
    match &secrets.app_service {
        Some(trust) => tracing::info!(
            principals = trust.principals.len(),
            "App Service Authentication is enabled: its principal headers are trusted (GANTRY_API_PRINCIPALS, Gantry.Read/Gantry.Operate roles)"
        ),
        None if secrets.api_tokens.is_empty() => tracing::error!(
            "GANTRY_API_TOKENS is not set and App Service Authentication is off: every operator API call will answer 401"
        ),
        None => {}
    }
    let deps = Arc::new(Deps {
        runs: gantry_pipeline::RunStore::new(store),
        bus: Arc::new(bus) as Arc<dyn MessageBus>,
        config: Arc::new(config),
        secrets,
        services: gantry_runtime::Services::new(Some(crate::wiring::azure_credential()?), http),
    });
    let app = gantry_runtime::app(deps, &crate::functions::all());
    axum::serve(listener, app).await.context("serving HTTP")?;
    Ok(())
}
