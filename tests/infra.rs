//! Consistency between the code and `infra/`: the queues the functions
//! trigger on and send to, the settings the code reads, and the role
//! assignments that let the identity touch each of them.
//!
//! The Bicep is read as text with a small bracket matcher (strings and `//`
//! comments skipped), not a Bicep compiler: it finds the `var queues`,
//! `var receiveQueues`, `var sendQueues`, `var appSettings` blocks and
//! `param alertSettings` of `infra/main.bicep` by their headers, and entries
//! one per line. Limits: a block renamed or built by an expression
//! (`concat`, loops) is not understood and fails the test loudly, which is
//! the intent; values are compared as text. `scripts/check-bicep.py` checks
//! the syntax and module wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use gantry_runtime::settings::{self, Kind};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(root().join(rel)).with_context(|| rel.to_string())
}

/// The text between the bracket that ends `header` and its matching close,
/// skipping `'...'` strings (with `\'` escapes) and `//` comments.
fn block<'a>(text: &'a str, header: &str) -> Result<&'a str> {
    let start = text
        .find(header)
        .with_context(|| format!("`{header}` not found"))?;
    let open_at = start + header.len() - 1;
    let open = text.as_bytes()[open_at];
    let close = match open {
        b'[' => b']',
        b'{' => b'}',
        _ => bail!("`{header}` must end with [ or {{"),
    };
    let bytes = text.as_bytes();
    let (mut depth, mut i) = (0usize, open_at);
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b if b == open => depth += 1,
            b if b == close => {
                depth -= 1;
                if depth == 0 {
                    return Ok(&text[open_at + 1..i]);
                }
            }
            _ => {}
        }
        i += 1;
    }
    bail!("`{header}` is not closed")
}

/// Lines of a block without `//` comments (outside strings) and blanks, trimmed.
fn lines(block: &str) -> impl Iterator<Item = &str> {
    block
        .lines()
        .map(|line| {
            let bytes = line.as_bytes();
            let (mut in_string, mut i) = (false, 0);
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' if in_string => i += 1,
                    b'\'' => in_string = !in_string,
                    b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => {
                        return line[..i].trim();
                    }
                    _ => {}
                }
                i += 1;
            }
            line.trim()
        })
        .filter(|l| !l.is_empty())
}

/// `'a'` entries of an array block.
fn string_list(text: &str, header: &str) -> Result<BTreeSet<String>> {
    lines(block(text, header)?)
        .map(|l| {
            l.strip_prefix('\'')
                .and_then(|l| l.strip_suffix('\''))
                .map(str::to_string)
                .with_context(|| format!("`{header}`: {l:?} is not a plain string entry"))
        })
        .collect()
}

/// `queues` of main.bicep: name → sessions.
fn bicep_queues(main: &str) -> Result<BTreeMap<String, bool>> {
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    for line in lines(block(main, "var queues = [")?) {
        if let Some(v) = line.strip_prefix("name: ") {
            name = Some(v.trim_matches('\'').to_string());
        } else if let Some(v) = line.strip_prefix("sessions: ") {
            let n = name
                .take()
                .context("sessions before name in `var queues`")?;
            out.insert(n, v == "true");
        }
    }
    Ok(out)
}

