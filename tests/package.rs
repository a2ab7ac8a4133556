//! `gantry package`: runs the real binary (`package --binary <this debug
//! build>`), then opens `dist/` and the zip and checks them against the
//! function registry (`gantry functions --json`), `host.json` and the modes
//! the Functions host needs.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gantry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.current_dir(root()).env("GANTRY_LOG", "warn");
    cmd
}

/// Function name → its `function.json` path in the package.
fn registry() -> Result<Vec<String>> {
    let out = gantry().args(["functions", "--json"]).output()?;
    assert!(out.status.success());
    let list: Vec<Value> = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .iter()
        .map(|f| f["name"].as_str().unwrap_or_default().to_string())
        .collect())
}

fn package(out: &Path, extra: &[&str]) -> Result<std::process::Output> {
    gantry()
        .arg("package")
        .arg("--binary")
        .arg(env!("CARGO_BIN_EXE_gantry"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .context("running gantry package")
}

/// Every zip entry: name → (unix mode, bytes).
fn unzip(path: &Path) -> Result<BTreeMap<String, (u32, Vec<u8>)>> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path)?)?;
    let mut out = BTreeMap::new();
    for i in 0..archive.len() {
        let mut file = archive.by_index(i)?;
        let name = file.name()?.to_string();
        let mode = file.unix_mode().context("entry without a unix mode")?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        assert!(
            out.insert(name.clone(), (mode, bytes)).is_none(),
            "{name} twice"
        );
    }
    Ok(out)
}

#[test]
fn package_layout_matches_the_registry_and_keeps_the_run_bit() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dist = tmp.path().join("dist");
    let out = package(&dist, &[])?;
    assert!(
        out.status.success(),
        "gantry package failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let host: Value = serde_json::from_slice(&std::fs::read(root().join("host.json"))?)?;
    let exe = host["customHandler"]["description"]["defaultExecutablePath"]
        .as_str()
        .context("host.json names no executable")?
        .to_string();

    let mut expected: Vec<String> = vec!["host.json".into(), exe.clone(), "gantry.toml".into()];
    let functions = registry()?;
    assert!(functions.len() >= 6, "registry too small: {functions:?}");
    for name in &functions {
        expected.push(format!("{name}/function.json"));
    }
    // policy-enforce reads `[policy] folder` at run time: shipped at the same path.
    let config = gantry_pipeline::Config::load(&root().join("gantry.toml"))?;
    let mut policy_files = Vec::new();
    if let Some(folder) = &config.policy.folder {
        let mut files = Vec::new();
        walk(&root().join(folder), &root().join(folder), &mut files)?;
        assert!(
            !files.is_empty(),
            "policy folder {} is empty",
            folder.display()
        );
        for f in files {
            let path = format!("{}/{f}", folder.display());
            policy_files.push(path.clone());
            expected.push(path);
        }
    }
    expected.sort();

    // The zip: exactly the expected entries, nothing else (no .git, target, sources).
    let zip_path = tmp.path().join("dist.zip");
    let entries = unzip(&zip_path)?;
    assert_eq!(entries.keys().cloned().collect::<Vec<_>>(), expected);
    for name in entries.keys() {
        assert!(!name.starts_with(".git") && !name.starts_with("target/"));
        assert!(!name.ends_with(".rs") && !name.contains("Cargo"));
    }

    // Run bit on the executable, in the zip's external attributes.
    let (mode, bytes) = &entries[&exe];
    assert_eq!(
        mode & 0o777,
        0o755,
        "executable mode in the zip is {:o}",
        mode
    );
    assert_eq!(
        mode & 0o170000,
        0o100000,
        "executable is not a regular file"
    );
    assert_eq!(bytes, &std::fs::read(env!("CARGO_BIN_EXE_gantry"))?);
    for (name, (mode, _)) in &entries {
        if name != &exe {
            assert_eq!(mode & 0o777, 0o644, "{name} mode {mode:o}");
        }
    }

    // host.json in the package points at the packaged executable and runs `serve`.
    let packaged_host: Value = serde_json::from_slice(&entries["host.json"].1)?;
    assert_eq!(
        packaged_host["customHandler"]["description"]["defaultExecutablePath"],
        exe
    );
    assert_eq!(
        packaged_host["customHandler"]["description"]["arguments"],
        serde_json::json!(["serve"])
    );

    // Every function.json is the source file, byte for byte.
    for name in &functions {
        let source = std::fs::read(root().join("functions").join(name).join("function.json"))?;
        assert_eq!(
            entries[&format!("{name}/function.json")].1,
            source,
            "{name}"
        );
    }
    for path in &policy_files {
        assert_eq!(entries[path].1, std::fs::read(root().join(path))?, "{path}");
    }
    assert_eq!(
        entries["gantry.toml"].1,
        std::fs::read(root().join("gantry.toml"))?
    );

    // dist/ holds the same tree with the same modes.
    let mut on_disk = Vec::new();
    walk(&dist, &dist, &mut on_disk)?;
    on_disk.sort();
    assert_eq!(on_disk, expected);
    let disk_mode = std::fs::metadata(dist.join(&exe))?.permissions().mode();
    assert_eq!(disk_mode & 0o777, 0o755);

    // The packaged executable is runnable as the host would start it and
    // hosts the same functions.
    let listed = Command::new(dist.join(&exe))
        .args(["functions", "--json"])
        .output()?;
    assert!(listed.status.success());
    let list: Vec<Value> = serde_json::from_slice(&listed.stdout)?;
    assert_eq!(list.len(), functions.len());
    Ok(())
}

#[test]
fn bad_input_writes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;

    // Not an executable for the Functions host.
    let dist = tmp.path().join("dist");
    let out = gantry()
        .arg("package")
        .arg("--binary")
        .arg(root().join("host.json"))
        .arg("--out")
        .arg(&dist)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an ELF"));
    assert!(!dist.exists() && !tmp.path().join("dist.zip").exists());

    // A configuration that does not load.
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[apps]]\nname = \"web\"\nrepo = \"a/b\"\nbogus = 1\n",
    )?;
    let out = package(&dist, &["--config", config.to_str().unwrap_or_default()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));
    assert!(!dist.exists() && !tmp.path().join("dist.zip").exists());

    // A function folder the binary does not host.
    let fake_root = tmp.path().join("src-tree");
    std::fs::create_dir_all(fake_root.join("functions/ghost"))?;
    std::fs::copy(root().join("host.json"), fake_root.join("host.json"))?;
    std::fs::write(
        fake_root.join("functions/ghost/function.json"),
        r#"{"bindings":[{"type":"httpTrigger","direction":"in","name":"req"}]}"#,
    )?;
    let out = package(
        &dist,
        &[
            "--root",
            fake_root.to_str().unwrap_or_default(),
            "--config",
            root().join("gantry.toml").to_str().unwrap_or_default(),
        ],
    )?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("functions/ghost"));
    assert!(!dist.exists());
    Ok(())
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(base, &path, out)?;
        } else {
            out.push(
                path.strip_prefix(base)?
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
    Ok(())
}
