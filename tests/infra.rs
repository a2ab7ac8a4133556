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
    // Beyond Writer (which covers Deployments, Services, ServiceAccounts,
    // NetworkPolicies and Ingresses to apply, and Deployments, ResourceQuotas
    // and LimitRanges to read), each custom role grants exactly these data
    // actions, no wildcard, at the scope named.
    let expected: BTreeMap<&str, (Vec<&str>, &str)> = BTreeMap::from([
        (
            "namespaceSettingsRole",
            (
                vec![
                    "Microsoft.ContainerService/managedClusters/resourcequotas/read",
                    "Microsoft.ContainerService/managedClusters/resourcequotas/write",
                    "Microsoft.ContainerService/managedClusters/limitranges/read",
                    "Microsoft.ContainerService/managedClusters/limitranges/write",
                ],
                "namespaceSettings",
            ),
        ),
        (
            "namespaceObjectsRole",
            (
                vec![
                    "Microsoft.ContainerService/managedClusters/namespaces/read",
                    "Microsoft.ContainerService/managedClusters/namespaces/write",
                ],
                "namespaceObjects",
            ),
        ),
        (
            "daemonSetReaderRole",
            (
                vec!["Microsoft.ContainerService/managedClusters/apps/daemonsets/read"],
                "daemonSetReader",
            ),
        ),
    ]);
    let mut found = BTreeMap::new();
    for (at, _) in aks.match_indices("\nresource ") {
        let line_end = aks[at + 1..].find('\n').map_or(aks.len(), |i| at + 1 + i);
        let header = &aks[at + 1..line_end];
        if !header.contains("'Microsoft.Authorization/roleDefinitions@") {
            continue;
        }
        let name = header.split_whitespace().nth(1).unwrap_or_default();
        let body = block(&aks, header)?;
        let actions = string_list(body, "dataActions: [")?;
        for action in &actions {
            assert!(
                !action.contains('*'),
                "{name}: wildcard data action {action}"
            );
        }
        found.insert(name.to_string(), actions);
    }
    assert_eq!(
        found.keys().map(String::as_str).collect::<Vec<_>>(),
        expected.keys().copied().collect::<Vec<_>>(),
        "custom AKS roles"
    );
    for (role, (actions, assignment)) in &expected {
        assert_eq!(
            found[*role],
            actions
                .iter()
                .map(|a| a.to_string())
                .collect::<BTreeSet<_>>(),
            "{role}"
        );
        let header_start = aks
            .find(&format!(
                "resource {assignment} 'Microsoft.Authorization/roleAssignments@"
            ))
            .with_context(|| format!("assignment {assignment}"))?;
        let assignment_body = &aks[header_start..];
        let assignment_body = &assignment_body[..assignment_body
            .find("\n}\n")
            .unwrap_or(assignment_body.len())];
        assert!(
            assignment_body.contains(&format!("roleDefinitionId: {role}.id")),
            "{assignment} does not assign {role}"
        );
    }
    // Per namespace wherever Kubernetes allows it (Namespace objects are cluster-scoped).
    for (assignment, scope) in [
        ("namespaceSettings", "scope: namespace[i]"),
        ("daemonSetReader", "scope: daemonSetNamespace[i]"),
        ("namespaceObjects", "scope: cluster"),
    ] {
        let at = aks
            .find(&format!("resource {assignment} '"))
            .with_context(|| assignment.to_string())?;
        let rest = &aks[at..];
        let rest = &rest[..rest.find("\n}\n").unwrap_or(rest.len())];
        assert!(rest.contains(scope), "{assignment} must be at {scope}");
    }
    assert!(aks.contains("for ns in daemonSetNamespaces:"));
    let (_, aks_module) = module_block(&main, "aksRoles")?;
    assert!(aks_module.contains("daemonSetNamespaces: daemonSetNamespaces"));
    // SecretProviderClass is a custom resource Azure RBAC cannot name: a
    // Kubernetes Role per namespace grants apply and delete (the prune of a
    // SecretProviderClass no longer rendered), nothing else.
    let spc = read("infra/kubernetes/secretproviderclass-role.yaml")?;
    assert!(spc.contains("kind: Role\n") && !spc.contains("ClusterRole"));
    assert!(spc.contains("apiGroups: [\"secrets-store.csi.x-k8s.io\"]"));
    assert!(spc.contains("resources: [\"secretproviderclasses\"]"));
    let verbs = spc
        .lines()
        .find_map(|l| l.trim().strip_prefix("verbs: "))
        .context("verbs")?;
    assert_eq!(
        verbs, r#"["get", "list", "watch", "create", "patch", "update", "delete"]"#,
        "SecretProviderClass role verbs"
    );
    for verb in ["deletecollection", "*", "escalate", "bind"] {
        assert!(
            !verbs.contains(verb),
            "SecretProviderClass role grants {verb}"
        );
    }
    assert!(spc.contains("kind: User\n    name: ${GANTRY_PRINCIPAL_ID}"));

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

