"""Failover under load: the leading operator SIGKILLed while 200 FineTuneJobs are being created.

    PYTHONPATH=api:operator:trainer_image:hack:. .venv/bin/python bench/bench_operator_failover.py \
        [--jobs 200] [--kill-after 60] [--out bench/results/operator_failover.json]

The control plane and 200 kwok 8-GPU nodes of bench_operator_scale.py. Two operator replicas
run with --leader-elect and the default Lease timings (15 s lease, 10 s renew deadline, 2 s
retry). The FineTuneJobs are created from a thread pool; once `--kill-after` of them exist, the
replica holding the Lease is SIGKILLed (no release). Measured: from the kill to the standby
holding the Lease (the goal: within the lease duration + 5 s), trainer Jobs per FineTuneJob over
the whole run (the goal: exactly one each, no duplicate), and whether every job still reaches
Succeeded with a transition event into each phase it passed (no lost transition).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_operator_scale import (  # noqa: E402
    NODES, REPO, AuditedCluster, Operator, Watcher, create_all, finetunejob, make_namespace, prepare, wait_until,
)

LEASE_SECONDS = 15.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kill-after", type=int, default=60, help="SIGKILL the leader once this many exist")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--state-dir", help="control-plane state (default: a temporary directory)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "operator_failover.json"))
    args = parser.parse_args(argv)
    from kubernetes import client

    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    # No MLflow or MinIO: the operator under test uses neither, and they would share its CPUs.
    cluster = AuditedCluster(args.state_dir or tmp / "cluster", local_node=False, mlflow=False, s3=False)
    cluster.start()
    replicas: list[Operator] = []
    try:
        api, kubeconfig = prepare(cluster)
        ns = "failover"
        make_namespace(cluster, ns)

        jobs_seen: dict[str, set[str]] = {}
        succeeded: dict[str, float] = {}
        lock = threading.Lock()

        def on_job(kind, obj, t):
            labels = obj["metadata"].get("labels") or {}
            if labels.get("app.kubernetes.io/component") == "trainer":
                with lock:
                    jobs_seen.setdefault(labels.get("finetune.dev/finetunejob", "?"), set()).add(obj["metadata"]["uid"])

        def on_ftj(kind, obj, t):
            if (obj.get("status") or {}).get("phase") == "Succeeded":
                with lock:
                    succeeded.setdefault(obj["metadata"]["name"], t)

        watchers = [Watcher(api, f"/apis/batch/v1/namespaces/{ns}/jobs", on_job),
                    Watcher(api, f"/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs", on_ftj)]
        for w in watchers:
            w.start()
            w.ready.wait(10)

        election = ("--leader-elect", "--leader-election-namespace", ns)
        coordination = client.CoordinationV1Api(api)

        def holder() -> str:
            try:
                return coordination.read_namespaced_lease("finetune-operator", ns).spec.holder_identity or ""
            except client.ApiException:
                return ""

        replicas.append(Operator(cluster, kubeconfig, ns, cluster.logs / "operator-a.log", extra_args=election))
        wait_until(lambda: holder() != "", 60, "the first replica to take the Lease")
        first_holder = holder()
        replicas.append(Operator(cluster, kubeconfig, ns, cluster.logs / "operator-b.log", extra_args=election))
        time.sleep(2 * 2.0)  # two retry periods: the standby has seen the Lease

        custom = client.CustomObjectsApi(api)
        created: list[str] = []
        killed = {"at": None}

        def create(body):
            custom.create_namespaced_custom_object("finetune.dev", "v1alpha1", ns, "finetunejobs", body,
                                                   _preload_content=False)
            with lock:
                created.append(body["metadata"]["name"])
                if len(created) == args.kill_after and killed["at"] is None:
                    os.killpg(replicas[0].process.pid, signal.SIGKILL)
                    killed["at"] = time.monotonic()

        t0 = time.monotonic()
        create_all(create, [finetunejob(f"ft-{i:04d}") for i in range(args.jobs)])
        t_created = time.monotonic()
        took_over = wait_until(lambda: holder() not in ("", first_holder), LEASE_SECONDS * 3,
                               "the standby to take the Lease") - killed["at"]
        error = None
        try:
            wait_until(lambda: len(succeeded) >= args.jobs, args.timeout, f"{args.jobs} FineTuneJobs to succeed")
        except TimeoutError as e:
            error = str(e)
        t_done = time.monotonic()
        time.sleep(3)  # any late duplicate Job would show in the watch by now
        for w in watchers:
            w.stopped = True

        events = json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]
        into_succeeded = {e["involvedObject"]["name"] for e in events
                          if e.get("reason") == "Succeeded" and e["involvedObject"].get("kind") == "FineTuneJob"}
        duplicates = {k: len(v) for k, v in jobs_seen.items() if len(v) > 1}
        result = {
            "benchmark": "operator failover: the leader SIGKILLed while FineTuneJobs are created",
            "jobs": args.jobs, "nodes": NODES, "killed_after_created": args.kill_after,
            "lease_duration_s": LEASE_SECONDS,
            "takeover_after_kill_s": round(took_over, 2),
            "takeover_within_lease_plus_5s": took_over <= LEASE_SECONDS + 5,
            "create_seconds": round(t_created - t0, 2),
            "all_succeeded_after_s": round(t_done - t0, 2) if error is None else None,
            "succeeded": len(succeeded),
            "trainer_jobs_created": sum(len(v) for v in jobs_seen.values()),
            "finetunejobs_with_a_job": len(jobs_seen),
            "duplicate_jobs": duplicates,
            "succeeded_without_a_transition_event": sorted(set(succeeded) - into_succeeded),
            "error": error,
            "python": sys.version.split()[0], "cpus": os.cpu_count(), "loadAverage1m": round(os.getloadavg()[0], 2),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        ok = error is None and not duplicates and result["takeover_within_lease_plus_5s"] \
            and not result["succeeded_without_a_transition_event"]
        return 0 if ok else 1
    finally:
        for r in replicas:
            r.stop()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
