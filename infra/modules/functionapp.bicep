// The Function App: Flex Consumption (FC1), Linux, custom handler runtime,
// running as the user-assigned identity. The package (dist.zip from
// `gantry package`) is deployed to the deployment container, read by the
// platform with the same identity.

@description('Function App name.')
param name string

@description('Region.')
param location string

@description('Tags for every resource (azd finds the app by azd-service-name).')
param tags object = {}

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Blob container URL the deployment package is uploaded to.')
param deploymentContainerUrl string

@description('App settings (name → value); secrets are Key Vault references.')
param appSettings object

@description('Maximum instances the plan scales out to.')
param maximumInstanceCount int = 40

@description('Memory per instance (MB): 512, 2048 or 4096.')
param instanceMemoryMB int = 2048

@description('Integration subnet (delegated to Microsoft.App/environments) for private networking; empty: no VNet integration.')
param virtualNetworkSubnetId string = ''

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-${name}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource site 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references resolve with the user-assigned identity, not a
    // (non-existent) system-assigned one.
    keyVaultReferenceIdentity: identityId
    // VNet integration (private networking): outbound calls to storage,
    // Service Bus and Key Vault resolve, through the private DNS zones linked
    // to the VNet, to the private endpoints' (RFC 1918) addresses, so they go
    // through the subnet. Flex Consumption integration is configured by
    // virtualNetworkSubnetId alone (Microsoft's Flex VNet samples set nothing
    // else; siteConfig.vnetRouteAllEnabled is an App Service setting, see
    // below). Inbound stays public: GitHub must reach /api/github.
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    // No siteConfig.ftpsState or linuxFxVersion: Flex Consumption rejects
    // them ("The following list of 2 site configuration properties
    // (Site.SiteConfig.FtpsState, Site.SiteConfig.LinuxFxVersion) for Flex
    // Consumption sites is invalid", as reported by Flex users; Microsoft's
    // list: "Flex Consumption plan deprecations" in the Functions app
    // settings reference). FTP stays off through the `ftp` publishing policy
    // below. vnetRouteAllEnabled is left out for the same reason: an App
    // Service routing switch not known to be accepted on Flex.
    siteConfig: {
      minTlsVersion: '1.2'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: deploymentContainerUrl
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'custom'
        version: '1.0'
      }
    }
  }
}

resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: site
  name: 'appsettings'
  properties: appSettings
}

// Basic-auth publishing (FTP / SCM with a password) stays off: deployments
// use Entra ID (azd, az, the GitHub workflow with OIDC).
resource ftp 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scm 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: site
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = site.id
output name string = site.name
output defaultHostName string = site.properties.defaultHostName
