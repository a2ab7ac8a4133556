// Service Bus namespace and gantry's queues. Standard tier by default:
// sessions and duplicate detection need at least that. Premium when private
// networking is on: private endpoints exist only on Premium (sessions and
// duplicate detection work the same there). Local (SAS) auth is off: every
// sender and receiver uses Entra ID.
//
// API versions: Microsoft.ServiceBus/namespaces(/queues, /networkRuleSets)@2024-01-01
// (learn.microsoft.com/azure/templates/microsoft.servicebus/2024-01-01/namespaces/networkrulesets:
// defaultAction, publicNetworkAccess, trustedServiceAccessEnabled).

@description('Namespace name.')
param name string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Queues: [{ name, sessions }].')
param queues array

@description('Deliveries before a message is dead-lettered (the host abandons on a transient failure).')
param maxDeliveryCount int

@description('Peek-lock duration (ISO 8601, at most PT5M); covers functionTimeout in host.json.')
param lockDuration string

@description('Duplicate detection window (ISO 8601): redelivered events with the same MessageId inside it are dropped.')
param duplicateDetectionWindow string

@description('Private networking (main.bicep): Premium SKU, public network access off, reached through its private endpoint; trusted Azure services (Event Grid delivering registry events with the identity) still get in.')
param privateNetworking bool

@allowed([
  1
  2
  4
  8
  16
])
@description('Premium messaging units (private networking only).')
param premiumMessagingUnits int = 1

var premiumSku = {
  name: 'Premium'
  tier: 'Premium'
  capacity: premiumMessagingUnits
}
var standardSku = {
  name: 'Standard'
  tier: 'Standard'
}
var sku = privateNetworking ? premiumSku : standardSku

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: sku
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
  }
}

// Private: deny the public endpoint, but let trusted Microsoft services
// through. Event Grid is one (it delivers the registry's ImagePushed events
// to registry-events with the user-assigned identity, which the trusted-
// service path requires); a consumption Logic App (the Defender automation)
// is not, see docs/deploy.md.
resource networkRules 'Microsoft.ServiceBus/namespaces/networkRuleSets@2024-01-01' = if (privateNetworking) {
  parent: namespace
  name: 'default'
  properties: {
    publicNetworkAccess: 'Disabled'
    defaultAction: 'Deny'
    trustedServiceAccessEnabled: true
    ipRules: []
    virtualNetworkRules: []
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = [
  for q in queues: {
    parent: namespace
    name: q.name
    properties: {
      requiresSession: q.sessions
      requiresDuplicateDetection: true
      duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
      maxDeliveryCount: maxDeliveryCount
      lockDuration: lockDuration
      deadLetteringOnMessageExpiration: true
      defaultMessageTimeToLive: 'P14D'
      enablePartitioning: false
    }
  }
]

output id string = namespace.id
output name string = namespace.name
output sku string = sku.name
output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
