// One role assignment scoped to one queue (never the namespace): the
// identity may send to / receive from exactly the queues listed in main.bicep.

@description('Service Bus namespace name.')
param namespaceName string

@description('Queue name.')
param queueName string

@description('Role definition GUID (Azure Service Bus Data Sender or Receiver).')
param roleId string

@description('Principal (object) id of the identity.')
param principalId string

resource namespace 'Microsoft.ServiceBus/namespaces@2024-01-01' existing = {
  name: namespaceName
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' existing = {
  parent: namespace
  name: queueName
}

resource assignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, principalId, roleId)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
