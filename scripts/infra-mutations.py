#!/usr/bin/env python3
"""Mutation check of tests/infra.rs: breaks the Bicep one line at a time and
makes sure the consistency test that guards that line fails (docs/deploy.md,
section 9). Every file is restored after each run, also on error.

    python3 scripts/infra-mutations.py      # builds the test binary first

Not part of scripts/test (it runs the infra test binary ~40 times); run it
after changing infra/ or tests/infra.rs. Exit status 1 if a mutation goes
unnoticed or no longer applies (the Bicep changed: update the list).
"""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
os.chdir(ROOT)

build = subprocess.run(
    ["cargo", "test", "--test", "infra", "--no-run", "--message-format=json"],
    capture_output=True, text=True, check=True,
)
binary = None
for line in build.stdout.splitlines():
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "infra" and msg.get("executable"):
        binary = msg["executable"]
if not binary:
    sys.exit("infra test binary not found in cargo's output")

# (file, exact text, replacement, the test that must then fail). A renamed
# test also shows up: the filter then runs no test and "passes".
P='private_networking_covers_every_service_the_code_reaches'
A='every_alert_rule_routes_to_the_action_group'
R='role_assignments_cover_every_resource_the_code_touches'
M=[
 ('infra/modules/storage.bicep',"publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'","publicNetworkAccess: 'Enabled'",P),
 ('infra/modules/storage.bicep',"  properties: accountProperties\n}\n\nresource stateBlobs","  properties: {}\n}\n\nresource stateBlobs",P),
 ('infra/modules/keyvault.bicep',"publicNetworkAccess: privateNetworking ? 'Disabled' : 'Enabled'","publicNetworkAccess: 'Enabled'",P),
 ('infra/modules/servicebus.bicep',"  name: 'Premium'\n","  name: 'Standard'\n",P),
 ('infra/modules/servicebus.bicep',"trustedServiceAccessEnabled: true","trustedServiceAccessEnabled: false",P),
 ('infra/modules/servicebus.bicep',"  sku: sku\n","  sku: standardSku\n",P),
 ('infra/main.bicep',"targetId: storage.outputs.stateAccountId\n    groupId: 'blob'","targetId: storage.outputs.stateAccountId\n    groupId: 'file'",P),
 ('infra/main.bicep',"groupId: 'vault'\n    dnsZoneId: dnsZoneId['privatelink.vaultcore.azure.net']","groupId: 'vault'\n    dnsZoneId: dnsZoneId['privatelink.blob.core.windows.net']",P),
 ('infra/main.bicep',"targetId: serviceBus.outputs.id\n","targetId: vault.outputs.id\n",P),
 ('infra/main.bicep',"    virtualNetworkSubnetId: privateNetworking ? network.outputs.appSubnetId : ''\n","",P),
 ('infra/main.bicep',"    vaultPrivateEndpoint\n  ]","  ]",P),
 ('infra/main.bicep',"if (privateNetworking && !empty(privateRegistryId)) {","if (privateNetworking) {",P),
 ('infra/main.bicep',"if (enableDefenderAutomation && !privateNetworking) {","if (enableDefenderAutomation) {",P),
 ('infra/main.bicep',"param privateNetworking bool = false","param privateNetworking bool = true",P),
 ('infra/main.bicep',"  GANTRY_LOG: 'info'\n","  GANTRY_LOG: 'info'\n  GANTRY_COSMOS: cosmos.outputs.endpoint\n",P),
 ('infra/main.bicep',"  'privatelink.vaultcore.azure.net'\n","",P),
 ('infra/main.bicep',"    duplicateDetectionWindow: duplicateDetectionWindow\n    privateNetworking: privateNetworking\n","    duplicateDetectionWindow: duplicateDetectionWindow\n    privateNetworking: false\n",P),
 ('infra/modules/network.bicep',"serviceName: 'Microsoft.App/environments'","serviceName: 'Microsoft.Web/serverFarms'",P),
 ('infra/modules/network.bicep',"        id: vnet.id","        id: ''",P),
 ('infra/modules/private-endpoint.bicep',"privateDnsZoneId: dnsZoneId","privateDnsZoneId: ''",P),
 ('infra/modules/functionapp.bicep',"    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId\n","",P),
 ('infra/modules/alerts.bicep',"    actions: {\n      actionGroups: [\n        actionGroup.id\n      ]\n    }\n  }\n}\n\noutput","    actions: {\n      actionGroups: []\n    }\n  }\n}\n\noutput",A),
 ('infra/modules/alerts.bicep',"        actionGroupId: actionGroup.id","        actionGroupId: ''",A),
 ('infra/modules/alerts.bicep',"(failed|blocked|rolled back)","(failed|blocked)",A),
 ('infra/modules/alerts.bicep',"\"^run [^ ]+: (failed","\"run [^ ]+: (failed",A),
 ('infra/modules/alerts.bicep',"(failed|blocked|rolled back): ","(failed|blocked|rolled back|deployed): ",A),
 ('infra/modules/alerts.bicep',"metricName: 'DeadletteredMessages'","metricName: 'ActiveMessages'",A),
 ('infra/modules/alerts.bicep',"requests | where success == false","requests",A),
 ('infra/main.bicep',"    serviceBusId: serviceBus.outputs.id\n","    serviceBusId: ''\n",A),
 ('infra/modules/alerts.bicep',"    enabled: true\n    scopes: [\n      appInsightsId\n    ]\n    evaluationFrequency: 'PT5M'\n    windowSize: 'PT15M'","    enabled: false\n    scopes: [\n      appInsightsId\n    ]\n    evaluationFrequency: 'PT5M'\n    windowSize: 'PT15M'",A),
 ('infra/modules/aks-roles.bicep',"'Microsoft.ContainerService/managedClusters/apps/daemonsets/read'","'Microsoft.ContainerService/managedClusters/apps/daemonsets/*'",R),
 ('infra/modules/aks-roles.bicep',"    scope: daemonSetNamespace[i]","    scope: cluster",R),
 ('infra/modules/aks-roles.bicep',"      roleDefinitionId: daemonSetReaderRole.id","      roleDefinitionId: namespaceSettingsRole.id",R),
 ('infra/modules/aks-roles.bicep',"          'Microsoft.ContainerService/managedClusters/limitranges/write'\n","          'Microsoft.ContainerService/managedClusters/limitranges/write'\n          'Microsoft.ContainerService/managedClusters/secrets/read'\n",R),
 ('infra/main.bicep',"    daemonSetNamespaces: daemonSetNamespaces\n","",R),
 ('infra/kubernetes/secretproviderclass-role.yaml','"patch", "update"]','"patch", "update", "delete"]',R),
 ('infra/kubernetes/secretproviderclass-role.yaml','resources: ["secretproviderclasses"]','resources: ["secrets"]',R),
]
E='the_aks_egress_route_sends_everything_to_the_firewall'
M += [
 ('infra/modules/aks-egress-route.bicep',"addressPrefix: '0.0.0.0/0'","addressPrefix: '10.0.0.0/8'",E),
 ('infra/modules/aks-egress-route.bicep',"nextHopType: 'VirtualAppliance'","nextHopType: 'Internet'",E),
 ('infra/modules/aks-egress-route.bicep',"disableBgpRoutePropagation: true","disableBgpRoutePropagation: false",E),
 ('infra/main.bicep',"firewallPrivateIp: aksEgressFirewallIp","firewallPrivateIp: '10.0.0.4'",E),
 ('infra/modules/functionapp.bicep',"      minTlsVersion: '1.2'\n","      minTlsVersion: '1.2'\n      ftpsState: 'Disabled'\n",P),
 ('infra/main.bicep',"privateNetworking: privateNetworking && privateKeyVault","privateNetworking: privateNetworking",P),
]
bad=0
for f,old,new,test in M:
    s=open(f).read()
    if s.count(old)!=1:
        print("SKIP (not unique/absent):", f, repr(old[:60]), s.count(old)); bad+=1; continue
    open(f,'w').write(s.replace(old,new))
    try:
        r=subprocess.run([binary,test,'--exact','-q'],capture_output=True,text=True)
    finally:
        open(f,'w').write(s)
    status = 'FAILS (good)' if r.returncode!=0 else 'PASSES (BAD)'
    if r.returncode==0: bad+=1
    print(status, f, repr(new[:50]))
print(f"{len(M)} mutations, {bad} not caught")
sys.exit(1 if bad else 0)
