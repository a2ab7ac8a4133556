//! `gantry package`: the deployment package the Functions host runs.
//!
//! ```text
//! dist/
//!   host.json                 customHandler → ./gantry serve
//!   gantry                    the Linux x86_64 executable, mode 0755
//!   gantry.toml               the configuration (GANTRY_CONFIG points here)
//!   <function>/function.json  one folder per function of the registry
//! dist.zip                    the same tree for zip deploy (run bit kept)
//! ```
//!
//! Everything is checked before anything is written (the executable is an
//! x86_64 ELF file, `host.json` runs it, every function of
//! [`crate::functions::all`] has exactly one `functions/<name>/function.json`,
//! `gantry.toml` parses), and the tree is assembled in a scratch folder that
//! replaces `dist/` only when complete, so a failed run leaves no half package.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

/// `gantry package` arguments.
#[derive(clap::Args)]
pub struct PackageArgs {
    /// Package this executable instead of building the release binary
    /// (`cargo build --release --target x86_64-unknown-linux-gnu -p gantry`).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Output folder (replaced as a whole).
    #[arg(long, default_value = "dist")]
    pub out: PathBuf,
    /// The zip for zip deploy; default `<out>.zip`.
    #[arg(long)]
    pub zip: Option<PathBuf>,
    /// The configuration to ship as `gantry.toml`.
    #[arg(long, default_value = "gantry.toml")]
    pub config: PathBuf,
    /// Source tree holding `host.json` and `functions/`.
    #[arg(long, default_value = ".")]
    pub root: PathBuf,
}

/// The Rust target the Functions host (Linux, x86_64) runs.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Unix mode of the executable in `dist/` and in the zip.
pub const EXECUTABLE_MODE: u32 = 0o755;

/// Unix mode of every other file.
pub const FILE_MODE: u32 = 0o644;

/// One file of the package: its path inside the package (`/`-separated),
/// its bytes and its mode.
struct Entry {
    path: String,
    bytes: Vec<u8>,
    mode: u32,
}

/// `gantry package`.
pub fn run(args: PackageArgs) -> Result<()> {
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => build_release(&args.root)?,
    };
    let entries = collect(&args.root, &binary, &args.config)?;
    let zip_path = args.zip.clone().unwrap_or_else(|| {
        let mut name = args.out.as_os_str().to_owned();
        name.push(".zip");
        PathBuf::from(name)
    });
    write_dir(&args.out, &entries)?;
    write_zip(&zip_path, &entries)?;
    eprintln!(
        "packaged {} files into {} and {}",
        entries.len(),
        args.out.display(),
        zip_path.display()
    );
    Ok(())
}

/// Builds the release binary for [`TARGET`], showing cargo's progress, and
/// returns its path.
fn build_release(root: &Path) -> Result<PathBuf> {
    eprintln!("==> cargo build --release --target {TARGET} -p gantry");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--release", "--locked", "--target", TARGET, "-p"])
        .arg("gantry")
        .current_dir(root)
        .status()
        .context("running cargo (is the Rust toolchain installed?)")?;
    ensure!(status.success(), "cargo build failed ({status})");
    // Cargo's own convention for the target folder.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target_dir.join(TARGET).join("release").join("gantry"))
}

