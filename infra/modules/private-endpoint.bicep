// One private endpoint (Private Link) for one sub-resource of a service, and
// its DNS zone group: the endpoint registers its private address in the
// private DNS zone of that sub-resource (e.g. privatelink.blob.core.windows.net),
// which network.bicep links to the VNet.
//
// API versions: Microsoft.Network/privateEndpoints@2023-11-01 and
// privateEndpoints/privateDnsZoneGroups@2023-11-01
// (learn.microsoft.com/azure/templates/microsoft.network/2023-11-01/privateendpoints).

@description('Endpoint name.')
param name string

@description('Region (the VNet\'s).')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Resource id of the private endpoint subnet.')
param subnetId string

@description('Resource id of the service the endpoint connects to.')
param targetId string

@description('The sub-resource (group id): blob, queue, table, namespace, vault, registry, ...')
param groupId string

@description('Resource id of the private DNS zone for that sub-resource.')
param dnsZoneId string

resource endpoint 'Microsoft.Network/privateEndpoints@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: name
        properties: {
          privateLinkServiceId: targetId
          groupIds: [
            groupId
          ]
        }
      }
    ]
  }
}

resource zoneGroup 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2023-11-01' = {
  parent: endpoint
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: replace(last(split(dnsZoneId, '/')), '.', '-')
        properties: {
          privateDnsZoneId: dnsZoneId
        }
      }
    ]
  }
}

output id string = endpoint.id
