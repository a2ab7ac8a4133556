// gantry on Azure: everything `azd up` (or `az deployment sub create`)
// provisions. See docs/deploy.md for the walk-through and docs/security.md
// for what each identity may do.
//
// tests/infra.rs reads this file: the `queues`, `receiveQueues`,
// `sendQueues` and `appSettings` blocks below are checked against
// functions/*/function.json, gantry_bus::QUEUES and
// gantry_runtime::settings::ALL. Keep their shape (one entry per line or per
// object) when editing. It also reads the private networking modules (one
// `module <x>PrivateEndpoint` per service, `var privateDnsZones`) and the
// alert rules in modules/alerts.bicep.
targetScope = 'subscription'

@minLength(1)
@maxLength(40)
@description('azd environment name; names and tags derive from it.')
param environmentName string

@minLength(1)
@description('Region of gantry\'s resources (must offer Flex Consumption: az functionapp list-flexconsumption-locations).')
param location string

@description('Resource group for gantry\'s resources.')
param resourceGroupName string = 'rg-gantry-${environmentName}'

@description('Existing Azure Container Registry the applications push to.')
param registryName string

@description('Resource group of the registry.')
param registryResourceGroup string

@description('Existing AKS cluster (Azure RBAC for Kubernetes enabled) gantry deploys to; empty for the `directory` deploy target only.')
param aksClusterName string = ''

@description('Resource group of the AKS cluster.')
param aksResourceGroup string = ''

@description('Namespaces gantry deploys to (the `namespace` of every [[apps]] in gantry.toml); each gets AKS RBAC Writer.')
param managedNamespaces array = []

@description('Namespaces of the mandatory DaemonSets the governance audit (cluster-audit) checks, e.g. kube-system: the identity gets read on DaemonSets there only. Empty: none.')
param daemonSetNamespaces array = []

@description('Let the identity apply Namespace objects (cluster-scoped custom role with namespaces read/write). Off: namespaces are created and labelled by the platform team, and the deploy step cannot apply them.')
param allowNamespaceApply bool = true

@allowed([
  'registry'
  'subscription'
  'none'
])
@description('Where the identity gets Reader for Resource Graph (the `defender` scan source): the registry only (least privilege), the whole subscription, or nowhere (Trivy only).')
param resourceGraphScope string = 'registry'

@description('Create Defender for Cloud workflow automation (needs Defender for Containers on the subscription).')
param enableDefenderAutomation bool = true

@secure()
@minLength(32)
@description('GitHub webhook secret (GANTRY_GITHUB_WEBHOOK_SECRET); the same value goes into the GitHub webhook. e.g. `openssl rand -hex 32`.')
param githubWebhookSecret string

@secure()
@minLength(1)
@description('Operator API tokens as name:scope:sha256hex entries, comma-separated (GANTRY_API_TOKENS); hashes only, never tokens.')
param apiTokens string

@description('App settings holding alert channel URLs, secrets and tokens (the `url_env` / `secret_env` / `token_env` names in gantry.toml). Each is a Key Vault reference to the secret of the same name, lower-case with dashes; set the values with `az keyvault secret set`.')
param alertSettings array = [
  'GANTRY_ALERT_TEAMS_URL'
  'GANTRY_ALERT_SLACK_URL'
  'GANTRY_ALERT_WEBHOOK_URL'
  'GANTRY_ALERT_WEBHOOK_SECRET'
  'GANTRY_GITHUB_TOKEN'
]

@description('Operator principals when App Service Authentication is on: <object id>:read|operate entries, comma-separated (GANTRY_API_PRINCIPALS; object ids, not secrets). Empty: bearer tokens only.')
param apiPrincipals string = ''

@description('OTLP/HTTP endpoint for traces (an OpenTelemetry Collector with the azuremonitor exporter, see docs/telemetry.md); empty: no export')
param otlpEndpoint string = ''

@minValue(1)
@maxValue(100)
@description('Deliveries before Service Bus dead-letters a message; also GANTRY_MAX_DELIVERY_COUNT (the last delivery records a transient failure on the run).')
param maxDeliveryCount int = 10

@description('Peek-lock duration of every queue (ISO 8601, at most PT5M): as long as host.json functionTimeout, so a lock never expires under a running invocation.')
param lockDuration string = 'PT5M'

