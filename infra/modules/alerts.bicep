// Azure Monitor: one action group (e-mail and/or webhook receivers) and the
// alert rules that route to it. These are about gantry itself (its queues and
// its functions); alerts about the applications gantry delivers go through
// gantry's own `alerts` queue and channels (gantry.toml).
//
// API versions (learn.microsoft.com/azure/templates/microsoft.insights):
// actionGroups@2023-01-01, metricAlerts@2018-03-01,
// scheduledQueryRules@2023-12-01 (kind LogAlert: criteria.allOf[].query,
// timeAggregation, operator, threshold, failingPeriods; actions.actionGroups).

@description('Name prefix.')
param name string

@description('Region of the log alert rules (the Application Insights region).')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('E-mail addresses the action group notifies.')
param emails array = []

@secure()
@description('Webhook the action group posts to (common alert schema); empty: none. Secure: such URLs often carry a token.')
param webhookUrl string = ''

@description('Resource id of the Service Bus namespace.')
param serviceBusId string

@description('Resource id of Application Insights (log alert scope).')
param appInsightsId string

@minValue(0)
@description('Failed invocations plus exceptions in 15 minutes above which the function-errors alert fires. Transient failures (a 503 so the host redelivers) count, hence not 0.')
param functionErrorThreshold int = 5

var webhookReceiver = [
  {
    name: 'webhook'
    serviceUri: webhookUrl
    useCommonAlertSchema: true
  }
]

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-${name}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'gantry'
    enabled: true
    emailReceivers: [
      for (email, i) in emails: {
        name: 'email-${i}'
        emailAddress: email
        useCommonAlertSchema: true
      }
    ]
    webhookReceivers: empty(webhookUrl) ? [] : webhookReceiver
  }
}

// A message in any queue's dead-letter sub-queue is an event gantry gave up
// on (runtime: the last delivery also records the reason on the run). The
// metric is a gauge per queue (dimension EntityName): the alert stays fired
// until the dead letters are dealt with (docs/operations.md).
resource deadLetters 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: 'alert-${name}-dead-letters'
  location: 'global'
  tags: tags
  properties: {
    description: 'A gantry queue has dead-lettered messages (any queue: EntityName split).'
    severity: 1
    enabled: true
    scopes: [
      serviceBusId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    autoMitigate: true
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'dead-lettered'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroup.id
      }
    ]
  }
}

// Failed, blocked and rolled-back runs. The runtime logs the outcome line of every queue
// invocation (shared/runtime/src/lib.rs, invoke_message: `Outcome::Done(line)`
// → `tracing::info!(function, message_id, "{line}")` and the line is the
// invocation response's `Logs` entry, which the Functions host writes to
// Application Insights `traces`). The steps' lines for a run they end are
// exactly `run {run_id}: failed: {reason}` (scan-check, policy-enforce,
// deploy), `run {run_id}: blocked: {reason}` (scan-check, policy-enforce)
// and `run {run_id}: rolled back: {summary}` (deploy, verify failed).
// tests/infra.rs matches this regex against those format strings. Anchored at the start so the JSON copy of the same event on stdout does
// not count twice.
resource failedRuns 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${name}-failed-runs'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'gantry: failed, blocked or rolled-back runs'
    description: 'A pipeline run failed, was blocked (scan or policy) or rolled back; the run id is in the message (GET /api/runs/<id> for the steps).'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: 'traces | where message matches regex "^run [^ ]+: (failed|blocked|rolled back): " | project timestamp, operation_Name, message'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

// Function errors: invocations the host records as failed (gantry answered
// 5xx: transient failure, the message is redelivered) and exceptions
// (host-side: a handler crash, a binding failure).
resource functionErrors 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${name}-function-errors'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'gantry: function errors'
    description: 'Failed function invocations (requests with success == false) and exceptions above the threshold in 15 minutes.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'union (requests | where success == false | project timestamp, operation_Name, problem = strcat("failed invocation ", resultCode)), (exceptions | project timestamp, operation_Name, problem = type)'
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: functionErrorThreshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}

output actionGroupId string = actionGroup.id