/// `module <symbol> '<path>' = <condition>{` header of main.bicep and its body.
fn module_block<'a>(main: &'a str, symbol: &str) -> Result<(&'a str, &'a str)> {
    let start = main
        .find(&format!("module {symbol} '"))
        .with_context(|| format!("module {symbol} not found in infra/main.bicep"))?;
    let line_end = main[start..].find('\n').map_or(main.len(), |i| start + i);
    let header = &main[start..line_end];
    let body = block(&main[start..], header)?;
    Ok((header, body))
}

/// Every service the code (or the Functions host) reaches, by the app
/// settings that point it there: a setting whose value reads the outputs of
/// one of these modules makes that service reachable.
const REACHED: [(&str, &str); 4] = [
    ("storage.outputs.state", "state"),
    ("storage.outputs.host", "host"),
    ("serviceBus.outputs.", "servicebus"),
    ("${vaultUri}", "vault"),
];

/// Modules an app setting may read without being a network destination of
/// its own: the identity (ids, not an endpoint) and monitoring (Application
/// Insights ingestion stays public: no Azure Monitor Private Link Scope, see
/// docs/deploy.md).
const NOT_PRIVATE: [&str; 2] = ["identity.outputs.", "monitoring.outputs."];

#[test]
fn private_networking_covers_every_service_the_code_reaches() -> Result<()> {
    let main = read("infra/main.bicep")?;
    // The default stays the public, deployable layout.
    assert!(main.contains("param privateNetworking bool = false"));

    // Which services the settings reach (the code reads exactly these
    // settings: the_code_reads_only_listed_settings).
    let settings = bicep_app_settings(&main)?;
    let mut reached = BTreeSet::new();
    for (name, value) in &settings {
        let mut known = false;
        for (needle, service) in REACHED {
            if value.contains(needle) {
                reached.insert(service);
                known = true;
            }
        }
        let module_ref = value.contains(".outputs.") || value.contains("${vaultUri}");
        if module_ref && !known {
            assert!(
                NOT_PRIVATE.iter().any(|n| value.contains(n)),
                "app setting {name} = {value} reaches a service the private networking test does not know: give it a private endpoint and add it to REACHED"
            );
        }
    }
    assert_eq!(
        reached,
        BTreeSet::from(["state", "host", "servicebus", "vault"]),
        "the scan must find every service (state, host, Service Bus, Key Vault)"
    );

    // One private endpoint per service: condition, target, group id, DNS zone.
    let endpoints = [
        (
            "state",
            "stateBlobPrivateEndpoint",
            "if (privateNetworking)",
            "storage.outputs.stateAccountId",
            "blob",
            "privatelink.blob.core.windows.net",
        ),
        (
            "host",
            "hostBlobPrivateEndpoint",
            "if (privateNetworking)",
            "storage.outputs.hostAccountId",
            "blob",
            "privatelink.blob.core.windows.net",
        ),
        (
            "servicebus",
            "serviceBusPrivateEndpoint",
            "if (privateNetworking)",
            "serviceBus.outputs.id",
            "namespace",
            "privatelink.servicebus.windows.net",
        ),
        (
            "vault",
            "vaultPrivateEndpoint",
            "if (privateNetworking)",
            "vault.outputs.id",
            "vault",
            "privatelink.vaultcore.azure.net",
        ),
        // The registry is referenced, not created: an endpoint only when its id is given.
        (
            "registry",
            "registryPrivateEndpoint",
            "if (privateNetworking && !empty(privateRegistryId))",
            "privateRegistryId",
            "registry",
            "privatelink.azurecr.io",
        ),
    ];
    let zones = string_list(&main, "var privateDnsZones = [")?;
    for service in &reached {
        assert!(
            endpoints.iter().any(|e| e.0 == *service),
            "{service} has no private endpoint"
        );
    }
    for (service, symbol, condition, target, group, zone) in endpoints {
        let (header, body) = module_block(&main, symbol)?;
        assert!(
            header.contains("'modules/private-endpoint.bicep'"),
            "{symbol}: {header}"
        );
        assert!(
            header.ends_with(&format!("= {condition} {{")),
            "{service}: the endpoint must be created under `{condition}`, header is {header}"
        );
        for line in [
            format!("targetId: {target}\n"),
            format!("groupId: '{group}'\n"),
            format!("dnsZoneId: dnsZoneId['{zone}']\n"),
            "subnetId: network.outputs.privateEndpointSubnetId\n".to_string(),
            "scope: rg\n".to_string(),
        ] {
            assert!(body.contains(&line), "{symbol} lacks `{}`", line.trim());
        }
        assert!(zones.contains(zone), "DNS zone {zone} is not created");
    }
    // The zones exist, are linked to the VNet, and the ids point at them.
    let (network_header, network) = module_block(&main, "network")?;
    assert!(network_header.ends_with("= if (privateNetworking) {"));
    assert!(network.contains("dnsZones: privateDnsZones"));
    assert!(main.contains(
        "z => resourceId(subscription().subscriptionId, resourceGroupName, 'Microsoft.Network/privateDnsZones', z)"
    ));
    let network_bicep = read("infra/modules/network.bicep")?;
    let links = block(
        &network_bicep,
        "resource link 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [",
    )?;
    assert!(links.contains("for (z, i) in dnsZones:") && links.contains("id: vnet.id"));
    assert!(network_bicep.contains("for z in dnsZones:"));
    let endpoint = read("infra/modules/private-endpoint.bicep")?;
    for needle in [
        "privateLinkServiceId: targetId",
        "groupIds: [\n            groupId\n          ]",
        "privateDnsZoneId: dnsZoneId",
        "id: subnetId",
    ] {
        assert!(
            endpoint.contains(needle),
            "private-endpoint.bicep lacks {needle}"
        );
    }

    // Public access off, under the same parameter, on every service with an
    // endpoint (the registry's is its owner's: docs/deploy.md).
    for symbol in ["storage", "serviceBus"] {
        let (_, body) = module_block(&main, symbol)?;
        assert!(
            body.contains("privateNetworking: privateNetworking\n"),
            "module {symbol} does not get privateNetworking"
        );
    }
    // The one documented exception: Flex Consumption cannot resolve Key Vault
    // references against a network-restricted vault, and gantry reads its
    // secrets only through references. The vault gets its endpoint always,
    // its public access goes off only when asked for explicitly.
    let (_, vault_module) = module_block(&main, "vault")?;
    assert!(vault_module.contains("privateNetworking: privateNetworking && privateKeyVault\n"));
    assert!(main.contains("param privateKeyVault bool = false"));
    assert!(read("docs/deploy.md")?.contains("`privateKeyVault`"));
    let public_off = "publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'";
    let storage = read("infra/modules/storage.bicep")?;
    let account_properties = block(&storage, "var accountProperties = {")?;
    assert!(account_properties.contains(public_off));
    assert!(account_properties.contains("defaultAction: privateNetworking ? 'Deny' : 'Allow'"));
    assert_eq!(
        storage.matches("properties: accountProperties\n").count(),
        2,
        "both accounts (host and state) use the shared account properties"
    );
    let vault = read("infra/modules/keyvault.bicep")?;
    assert!(vault.contains(public_off));
    assert!(vault.contains("defaultAction: privateNetworking ? 'Deny' : 'Allow'"));

    // Service Bus: Premium (private endpoints exist only there), public off,
    // trusted services (Event Grid delivery) still allowed.
    let sb = read("infra/modules/servicebus.bicep")?;
    assert!(sb.contains("var sku = privateNetworking ? premiumSku : standardSku"));
    let premium = block(&sb, "var premiumSku = {")?;
    assert!(premium.contains("name: 'Premium'") && premium.contains("tier: 'Premium'"));
    let namespace = block(
        &sb,
        "resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {",
    )?;
    assert!(namespace.contains("sku: sku\n") && namespace.contains(public_off));
    let rules = block(
        &sb,
        "resource networkRules 'Microsoft.ServiceBus/namespaces/networkRuleSets@2024-01-01' = if (privateNetworking) {",
    )?;
    for needle in [
        "publicNetworkAccess: 'Disabled'",
        "defaultAction: 'Deny'",
        "trustedServiceAccessEnabled: true",
    ] {
        assert!(rules.contains(needle), "networkRuleSets lacks {needle}");
    }
    // Event Grid uses the trusted-service path only with a managed identity.
    assert!(read("infra/modules/eventgrid.bicep")?.contains("deliveryWithResourceIdentity"));
    // The consumption Logic App cannot reach a private namespace: not created then.
    assert!(main.contains(
        "module defender 'modules/defender.bicep' = if (enableDefenderAutomation && !privateNetworking) {"
    ));

    // The Function App is VNet-integrated in the delegated subnet, and starts
    // only once the endpoints exist.
    let (_, app) = module_block(&main, "functionApp")?;
    assert!(
        app.contains(
            "virtualNetworkSubnetId: privateNetworking ? network.outputs.appSubnetId : ''"
        )
    );
    for dep in [
        "stateBlobPrivateEndpoint",
        "hostBlobPrivateEndpoint",
        "serviceBusPrivateEndpoint",
        "vaultPrivateEndpoint",
    ] {
        assert!(app.contains(dep), "functionApp does not depend on {dep}");
    }
    let function_app = read("infra/modules/functionapp.bicep")?;
    assert!(function_app.contains(
        "virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId"
    ));
    // Site settings Flex Consumption rejects stay out of the site.
    let site_config = block(&function_app, "    siteConfig: {")?;
    for rejected in ["ftpsState", "linuxFxVersion", "vnetRouteAllEnabled"] {
        assert!(
            !site_config.contains(rejected),
            "functionapp.bicep sets {rejected}, which Flex Consumption does not accept"
        );
    }
    let vnet = block(
        &network_bicep,
        "resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {",
    )?;
    let app_subnet = &vnet[vnet.find("name: 'snet-app'").context("snet-app")?..];
    let app_subnet = &app_subnet[..app_subnet.find("name: 'snet-pe'").context("snet-pe")?];
    assert!(
        app_subnet.contains("serviceName: 'Microsoft.App/environments'"),
        "the Flex Consumption integration subnet must be delegated to Microsoft.App/environments"
    );
    assert!(network_bicep.contains("output appSubnetId string = '${vnet.id}/subnets/snet-app'"));
    Ok(())
}

