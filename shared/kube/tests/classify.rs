//! `classify` on Deployment and Pod objects as the API server returns them
//! (JSON deserialized into `k8s-openapi` types), without a client.

// Helpers outside `#[test]` functions unwrap too: a panic is a test failure.
#![allow(clippy::unwrap_used)]

use gantry_kube::{Rollout, classify};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

const NEW_IMAGE: &str = "contoso.azurecr.io/web@sha256:abababababababababababababababababababababababababababababababab";
const OLD_IMAGE: &str = "contoso.azurecr.io/web@sha256:cdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcdcd";

/// The rendered Deployment (3 replicas, `NEW_IMAGE`) at `generation` with
/// `status` as the deployment controller writes it.
fn deployment(generation: i64, status: Value) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "web",
            "namespace": "web",
            "uid": "0b6a3c9e-8f6d-4f3e-9d1e-5a7c2b4e6f80",
            "resourceVersion": "48213",
            "generation": generation,
            "creationTimestamp": "2026-11-20T09:12:44Z",
            "labels": {
                "app.kubernetes.io/name": "web",
                "app.kubernetes.io/instance": "web",
                "app.kubernetes.io/managed-by": "gantry"
            },
            "annotations": { "deployment.kubernetes.io/revision": "4" }
        },
        "spec": {
            "replicas": 3,
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": 300,
            "selector": { "matchLabels": { "app.kubernetes.io/name": "web", "app.kubernetes.io/instance": "web" } },
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 } },
            "template": {
                "metadata": { "labels": {
                    "app.kubernetes.io/name": "web",
                    "app.kubernetes.io/instance": "web",
                    "app.kubernetes.io/managed-by": "gantry"
                } },
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [{
                        "name": "web",
                        "image": NEW_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }]
                    }]
                }
            }
        },
        "status": status
    }))
    .unwrap()
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": type_,
        "status": status,
        "lastUpdateTime": "2026-11-20T09:14:02Z",
        "lastTransitionTime": "2026-11-20T09:14:02Z",
        "reason": reason,
        "message": message
    })
}

fn status(observed: i64, replicas: i64, updated: i64, available: i64, conditions: Value) -> Value {
    let mut status = json!({
        "observedGeneration": observed,
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": available,
        "availableReplicas": available,
        "conditions": conditions
    });
    if replicas > available {
        status["unavailableReplicas"] = json!(replicas - available);
    }
    status
}

fn healthy_conditions() -> Value {
    json!([
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability."
        ),
        condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            "ReplicaSet \"web-5d9c7b8f4\" has successfully progressed."
        )
    ])
}

fn progressing_conditions() -> Value {
    json!([
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability."
        ),
        condition(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            "ReplicaSet \"web-5d9c7b8f4\" is progressing."
        )
    ])
}

/// A pod of the ReplicaSet `hash` running `image`; its container is
/// running, or waiting with `waiting = (reason, message)`.
fn pod(name: &str, hash: &str, image: &str, waiting: Option<(&str, &str)>) -> Pod {
    let state = match waiting {
        Some((reason, message)) => json!({ "waiting": { "reason": reason, "message": message } }),
        None => json!({ "running": { "startedAt": "2026-11-20T09:13:10Z" } }),
    };
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "web",
            "uid": format!("1c2d3e4f-0000-4000-8000-{:0>12}", name.len()),
            "labels": {
                "app.kubernetes.io/name": "web",
                "app.kubernetes.io/instance": "web",
                "app.kubernetes.io/managed-by": "gantry",
                "pod-template-hash": hash
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": format!("web-{hash}"),
                "uid": "7a8b9c0d-0000-4000-8000-000000000002",
                "controller": true,
                "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{ "name": "web", "image": image, "imagePullPolicy": "IfNotPresent" }]
        },
        "status": {
            "phase": if waiting.is_some() { "Pending" } else { "Running" },
            "containerStatuses": [{
                "name": "web",
                "image": image,
                "imageID": "",
                "ready": waiting.is_none(),
                "started": waiting.is_none(),
                "restartCount": if waiting.is_some() { 5 } else { 0 },
                "state": state
            }]
        }
    }))
    .unwrap()
}

