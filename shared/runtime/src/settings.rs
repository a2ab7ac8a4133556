//! Every environment variable gantry reads, in one list.
//!
//! `tests/infra.rs` keeps three things in step with [`ALL`]: the code (a scan
//! of `src/`, `shared/` and `functions/` for string literals passed to
//! `env::var`, `env::var_os`, `EnvFilter::from_env` and clap's `env` attribute
//! must find only names listed here), and `infra/main.bicep` (every
//! [`Kind::AppSetting`] and [`Kind::Secret`] is a Function App app setting;
//! every secret is a Key Vault reference). A new setting is added here first.
//!
//! Channel credentials named by `gantry.toml` (`url_env`, `secret_env`,
//! `token_env`) are not listed: their names come from configuration, and the
//! same test checks them against the Bicep `alertSettings` parameter.

/// Where a setting comes from in Azure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A plain Function App app setting, set by `infra/main.bicep`.
    AppSetting,
    /// A secret: an app setting whose value is a Key Vault reference.
    Secret,
    /// Set by the platform (Functions host, App Service), never by gantry's infra.
    Platform,
    /// Only for the CLI, `gantry dev`, builds or tests; not read by `gantry serve`.
    Local,
    /// A standard variable an operator may add as an app setting (the
    /// OpenTelemetry SDK's switches); the infra leaves it unset.
    Optional,
}

/// One environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// The variable's name.
    pub name: &'static str,
    /// Where it comes from.
    pub kind: Kind,
    /// What it means (shown in docs/deploy.md's table).
    pub meaning: &'static str,
}

const fn setting(name: &'static str, kind: Kind, meaning: &'static str) -> Setting {
    Setting {
        name,
        kind,
        meaning,
    }
}

/// Every environment variable gantry's code reads.
pub const ALL: &[Setting] = &[
    setting(
        "GANTRY_CONFIG",
        Kind::AppSetting,
        "path of gantry.toml (in the package: gantry.toml)",
    ),
    setting(
        "GANTRY_STORAGE",
        Kind::AppSetting,
        "blob service URL of the state account (managed identity) or a connection string",
    ),
    setting("GANTRY_CONTAINER", Kind::AppSetting, "the state container"),
    setting(
        "GANTRY_SERVICEBUS",
        Kind::AppSetting,
        "fully-qualified Service Bus namespace gantry sends to",
    ),
    setting(
        "AZURE_CLIENT_ID",
        Kind::AppSetting,
        "client id of the user-assigned identity gantry authenticates as",
    ),
    setting(
        "GANTRY_MAX_DELIVERY_COUNT",
        Kind::AppSetting,
        "the queues' MaxDeliveryCount (the last delivery records a transient failure)",
    ),
    setting("GANTRY_LOG", Kind::AppSetting, "log filter (default info)"),
    setting(
        "GANTRY_GITHUB_WEBHOOK_SECRET",
        Kind::Secret,
        "GitHub webhook HMAC secret",
    ),
    setting(
        "GANTRY_API_TOKENS",
        Kind::Secret,
        "operator API token hashes (name:scope:sha256hex, comma-separated)",
    ),
    setting(
        "GANTRY_LOG_FORMAT",
        Kind::AppSetting,
        "log format: json (default in gantry serve) or text (default in gantry dev)",
    ),
    setting(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        Kind::AppSetting,
        "OpenTelemetry: OTLP/HTTP endpoint traces are exported to (unset: no export)",
    ),
    setting(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        Kind::Optional,
        "OpenTelemetry: OTLP/HTTP endpoint for traces only",
    ),
    setting(
        "OTEL_SERVICE_NAME",
        Kind::AppSetting,
        "OpenTelemetry: service name on exported spans (default gantry)",
    ),
    setting(
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        Kind::AppSetting,
        "Application Insights of the Functions host (gantry logs a hint when it is set without an OTLP endpoint)",
    ),
    setting(
        "OTEL_SDK_DISABLED",
        Kind::Optional,
        "OpenTelemetry: true turns the export off",
    ),
    setting(
        "OTEL_TRACES_EXPORTER",
        Kind::Optional,
        "OpenTelemetry: none turns the trace export off",
    ),
    setting(
        "GANTRY_API_PRINCIPALS",
        Kind::AppSetting,
        "App Service Authentication principals allowed on the operator API (<object id>:read|operate, comma-separated)",
    ),
    setting(
        "WEBSITE_AUTH_ENABLED",
        Kind::Platform,
        "set by App Service when its Authentication is on: only then are X-MS-CLIENT-PRINCIPAL headers trusted",
    ),
    setting(
        "FUNCTIONS_CUSTOMHANDLER_PORT",
        Kind::Platform,
        "port the Functions host forwards invocations to",
    ),
    setting(
        "IDENTITY_ENDPOINT",
        Kind::Platform,
        "managed identity endpoint (App Service)",
    ),
    setting(
        "MSI_ENDPOINT",
        Kind::Platform,
        "managed identity endpoint (older App Service hosts)",
    ),
    setting(
        "GANTRY_STATE",
        Kind::Local,
        "gantry dev / runs: embedded store directory",
    ),
    setting(
        "GANTRY_URL",
        Kind::Local,
        "gantry runs / apps: the operator API base URL",
    ),
    setting(
        "GANTRY_TOKEN",
        Kind::Local,
        "gantry runs / apps: the operator API bearer token",
    ),
    setting(
        "GANTRY_RETRY_BACKOFF_MS",
        Kind::Local,
        "gantry dev: first hold of a failed delivery before it is abandoned (doubles, at most 8 s; default 0)",
    ),
    setting(
        "GANTRY_FAULT",
        Kind::Local,
        "tests only, gantry dev only: crash-after:<function>:before-ack aborts the process after that function succeeds, before its message is completed",
    ),
    setting(
        "GANTRY_AZURITE_BIN",
        Kind::Local,
        "tests: the Azurite executable",
    ),
    setting(
        "CARGO",
        Kind::Local,
        "gantry package: the cargo that builds the release binary",
    ),
    setting(
        "CARGO_TARGET_DIR",
        Kind::Local,
        "gantry package: where cargo puts the release binary",
    ),
];

/// The setting called `name`, if gantry reads it.
pub fn find(name: &str) -> Option<&'static Setting> {
    ALL.iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(
                ALL[i + 1..].iter().all(|b| b.name != a.name),
                "{} twice",
                a.name
            );
        }
        assert_eq!(
            find("GANTRY_CONFIG").map(|s| s.kind),
            Some(Kind::AppSetting)
        );
        assert!(find("NOPE").is_none());
    }
}
