"""The local control plane behaves like a real cluster (issue: foundation)."""

from __future__ import annotations

import json

import pytest

from finetune_devcluster.cluster import GPU_NODES
from tests.fixtures.cluster import get_json, wait_for

pytestmark = pytest.mark.cluster


def _apply(cluster, namespace, obj):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def _claim(cluster, namespace, name):
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                                "spec": {"accessModes": ["ReadWriteOnce"],
                                         "resources": {"requests": {"storage": "1Gi"}}}})


def _local_pod(name: str, container: dict, volumes: list[dict], **spec) -> dict:
    """A pod for the local node (its selector and toleration), never restarted."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
        "restartPolicy": "Never", **spec,
        "nodeSelector": {"finetune.dev/local-node": "true"},
        "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists"}],
        "containers": [{"name": "main", "image": "local", **container}], "volumes": volumes}}


def _gpu_job(name: str, gpus: int) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": "main", "image": "busybox", "command": ["true"],
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}}}}


def test_gpu_job_is_bound_to_a_gpu_node_and_succeeds(cluster, namespace):
    _apply(cluster, namespace, _gpu_job("one-gpu", 1))
    wait_for(lambda: get_json(cluster, "job", "one-gpu", "-n", namespace).get("status", {}).get("succeeded") == 1,
             timeout=60, what="the Job to succeed")
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "job-name=one-gpu")["items"]
    assert pods[0]["spec"]["nodeName"] in GPU_NODES
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_pod_asking_for_100_gpus_stays_pending_unschedulable(cluster, namespace):
    pod = _gpu_job("too-big", 100)["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-big"}, "spec": pod["spec"]}
    _apply(cluster, namespace, pod)

    def unschedulable():
        p = get_json(cluster, "pod", "too-big", "-n", namespace)
        cond = [c for c in p["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return cond and cond[0]["status"] == "False" and cond[0]["reason"] == "Unschedulable" and cond[0]
    cond = wait_for(unschedulable, timeout=60, what="the scheduler to mark the pod Unschedulable")
    assert "nvidia.com/gpu" in cond["message"]
    assert get_json(cluster, "pod", "too-big", "-n", namespace)["status"]["phase"] == "Pending"


def test_serviceaccount_is_denied_until_granted_a_role(cluster, namespace):
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    denied = cluster.kubectl("get", "pods", "-n", namespace, token=token, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    cluster.kubectl("create", "role", "pod-reader", "--verb=list,get", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "reader", "--role=pod-reader",
                    f"--serviceaccount={namespace}:reader", "-n", namespace)
    wait_for(lambda: cluster.kubectl("get", "pods", "-n", namespace, token=token, check=False).returncode == 0,
             timeout=30, what="the RoleBinding to take effect")
    # Still denied outside what the Role grants.
    assert cluster.kubectl("get", "secrets", "-n", namespace, token=token, check=False).returncode != 0


def test_deleting_an_owner_garbage_collects_its_children(cluster, namespace):
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = get_json(cluster, "configmap", "owner", "-n", namespace)
    child = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "child", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                                              "uid": owner["metadata"]["uid"]}]}}
    _apply(cluster, namespace, child)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(lambda: cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0,
             timeout=60, what="the garbage collector to delete the child")


def test_pvc_binds_and_a_pod_using_it_is_scheduled(cluster, namespace):
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
                                "spec": {"accessModes": ["ReadWriteOnce"],
                                         "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for(lambda: get_json(cluster, "pvc", "data", "-n", namespace)["status"].get("phase") == "Bound",
             timeout=60, what="the claim to bind")
    _apply(cluster, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "user"}, "spec": {
        "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "infinity"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}})
    wait_for(lambda: get_json(cluster, "pod", "user", "-n", namespace)["status"].get("phase") == "Running",
             timeout=60, what="the pod using the claim to run")


def test_local_node_really_runs_a_pod_with_its_volumes_and_reports_exit(cluster, namespace, tmp_path):
    """A pod on the local node executes its command here, sees its ConfigMap, Secret and claim."""
    cluster.kubectl("create", "configmap", "cfg", "--from-literal=greeting=hello", "-n", namespace)
    cluster.kubectl("create", "secret", "generic", "tok", "--from-literal=token=s3cret", "-n", namespace)
    _claim(cluster, namespace, "vol")
    script = ("import os,pathlib,sys;"
              "g=pathlib.Path('/etc/cfg/greeting').read_text();"
              "t=os.environ['TOKEN'];"
              "pathlib.Path('/data/out.txt').write_text(g+':'+t+':'+os.environ['POD_NS']);"
              "pathlib.Path('/dev/termination-log').write_text('done');"
              "sys.exit(int(sys.argv[1]))")
    _apply(cluster, namespace, _local_pod(
        "runs-here", {"command": ["python", "-c", script, "3"],
                      "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                              {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                      "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
                                       {"name": "vol", "mountPath": "/data"}]},
        [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "vol", "persistentVolumeClaim": {"claimName": "vol"}}]))
    pod = wait_for(lambda: (p := get_json(cluster, "pod", "runs-here", "-n", namespace))["status"].get("phase")
                   == "Failed" and p, timeout=90, what="the local pod to finish")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["message"] == "done"
    pvc = get_json(cluster, "pvc", "vol", "-n", namespace)
    pv = get_json(cluster, "pv", pvc["spec"]["volumeName"])
    from pathlib import Path
    assert Path(pv["spec"]["hostPath"]["path"], "out.txt").read_text() == f"hello:s3cret:{namespace}"


def test_a_mount_over_the_python_environment_does_not_hide_it(cluster, namespace):
    """A pod's emptyDir at /tmp (the trainer has one) must not hide the environment the local
    node runs commands with, wherever the checkout lives (CI clones may sit under /tmp)."""
    import sys
    from pathlib import Path

    top = "/" + Path(sys.prefix).parts[1]
    _apply(cluster, namespace, _local_pod(
        "covered", {"command": ["python", "-c", "import finetune_trainer.config, pathlib, sys;"
                                f"pathlib.Path('{top}/scratch').write_text('ok')"],
                    "volumeMounts": [{"name": "scratch", "mountPath": top}]},
        [{"name": "scratch", "emptyDir": {}}]))
    pod = wait_for(lambda: (p := get_json(cluster, "pod", "covered", "-n", namespace))["status"].get("phase")
                   in ("Succeeded", "Failed") and p, timeout=90, what="the pod to finish")
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0, term


def test_a_deleted_local_pod_gets_sigterm_with_no_signal_blocked(cluster, namespace):
    """As from a container runtime: the process starts with no signal blocked, and deleting the
    pod delivers SIGTERM (its handler runs long before the grace period's SIGKILL)."""
    from pathlib import Path

    _claim(cluster, namespace, "vol")
    script = ("import pathlib,signal,sys,time\n"
              "out=pathlib.Path('/data')\n"
              "blocked=[l.split()[1] for l in open('/proc/self/status') if l.startswith('SigBlk:')][0]\n"
              "def stop(*_):\n"
              "    (out/'signal.txt').write_text('SIGTERM'); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "(out/'blocked.txt').write_text(blocked)\n"
              "while True: time.sleep(0.1)\n")
    _apply(cluster, namespace, _local_pod(
        "stops", {"command": ["python", "-c", script], "volumeMounts": [{"name": "vol", "mountPath": "/data"}]},
        [{"name": "vol", "persistentVolumeClaim": {"claimName": "vol"}}], terminationGracePeriodSeconds=600))
    pv = get_json(cluster, "pv", wait_for(lambda: get_json(cluster, "pvc", "vol", "-n", namespace)["spec"].get(
        "volumeName"), timeout=60, what="the claim to bind"))
    folder = Path(pv["spec"]["hostPath"]["path"])
    wait_for(lambda: (folder / "blocked.txt").exists(), timeout=120, what="the pod to start")
    assert int((folder / "blocked.txt").read_text(), 16) == 0, "no signal is blocked in a container"

    cluster.kubectl("delete", "pod", "stops", "-n", namespace, "--wait=false")

    # Far below the 600 s grace period: only SIGTERM can have stopped it.
    wait_for(lambda: (folder / "signal.txt").exists(), timeout=120, what="the pod's SIGTERM handler to run")
    assert (folder / "signal.txt").read_text() == "SIGTERM"


def test_every_node_heartbeats_through_a_lease_renewed_well_within_the_grace_period(cluster):
    """Issue 13's kwok readiness flaps: kwok nodes had no Lease, and their status heartbeat
    (about every 55 s) outlasted the node-monitor-grace-period (50 s), so each minute every
    kwok node went NotReady for a moment and the node lifecycle controller marked its pods
    NotReady. Each node now renews a Lease, as a kubelet does."""
    import datetime as dt

    nodes = [n["metadata"]["name"] for n in get_json(cluster, "nodes")["items"]]
    assert set(GPU_NODES) <= set(nodes)

    def renew_times() -> dict[str, dt.datetime]:
        leases = get_json(cluster, "leases", "-n", "kube-node-lease")["items"]
        return {lease["metadata"]["name"]: dt.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
                for lease in leases if lease["spec"].get("renewTime")}

    first = wait_for(lambda: set(nodes) <= set(times := renew_times()) and times, timeout=60,
                     what="a Lease for every node")
    for lease in get_json(cluster, "leases", "-n", "kube-node-lease")["items"]:
        assert lease["spec"]["leaseDurationSeconds"] <= 40, lease["metadata"]["name"]
    # Renewed (each at least once more) within 20 s, far inside the 50 s grace period.
    wait_for(lambda: all(renew_times()[n] > first[n] for n in nodes), timeout=20, interval=1,
             what="every node to renew its Lease")
