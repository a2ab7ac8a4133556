// AKS with Azure RBAC for Kubernetes authorization: the identity may fetch a
// user kubeconfig for the cluster (Cluster User Role, no Kubernetes rights by
// itself) and write workloads in each managed namespace only (RBAC Writer
// scoped to <cluster>/namespaces/<ns>: Deployments, Services, ConfigMaps,
// ...; no Roles or RoleBindings, nothing cluster-wide).

@description('AKS cluster name (in this module\'s resource group).')
param clusterName string

@description('Namespaces gantry deploys to.')
param namespaces array

@description('Principal (object) id of the identity.')
param principalId string

@description('Built-in role definition GUIDs.')
param roles object

resource cluster 'Microsoft.ContainerService/managedClusters@2024-09-01' existing = {
  name: clusterName
}

resource clusterUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(cluster.id, principalId, roles.aksClusterUser)
  scope: cluster
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.aksClusterUser)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// A namespace is a role-assignment scope AKS understands
// (`az role assignment create --scope <cluster id>/namespaces/<ns>`). The
// `existing` reference only gives Bicep that scope path; nothing is read or
// created on the namespace itself (create the namespaces with kubectl or
// GitOps beforehand).
resource namespace 'Microsoft.ContainerService/managedClusters/namespaces@2025-03-02-preview' existing = [
  for ns in namespaces: {
    parent: cluster
    name: ns
  }
]

resource namespaceWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (ns, i) in namespaces: {
    name: guid(cluster.id, ns, principalId, roles.aksRbacWriter)
    scope: namespace[i]
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.aksRbacWriter)
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]
