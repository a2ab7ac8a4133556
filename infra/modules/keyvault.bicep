// Key Vault in RBAC mode holding gantry's secrets. The Function App reads
// them only through Key Vault references (@Microsoft.KeyVault(SecretUri=...))
// resolved by the platform with the user-assigned identity; gantry's code
// never talks to Key Vault.

@description('Vault name (3-24 characters).')
param name string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Public network access off; the vault is reached through its private endpoint only (main.bicep: privateNetworking && privateKeyVault).')
param privateNetworking bool

@description('Secrets to create now: [{ name, value }]. Others (alert channel URLs) are set by the operator later.')
@secure()
param secrets object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 30
    enablePurgeProtection: true
    // Private: only clients in the VNet (private endpoint +
    // privatelink.vaultcore.azure.net) reach the data plane. main.bicep turns
    // this on only with privateKeyVault, because the Flex platform resolves
    // Key Vault references from outside the VNet. The secrets below are
    // written through ARM (control plane).
    publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
    networkAcls: {
      defaultAction: privateNetworking ? 'Deny' : 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [
  for s in secrets.items: {
    parent: vault
    name: s.name
    properties: {
      value: s.value
      contentType: 'text/plain'
    }
  }
]

output id string = vault.id
output name string = vault.name
output uri string = vault.properties.vaultUri
