// Optional: the route table for AKS egress through Azure Firewall (main.bicep
// `aksEgressFirewallIp`). The cluster, its VNet and the firewall are not
// created by this template: associate this table with the cluster's node
// subnet and create (or update) the cluster with
// `networkProfile.outboundType: 'userDefinedRouting'`, then allow the FQDNs
// AKS needs on the firewall (docs/deploy.md, "AKS egress through Azure
// Firewall").
//
// API version: Microsoft.Network/routeTables@2023-11-01
// (learn.microsoft.com/azure/templates/microsoft.network/2023-11-01/routetables).

@description('Route table name.')
param name string

@description('Region (must be the region of the AKS node subnet).')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Private IP address of the Azure Firewall (or other NVA) all egress goes through.')
param firewallPrivateIp string

resource routeTable 'Microsoft.Network/routeTables@2023-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    // Routes learned from a VPN / ExpressRoute gateway must not bypass the
    // firewall.
    disableBgpRoutePropagation: true
    routes: [
      {
        name: 'default-via-firewall'
        properties: {
          addressPrefix: '0.0.0.0/0'
          nextHopType: 'VirtualAppliance'
          nextHopIpAddress: firewallPrivateIp
        }
      }
    ]
  }
}

output id string = routeTable.id
