//! Per-app exposure (`[apps.expose]`), Key Vault app secrets
//! (`[apps.keyvault]`) and declared egress (`[apps.egress]`): the settings,
//! their validation, and the secret-looking-env rule shared by config
//! validation and the `secret-env` built-in policy.
//!
//! Every value here ends up in a Kubernetes field, label or annotation, so
//! each one is checked against the grammar the API server (or Azure) expects
//! before anything is rendered: CIDRs are parsed and must be canonical, hosts
//! are DNS names, ids are UUIDs, names follow Key Vault's and Kubernetes'
//! rules, and nothing may contain control characters. See `docs/exposure.md`.

use std::net::IpAddr;

use serde::Deserialize;

use crate::names::AppName;

/// How an app is reached (`[apps.expose] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExposeMode {
    /// ClusterIP Service only: reachable from pods in the cluster (default).
    #[default]
    Cluster,
    /// Azure internal load balancer (private IP in the cluster's VNet).
    InternalLb,
    /// Azure public load balancer; needs `allow_public = true` on the app.
    PublicLb,
    /// L7 through an Ingress (AGIC, Application Gateway for Containers, or an
    /// in-cluster controller); the Service stays ClusterIP.
    Ingress,
}

impl ExposeMode {
    /// The `gantry.toml` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExposeMode::Cluster => "cluster",
            ExposeMode::InternalLb => "internal-lb",
            ExposeMode::PublicLb => "public-lb",
            ExposeMode::Ingress => "ingress",
        }
    }

    /// Whether the Service is a `LoadBalancer`.
    pub fn is_load_balancer(self) -> bool {
        matches!(self, ExposeMode::InternalLb | ExposeMode::PublicLb)
    }
}

/// `[apps.expose]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeConfig {
    /// The mode (default `cluster`).
    #[serde(default)]
    pub mode: ExposeMode,
    /// `internal-lb`: subnet of the load balancer's frontend IP
    /// (`service.beta.kubernetes.io/azure-load-balancer-internal-subnet`).
    #[serde(default)]
    pub internal_subnet: Option<String>,
    /// Load balancer modes: client CIDRs (`spec.loadBalancerSourceRanges` and
    /// the NetworkPolicy `ipBlock`s). `ingress`: the gateway's subnet (AGIC,
    /// Application Gateway for Containers), whose addresses reach the pods.
    #[serde(default)]
    pub source_ranges: Vec<String>,
    /// `ingress`: `spec.ingressClassName`.
    #[serde(default)]
    pub class: Option<String>,
    /// `ingress`: the host name routed to the app.
    #[serde(default)]
    pub host: Option<String>,
    /// `ingress`: the path prefix (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// `ingress`: namespace of an in-cluster ingress proxy whose pods may
    /// reach the app (e.g. `app-routing-system`).
    #[serde(default)]
    pub controller_namespace: Option<AppName>,
    /// `cluster`: only pods of these namespaces may reach the app (default:
    /// any pod in the cluster).
    #[serde(default)]
    pub from_namespaces: Vec<AppName>,
}

/// Default `source_ranges` of an internal load balancer: the RFC 1918 private
/// ranges (the VNet, peered VNets, on-premises over VPN/ExpressRoute).
pub const INTERNAL_DEFAULT_RANGES: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

/// Default `source_ranges` of a public load balancer: anywhere (IPv4).
pub const PUBLIC_DEFAULT_RANGES: [&str; 1] = ["0.0.0.0/0"];

impl ExposeConfig {
    /// The Ingress path prefix.
    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// The CIDRs allowed to reach the app's port in the load balancer modes:
    /// `source_ranges`, or the mode's default when empty.
    pub fn effective_source_ranges(&self) -> Vec<String> {
        if !self.source_ranges.is_empty() {
            return self.source_ranges.clone();
        }
        let defaults: &[&str] = match self.mode {
            ExposeMode::InternalLb => &INTERNAL_DEFAULT_RANGES,
            ExposeMode::PublicLb => &PUBLIC_DEFAULT_RANGES,
            ExposeMode::Cluster | ExposeMode::Ingress => &[],
        };
        defaults.iter().map(|s| s.to_string()).collect()
    }
}