@description('Duplicate detection window (ISO 8601): gantry\'s MessageIds are derived from what they mean, so redeliveries inside it are dropped.')
param duplicateDetectionWindow string = 'P1D'

@description('The state container (GANTRY_CONTAINER).')
param stateContainerName string = 'gantry'

@description('Maximum Flex Consumption instances.')
param maximumInstanceCount int = 40

@description('Private networking: a VNet the Function App is integrated into, private endpoints and private DNS zones for the state and host storage accounts (blob), Service Bus (then Premium), Key Vault and, with privateRegistryId, the registry; public network access off on storage and Service Bus (Key Vault: see privateKeyVault; the registry is its owner\'s). Off (default): public endpoints with Entra ID auth only. See docs/deploy.md, "Private networking".')
param privateNetworking bool = false

@description('With privateNetworking, also turn off the Key Vault\'s public network access. Off by default: Flex Consumption cannot resolve Key Vault references against a network-restricted vault, even with VNet integration (Flex Consumption plan docs, "Considerations"), and gantry reads its secrets only through references, so it would fail closed (webhooks and API refused). The vault gets its private endpoint either way. Turn on once that platform limit is gone.')
param privateKeyVault bool = false

@description('Address space of gantry\'s VNet (private networking); must not overlap networks you peer or connect it to.')
param vnetAddressPrefix string = '10.60.0.0/16'

@description('Function App integration subnet (delegated to Microsoft.App/environments).')
param appSubnetPrefix string = '10.60.0.0/24'

@description('Private endpoint subnet.')
param privateEndpointSubnetPrefix string = '10.60.1.0/24'

@description('Resource id of the container registry (Premium SKU) to give a private endpoint in gantry\'s VNet (private networking); empty: none. The registry is not created here: disabling its public access is its owner\'s decision (docs/deploy.md).')
param privateRegistryId string = ''

@description('Private IP of the Azure Firewall that AKS egress goes through: creates a route table (0.0.0.0/0 → this IP) to associate with the AKS node subnet (outboundType userDefinedRouting). Empty: none. See docs/deploy.md.')
param aksEgressFirewallIp string = ''

@description('E-mail addresses of the Azure Monitor action group (dead letters, failed runs, function errors).')
param alertEmails array = []

@secure()
@description('Webhook of the Azure Monitor action group (common alert schema); empty: none.')
param alertWebhookUrl string = ''

@minValue(0)
@description('Failed invocations plus exceptions per 15 minutes above which the function-errors alert fires.')
param functionErrorThreshold int = 5

var token = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
  application: 'gantry'
}
var names = {
  identity: 'id-gantry-${environmentName}'
  functionApp: 'func-gantry-${token}'
  hostStorage: take('stgh${token}', 24)
  stateStorage: take('stgs${token}', 24)
  serviceBus: 'sb-gantry-${token}'
  vault: take('kv-gantry-${token}', 24)
  monitoring: 'gantry-${token}'
  vnet: 'vnet-gantry-${environmentName}'
}
var deploymentContainerName = 'app-package'

// Private DNS zones of the private endpoints (public Azure cloud): blob for
// both storage accounts, Service Bus, Key Vault, the registry.
var privateDnsZones = [
  'privatelink.blob.core.windows.net'
  'privatelink.servicebus.windows.net'
  'privatelink.vaultcore.azure.net'
  'privatelink.azurecr.io'
]
// Zone name → id: network.bicep creates them in gantry's resource group.
var dnsZoneId = toObject(
  privateDnsZones,
  z => z,
  z => resourceId(subscription().subscriptionId, resourceGroupName, 'Microsoft.Network/privateDnsZones', z)
)

// Built-in role definition GUIDs (the same in every tenant).
var roles = {
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  reader: 'acdd72a7-3385-48ef-bd42-f606fba81ae7'
  aksClusterUser: '4abbcc35-e782-43d8-92c5-2d3f1bd2253f'
  aksRbacWriter: 'a7ffa36f-339b-4b5c-8bdf-e2c188b2c0eb'
}

