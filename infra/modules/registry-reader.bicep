// Reader on the container registry only: enough for Resource Graph to return
// Defender's vulnerability sub-assessments of that registry's images (the
// `defender` scan source), nothing about the rest of the subscription.

@description('Container registry name (in this module\'s resource group).')
param registryName string

@description('Principal (object) id of the identity.')
param principalId string

@description('Reader role definition GUID.')
param readerRoleId string

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource reader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, principalId, readerRoleId)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', readerRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