/// `[apps.keyvault]`: Key Vault secrets mounted as files through the Secrets
/// Store CSI driver, read with the app's workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyVaultConfig {
    /// The vault's name (`https://{vault_name}.vault.azure.net`).
    pub vault_name: String,
    /// Entra ID tenant of the vault (UUID).
    pub tenant_id: String,
    /// Client id (UUID) of the user-assigned managed identity federated with
    /// the app's ServiceAccount.
    pub client_id: String,
    /// The secrets (`[[apps.keyvault.secrets]]`).
    #[serde(default)]
    pub secrets: Vec<KeyVaultSecret>,
}

/// Where the CSI volume is mounted in the container.
pub const SECRETS_MOUNT_PATH: &str = "/mnt/secrets";

/// One Key Vault secret: its object name and the variable that names its file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyVaultSecret {
    /// The secret's object name in the vault (`[0-9A-Za-z-]{1,127}`); also
    /// the file name under [`SECRETS_MOUNT_PATH`].
    pub name: String,
    /// The app's variable name; the container gets `{env}_FILE` holding the
    /// file's path, never the value.
    pub env: String,
}

impl KeyVaultSecret {
    /// The rendered variable name, `{env}_FILE`.
    pub fn file_env(&self) -> String {
        format!("{}_FILE", self.env)
    }

    /// The file's path, `/mnt/secrets/{name}`.
    pub fn file_path(&self) -> String {
        format!("{SECRETS_MOUNT_PATH}/{}", self.name)
    }
}

/// A named Azure service reached through its private endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureService {
    /// Key Vault (HTTPS).
    Keyvault,
    /// Storage: blob, queue, table, file over HTTPS.
    Storage,
    /// Service Bus: AMQP over TLS and AMQP over WebSockets/HTTPS.
    Servicebus,
    /// Event Hubs: AMQP over TLS, Kafka, HTTPS.
    Eventhubs,
    /// Azure SQL Database (TDS; redirect mode also uses 11000-11999).
    Sql,
    /// Azure Database for PostgreSQL.
    Postgres,
    /// Azure Database for MySQL.
    Mysql,
    /// Cosmos DB (gateway mode, HTTPS).
    Cosmos,
    /// Azure Cache for Redis (TLS).
    Redis,
}

impl AzureService {
    /// The `gantry.toml` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AzureService::Keyvault => "keyvault",
            AzureService::Storage => "storage",
            AzureService::Servicebus => "servicebus",
            AzureService::Eventhubs => "eventhubs",
            AzureService::Sql => "sql",
            AzureService::Postgres => "postgres",
            AzureService::Mysql => "mysql",
            AzureService::Cosmos => "cosmos",
            AzureService::Redis => "redis",
        }
    }

    /// TCP port ranges `(first, last)` the service's private endpoint serves.
    pub fn tcp_ports(self) -> &'static [(u16, u16)] {
        match self {
            AzureService::Keyvault | AzureService::Storage | AzureService::Cosmos => &[(443, 443)],
            AzureService::Servicebus => &[(443, 443), (5671, 5671)],
            AzureService::Eventhubs => &[(443, 443), (5671, 5671), (9093, 9093)],
            AzureService::Sql => &[(1433, 1433), (11000, 11999)],
            AzureService::Postgres => &[(5432, 5432)],
            AzureService::Mysql => &[(3306, 3306)],
            AzureService::Redis => &[(6380, 6380)],
        }
    }
}