/// `appSettings` of main.bicep: name → value expression (text).
fn bicep_app_settings(main: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for line in lines(block(main, "var appSettings = {")?) {
        let (k, v) = line
            .split_once(':')
            .with_context(|| format!("app setting line {line:?}"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Service Bus trigger bindings of every `functions/*/function.json` that
/// exists now: (function, queue, sessions, connection).
fn trigger_queues() -> Result<Vec<(String, String, bool, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("functions"))? {
        let dir = entry?.path();
        let function = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let path = dir.join("function.json");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| path.display().to_string())?;
        for b in json["bindings"].as_array().into_iter().flatten() {
            if b["type"] == "serviceBusTrigger" {
                out.push((
                    function.clone(),
                    b["queueName"].as_str().unwrap_or_default().to_string(),
                    b["isSessionsEnabled"].as_bool().unwrap_or(false),
                    b["connection"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    Ok(out)
}

#[test]
fn every_trigger_queue_exists_in_the_bicep_with_its_sessions() -> Result<()> {
    let main = read("infra/main.bicep")?;
    let queues = bicep_queues(&main)?;
    let settings = bicep_app_settings(&main)?;
    let triggers = trigger_queues()?;
    assert!(
        triggers.len() >= 4,
        "too few Service Bus functions found: {triggers:?}"
    );
    for (function, queue, sessions, connection) in &triggers {
        let Some(bicep_sessions) = queues.get(queue) else {
            panic!("{function} triggers on queue {queue}, which infra/main.bicep does not create");
        };
        assert_eq!(
            bicep_sessions, sessions,
            "{function}: isSessionsEnabled={sessions} but queue {queue} has requiresSession={bicep_sessions}"
        );
        // The host resolves `connection` to `<name>__fullyQualifiedNamespace` (+ credential, clientId).
        for suffix in ["fullyQualifiedNamespace", "credential", "clientId"] {
            assert!(
                settings.contains_key(&format!("{connection}__{suffix}")),
                "{function}: app setting {connection}__{suffix} missing"
            );
        }
    }
    // The Bicep creates exactly the queues the code knows, with sessions where the sender sets them.
    let code: BTreeSet<String> = gantry_bus::QUEUES.iter().map(|q| q.to_string()).collect();
    assert_eq!(queues.keys().cloned().collect::<BTreeSet<_>>(), code);
    for (queue, sessions) in &queues {
        assert_eq!(
            *sessions,
            gantry_bus::SESSION_QUEUES.contains(&queue.as_str()),
            "{queue}: sessions differ from gantry_bus::SESSION_QUEUES"
        );
    }

    // Every queue gets the properties the pipeline relies on.
    let sb = read("infra/modules/servicebus.bicep")?;
    for property in [
        "requiresSession: q.sessions",
        "requiresDuplicateDetection: true",
        "maxDeliveryCount: maxDeliveryCount",
        "lockDuration: lockDuration",
        "disableLocalAuth: true",
    ] {
        assert!(sb.contains(property), "servicebus.bicep lacks `{property}`");
    }
    let module = block(&main, "module serviceBus 'modules/servicebus.bicep' = {")?;
    assert!(module.contains("queues: queues"));
    assert!(module.contains("maxDeliveryCount: maxDeliveryCount"));
    // The runtime's idea of the last delivery is the queue's.
    assert_eq!(
        settings["GANTRY_MAX_DELIVERY_COUNT"],
        "string(maxDeliveryCount)"
    );
    Ok(())
}

/// `(name, file)` of every environment variable literal read under `dir`.
fn env_reads(dir: &Path, out: &mut Vec<(String, String)>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            // Integration tests set variables for the binary; they do not read settings.
            if name != "tests" && name != "target" {
                env_reads(&path, out)?;
            }
            continue;
        }
        if !name.ends_with(".rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        for pattern in [
            "env::var(\"",
            "env::var_os(\"",
            "from_env(\"",
            "env = \"",
            "env!(\"",
        ] {
            for (at, _) in text.match_indices(pattern) {
                // `url_env = "..."` in a TOML example is configuration, not a read.
                let before = text[..at].chars().next_back().unwrap_or(' ');
                if pattern.starts_with("env = ")
                    && (before.is_ascii_alphanumeric() || before == '_')
                {
                    continue;
                }
                let rest = &text[at + pattern.len()..];
                let Some(end) = rest.find('"') else { continue };
                out.push((rest[..end].to_string(), path.display().to_string()));
            }
        }
    }
    Ok(())
}

#[test]
fn the_code_reads_only_listed_settings() -> Result<()> {
    let mut reads = Vec::new();
    for dir in ["src", "shared", "functions"] {
        env_reads(&root().join(dir), &mut reads)?;
    }
    // The scan works: it finds reads we know exist.
    let names: BTreeSet<&str> = reads.iter().map(|(n, _)| n.as_str()).collect();
    for known in ["GANTRY_CONFIG", "GANTRY_STORAGE", "GANTRY_API_TOKENS"] {
        assert!(names.contains(known), "scan did not find {known}");
    }
    for (name, file) in &reads {
        // Compile-time cargo variables (env!("CARGO_MANIFEST_DIR") ...) are not settings.
        if name.starts_with("CARGO_") && name != "CARGO_TARGET_DIR" {
            continue;
        }
        assert!(
            settings::find(name).is_some(),
            "{file} reads {name}, which is not in gantry_runtime::settings::ALL (add it there and, if `gantry serve` needs it, to infra/main.bicep appSettings)"
        );
    }
    // And the list does not rot: every listed setting is read somewhere.
    for s in settings::ALL {
        assert!(
            names.contains(s.name),
            "{} is listed in settings::ALL but nothing reads it",
            s.name
        );
    }
    Ok(())
}

#[test]
fn every_setting_gantry_serve_reads_is_an_app_setting() -> Result<()> {
    let main = read("infra/main.bicep")?;
    let app = bicep_app_settings(&main)?;
    let vault_module = block(&main, "module vault 'modules/keyvault.bicep' = {")?;
    for s in settings::ALL {
        match s.kind {
            Kind::AppSetting => assert!(
                app.contains_key(s.name),
                "{} ({}) is not set in infra/main.bicep appSettings",
                s.name,
                s.meaning
            ),
            Kind::Secret => {
                let value = app
                    .get(s.name)
                    .with_context(|| format!("secret {} is not an app setting", s.name))?;
                assert!(
                    value.starts_with("'@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/"),
                    "{} must be a Key Vault reference, is {value}",
                    s.name
                );
                // ...to a secret the deployment creates: an unresolved
                // reference would hand the literal reference text to gantry.
                let secret = value
                    .rsplit("secrets/")
                    .next()
                    .and_then(|v| v.strip_suffix(")'"))
                    .context("secret name")?;
                assert!(
                    vault_module.contains(&format!("name: '{secret}'")),
                    "{}: Key Vault secret {secret} is not created by the vault module",
                    s.name
                );
            }
            Kind::Optional => {}
            Kind::Platform | Kind::Local => assert!(
                !app.contains_key(s.name),
                "{} is set by the platform or only local; the Bicep must not set it",
                s.name
            ),
        }
    }

    // Channel credentials named in gantry.toml (url_env / secret_env / token_env,
    // in comments too: the documented examples) are Key Vault-backed settings.
    let alert_settings = string_list(&main, "param alertSettings array = [")?;
    assert!(
        main.contains("s => '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/${toLower(replace(s, '_', '-'))})'"),
        "alert settings must be Key Vault references"
    );
    assert!(main.contains("appSettings: union(appSettings, alertSettingValues)"));
    for setting in &alert_settings {
        assert!(
            setting
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "{setting}: not an environment variable name"
        );
    }
    let mut named = BTreeSet::new();
    for file in ["gantry.toml"] {
        let text = read(file)?;
        for key in ["url_env", "secret_env", "token_env"] {
            for (at, _) in text.match_indices(key) {
                let rest = text[at + key.len()..].trim_start();
                let Some(rest) = rest.strip_prefix('=') else {
                    continue;
                };
                let rest = rest.trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                if let Some(end) = rest.find('"') {
                    named.insert(rest[..end].to_string());
                }
            }
        }
    }
    for name in &named {
        assert!(
            alert_settings.contains(name),
            "gantry.toml names {name}; add it to param alertSettings in infra/main.bicep"
        );
    }
    Ok(())
}

#[test]
fn role_assignments_cover_every_resource_the_code_touches() -> Result<()> {
    let main = read("infra/main.bicep")?;
    let receive = string_list(&main, "var receiveQueues = [")?;
    let send = string_list(&main, "var sendQueues = [")?;

    // Receive: every queue a function triggers on.
    for (function, queue, _, _) in trigger_queues()? {
        assert!(
            receive.contains(&queue),
            "{function} triggers on {queue}: no receiver role"
        );
    }
    // Send: every queue the code may send to (gantry_bus refuses any other).
    for queue in gantry_bus::QUEUES {
        assert!(
            send.contains(*queue),
            "gantry may send to {queue}: no sender role"
        );
    }
    // The loops assign exactly those roles, per queue.
    let receivers = block(&main, "module receiverRoles 'modules/queue-role.bicep' = [")?;
    assert!(receivers.contains("for queue in receiveQueues:"));
    assert!(receivers.contains("roleId: roles.serviceBusDataReceiver"));
    let senders = block(&main, "module senderRoles 'modules/queue-role.bicep' = [")?;
    assert!(senders.contains("for queue in sendQueues:"));
    assert!(senders.contains("roleId: roles.serviceBusDataSender"));
    let queue_role = read("infra/modules/queue-role.bicep")?;
    assert!(
        queue_role.contains("scope: queue\n"),
        "queue roles must be scoped to the queue, not the namespace"
    );

    // Event Grid and the Defender Logic App send with the identity too.
    let eventgrid = read("infra/modules/eventgrid.bicep")?;
    assert!(eventgrid.contains("deliveryWithResourceIdentity"));
    assert!(main.contains("queueId: '${serviceBus.outputs.id}/queues/registry-events'"));
    assert!(send.contains("registry-events"));
    let defender = read("infra/modules/defender.bicep")?;
    assert!(defender.contains("param queueName string = 'security-events'"));
    assert!(defender.contains("type: 'ManagedServiceIdentity'"));
    assert!(send.contains("security-events"));

    // State: Blob Data Contributor on the state container, not the account.
    let roles = read("infra/modules/roles.bicep")?;
    let state = block(
        &roles,
        "resource stateBlobContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {",
    )?;
    assert!(state.contains("scope: stateContainer"));
    assert!(state.contains("roles.storageBlobDataContributor"));
    // Key Vault references: Secrets User on the vault.
    let vault = block(
        &roles,
        "resource vaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {",
    )?;
    assert!(vault.contains("scope: vault") && vault.contains("roles.keyVaultSecretsUser"));
    // Host storage (AzureWebJobsStorage, deployment package).
    let host = block(
        &roles,
        "resource hostBlobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {",
    )?;
    assert!(host.contains("scope: hostAccount") && host.contains("roles.storageBlobDataOwner"));
    // The host must not start before its roles exist.
    let app = block(&main, "module functionApp 'modules/functionapp.bicep' = {")?;
    for dep in ["resourceRoles", "receiverRoles", "senderRoles"] {
        assert!(app.contains(dep), "functionApp does not depend on {dep}");
    }
    // Resource Graph (defender scan source) and AKS (kubernetes deploy target).
    assert!(main.contains("module registryReader 'modules/registry-reader.bicep'"));
    assert!(main.contains("module subscriptionReader 'modules/subscription-reader.bicep'"));
    let aks = read("infra/modules/aks-roles.bicep")?;
    assert!(aks.contains("scope: namespace[i]") && aks.contains("roles.aksRbacWriter"));

    // The role GUIDs are the built-in roles they are named after.
    let ids = block(&main, "var roles = {")?;
    for (name, id) in [
        (
            "serviceBusDataSender",
            "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39",
        ),
        (
            "serviceBusDataReceiver",
            "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0",
        ),
        (
            "storageBlobDataOwner",
            "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
        ),
        (
            "storageBlobDataContributor",
            "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
        ),
        (
            "keyVaultSecretsUser",
            "4633458b-17de-408a-b874-0445c86b69e6",
        ),
        (
            "monitoringMetricsPublisher",
            "3913510d-42f4-4e42-8a64-420c390055eb",
        ),
        ("reader", "acdd72a7-3385-48ef-bd42-f606fba81ae7"),
        ("aksClusterUser", "4abbcc35-e782-43d8-92c5-2d3f1bd2253f"),
        ("aksRbacWriter", "a7ffa36f-339b-4b5c-8bdf-e2c188b2c0eb"),
    ] {
        assert!(
            ids.contains(&format!("{name}: '{id}'")),
            "role {name} is not {id}"
        );
    }
    Ok(())
}

#[test]
fn storage_is_keyless_and_the_app_uses_the_identity() -> Result<()> {
    let storage = read("infra/modules/storage.bicep")?;
    assert!(storage.contains("allowSharedKeyAccess: false"));
    assert!(storage.contains("allowBlobPublicAccess: false"));
    let main = read("infra/main.bicep")?;
    let app = bicep_app_settings(&main)?;
    assert_eq!(app["AzureWebJobsStorage__credential"], "'managedidentity'");
    assert_eq!(app["ServiceBusConnection__credential"], "'managedidentity'");
    assert_eq!(app["AZURE_CLIENT_ID"], "identity.outputs.clientId");
    // No connection strings or keys anywhere in the settings.
    for (k, v) in &app {
        assert!(
            !v.contains("AccountKey") && !v.contains("SharedAccessKey") && !v.contains("listKeys"),
            "{k} carries a key"
        );
    }
    let function_app = read("infra/modules/functionapp.bicep")?;
    for needle in [
        "name: 'FC1'",
        "tier: 'FlexConsumption'",
        "name: 'custom'",
        "type: 'UserAssignedIdentity'",
        "keyVaultReferenceIdentity: identityId",
        "type: 'UserAssigned'",
    ] {
        assert!(
            function_app.contains(needle),
            "functionapp.bicep lacks {needle}"
        );
    }
    Ok(())
}

#[test]
fn block_reader_skips_strings_and_comments() -> Result<()> {
    let text = "var a = [\n  'x]' // ] in a comment\n  'y\\'z'\n]\nvar b = 1";
    assert_eq!(
        string_list(text, "var a = [")?,
        ["x]".to_string(), "y\\'z".to_string()]
            .into_iter()
            .collect()
    );
    assert!(block("var a = [ 'open", "var a = [").is_err());
    Ok(())
}

#[test]
fn azd_and_workflows_match_the_code() -> Result<()> {
    // azd deploys what `gantry package` writes, to the app tagged with the service name.
    let azure = read("azure.yaml")?;
    assert!(
        azure.contains("  gantry:\n"),
        "azd service must be `gantry`"
    );
    assert!(azure.contains("host: function") && azure.contains("language: custom"));
    assert!(azure.contains("dist: dist"));
    assert!(azure.contains("-- package --out dist"));
    assert!(azure.contains("path: infra") && azure.contains("module: main"));
    let main = read("infra/main.bicep")?;
    assert!(main.contains("'azd-service-name': 'gantry'"));

    // The application workflow: OIDC, SHA tag, OCI labels, and the Trivy report
    // where scan-check reads it (scans/{digest}.trivy.json in the state container).
    let app = read("infra/github/app-build.yml")?;
    assert!(app.contains("id-token: write") && app.contains("uses: azure/login@"));
    assert!(
        !app.contains("secrets."),
        "the app workflow must not need stored secrets"
    );
    assert!(app.contains(":${{ github.sha }}"));
    assert!(app.contains("org.opencontainers.image.revision=${{ github.sha }}"));
    assert!(app.contains("org.opencontainers.image.source="));
    assert!(app.contains("--name \"scans/${DIGEST}.trivy.json\""));
    assert!(app.contains("--auth-mode login"));
    let scan_check = read("shared/context/src/lib.rs")?;
    assert!(scan_check.contains("format!(\"scans/{digest}.trivy.json\")"));

    // gantry's own workflow: the same test command as CI, the package, OIDC deploy of the zip.
    let own = read("infra/github/gantry.yml")?;
    assert!(own.contains("run: ./scripts/test"));
    assert!(own.contains("-- package --out dist"));
    assert!(own.contains("package: dist.zip"));
    assert!(own.contains("id-token: write") && !own.contains("secrets."));
    Ok(())
}