/// Reads and checks every file of the package.
fn collect(root: &Path, binary: &Path, config: &Path) -> Result<Vec<Entry>> {
    let host_path = root.join("host.json");
    let host_text = std::fs::read_to_string(&host_path)
        .with_context(|| format!("reading {}", host_path.display()))?;
    let host: serde_json::Value = serde_json::from_str(&host_text)
        .with_context(|| format!("{} is not JSON", host_path.display()))?;
    let exe = executable_name(&host)?;

    let binary_bytes =
        std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    check_linux_x86_64(&binary_bytes)
        .with_context(|| format!("{} cannot run on the Functions host", binary.display()))?;

    let config_text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    // A package whose configuration does not load would start and fail on
    // every invocation: refuse it here.
    let parsed = gantry_pipeline::Config::parse(&config_text, &config.display().to_string())?;
    let policy_folder = parsed.policy.folder.clone();

    let mut entries = vec![
        Entry {
            path: "host.json".into(),
            bytes: host_text.into_bytes(),
            mode: FILE_MODE,
        },
        Entry {
            path: exe,
            bytes: binary_bytes,
            mode: EXECUTABLE_MODE,
        },
        Entry {
            path: "gantry.toml".into(),
            bytes: config_text.into_bytes(),
            mode: FILE_MODE,
        },
    ];

    // policy-enforce reads `[policy] folder` relative to gantry.toml at run
    // time: ship it at the same relative path.
    if let Some(folder) = policy_folder {
        let rel = package_relative(&folder)?;
        let base = config.parent().unwrap_or(Path::new("")).join(&folder);
        let mut files = Vec::new();
        list_files(&base, &mut files)
            .with_context(|| format!("reading the policy folder {}", base.display()))?;
        files.sort();
        for file in files {
            let inner = file
                .strip_prefix(&base)?
                .to_string_lossy()
                .replace('\\', "/");
            entries.push(Entry {
                path: format!("{rel}/{inner}"),
                bytes: std::fs::read(&file)
                    .with_context(|| format!("reading {}", file.display()))?,
                mode: FILE_MODE,
            });
        }
    }

    let functions_dir = root.join("functions");
    let registry: Vec<String> = crate::functions::all()
        .iter()
        .map(|f| f.name.to_string())
        .collect();
    for entry in std::fs::read_dir(&functions_dir)
        .with_context(|| format!("reading {}", functions_dir.display()))?
    {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if !registry.contains(&name) {
            bail!(
                "functions/{name} is not a function of this binary (src/functions.rs): the host would route to a missing handler"
            );
        }
    }
    for name in &registry {
        let path = functions_dir.join(name).join("function.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (function {name})", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        ensure!(
            json["bindings"].as_array().is_some_and(|b| !b.is_empty()),
            "{} has no bindings",
            path.display()
        );
        entries.push(Entry {
            path: format!("{name}/function.json"),
            bytes: text.into_bytes(),
            mode: FILE_MODE,
        });
    }
    Ok(entries)
}

/// `folder` as a `/`-separated path inside the package: relative, and
/// never climbing out of it.
fn package_relative(folder: &Path) -> Result<String> {
    use std::path::Component;
    let mut parts = Vec::new();
    for component in folder.components() {
        match component {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => bail!(
                "[policy] folder {} must be a relative path inside the package",
                folder.display()
            ),
        }
    }
    ensure!(!parts.is_empty(), "[policy] folder is empty");
    Ok(parts.join("/"))
}

/// Every file under `dir`, recursively (hidden files skipped: no `.git`).
fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            list_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The executable `host.json` starts: a plain file name at the package root.
fn executable_name(host: &serde_json::Value) -> Result<String> {
    let handler = &host["customHandler"];
    let Some(path) = handler["description"]["defaultExecutablePath"].as_str() else {
        bail!("host.json has no customHandler.description.defaultExecutablePath");
    };
    let name = path.strip_prefix("./").unwrap_or(path);
    ensure!(
        !name.is_empty()
            && !name.contains(['/', '\\'])
            && name != "."
            && name != ".."
            && !name.contains(".."),
        "host.json defaultExecutablePath {path:?} must name a file at the package root"
    );
    ensure!(
        handler["description"]["arguments"] == serde_json::json!(["serve"]),
        "host.json must start `{name} serve`"
    );
    ensure!(
        handler["enableForwardingHttpRequest"] == true,
        "host.json must set customHandler.enableForwardingHttpRequest (the webhook HMAC needs the raw request)"
    );
    Ok(name.to_string())
}

/// The Functions host runs Linux on x86_64: an executable for anything else
/// deploys fine and then fails to start.
fn check_linux_x86_64(bytes: &[u8]) -> Result<()> {
    ensure!(bytes.len() > 20, "not an executable (too short)");
    ensure!(&bytes[..4] == b"\x7fELF", "not an ELF executable");
    ensure!(
        bytes[4] == 2 && bytes[5] == 1,
        "not a 64-bit little-endian ELF"
    );
    let machine = u16::from_le_bytes([bytes[18], bytes[19]]);
    ensure!(
        machine == 62,
        "built for ELF machine {machine}, not x86_64 (62)"
    );
    Ok(())
}

/// Writes the tree to a scratch folder beside `out`, then swaps it in.
fn write_dir(out: &Path, entries: &[Entry]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(".gantry-package-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a scratch folder in {}", parent.display()))?;
    for entry in entries {
        let path = scratch.path().join(&entry.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &entry.bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(entry.mode))?;
    }
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    let staged = scratch.keep();
    std::fs::rename(&staged, out)
        .with_context(|| format!("moving {} to {}", staged.display(), out.display()))?;
    Ok(())
}

/// Writes the zip: deflated, fixed timestamps (same input, same bytes), and
/// each entry's Unix mode in the external attributes, which zip deploy on
/// Linux restores — without it the host cannot start the executable.
fn write_zip(path: &Path, entries: &[Entry]) -> Result<()> {
    use zip::write::SimpleFileOptions;
    let tmp = path.with_extension("zip.partial");
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    for entry in entries {
        let options = SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .last_modified_time(zip::DateTime::default())
            .unix_permissions(entry.mode);
        zip.start_file(entry.path.as_str(), options)
            .with_context(|| format!("adding {} to the zip", entry.path))?;
        zip.write_all(&entry.bytes)?;
    }
    let mut writer = zip.finish().context("finishing the zip")?;
    writer.flush()?;
    drop(writer);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executable_name_rejects_paths_outside_the_root() {
        let host = |p: &str| serde_json::json!({"customHandler": {"description": {"defaultExecutablePath": p, "arguments": ["serve"]}, "enableForwardingHttpRequest": true}});
        assert_eq!(executable_name(&host("gantry")).unwrap(), "gantry");
        assert_eq!(executable_name(&host("./gantry")).unwrap(), "gantry");
        for bad in ["", "../gantry", "bin/gantry", "/usr/bin/gantry", ".."] {
            assert!(executable_name(&host(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_x86_64_elf_is_accepted() {
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        assert!(check_linux_x86_64(&elf).is_ok());
        elf[18] = 183; // aarch64
        assert!(check_linux_x86_64(&elf).is_err());
        assert!(check_linux_x86_64(b"#!/bin/sh\necho hello world, not elf").is_err());
    }
}