fn running_new_pods() -> Vec<Pod> {
    ["x2k9p", "q7w4z", "m3n8v"]
        .iter()
        .map(|s| pod(&format!("web-5d9c7b8f4-{s}"), "5d9c7b8f4", NEW_IMAGE, None))
        .collect()
}

fn reason(rollout: &Rollout) -> &str {
    match rollout {
        Rollout::Progressing { reason } | Rollout::Failed { reason } => reason,
        Rollout::Complete => "",
    }
}

#[test]
fn complete() {
    let d = deployment(4, status(4, 3, 3, 3, healthy_conditions()));
    assert_eq!(
        classify(&d, &running_new_pods(), Some(4)),
        Rollout::Complete
    );
    // Without an expected generation the Deployment's own is the target.
    assert_eq!(classify(&d, &running_new_pods(), None), Rollout::Complete);
}

#[test]
fn progressing_until_the_controller_observes_the_new_generation() {
    // The status still describes generation 3, complete; the apply made it 4.
    let d = deployment(4, status(3, 3, 3, 3, healthy_conditions()));
    let r = classify(&d, &running_new_pods(), Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
    assert!(reason(&r).contains("generation 4"), "{r:?}");
}

#[test]
fn expected_generation_ahead_of_what_was_read_is_still_progressing() {
    let d = deployment(3, status(3, 3, 3, 3, healthy_conditions()));
    let r = classify(&d, &running_new_pods(), Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
}

#[test]
fn progressing_while_updated_replicas_are_fewer_than_desired() {
    let d = deployment(4, status(4, 4, 1, 3, progressing_conditions()));
    let r = classify(&d, &running_new_pods()[..1], Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
    assert!(reason(&r).contains("1 of 3"), "{r:?}");
}

#[test]
fn progressing_while_old_replicas_terminate() {
    let d = deployment(4, status(4, 4, 3, 3, progressing_conditions()));
    let r = classify(&d, &running_new_pods(), Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
    assert!(reason(&r).contains("pending termination"), "{r:?}");
}

#[test]
fn progressing_while_updated_replicas_are_unavailable() {
    let d = deployment(4, status(4, 3, 3, 2, progressing_conditions()));
    let r = classify(&d, &running_new_pods(), Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
    assert!(reason(&r).contains("2 of 3"), "{r:?}");
}

#[test]
fn replica_failure_is_reported_but_not_fatal() {
    let conditions = json!([
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability."
        ),
        condition(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            "ReplicaSet \"web-5d9c7b8f4\" is progressing."
        ),
        condition(
            "ReplicaFailure",
            "True",
            "FailedCreate",
            "pods \"web-5d9c7b8f4-abcde\" is forbidden: exceeded quota: web"
        )
    ]);
    let d = deployment(4, status(4, 3, 0, 3, conditions));
    let r = classify(&d, &[], Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
    assert!(reason(&r).contains("exceeded quota"), "{r:?}");
}

#[test]
fn progress_deadline_exceeded_fails() {
    let conditions = json!([
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability."
        ),
        condition(
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            "ReplicaSet \"web-5d9c7b8f4\" has timed out progressing."
        )
    ]);
    let d = deployment(4, status(4, 4, 1, 3, conditions));
    let r = classify(&d, &[], Some(4));
    assert_eq!(
        r,
        Rollout::Failed {
            reason:
                "ProgressDeadlineExceeded: ReplicaSet \"web-5d9c7b8f4\" has timed out progressing."
                    .into()
        }
    );
}

#[test]
fn a_stale_deadline_from_the_previous_generation_does_not_fail_the_new_one() {
    let conditions = json!([condition(
        "Progressing",
        "False",
        "ProgressDeadlineExceeded",
        "ReplicaSet \"web-7f6e5d4c3\" has timed out progressing."
    )]);
    let d = deployment(5, status(4, 4, 1, 3, conditions));
    let r = classify(&d, &[], Some(5));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
}

#[test]
fn crash_loop_fails_naming_pod_and_container() {
    let d = deployment(4, status(4, 4, 1, 3, progressing_conditions()));
    let mut pods = running_new_pods()[..0].to_vec();
    pods.push(pod("web-7f6e5d4c3-aaaaa", "7f6e5d4c3", OLD_IMAGE, None));
    pods.push(pod(
        "web-5d9c7b8f4-x2k9p",
        "5d9c7b8f4",
        NEW_IMAGE,
        Some((
            "CrashLoopBackOff",
            "back-off 2m40s restarting failed container=web pod=web-5d9c7b8f4-x2k9p_web(1c2d3e4f)",
        )),
    ));
    let r = classify(&d, &pods, Some(4));
    assert!(matches!(r, Rollout::Failed { .. }), "{r:?}");
    let reason = reason(&r);
    assert!(
        reason.starts_with("pod web-5d9c7b8f4-x2k9p: container web: CrashLoopBackOff"),
        "{reason}"
    );
    assert!(reason.contains("back-off 2m40s"), "{reason}");
}

#[test]
fn image_pull_failures_fail() {
    let d = deployment(4, status(4, 4, 1, 3, progressing_conditions()));
    for (waiting, message) in [
        (
            "ImagePullBackOff",
            "Back-off pulling image \"contoso.azurecr.io/web@sha256:abab\"",
        ),
        (
            "ErrImagePull",
            "failed to pull and unpack image: 401 Unauthorized",
        ),
        ("CreateContainerConfigError", "secret \"web-env\" not found"),
        ("InvalidImageName", "Failed to apply default image tag"),
    ] {
        let pods = [pod(
            "web-5d9c7b8f4-q7w4z",
            "5d9c7b8f4",
            NEW_IMAGE,
            Some((waiting, message)),
        )];
        let r = classify(&d, &pods, Some(4));
        assert_eq!(
            r,
            Rollout::Failed {
                reason: format!("pod web-5d9c7b8f4-q7w4z: container web: {waiting}: {message}")
            }
        );
    }
}

#[test]
fn ordinary_waiting_is_not_a_failure() {
    let d = deployment(4, status(4, 4, 1, 3, progressing_conditions()));
    let pods = [pod(
        "web-5d9c7b8f4-q7w4z",
        "5d9c7b8f4",
        NEW_IMAGE,
        Some(("ContainerCreating", "")),
    )];
    let r = classify(&d, &pods, Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
}

#[test]
fn old_replica_set_crash_loop_does_not_fail_the_new_rollout() {
    // The previous version is crash-looping (why the fix is being deployed);
    // its pods run OLD_IMAGE, the Deployment's template NEW_IMAGE.
    let d = deployment(4, status(4, 5, 1, 3, progressing_conditions()));
    let mut pods = vec![pod("web-5d9c7b8f4-x2k9p", "5d9c7b8f4", NEW_IMAGE, None)];
    for name in ["web-7f6e5d4c3-aaaaa", "web-7f6e5d4c3-bbbbb"] {
        pods.push(pod(
            name,
            "7f6e5d4c3",
            OLD_IMAGE,
            Some((
                "CrashLoopBackOff",
                "back-off 5m0s restarting failed container",
            )),
        ));
    }
    let r = classify(&d, &pods, Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");

    // Once the old pods are gone and the new ones available: complete.
    let d = deployment(4, status(4, 3, 3, 3, healthy_conditions()));
    assert_eq!(
        classify(&d, &running_new_pods(), Some(4)),
        Rollout::Complete
    );
}

#[test]
fn terminating_pods_are_ignored() {
    let d = deployment(4, status(4, 4, 3, 3, progressing_conditions()));
    let mut p = pod(
        "web-5d9c7b8f4-zzzzz",
        "5d9c7b8f4",
        NEW_IMAGE,
        Some(("CrashLoopBackOff", "back-off")),
    );
    p.metadata.deletion_timestamp =
        Some(serde_json::from_value(json!("2026-11-20T09:15:00Z")).unwrap());
    let r = classify(&d, &[p], Some(4));
    assert!(matches!(r, Rollout::Progressing { .. }), "{r:?}");
}

#[test]
fn scaled_to_zero_is_complete_when_nothing_runs() {
    let mut d = deployment(4, json!({ "observedGeneration": 4 }));
    d.spec.as_mut().unwrap().replicas = Some(0);
    assert_eq!(classify(&d, &[], Some(4)), Rollout::Complete);
}
