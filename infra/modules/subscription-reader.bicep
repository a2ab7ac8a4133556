// Reader on a whole subscription, for `resourceGraphScope = 'subscription'`:
// when Defender findings must be queried across registries, or images live
// in registries gantry does not manage. Wider than registry-reader.bicep;
// choose it knowingly.
targetScope = 'subscription'

@description('Principal (object) id of the identity.')
param principalId string

@description('Reader role definition GUID.')
param readerRoleId string

resource reader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, readerRoleId)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', readerRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
