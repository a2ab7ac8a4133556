// The one user-assigned managed identity gantry uses for everything: the
// Function App (host storage, state, Service Bus, Key Vault references,
// Resource Graph, AKS), Event Grid delivery and the Defender Logic App.
// What it may do is exactly the role assignments in main.bicep.

@description('Identity name.')
param name string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output id string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