// Every Service Bus queue (DESIGN.md §1). `sessions` must match
// `isSessionsEnabled` of the function.json that triggers on it.
var queues = [
  {
    name: 'registry-events'
    sessions: false
  }
  {
    name: 'security-events'
    sessions: false
  }
  {
    name: 'scan'
    sessions: false
  }
  {
    name: 'policy'
    sessions: false
  }
  {
    name: 'deploy'
    sessions: true
  }
  {
    name: 'alerts'
    sessions: false
  }
]

// Queues a function triggers on: the identity receives from these.
var receiveQueues = [
  'registry-events'
  'security-events'
  'scan'
  'policy'
  'deploy'
  'alerts'
]

// Queues the identity sends to: every queue gantry's code may send to
// (gantry_bus::QUEUES), which includes registry-events (Event Grid delivers
// with this identity) and security-events (the Defender Logic App sends with
// it).
var sendQueues = [
  'registry-events'
  'security-events'
  'scan'
  'policy'
  'deploy'
  'alerts'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: names.identity
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    name: names.monitoring
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    hostAccountName: names.hostStorage
    stateAccountName: names.stateStorage
    stateContainerName: stateContainerName
    deploymentContainerName: deploymentContainerName
    location: location
    tags: tags
    privateNetworking: privateNetworking
  }
}

module serviceBus 'modules/servicebus.bicep' = {
  name: 'servicebus'
  scope: rg
  params: {
    name: names.serviceBus
    location: location
    tags: tags
    queues: queues
    maxDeliveryCount: maxDeliveryCount
    lockDuration: lockDuration
    duplicateDetectionWindow: duplicateDetectionWindow
    privateNetworking: privateNetworking
  }
}

module vault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: names.vault
    location: location
    tags: tags
    // Not plain privateNetworking: see param privateKeyVault.
    privateNetworking: privateNetworking && privateKeyVault
    secrets: {
      items: [
        {
          name: 'gantry-github-webhook-secret'
          value: githubWebhookSecret
        }
        {
          name: 'gantry-api-tokens'
          value: apiTokens
        }
      ]
    }
  }
}

var vaultUri = vault.outputs.uri
var alertSettingValues = toObject(
  alertSettings,
  s => s,
  s => '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/${toLower(replace(s, '_', '-'))})'
)

// The Function App's settings: every setting gantry reads in Azure
// (gantry_runtime::settings::ALL), secrets as Key Vault references, plus the
// host's identity-based connections. Flex Consumption sets the runtime in
// functionAppConfig, not FUNCTIONS_WORKER_RUNTIME / FUNCTIONS_EXTENSION_VERSION.
var appSettings = {
  AzureWebJobsStorage__accountName: storage.outputs.hostAccountName
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.outputs.clientId
  ServiceBusConnection__fullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: identity.outputs.clientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.outputs.clientId};Authorization=AAD'
  AZURE_CLIENT_ID: identity.outputs.clientId
  GANTRY_CONFIG: 'gantry.toml'
  GANTRY_STORAGE: storage.outputs.stateBlobEndpoint
  GANTRY_CONTAINER: stateContainerName
  GANTRY_SERVICEBUS: serviceBus.outputs.fullyQualifiedNamespace
  GANTRY_MAX_DELIVERY_COUNT: string(maxDeliveryCount)
  GANTRY_LOG: 'info'
  GANTRY_LOG_FORMAT: 'json'
  OTEL_EXPORTER_OTLP_ENDPOINT: otlpEndpoint
  OTEL_SERVICE_NAME: 'gantry'
  GANTRY_API_PRINCIPALS: apiPrincipals
  GANTRY_GITHUB_WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/gantry-github-webhook-secret)'
  GANTRY_API_TOKENS: '@Microsoft.KeyVault(SecretUri=${vaultUri}secrets/gantry-api-tokens)'
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  params: {
    name: names.functionApp
    location: location
    tags: union(tags, {
      'azd-service-name': 'gantry'
    })
    identityId: identity.outputs.id
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    appSettings: union(appSettings, alertSettingValues)
    maximumInstanceCount: maximumInstanceCount
    virtualNetworkSubnetId: privateNetworking ? network.outputs.appSubnetId : ''
  }
  // The host starts with these settings: its identity must already hold the
  // storage, queue and vault roles, or the first start fails; with private
  // networking, the endpoints must exist too.
  dependsOn: [
    resourceRoles
    receiverRoles
    senderRoles
    stateBlobPrivateEndpoint
    hostBlobPrivateEndpoint
    serviceBusPrivateEndpoint
    vaultPrivateEndpoint
  ]
}

