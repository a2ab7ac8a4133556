// AKS with Azure RBAC for Kubernetes authorization: the identity may fetch a
// user kubeconfig for the cluster (Cluster User Role, no Kubernetes rights by
// itself) and write workloads in each managed namespace only (RBAC Writer
// scoped to <cluster>/namespaces/<ns>: Deployments, Services, ConfigMaps,
// ...; no Roles or RoleBindings, nothing cluster-wide), plus the two custom
// roles below for what gantry renders beyond Writer: ResourceQuota and
// LimitRange (per namespace) and the Namespace objects (cluster scope), and
// one for what the governance audit reads beyond the managed namespaces
// (DaemonSets in the namespaces of mandatory DaemonSets).
//
// What Writer (a7ffa36f-..., learn.microsoft.com/azure/role-based-access-control/built-in-roles/containers)
// already covers, per namespace, for what gantry applies and reads:
//   apply: apps/deployments/*, services/*, serviceaccounts/*,
//          networking.k8s.io/networkpolicies/*, networking.k8s.io/ingresses/*
//          (exposure mode `ingress`; `*` includes the delete that removes
//          an Ingress the app no longer renders);
//   read (governance audit): apps/deployments/*, resourcequotas/read,
//          limitranges/read (also in the namespace settings role below).
// Not covered and not expressible: secrets-store.csi.x-k8s.io
// SecretProviderClass (app secrets from Key Vault). It is a custom resource;
// Azure RBAC for Kubernetes has no dataActions for custom resources except
// the blanket `Microsoft.ContainerService/managedClusters/*/read` (AKS docs,
// "Use Azure RBAC for Kubernetes Authorization"), and no write at all. A
// Kubernetes RBAC Role + RoleBinding per namespace grants it instead:
// infra/kubernetes/secretproviderclass-role.yaml (docs/deploy.md).

@description('AKS cluster name (in this module\'s resource group).')
param clusterName string

@description('Namespaces gantry deploys to.')
param namespaces array

@description('Principal (object) id of the identity.')
param principalId string

@description('Built-in role definition GUIDs.')
param roles object

@description('Namespaces of the mandatory DaemonSets the governance audit checks (e.g. kube-system): the identity may read DaemonSets there, nothing else.')
param daemonSetNamespaces array = []

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

resource daemonSetNamespace 'Microsoft.ContainerService/managedClusters/namespaces@2025-03-02-preview' existing = [
  for ns in daemonSetNamespaces: {
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

// Governance audit: the mandatory DaemonSets (a security agent, a log
// shipper) usually live in kube-system or a vendor namespace gantry does not
// manage. The built-in RBAC Reader there would also show ConfigMaps, Pods
// and events of the platform's components; this role reads DaemonSets only.
resource daemonSetReaderRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = if (!empty(daemonSetNamespaces)) {
  name: guid(cluster.id, 'gantry-daemonset-reader')
  properties: {
    roleName: 'gantry daemonset reader (${clusterName})'
    description: 'Read DaemonSets (gantry\'s governance audit checks that the mandatory DaemonSets run).'
    type: 'CustomRole'
    assignableScopes: [
      resourceGroup().id
    ]
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.ContainerService/managedClusters/apps/daemonsets/read'
        ]
        notDataActions: []
      }
    ]
  }
}

resource daemonSetReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for (ns, i) in daemonSetNamespaces: {
    name: guid(cluster.id, ns, principalId, 'gantry-daemonset-reader')
    scope: daemonSetNamespace[i]
    properties: {
      roleDefinitionId: daemonSetReaderRole.id
      principalId: principalId
      principalType: 'ServicePrincipal'
    }
  }
]
