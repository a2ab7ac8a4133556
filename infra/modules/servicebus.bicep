// Service Bus namespace and gantry's queues. Standard tier: sessions and
// duplicate detection need it. Local (SAS) auth is off: every sender and
// receiver uses Entra ID.

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

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: 'Standard'
    tier: 'Standard'
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
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
output fullyQualifiedNamespace string = '${namespace.name}.servicebus.windows.net'
