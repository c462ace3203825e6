"""`python -m finetune_devcluster up|down|status`: the local cluster for people (make cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cluster import REPO_ROOT, Cluster, stop_from_pid_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune_devcluster")
    p.add_argument("command", choices=["up", "down"])
    p.add_argument("--state-dir", type=Path, default=REPO_ROOT / ".cluster")
    args = p.parse_args(argv)
    if args.command == "down":
        stopped = stop_from_pid_file(args.state_dir)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    c = Cluster(args.state_dir).start()
    print(f"cluster is up: export KUBECONFIG={c.kubeconfig}")
    if c.mlflow:
        c.wait_mlflow()
        print(f"MLflow tracking server: {c.mlflow_url} (set -a; . {c.mlflow_env_file}; set +a)")
    if c.s3:
        print(f"S3-compatible store (MinIO): {c.s3_url} (set -a; . {c.s3_env_file}; set +a)")
    print(f"logs: {c.logs}/   stop: make cluster-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