#[test]
fn the_aks_egress_route_sends_everything_to_the_firewall() -> Result<()> {
    let main = read("infra/main.bicep")?;
    assert!(main.contains("param aksEgressFirewallIp string = ''"));
    let (header, body) = module_block(&main, "aksEgressRoute")?;
    assert!(header.ends_with("= if (!empty(aksEgressFirewallIp)) {"));
    assert!(body.contains("firewallPrivateIp: aksEgressFirewallIp"));
    let route = read("infra/modules/aks-egress-route.bicep")?;
    let routes = block(&route, "routes: [")?;
    assert_eq!(
        routes.matches("addressPrefix:").count(),
        1,
        "one route: the default"
    );
    for needle in [
        "addressPrefix: '0.0.0.0/0'",
        "nextHopType: 'VirtualAppliance'",
        "nextHopIpAddress: firewallPrivateIp",
    ] {
        assert!(routes.contains(needle), "route lacks {needle}");
    }
    assert!(route.contains("disableBgpRoutePropagation: true"));
    Ok(())
}

/// Whether `pattern` (RE2 syntax, as KQL `matches regex` uses) matches
/// `text`, evaluated by regorus' `regex.match` (Rust regex, also RE2-like).
fn re_match(pattern: &str, text: &str) -> Result<bool> {
    let mut engine = regorus::Engine::new();
    engine.add_policy(
        "re.rego".into(),
        "package re\nmatched := regex.match(input.p, input.t)\n".into(),
    )?;
    engine.set_input(regorus::Value::from_json_str(
        &serde_json::json!({"p": pattern, "t": text}).to_string(),
    )?);
    Ok(engine.eval_rule("data.re.matched".into())? == regorus::Value::from(true))
}

