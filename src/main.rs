//! `gantry`: one executable for everything — the Azure Functions custom handler
//! (`serve`), the local development host (`dev`), and operator tools.

mod audit;
mod dev;
mod functions;
mod package;
mod policy;
mod runs;
mod send;
mod serve;
mod telemetry;
mod wiring;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// gantry: a secure, event-driven delivery pipeline for Kubernetes on Azure.
#[derive(Parser)]
#[command(name = "gantry", version, about, long_about = None)]
struct Cli {
    /// Log as JSON lines (same as GANTRY_LOG_FORMAT=json; the default for
    /// `serve` and under the Functions host).
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run as the Azure Functions custom handler (listens on 127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT).
    Serve,
    /// Run the whole pipeline locally: HTTP API, embedded durable queues and state.
    Dev(dev::DevArgs),
    /// Send a sample event (GitHub webhook, registry or security event) to a running `gantry dev`.
    Send(send::SendArgs),
    /// Print an app's Kubernetes manifests for a digest, as YAML (what policy-enforce checks and deploy applies).
    Render {
        /// The app (a name from gantry.toml).
        app: String,
        /// The image digest (sha256:...).
        #[arg(long)]
        digest: String,
        /// gantry.toml to use; default ./gantry.toml if present, else the embedded example.
        #[arg(long, env = "GANTRY_CONFIG")]
        config: Option<PathBuf>,
        /// Print the manifest hash on stderr too.
        #[arg(long)]
        hash: bool,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// List the functions this binary hosts and their triggers (as in each function.json).
    Functions {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Build the deployment package: `dist/` as the Functions host expects it and `dist.zip` for zip deploy.
    Package(package::PackageArgs),
    /// Runs through the operator API: list, show, retrigger, approve, reject.
    Runs {
        #[command(subcommand)]
        command: runs::RunsCommand,
    },
    /// Apps through the operator API: rollback.
    Apps {
        #[command(subcommand)]
        command: runs::AppsCommand,
    },
    /// Open cluster-audit findings (policy, drift, vulnerabilities,
    /// governance); exit status 2 with --fail-on-findings when any is open.
    Audit(audit::AuditArgs),
}

/// Where state lives, shared by `dev` and `runs`.
/// No `Debug`: `--storage` may hold a connection string with an account key.
#[derive(clap::Args, Clone)]
pub struct StoreArgs {
    /// Directory of the embedded store and queues.
    #[arg(long, default_value = ".gantry", env = "GANTRY_STATE")]
    pub state: PathBuf,
    /// Use Blob Storage instead of the embedded store: a blob service URL
    /// (Entra ID credential) or a storage connection string (e.g. Azurite).
    #[arg(long, env = "GANTRY_STORAGE", hide_env_values = true)]
    pub storage: Option<String>,
    /// Blob container holding gantry's state.
    #[arg(long, default_value = "gantry", env = "GANTRY_CONTAINER")]
    pub container: String,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes, not a backtrace.
            eprintln!("error: {e:#}");
            if e.downcast_ref::<audit::FindingsFound>().is_some() {
                // Distinct from 1 (the command failed): findings are open.
                return std::process::ExitCode::from(2);
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    use gantry_runtime::telemetry::LogFormat;
    let default = if matches!(cli.command, Command::Serve)
        || std::env::var_os("FUNCTIONS_CUSTOMHANDLER_PORT").is_some()
    {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let format = if cli.log_json {
        LogFormat::Json
    } else {
        LogFormat::from_env(default).map_err(anyhow::Error::msg)?
    };
    // Kept until the end of main: dropping it flushes spans not yet exported.
    let _telemetry = telemetry::init(format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve::run().await,
            Command::Dev(args) => dev::run(args).await,
            Command::Send(args) => send::run(args).await,
            Command::Functions { json } => functions::print(json),
            Command::Render {
                app,
                digest,
                config,
                hash,
            } => policy::render(&app, &digest, config.as_deref(), hash),
            Command::Policy { command } => policy::run(command),
            Command::Runs { command } => runs::run(command).await,
            Command::Package(args) => package::run(args),
            Command::Apps { command } => runs::apps(command).await,
            Command::Audit(args) => audit::run(args).await,
        }
    })
}
