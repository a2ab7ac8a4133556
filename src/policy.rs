//! `gantry render` and `gantry policy test`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use gantry_pipeline::Digest;

#[derive(clap::Subcommand)]
pub enum PolicyCommand {
    /// Run gator-style suite.yaml files (a file, or a folder searched recursively).
    Test {
        /// Suite file or folder (e.g. policies/ or a gatekeeper-library checkout).
        path: PathBuf,
    },
}

/// The configuration `render` uses: the flag, else ./gantry.toml, else the example.
fn config(path: Option<&Path>) -> Result<gantry_pipeline::Config> {
    let default = PathBuf::from("gantry.toml");
    let path = path.or_else(|| default.is_file().then_some(default.as_path()));
    crate::wiring::load_config(path)
}

pub fn render(app: &str, digest: &str, config_path: Option<&Path>, print_hash: bool) -> Result<()> {
    let config = config(config_path)?;
    let Some(app) = config.app(app) else {
        bail!(
            "no app {app:?} in the configuration; apps: {}",
            config
                .apps
                .iter()
                .map(|a| a.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let digest = Digest::parse(digest)?;
    let rendered = gantry_manifests::render(&gantry_manifests::RenderInput {
        app,
        digest: &digest,
        registry_image: &app.image,
        run_id: None,
        commit: None,
        verdicts: None,
    })?;
    print!("{}", gantry_manifests::to_yaml(&rendered.objects)?);
    if print_hash {
        eprintln!("manifest hash {}", rendered.hash);
    }
    Ok(())
}

pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Test { path } => {
            let report = gantry_policy::run_suites(&path)
                .with_context(|| format!("running the suites in {}", path.display()))?;
            for failure in &report.failures {
                println!("{failure}");
            }
            println!("{} passed, {} failed", report.passed, report.failed);
            if report.failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
