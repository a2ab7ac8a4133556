// Two accounts, both without shared keys (Entra ID only):
// - host: the Functions host's own storage (AzureWebJobsStorage) and the Flex
//   Consumption deployment container the zip package is uploaded to;
// - state: gantry's state container (runs, indexes, scans, audit).
// Separate accounts so the identity's broad rights on host storage (the host
// needs Blob Data Owner there) do not extend to gantry's records, where it
// gets Blob Data Contributor on the one container only.

@description('Host storage account name (3-24 lowercase letters and digits).')
param hostAccountName string

@description('State storage account name (3-24 lowercase letters and digits).')
param stateAccountName string

@description('The state container (GANTRY_CONTAINER).')
param stateContainerName string

@description('The Flex Consumption deployment container.')
param deploymentContainerName string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Private networking (main.bicep): public network access off on both accounts; they are reached through private endpoints (blob) only.')
param privateNetworking bool

// Private: no public endpoint at all (not even for trusted Azure services:
// nothing but gantry's VNet needs these accounts; `bypass` only matters for
// the firewall of an account that is still public).
var accountProperties = {
  allowSharedKeyAccess: false
  allowBlobPublicAccess: false
  minimumTlsVersion: 'TLS1_2'
  supportsHttpsTrafficOnly: true
  defaultToOAuthAuthentication: true
  publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'
  networkAcls: {
    defaultAction: privateNetworking ? 'Deny' : 'Allow'
    bypass: 'None'
  }
}

resource hostAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: hostAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: accountProperties
}

resource hostBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: hostAccount
  name: 'default'
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: hostBlobs
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource stateAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: stateAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_ZRS'
  }
  properties: accountProperties
}

resource stateBlobs 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: stateAccount
  name: 'default'
  properties: {
    // Runs and the audit trail are the pipeline's memory: keep deleted or
    // overwritten blobs recoverable for a while.
    deleteRetentionPolicy: {
      enabled: true
      days: 14
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 14
    }
  }
}

resource stateContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: stateBlobs
  name: stateContainerName
  properties: {
    publicAccess: 'None'
  }
}

output hostAccountName string = hostAccount.name
output hostAccountId string = hostAccount.id
output hostBlobEndpoint string = hostAccount.properties.primaryEndpoints.blob
output deploymentContainerUrl string = '${hostAccount.properties.primaryEndpoints.blob}${deploymentContainerName}'
output stateAccountName string = stateAccount.name
output stateAccountId string = stateAccount.id
output stateBlobEndpoint string = stateAccount.properties.primaryEndpoints.blob
output stateContainerId string = stateContainer.id