/// `[apps.egress]`: what the app's pods may reach; everything else is denied.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    /// DNS to the cluster's kube-dns pods (UDP and TCP 53); default `true`.
    #[serde(default = "default_true")]
    pub dns: bool,
    /// CIDRs the app may reach.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// TCP ports allowed to `cidrs`; empty: every port and protocol.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Confirms a `cidrs` entry of `0.0.0.0/0` or `::/0` (the whole
    /// internet): renders `gantry.dev/allow-internet-egress: "true"` on the
    /// app's egress policy, which the `egress` built-in policy requires for it.
    /// Like `allow_public`, it must be set exactly when it means something.
    #[serde(default)]
    pub allow_internet: bool,
    /// Named Azure services, reached through their private endpoints in
    /// `private_endpoint_cidr` on the service's ports.
    #[serde(default)]
    pub services: Vec<AzureService>,
    /// The private-endpoint subnet (NetworkPolicy cannot match FQDNs).
    #[serde(default)]
    pub private_endpoint_cidr: Option<String>,
    /// Per-service private-endpoint CIDRs (`[apps.egress.service_cidrs]`,
    /// e.g. `sql = "10.0.9.0/24"`), overriding `private_endpoint_cidr` for
    /// the services listed; keys must be in `services`.
    #[serde(default)]
    pub service_cidrs: std::collections::BTreeMap<String, String>,
}

impl EgressConfig {
    /// Each private-endpoint CIDR the app's `services` are reached in, with
    /// the TCP port ranges allowed to it (sorted, de-duplicated), in CIDR
    /// order. Only meaningful after [`validate`].
    pub fn service_rules(&self) -> Vec<(String, Vec<(u16, u16)>)> {
        let mut rules: std::collections::BTreeMap<String, Vec<(u16, u16)>> =
            std::collections::BTreeMap::new();
        for service in &self.services {
            let cidr = self
                .service_cidrs
                .get(service.as_str())
                .or(self.private_endpoint_cidr.as_ref());
            if let Some(cidr) = cidr {
                rules
                    .entry(cidr.clone())
                    .or_default()
                    .extend(service.tcp_ports().iter().copied());
            }
        }
        rules
            .into_iter()
            .map(|(cidr, mut ports)| {
                ports.sort_unstable();
                ports.dedup();
                (cidr, ports)
            })
            .collect()
    }
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            dns: true,
            cidrs: Vec::new(),
            ports: Vec::new(),
            allow_internet: false,
            services: Vec::new(),
            private_endpoint_cidr: None,
            service_cidrs: std::collections::BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// Parses a CIDR (`10.1.0.0/16`, `fd00::/8`) and requires it canonical (no
/// host bits set), so what is written is what the API server and Azure apply.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (address/prefix)"))?;
    let ip: IpAddr = addr
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR: {addr:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u8 = prefix
        .parse()
        .ok()
        .filter(|p| {
            *p <= max && !prefix.starts_with('+') && !(prefix.len() > 1 && prefix.starts_with('0'))
        })
        .ok_or_else(|| format!("{s:?} is not a CIDR: prefix must be 0-{max}"))?;
    let host_bits_clear = match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            prefix == 32 || bits & (u32::MAX >> prefix) == 0
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            prefix == 128 || bits & (u128::MAX >> prefix) == 0
        }
    };
    if !host_bits_clear {
        return Err(format!(
            "{s:?} has host bits set: give the network address of the range"
        ));
    }
    Ok((ip, prefix))
}

/// A DNS name as Kubernetes accepts for an Ingress host: lowercase labels of
/// `[a-z0-9-]` (1-63, no leading or trailing `-`), at least two labels, at
/// most 253 bytes, an optional leading `*.` wildcard, and not an IP address.
pub fn valid_host(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let labels: Vec<&str> = name.split('.').collect();
    host.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| valid_label(l))
        && labels
            .last()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A DNS subdomain (an IngressClass name such as `azure-application-gateway`
/// or `webapprouting.kubernetes.azure.com`).
pub fn valid_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(valid_label)
}