// Private networking (privateNetworking): the VNet, the DNS zones, and one
// private endpoint per service the code (or the Functions host) reaches.
// tests/infra.rs checks each: condition, group id, DNS zone, and that the
// service's public access is off under the same parameter.
module network 'modules/network.bicep' = if (privateNetworking) {
  name: 'network'
  scope: rg
  params: {
    name: names.vnet
    location: location
    tags: tags
    addressPrefix: vnetAddressPrefix
    appSubnetPrefix: appSubnetPrefix
    privateEndpointSubnetPrefix: privateEndpointSubnetPrefix
    dnsZones: privateDnsZones
  }
}

// State: gantry's records (GANTRY_STORAGE, blob only).
module stateBlobPrivateEndpoint 'modules/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-state-blob'
  scope: rg
  params: {
    name: 'pe-${names.stateStorage}-blob'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    targetId: storage.outputs.stateAccountId
    groupId: 'blob'
    dnsZoneId: dnsZoneId['privatelink.blob.core.windows.net']
  }
}

// Host storage: AzureWebJobsStorage and the Flex deployment container. Blob
// only: gantry has HTTP, Service Bus and timer triggers (keys, leases and
// timer status are blobs), no queue/blob triggers or Durable Functions, and
// the identity holds Blob Data Owner there and nothing for queues or tables.
module hostBlobPrivateEndpoint 'modules/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-host-blob'
  scope: rg
  params: {
    name: 'pe-${names.hostStorage}-blob'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    targetId: storage.outputs.hostAccountId
    groupId: 'blob'
    dnsZoneId: dnsZoneId['privatelink.blob.core.windows.net']
  }
}

module serviceBusPrivateEndpoint 'modules/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-servicebus'
  scope: rg
  params: {
    name: 'pe-${names.serviceBus}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    targetId: serviceBus.outputs.id
    groupId: 'namespace'
    dnsZoneId: dnsZoneId['privatelink.servicebus.windows.net']
  }
}

module vaultPrivateEndpoint 'modules/private-endpoint.bicep' = if (privateNetworking) {
  name: 'pe-vault'
  scope: rg
  params: {
    name: 'pe-${names.vault}'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    targetId: vault.outputs.id
    groupId: 'vault'
    dnsZoneId: dnsZoneId['privatelink.vaultcore.azure.net']
  }
}

// The registry is referenced, not created: an endpoint only when its id is
// given (Premium SKU). gantry's code does not pull images (AKS does; Event
// Grid's system topic is unaffected by the registry's network rules): the
// endpoint serves clients in (or peered with) this VNet.
module registryPrivateEndpoint 'modules/private-endpoint.bicep' = if (privateNetworking && !empty(privateRegistryId)) {
  name: 'pe-registry'
  scope: rg
  params: {
    name: 'pe-${registryName}-registry'
    location: location
    tags: tags
    subnetId: network.outputs.privateEndpointSubnetId
    targetId: privateRegistryId
    groupId: 'registry'
    dnsZoneId: dnsZoneId['privatelink.azurecr.io']
  }
}

// AKS egress through Azure Firewall: only the route table; the cluster, its
// subnet and the firewall are the platform team's (docs/deploy.md).
module aksEgressRoute 'modules/aks-egress-route.bicep' = if (!empty(aksEgressFirewallIp)) {
  name: 'aks-egress-route'
  scope: rg
  params: {
    name: 'rt-aks-egress-${environmentName}'
    location: location
    tags: tags
    firewallPrivateIp: aksEgressFirewallIp
  }
}

// Azure Monitor: action group + alert rules on dead letters, failed runs and
// function errors (modules/alerts.bicep).
module alerts 'modules/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    name: environmentName
    location: location
    tags: tags
    emails: alertEmails
    webhookUrl: alertWebhookUrl
    serviceBusId: serviceBus.outputs.id
    appInsightsId: monitoring.outputs.appInsightsId
    functionErrorThreshold: functionErrorThreshold
  }
}