/// String literals starting `"run {` in the functions' sources, with every
/// `{...}` placeholder filled in: the outcome lines the runtime logs.
fn run_outcome_lines() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root().join("functions"))? {
        let path = entry?.path().join("src/lib.rs");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (at, _) in text.match_indices("\"run {") {
            let rest = &text[at + 1..];
            let Some(end) = rest.find('"') else { continue };
            let mut line = String::new();
            let mut in_placeholder = false;
            for c in rest[..end].chars() {
                match c {
                    '{' => {
                        in_placeholder = true;
                        line.push_str("01JD2X9Q");
                    }
                    '}' => in_placeholder = false,
                    c if !in_placeholder => line.push(c),
                    _ => {}
                }
            }
            out.push((line, path.display().to_string()));
        }
    }
    Ok(out)
}

#[test]
fn every_alert_rule_routes_to_the_action_group() -> Result<()> {
    let alerts = read("infra/modules/alerts.bicep")?;
    // Every metric or log alert rule in the module routes to the action group.
    let mut rules = BTreeMap::new();
    for (at, _) in alerts.match_indices("\nresource ") {
        let line_end = alerts[at + 1..]
            .find('\n')
            .map_or(alerts.len(), |i| at + 1 + i);
        let header = &alerts[at + 1..line_end];
        if header.contains("'Microsoft.Insights/metricAlerts@")
            || header.contains("'Microsoft.Insights/scheduledQueryRules@")
        {
            let name = header.split_whitespace().nth(1).unwrap_or_default();
            let body = block(&alerts, header)?;
            assert!(
                body.contains("actionGroupId: actionGroup.id")
                    || body.contains("actionGroups: [\n        actionGroup.id\n      ]"),
                "alert rule {name} does not route to the action group"
            );
            assert!(body.contains("enabled: true"), "{name} is disabled");
            rules.insert(name.to_string(), body.to_string());
        }
    }
    assert_eq!(
        rules.keys().map(String::as_str).collect::<Vec<_>>(),
        ["deadLetters", "failedRuns", "functionErrors"],
        "expected the dead-letter, failed-run and function-error rules"
    );
    // The action group notifies the receivers from the parameters.
    let group = block(
        &alerts,
        "resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {",
    )?;
    assert!(group.contains("for (email, i) in emails:") && group.contains("emailAddress: email"));
    assert!(group.contains("webhookReceivers: empty(webhookUrl) ? [] : webhookReceiver"));
    assert!(alerts.contains("serviceUri: webhookUrl"));

    // Dead letters: the Service Bus metric, per queue, above 0.
    let dead = &rules["deadLetters"];
    for needle in [
        "metricName: 'DeadletteredMessages'",
        "metricNamespace: 'Microsoft.ServiceBus/namespaces'",
        "name: 'EntityName'",
        "operator: 'GreaterThan'",
        "threshold: 0\n",
        "serviceBusId\n",
    ] {
        assert!(dead.contains(needle), "dead-letter rule lacks {needle}");
    }
    // Function errors: failed invocations and exceptions in Application Insights.
    let errors = &rules["functionErrors"];
    assert!(errors.contains("requests | where success == false") && errors.contains("exceptions"));
    assert!(errors.contains("appInsightsId\n"));

    // Failed runs: the query matches exactly the outcome lines the steps log
    // for a run they fail, block or roll back, and no other outcome line.
    let failed = &rules["failedRuns"];
    assert!(failed.contains("appInsightsId\n"));
    let query = failed
        .lines()
        .find_map(|l| l.trim().strip_prefix("query: '"))
        .context("failedRuns query")?;
    let pattern = query
        .split("matches regex \"")
        .nth(1)
        .and_then(|q| q.split('"').next())
        .context("failedRuns regex")?;
    let lines = run_outcome_lines()?;
    let mut ends = BTreeMap::new();
    for (line, file) in &lines {
        let end = [": failed: ", ": blocked: ", ": rolled back: "]
            .into_iter()
            .find(|w| line.contains(w));
        assert_eq!(
            re_match(pattern, line)?,
            end.is_some(),
            "{file}: `{line}` vs the failed-runs regex {pattern}"
        );
        if let Some(end) = end {
            *ends.entry(end).or_insert(0) += 1;
        }
    }
    // The scan found the lines (scan-check and policy-enforce block and fail,
    // deploy fails and rolls back).
    assert!(
        ends.get(": failed: ").copied().unwrap_or(0) >= 3,
        "{ends:?}"
    );
    assert!(
        ends.get(": blocked: ").copied().unwrap_or(0) >= 2,
        "{ends:?}"
    );
    assert!(
        ends.get(": rolled back: ").copied().unwrap_or(0) >= 1,
        "{ends:?}"
    );
    // The JSON copy of the same event (stdout) does not count twice.
    assert!(!re_match(
        pattern,
        r#"{"level":"INFO","message":"run 01JD2X9Q: failed: x"}"#
    )?);
    // ...and the runtime logs each outcome line as it is.
    let runtime = read("shared/runtime/src/lib.rs")?;
    assert!(
        runtime.contains(
            "tracing::info!(function = name, message_id = ?meta.message_id, \"{line}\");"
        )
    );
    assert!(runtime.contains("logs: vec![log],"));

    // main.bicep deploys the rules unconditionally, on gantry's namespace and
    // Application Insights, with the receivers from its parameters.
    let main = read("infra/main.bicep")?;
    let (header, body) = module_block(&main, "alerts")?;
    assert!(header.ends_with("'modules/alerts.bicep' = {"));
    for needle in [
        "serviceBusId: serviceBus.outputs.id",
        "appInsightsId: monitoring.outputs.appInsightsId",
        "emails: alertEmails",
        "webhookUrl: alertWebhookUrl",
    ] {
        assert!(body.contains(needle), "module alerts lacks {needle}");
    }
    Ok(())
}

#[test]
fn the_regex_helper_can_say_no() -> Result<()> {
    assert!(re_match("^run [^ ]+: failed: ", "run 1: failed: x")?);
    assert!(!re_match("^run [^ ]+: failed: ", "run 1: deployed: x")?);
    Ok(())
}