/// `8-4-4-4-12` hexadecimal.
pub fn valid_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A Key Vault name: 3-24 of `[0-9A-Za-z-]`, starting with a letter, ending
/// with a letter or digit, no `--`.
pub fn valid_vault_name(s: &str) -> bool {
    (3..=24).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !s.contains("--")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A Key Vault object name: `[0-9A-Za-z-]{1,127}`.
pub fn valid_secret_name(s: &str) -> bool {
    (1..=127).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An Azure subnet name: 1-80 of `[0-9A-Za-z._-]`, starting with a letter or
/// digit, ending with a letter, digit or `_`.
pub fn valid_subnet_name(s: &str) -> bool {
    (1..=80).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An Ingress `Prefix` path: `/` then `[A-Za-z0-9._~/-]`, at most 200 bytes
/// (the set ingress-nginx's strict path validation accepts).
pub fn valid_ingress_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'/' | b'-'))
}

fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Name fragments (uppercase) that make a variable look like a secret.
/// Kept in step with `policies/secret-env/template.yaml`.
pub const SECRET_NAME_PATTERNS: [&str; 10] = [
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "CONNECTION_STRING",
    "CONNECTIONSTRING",
    "API_KEY",
    "APIKEY",
    "PRIVATE_KEY",
    "CREDENTIAL",
];

/// Value fragments (lowercase) that look like a credential.
/// Kept in step with `policies/secret-env/template.yaml`.
pub const SECRET_VALUE_MARKERS: [&str; 8] = [
    "accountkey=",
    "sharedaccesskey=",
    "sharedaccesssignature=",
    "password=",
    "pwd=",
    "-----begin",
    "?sig=",
    "&sig=",
];

/// Why the variable `name = value` looks like a secret, or `None`.
///
/// A name matching [`SECRET_NAME_PATTERNS`] or ending in `_KEY` with a
/// non-empty literal value is refused, except `*_FILE` variables holding an
/// absolute path (a file mounted from Key Vault, as gantry renders them); a
/// value containing one of [`SECRET_VALUE_MARKERS`] is refused whatever the
/// name.
pub fn secret_like_env(name: &str, value: &str) -> Option<String> {
    let upper = name.to_ascii_uppercase();
    let file_path = upper.ends_with("_FILE") && value.starts_with('/');
    if !value.is_empty() && !file_path {
        if let Some(p) = SECRET_NAME_PATTERNS.iter().find(|p| upper.contains(*p)) {
            return Some(format!("its name contains {p}"));
        }
        if upper.ends_with("_KEY") {
            return Some("its name ends with _KEY".into());
        }
    }
    let lower = value.to_ascii_lowercase();
    SECRET_VALUE_MARKERS
        .iter()
        .find(|m| lower.contains(*m))
        .map(|m| format!("its value contains {m:?}"))
}

