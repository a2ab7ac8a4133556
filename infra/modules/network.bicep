// Private networking (main.bicep `privateNetworking`): one VNet with
// - `snet-app`: the Function App's VNet integration. Flex Consumption runs on
//   the Container Apps platform, so the subnet is delegated to
//   Microsoft.App/environments (not Microsoft.Web/serverFarms as for Premium
//   or Dedicated plans), and it holds nothing else;
// - `snet-pe`: the private endpoints of storage, Service Bus, Key Vault and
//   (optionally) the registry;
// and the private DNS zones those endpoints register in, linked to the VNet
// so that the app resolves `<account>.blob.core.windows.net` & co. to the
// endpoints' private addresses.
//
// API versions: Microsoft.Network/virtualNetworks@2023-11-01 and
// Microsoft.Network/privateDnsZones(/virtualNetworkLinks)@2020-06-01, as
// documented on learn.microsoft.com/azure/templates/microsoft.network.

@description('VNet name.')
param name string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Address space of the VNet.')
param addressPrefix string

@description('Function App integration subnet (at least /27 for Flex Consumption; /24 leaves room to scale out).')
param appSubnetPrefix string

@description('Private endpoint subnet.')
param privateEndpointSubnetPrefix string

@description('Private DNS zones to create and link (public Azure cloud names).')
param dnsZones array

resource vnet 'Microsoft.Network/virtualNetworks@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: [
        addressPrefix
      ]
    }
    subnets: [
      {
        name: 'snet-app'
        properties: {
          addressPrefix: appSubnetPrefix
          delegations: [
            {
              name: 'flex-consumption'
              properties: {
                serviceName: 'Microsoft.App/environments'
              }
            }
          ]
        }
      }
      {
        name: 'snet-pe'
        properties: {
          addressPrefix: privateEndpointSubnetPrefix
          // Network policies (NSG/UDR) on private endpoints stay off: the
          // endpoints are only reached from inside this VNet.
          privateEndpointNetworkPolicies: 'Disabled'
        }
      }
    ]
  }
}

resource zone 'Microsoft.Network/privateDnsZones@2020-06-01' = [
  for z in dnsZones: {
    name: z
    location: 'global'
    tags: tags
  }
]

resource link 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [
  for (z, i) in dnsZones: {
    parent: zone[i]
    name: '${name}-link'
    location: 'global'
    tags: tags
    properties: {
      registrationEnabled: false
      virtualNetwork: {
        id: vnet.id
      }
    }
  }
]

output vnetId string = vnet.id
output appSubnetId string = '${vnet.id}/subnets/snet-app'
output privateEndpointSubnetId string = '${vnet.id}/subnets/snet-pe'
// Zone ids are `resourceId(..., 'Microsoft.Network/privateDnsZones', <name>)`
// in this resource group: main.bicep derives them (and depends on this module).
output dnsZoneNames array = [for (z, i) in dnsZones: zone[i].name]