module resourceRoles 'modules/roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    hostAccountName: storage.outputs.hostAccountName
    stateAccountName: storage.outputs.stateAccountName
    stateContainerName: stateContainerName
    vaultName: vault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
    roles: roles
  }
}

module receiverRoles 'modules/queue-role.bicep' = [
  for queue in receiveQueues: {
    name: 'sb-receive-${queue}'
    scope: rg
    params: {
      namespaceName: serviceBus.outputs.name
      queueName: queue
      roleId: roles.serviceBusDataReceiver
      principalId: identity.outputs.principalId
    }
  }
]

module senderRoles 'modules/queue-role.bicep' = [
  for queue in sendQueues: {
    name: 'sb-send-${queue}'
    scope: rg
    params: {
      namespaceName: serviceBus.outputs.name
      queueName: queue
      roleId: roles.serviceBusDataSender
      principalId: identity.outputs.principalId
    }
  }
]

module registryEvents 'modules/eventgrid.bicep' = {
  name: 'registry-events'
  scope: resourceGroup(registryResourceGroup)
  params: {
    registryName: registryName
    identityId: identity.outputs.id
    queueId: '${serviceBus.outputs.id}/queues/registry-events'
    tags: tags
  }
  // Event Grid validates delivery with the identity when the subscription
  // is created: the sender role must exist first.
  dependsOn: [
    senderRoles
  ]
}

// A consumption Logic App is not a trusted service of Service Bus and has no
// VNet integration: with private networking it cannot reach the namespace, so
// it is not created (docs/deploy.md: alternatives).
module defender 'modules/defender.bicep' = if (enableDefenderAutomation && !privateNetworking) {
  name: 'defender'
  scope: rg
  params: {
    name: environmentName
    location: location
    tags: tags
    identityId: identity.outputs.id
    serviceBusNamespace: serviceBus.outputs.fullyQualifiedNamespace
  }
  dependsOn: [
    senderRoles
  ]
}

module registryReader 'modules/registry-reader.bicep' = if (resourceGraphScope == 'registry') {
  name: 'registry-reader'
  scope: resourceGroup(registryResourceGroup)
  params: {
    registryName: registryName
    principalId: identity.outputs.principalId
    readerRoleId: roles.reader
  }
}

module subscriptionReader 'modules/subscription-reader.bicep' = if (resourceGraphScope == 'subscription') {
  name: 'subscription-reader'
  params: {
    principalId: identity.outputs.principalId
    readerRoleId: roles.reader
  }
}

module aksRoles 'modules/aks-roles.bicep' = if (!empty(aksClusterName)) {
  name: 'aks-roles'
  scope: resourceGroup(empty(aksResourceGroup) ? resourceGroupName : aksResourceGroup)
  params: {
    clusterName: aksClusterName
    namespaces: managedNamespaces
    principalId: identity.outputs.principalId
    roles: roles
    allowNamespaceApply: allowNamespaceApply
    daemonSetNamespaces: daemonSetNamespaces
  }
}

output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output GANTRY_URL string = 'https://${functionApp.outputs.defaultHostName}'
output GANTRY_WEBHOOK_URL string = 'https://${functionApp.outputs.defaultHostName}/api/github'
output GANTRY_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output GANTRY_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
output GANTRY_STATE_ACCOUNT string = storage.outputs.stateAccountName
output GANTRY_STATE_CONTAINER string = stateContainerName
output GANTRY_SERVICEBUS_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output GANTRY_KEY_VAULT string = vault.outputs.name
output GANTRY_VNET_ID string = privateNetworking ? network.outputs.vnetId : ''
output GANTRY_AKS_EGRESS_ROUTE_TABLE_ID string = empty(aksEgressFirewallIp) ? '' : aksEgressRoute.outputs.id
output GANTRY_ACTION_GROUP_ID string = alerts.outputs.actionGroupId
// For gantry.toml `[deploy] aks_cluster` (configuration, not an app setting).
output GANTRY_AKS_CLUSTER_ID string = empty(aksClusterName) ? '' : '/subscriptions/${subscription().subscriptionId}/resourceGroups/${empty(aksResourceGroup) ? resourceGroupName : aksResourceGroup}/providers/Microsoft.ContainerService/managedClusters/${aksClusterName}'
