// AKS with Azure RBAC for Kubernetes authorization: the identity may fetch a
// user kubeconfig for the cluster (Cluster User Role, no Kubernetes rights by
// itself) and write workloads in each managed namespace only (RBAC Writer
// scoped to <cluster>/namespaces/<ns>: Deployments, Services, ConfigMaps,
// ...; no Roles or RoleBindings, nothing cluster-wide), plus the two custom
// roles below for what gantry renders beyond Writer: ResourceQuota and
// LimitRange (per namespace) and the Namespace objects (cluster scope).

@description('AKS cluster name (in this module\'s resource group).')
param clusterName string

@description('Namespaces gantry deploys to.')
param namespaces array

@description('Principal (object) id of the identity.')
param principalId string

@description('Built-in role definition GUIDs.')
param roles object

@description('Let the identity patch Namespace objects (cluster scope): the renderer applies each app\'s Namespace with its Pod Security labels. Off: create and label the namespaces yourself, and deploys fail at the Namespace object.')
param allowNamespaceApply bool = true

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

// RBAC Writer (like Kubernetes `edit`) may read but not write ResourceQuota
// and LimitRange, which gantry renders for every app: a custom role adds
// exactly those, per namespace.
resource namespaceSettingsRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(cluster.id, 'gantry-namespace-settings')
  properties: {
    roleName: 'gantry namespace settings (${clusterName})'
    description: 'Write ResourceQuota and LimitRange objects (gantry renders one of each per app namespace).'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.ContainerService/managedClusters/resourcequotas/read'
          'Microsoft.ContainerService/managedClusters/resourcequotas/write'
          'Microsoft.ContainerService/managedClusters/limitranges/read'
          'Microsoft.ContainerService/managedClusters/limitranges/write'
        ]
        notDataActions: []
      }
    ]
  }
}

resource namespaceSettings 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (ns, i) in namespaces: {
    name: guid(cluster.id, ns, principalId, 'gantry-namespace-settings')
    scope: namespace[i]
    properties: {
      roleDefinitionId: namespaceSettingsRole.id
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]

// Namespaces are cluster-scoped objects: a namespace-scoped assignment
// cannot cover them. Read + write on Namespace objects only (this also
// allows relabelling other namespaces: see docs/security.md).
resource namespaceObjectsRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = if (allowNamespaceApply) {
  name: guid(cluster.id, 'gantry-namespace-objects')
  properties: {
    roleName: 'gantry namespace objects (${clusterName})'
    description: 'Read and server-side apply Namespace objects (gantry applies each app namespace with Pod Security labels).'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.ContainerService/managedClusters/namespaces/read'
          'Microsoft.ContainerService/managedClusters/namespaces/write'
        ]
        notDataActions: []
      }
    ]
  }
}

resource namespaceObjects 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (allowNamespaceApply) {
  name: guid(cluster.id, principalId, 'gantry-namespace-objects')
  scope: cluster
  properties: {
    roleDefinitionId: namespaceObjectsRole.id
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
