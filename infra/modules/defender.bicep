// Defender for Cloud workflow automation → Logic App → security-events.
// The automation posts every security alert of the subscription to the Logic
// App's request trigger; the Logic App forwards the alert JSON unchanged to
// the Service Bus REST endpoint with the user-assigned identity (no API
// connection, no SAS key), MessageId = SystemAlertId so Defender's repeats
// are dropped by duplicate detection.

@description('Name prefix.')
param name string

@description('Region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Service Bus fully-qualified namespace.')
param serviceBusNamespace string

@description('Queue the alerts go to.')
param queueName string = 'security-events'

resource workflow 'Microsoft.Logic/workflows@2019-05-01' = {
  name: 'logic-${name}-defender'
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    state: 'Enabled'
    definition: {
      '$schema': 'https://schema.management.azure.com/providers/Microsoft.Logic/schemas/2016-06-01/workflowdefinition.json#'
      contentVersion: '1.0.0.0'
      triggers: {
        manual: {
          type: 'Request'
          kind: 'Http'
          inputs: {
            method: 'POST'
          }
        }
      }
      actions: {
        send_to_security_events: {
          type: 'Http'
          runAfter: {}
          inputs: {
            method: 'POST'
            uri: 'https://${serviceBusNamespace}/${queueName}/messages'
            headers: {
              'Content-Type': 'application/json'
              // Defender re-sends an alert when it is updated: the same
              // SystemAlertId is dropped inside the detection window.
              BrokerProperties: '@{concat(\'{"MessageId":"\', coalesce(triggerBody()?[\'SystemAlertId\'], triggerBody()?[\'systemAlertId\'], triggerBody()?[\'name\'], guid()), \'"}\')}'
            }
            body: '@triggerBody()'
            authentication: {
              type: 'ManagedServiceIdentity'
              identity: identityId
              audience: 'https://servicebus.azure.net'
            }
          }
        }
      }
      outputs: {}
    }
  }
}

resource automation 'Microsoft.Security/automations@2023-12-01-preview' = {
  name: 'gantry-${name}-alerts'
  location: location
  tags: tags
  properties: {
    description: 'Send Defender for Cloud security alerts to gantry (security-events queue).'
    isEnabled: true
    scopes: [
      {
        description: 'The subscription gantry runs in'
        scopePath: subscription().id
      }
    ]
    sources: [
      {
        eventSource: 'Alerts'
        ruleSets: []
      }
    ]
    actions: [
      {
        actionType: 'LogicApp'
        logicAppResourceId: workflow.id
        uri: listCallbackUrl('${workflow.id}/triggers/manual', '2019-05-01').value
      }
    ]
  }
}

output workflowName string = workflow.name
output automationName string = automation.name