/// A validation failure: the field (in `gantry.toml` spelling below the app,
/// e.g. `expose.host`) and what is wrong.
pub type FieldError = (&'static str, String);

fn no_control(field: &'static str, s: &str) -> Result<(), FieldError> {
    if s.chars().any(char::is_control) {
        return Err((field, format!("{s:?} contains control characters")));
    }
    Ok(())
}

/// Checks `[apps.expose]`, `allow_public`, `[apps.keyvault]` and
/// `[apps.egress]` of one app; `env` is the app's plain variables (a
/// `{env}_FILE` of a Key Vault secret must not collide with one).
pub fn validate(
    expose: &ExposeConfig,
    allow_public: bool,
    keyvault: Option<&KeyVaultConfig>,
    egress: &EgressConfig,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), FieldError> {
    validate_expose(expose, allow_public)?;
    if let Some(kv) = keyvault {
        validate_keyvault(kv, env)?;
    }
    validate_egress(egress)?;
    for (name, value) in env {
        if let Some(reason) = secret_like_env(name, value) {
            return Err((
                "env",
                format!(
                    "{name:?} looks like a secret ({reason}): declare it under [apps.keyvault] so only its name passes through gantry"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_expose(e: &ExposeConfig, allow_public: bool) -> Result<(), FieldError> {
    let mode = e.mode;
    // Which optional keys each mode uses: any other one set is an error, so a
    // setting that would silently do nothing is never accepted.
    let used: &[&str] = match mode {
        ExposeMode::Cluster => &["from_namespaces"],
        ExposeMode::InternalLb => &["internal_subnet", "source_ranges"],
        ExposeMode::PublicLb => &["source_ranges"],
        ExposeMode::Ingress => &[
            "class",
            "host",
            "path",
            "controller_namespace",
            "source_ranges",
        ],
    };
    let set = [
        ("internal_subnet", e.internal_subnet.is_some()),
        ("source_ranges", !e.source_ranges.is_empty()),
        ("class", e.class.is_some()),
        ("host", e.host.is_some()),
        ("path", e.path.is_some()),
        ("controller_namespace", e.controller_namespace.is_some()),
        ("from_namespaces", !e.from_namespaces.is_empty()),
    ];
    for (key, is_set) in set {
        if is_set && !used.contains(&key) {
            return Err((
                "expose",
                format!("{key} is not used with mode = {:?}", mode.as_str()),
            ));
        }
    }
    if allow_public && mode != ExposeMode::PublicLb {
        return Err((
            "allow_public",
            format!(
                "only means something with expose.mode = \"public-lb\" (mode is {:?})",
                mode.as_str()
            ),
        ));
    }
    if mode == ExposeMode::PublicLb && !allow_public {
        return Err((
            "expose.mode",
            "\"public-lb\" exposes the app to the internet: set allow_public = true on the app to confirm".into(),
        ));
    }
    if let Some(subnet) = &e.internal_subnet
        && !valid_subnet_name(subnet)
    {
        return Err((
            "expose.internal_subnet",
            format!("{subnet:?} is not an Azure subnet name"),
        ));
    }
    if e.source_ranges.len() > 64 {
        return Err(("expose.source_ranges", "at most 64 CIDRs".into()));
    }
    for cidr in &e.source_ranges {
        no_control("expose.source_ranges", cidr)?;
        parse_cidr(cidr).map_err(|m| ("expose.source_ranges", m))?;
    }
    if mode == ExposeMode::Ingress {
        match &e.class {
            None => return Err(("expose.class", "ingress mode needs an ingress class".into())),
            Some(c) if !valid_dns_subdomain(c) => {
                return Err((
                    "expose.class",
                    format!("{c:?} is not an IngressClass name (lowercase DNS subdomain)"),
                ));
            }
            Some(_) => {}
        }
        match &e.host {
            None => return Err(("expose.host", "ingress mode needs a host name".into())),
            Some(h) if !valid_host(h) => {
                return Err((
                    "expose.host",
                    format!("{h:?} is not a lowercase DNS name (e.g. web.contoso.com)"),
                ));
            }
            Some(_) => {}
        }
        if let Some(p) = &e.path
            && !valid_ingress_path(p)
        {
            return Err((
                "expose.path",
                format!("{p:?} must be an absolute path of [A-Za-z0-9._~/-]"),
            ));
        }
        if e.controller_namespace.is_none() && e.source_ranges.is_empty() {
            return Err((
                "expose",
                "ingress mode needs controller_namespace (an in-cluster proxy's namespace) or source_ranges (the Application Gateway's subnet): the NetworkPolicy admits only that path".into(),
            ));
        }
    }
    Ok(())
}

fn validate_keyvault(
    kv: &KeyVaultConfig,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), FieldError> {
    if !valid_vault_name(&kv.vault_name) {
        return Err((
            "keyvault.vault_name",
            format!(
                "{:?} is not a Key Vault name (3-24 of [0-9A-Za-z-], starting with a letter)",
                kv.vault_name
            ),
        ));
    }
    if !valid_uuid(&kv.tenant_id) {
        return Err((
            "keyvault.tenant_id",
            format!("{:?} is not a UUID", kv.tenant_id),
        ));
    }
    if !valid_uuid(&kv.client_id) {
        return Err((
            "keyvault.client_id",
            format!("{:?} is not a UUID", kv.client_id),
        ));
    }
    if kv.secrets.is_empty() {
        return Err((
            "keyvault.secrets",
            "declare at least one [[apps.keyvault.secrets]]".into(),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    let mut envs = std::collections::BTreeSet::new();
    for s in &kv.secrets {
        if !valid_secret_name(&s.name) {
            return Err((
                "keyvault.secrets.name",
                format!(
                    "{:?} is not a Key Vault secret name ([0-9A-Za-z-]{{1,127}})",
                    s.name
                ),
            ));
        }
        // The file name: two secrets differing only in case would collide on
        // case-insensitive lookups and in Key Vault itself.
        if !names.insert(s.name.to_ascii_lowercase()) {
            return Err((
                "keyvault.secrets.name",
                format!("{:?} is listed twice", s.name),
            ));
        }
        if !valid_env_name(&s.env) || s.env.len() > 123 {
            return Err((
                "keyvault.secrets.env",
                format!("{:?} is not a valid variable name", s.env),
            ));
        }
        if !envs.insert(s.env.clone()) {
            return Err((
                "keyvault.secrets.env",
                format!("{:?} is listed twice", s.env),
            ));
        }
        let file_env = s.file_env();
        if env.contains_key(&file_env) || env.contains_key(&s.env) {
            return Err((
                "keyvault.secrets.env",
                format!("{:?} is also set in [apps.env]", s.env),
            ));
        }
    }
    Ok(())
}

fn validate_egress(e: &EgressConfig) -> Result<(), FieldError> {
    if e.cidrs.len() > 64 {
        return Err(("egress.cidrs", "at most 64 CIDRs".into()));
    }
    let mut internet = false;
    for cidr in &e.cidrs {
        no_control("egress.cidrs", cidr)?;
        let (_, prefix) = parse_cidr(cidr).map_err(|m| ("egress.cidrs", m))?;
        if prefix == 0 {
            // The `egress` built-in policy denies a /0 without the opt-in:
            // refuse it here with the fix instead of at the policy gate.
            if !e.allow_internet {
                return Err((
                    "egress.cidrs",
                    format!(
                        "{cidr:?} is the whole internet: set allow_internet = true under [apps.egress] to confirm"
                    ),
                ));
            }
            internet = true;
        }
    }
    if e.allow_internet && !internet {
        return Err((
            "egress.allow_internet",
            "only means something with a cidrs entry of \"0.0.0.0/0\" or \"::/0\"".into(),
        ));
    }
    if !e.ports.is_empty() && e.cidrs.is_empty() {
        return Err((
            "egress.ports",
            "ports apply to cidrs: list the cidrs".into(),
        ));
    }
    if e.ports.contains(&0) {
        return Err(("egress.ports", "ports must be 1-65535".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(s) = e.services.iter().find(|s| !seen.insert(**s)) {
        return Err((
            "egress.services",
            format!("{:?} is listed twice", s.as_str()),
        ));
    }
    for (name, cidr) in &e.service_cidrs {
        if !e.services.iter().any(|s| s.as_str() == name) {
            return Err((
                "egress.service_cidrs",
                format!("{name:?} is not in egress.services"),
            ));
        }
        no_control("egress.service_cidrs", cidr)?;
        not_everything(
            "egress.service_cidrs",
            parse_cidr(cidr).map_err(|m| ("egress.service_cidrs", m))?,
        )?;
    }
    let uncovered = e
        .services
        .iter()
        .find(|s| !e.service_cidrs.contains_key(s.as_str()));
    match (&e.private_endpoint_cidr, uncovered) {
        (None, Some(service)) => {
            return Err((
                "egress.private_endpoint_cidr",
                format!(
                    "services are reached through their private endpoints: give the private-endpoint subnet's CIDR (or egress.service_cidrs.{})",
                    service.as_str()
                ),
            ));
        }
        (Some(_), None) => {
            return Err((
                "egress.private_endpoint_cidr",
                "no service uses it: list the services the app reaches".into(),
            ));
        }
        (Some(cidr), Some(_)) => {
            no_control("egress.private_endpoint_cidr", cidr)?;
            not_everything(
                "egress.private_endpoint_cidr",
                parse_cidr(cidr).map_err(|m| ("egress.private_endpoint_cidr", m))?,
            )?;
        }
        (None, None) => {}
    }
    Ok(())
}

/// A private-endpoint subnet is never the whole address space: a /0 there
/// would open the services' ports to the internet without `allow_internet`.
fn not_everything(field: &'static str, (_, prefix): (IpAddr, u8)) -> Result<(), FieldError> {
    if prefix == 0 {
        return Err((
            field,
            "a private-endpoint subnet cannot be the whole address space: give the subnet's CIDR"
                .into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(parse_cidr("10.1.0.0/16").is_ok());
        assert!(parse_cidr("0.0.0.0/0").is_ok());
        assert!(parse_cidr("10.1.2.3/32").is_ok());
        assert!(parse_cidr("fd00::/8").is_ok());
        for bad in [
            "10.1.2.3/16",
            "10.1.0.0",
            "10.1.0.0/33",
            "10.1.0.0/-1",
            "10.1.0.0/+8",
            "10.1.0.0/08",
            "10.1.0/16",
            "web/16",
            "10.1.0.0/16\n",
            "fd00::1/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_and_names() {
        for ok in ["web.contoso.com", "*.contoso.com", "a-b.c1.io"] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "web",
            "Web.contoso.com",
            "web..com",
            "-a.com",
            "10.0.0.1",
            "web.contoso.com.",
            "a*.b.com",
            "web.contoso.com\r",
            "",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
        assert!(valid_dns_subdomain("azure-application-gateway"));
        assert!(valid_dns_subdomain("webapprouting.kubernetes.azure.com"));
        assert!(!valid_dns_subdomain("Azure"));
        assert!(!valid_dns_subdomain("a b"));
        assert!(valid_uuid("7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f13"));
        assert!(!valid_uuid("7d3f2a51-9c4e-4b8a-a1f6-2e5c8b9d0f1"));
        assert!(!valid_uuid("7d3f2a51x9c4e-4b8a-a1f6-2e5c8b9d0f13"));
        assert!(valid_vault_name("kv-contoso-prod"));
        for bad in ["kv", "1kv", "kv--x", "kv-", "kv_x", &"k".repeat(25)] {
            assert!(!valid_vault_name(bad), "{bad}");
        }
        assert!(valid_secret_name("db-connection"));
        assert!(!valid_secret_name("db_connection"));
        assert!(!valid_secret_name(&"a".repeat(128)));
        assert!(valid_ingress_path("/api/v1"));
        assert!(!valid_ingress_path("api"));
        assert!(!valid_ingress_path("/a b"));
        assert!(!valid_ingress_path("/a;b"));
    }

    #[test]
    fn secret_like() {
        for (name, value) in [
            ("DB_PASSWORD", "hunter2"),
            ("GITHUB_TOKEN", "x"),
            ("client_secret", "x"),
            ("STORAGE_CONNECTION_STRING", "x"),
            ("SIGNING_KEY", "x"),
            ("AZURE_CREDENTIALS", "x"),
            ("DSN", "Server=db;User Id=app;Password=hunter2"),
            (
                "STORAGE",
                "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc==",
            ),
            ("TLS", "-----BEGIN PRIVATE KEY-----"),
            (
                "BLOB_URL",
                "https://a.blob.core.windows.net/c?sv=2022&sig=abc",
            ),
            ("DB_PASSWORD_FILE", "hunter2"),
        ] {
            assert!(secret_like_env(name, value).is_some(), "{name}={value}");
        }
        for (name, value) in [
            ("DB_PASSWORD", ""),
            ("DB_PASSWORD_FILE", "/mnt/secrets/db-password"),
            ("LOG_LEVEL", "debug"),
            ("KEYVAULT_NAME", "kv-contoso"),
            ("PORT", "8080"),
        ] {
            assert!(secret_like_env(name, value).is_none(), "{name}={value}");
        }
    }
}
