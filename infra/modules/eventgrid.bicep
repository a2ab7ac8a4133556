// Event Grid system topic on the container registry, deployed into the
// registry's resource group (a system topic lives beside its source). Its
// subscription delivers ImagePushed / ImageDeleted to the registry-events
// queue with the user-assigned identity (deliveryWithResourceIdentity): no
// SAS key, and the identity may send to that queue only.

@description('Container registry name (in this module\'s resource group).')
param registryName string

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Resource id of the registry-events queue.')
param queueId string

@description('Tags for every resource.')
param tags object = {}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: registryName
}

resource topic 'Microsoft.EventGrid/systemTopics@2025-02-15' = {
  name: 'evgt-${registryName}'
  location: registry.location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    source: registry.id
    topicType: 'Microsoft.ContainerRegistry.Registries'
  }
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2025-02-15' = {
  parent: topic
  name: 'gantry-registry-events'
  properties: {
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.ContainerRegistry.ImagePushed'
        'Microsoft.ContainerRegistry.ImageDeleted'
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deliveryWithResourceIdentity: {
      identity: {
        type: 'UserAssigned'
        userAssignedIdentity: identityId
      }
      destination: {
        endpointType: 'ServiceBusQueue'
        properties: {
          resourceId: queueId
        }
      }
    }
  }
}

output topicName string = topic.name
output registryId string = registry.id
