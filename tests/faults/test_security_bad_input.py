"""A catalogue of bad input and where each one is stopped.

- Hostile or malformed manifests: `kubectl create --dry-run=server` (strict field validation,
  the CRD's OpenAPI schema and CEL rules) refuses them with a message naming the field, or
  accepts them when the value is harmless data (then later tests show it is carried literally).
- Bad datasets: `finetune-trainer validate-data` exits 2 naming the line and the problem; one
  goes through a real FineTuneJob on the local node and ends Failed with a condition naming it.
- Missing Secrets, keys, claims and PriorityClasses: the job waits with a condition naming the
  missing object; concurrent writers get resourceVersion conflicts, not lost updates.
- Through all of it, the operator keeps its pid and does not hot-loop (its reconcile rate and
  log rate over a quiet window stay near the resync rate).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from finetune_trainer.data import validate_cli
from tests.fixtures.cluster import get_json, trainer_config_of, wait_for
from tests.fixtures.ml import learnable_instruction_records, write_jsonl
from tests.cluster.test_operator_lifecycle import NOWHERE, apply, ftj, status, trainer_jobs

pytestmark = [pytest.mark.reliability]

HOSTILE = "$(touch /tmp/pwned); rm -rf / `id`"
HUGE = "x" * 100_000


def base_ftj(name: str = "bad") -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
            "spec": {"model": {"source": "hf://org/tiny"}, "dataset": {"source": "pvc://data/train.jsonl"},
                     "resources": {"gpusPerNode": 1}}}


def base_isvc(name: str = "bad") -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
            "spec": {"model": {"source": "hf://org/tiny"}}}


def at(path: str, value, base=base_ftj):
    """A manifest with `value` set at a dotted path (created as needed); '-' deletes the key."""
    obj = base()
    keys = path.split(".")
    node = obj
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value == "-":
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return obj


REJECT, ACCEPT = "reject", "accept"
# (id, manifest, expected outcome, text the refusal must contain)
MANIFESTS = [
    ("unknown-spec-field", at("spec.colour", "blue"), REJECT, 'unknown field "spec.colour"'),
    ("unknown-nested-field", at("spec.training.lerningRate", 0.1), REJECT, 'unknown field "spec.training.lerningRate"'),
    ("unknown-status-like-field", at("spec.phase", "Succeeded"), REJECT, 'unknown field "spec.phase"'),
    ("name-uppercase", at("metadata.name", "BadName"), REJECT, "RFC 1123"),
    ("name-too-long", at("metadata.name", "a" * 254), REJECT, "metadata.name"),
    ("name-shell", at("metadata.name", "a;rm -rf /"), REJECT, "RFC 1123"),
    ("name-subshell", at("metadata.name", "$(touch-pwned)"), REJECT, "RFC 1123"),
    ("name-newline", at("metadata.name", "a\nb"), REJECT, "RFC 1123"),
    ("name-unicode", at("metadata.name", "jöb"), REJECT, "RFC 1123"),
    ("label-invalid", at("metadata.labels", {"x": "bad value!"}), REJECT, "metadata.labels"),
    ("spec-missing", at("spec", "-"), REJECT, "spec"),
    ("spec-null", at("spec", None), REJECT, "spec"),
    ("model-missing", at("spec.model", "-"), REJECT, "spec.model"),
    ("dataset-missing", at("spec.dataset", "-"), REJECT, "spec.dataset"),
    ("model-source-empty", at("spec.model.source", ""), REJECT, "spec.model.source"),
    ("model-source-subshell", at("spec.model.source", "$(touch /tmp/pwned)"), REJECT, "spec.model.source"),
    ("model-source-semicolon", at("spec.model.source", "hf://org/m; rm -rf /"), REJECT, "spec.model.source"),
    ("model-source-newline", at("spec.model.source", "hf://org/m\nrm -rf /"), REJECT, "spec.model.source"),
    ("model-source-backticks", at("spec.model.source", "hf://org/`id`"), REJECT, "spec.model.source"),
    ("model-source-huge", at("spec.model.source", "hf://org/" + HUGE), REJECT, "spec.model.source"),
    ("model-revision-shell", at("spec.model.revision", "main; rm -rf /"), REJECT, "spec.model.revision"),
    ("model-token-secret-path", at("spec.model.tokenSecretRef", {"name": "../etc/passwd"}), REJECT,
     "spec.model.tokenSecretRef.name"),
    # A path inside the claim: plain data in the trainer's ConfigMap, never part of a command.
    ("dataset-source-subshell", at("spec.dataset.source", "pvc://data/$(id).jsonl"), ACCEPT, None),
    ("dataset-split-backticks", at("spec.dataset.split", "train`id`"), REJECT, "spec.dataset.split"),
    ("dataset-format-unknown", at("spec.dataset.format", "yaml"), REJECT, "spec.dataset.format"),
    ("dataset-fieldmap-hostile", at("spec.dataset.fieldMap", {"instruction": HOSTILE, "output": "a\nb"}),
     ACCEPT, None),
    ("dataset-fieldmap-huge", at("spec.dataset.fieldMap", {"instruction": HUGE}), REJECT, "spec.dataset.fieldMap"),
    ("dataset-eval-negative", at("spec.dataset.evalFraction", -0.1), REJECT, "spec.dataset.evalFraction"),
    ("dataset-eval-above-max", at("spec.dataset.evalFraction", 0.9), REJECT, "spec.dataset.evalFraction"),
    ("training-epochs-negative", at("spec.training", {"epochs": -3}), REJECT, "spec.training.epochs"),
    ("training-steps-enormous", at("spec.training", {"maxSteps": 2 ** 70}), REJECT, "spec.training.maxSteps"),
    ("training-batch-zero", at("spec.training", {"perDeviceBatchSize": 0}), REJECT, "spec.training.perDeviceBatchSize"),
    ("training-lr-negative", at("spec.training", {"learningRate": -1}), REJECT, "spec.training.learningRate"),
    ("training-lr-string", at("spec.training", {"learningRate": "fast"}), REJECT, "spec.training.learningRate"),
    ("training-precision-unknown", at("spec.training", {"precision": "fp8"}), REJECT, "spec.training.precision"),
    ("method-unknown", at("spec.method", {"type": "dpo"}), REJECT, "spec.method.type"),
    ("lora-rank-zero", at("spec.method", {"type": "lora", "lora": {"r": 0}}), REJECT, "spec.method.lora.r"),
    ("gpus-negative", at("spec.resources.gpusPerNode", -1), REJECT, "spec.resources.gpusPerNode"),
    ("gpus-enormous", at("spec.resources.gpusPerNode", 10 ** 9), REJECT, "spec.resources.gpusPerNode"),
    ("nodes-zero", at("spec.resources.nodes", 0), REJECT, "spec.resources.nodes"),
    ("multinode-without-gpus", at("spec.resources", {"nodes": 2, "gpusPerNode": 0}), REJECT, "gpusPerNode"),
    ("cpu-not-a-quantity", at("spec.resources.cpu", "lots"), REJECT, "spec.resources.cpu"),
    ("memory-shell", at("spec.resources.memory", "4Gi; reboot"), REJECT, "spec.resources.memory"),
    ("image-with-space", at("spec.resources.image", "img; rm -rf /"), REJECT, "spec.resources.image"),
    ("storage-size-word", at("spec.storage", {"size": "huge"}), REJECT, "spec.storage.size"),
    ("ttl-negative", at("spec.ttlSecondsAfterFinished", -1), REJECT, "spec.ttlSecondsAfterFinished"),
    ("suspend-string", at("spec.suspend", "yes"), REJECT, "spec.suspend"),
    ("push-hub-without-token", at("spec.output", {"push": {"uri": "hf://org/out"}}), REJECT,
     "tokenSecretRef is required"),
    ("eval-prompt-unicode-and-shell", at("spec.evaluation", {"prompts": [
        {"prompt": "日本語 🙂 " + HOSTILE, "reference": "ok\n\u202e"}]}), ACCEPT, None),
    ("wrong-api-version", at("apiVersion", "finetune.dev/v9"), REJECT, "no matches for kind"),
    ("isvc-extra-args-hostile", at("spec.vllm", {"extraArgs": [HOSTILE, "--x\n--y"]}, base_isvc), ACCEPT, None),
    ("isvc-extra-arg-huge", at("spec.vllm", {"extraArgs": ["--" + "x" * 2000]}, base_isvc), REJECT,
     "spec.vllm.extraArgs[0]"),
    ("isvc-extra-args-too-many", at("spec.vllm", {"extraArgs": ["--a"] * 65}, base_isvc), REJECT,
     "spec.vllm.extraArgs"),
    ("isvc-adapter-name-shell", at("spec.adapters", [{"name": "$(id)", "path": "pvc://a/b"}], base_isvc),
     REJECT, "spec.adapters[0].name"),
    ("isvc-adapter-name-space", at("spec.adapters", [{"name": "a b", "path": "pvc://a/b"}], base_isvc),
     REJECT, "spec.adapters[0].name"),
    ("isvc-adapter-both-refs", at("spec.adapters", [{"name": "a", "path": "pvc://a/b",
                                                     "fineTuneJobRef": {"name": "x"}}], base_isvc),
     REJECT, "exactly one of fineTuneJobRef or path"),
]


@pytest.fixture(scope="module")
def catalogue_namespace(cluster, crds):
    name = f"bad-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.cluster
@pytest.mark.parametrize("case, manifest, expected, text", MANIFESTS, ids=[m[0] for m in MANIFESTS])
def test_hostile_manifest_is_refused_at_admission_or_accepted_as_plain_data(
        cluster, catalogue_namespace, case, manifest, expected, text):
    """Each manifest goes to the API server with strict field validation (dry run): the refusal
    names the offending field; the few accepted ones hold harmless data only."""
    out = cluster.kubectl("create", "--dry-run=server", "--validate=strict", "-n", catalogue_namespace,
                          "-o", "json", "-f", "-", input=json.dumps(manifest), check=False)
    if expected == REJECT:
        assert out.returncode != 0, f"{case} was accepted"
        assert text in out.stderr, out.stderr[:2000]
    else:
        assert out.returncode == 0, out.stderr[:2000]
        assert contains(json.loads(out.stdout)["spec"], manifest["spec"]), out.stdout[:2000]


def contains(stored, sent) -> bool:
    """Everything sent is stored unchanged (the server adds defaults around it)."""
    if isinstance(sent, dict):
        return isinstance(stored, dict) and all(contains(stored.get(k), v) for k, v in sent.items())
    return stored == sent


# --- datasets -----------------------------------------------------------------------------------

GOOD = [json.dumps(r).encode() for r in learnable_instruction_records(20)]


def lines(*extra: bytes, at_line: int = 4) -> bytes:
    body = list(GOOD)
    for i, line in enumerate(extra):
        body.insert(at_line - 1 + i, line)
    return b"".join(line + b"\n" for line in body)


DATASETS = [
    ("truncated-last-line", b"".join(l + b"\n" for l in GOOD) + b'{"instruction": "x", "outp', "line 21"),
    ("truncated-middle-line", lines(b'{"instruction": "x", "output"'), "line 4"),
    ("latin1-bytes", lines('{"instruction": "caf\u00e9", "output": "y"}'.encode("latin-1")), "line 4"),
    ("utf16-file", "\n".join(l.decode() for l in GOOD).encode("utf-16"), "line 1"),
    ("gigantic-record", lines(json.dumps({"instruction": "x" * 1_200_000, "output": "y"}).encode()), "line 4"),
    ("empty-file", b"", "file is empty"),
    ("only-blank-lines", b"\n\n   \n", "no records"),
    ("binary-gzip", b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "line 1"),
    ("nul-bytes", lines(b'{"instruction": "a\x00b", "output": "y"}'), "line 4"),
    ("chat-records-for-instruction", b"".join(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
                                               + b"\n" for _ in range(20)), 'field "instruction" is missing'),
    ("json-array-not-lines", json.dumps(learnable_instruction_records(20)).encode(), "line 1"),
    ("record-is-a-list", lines(b'["instruction", "output"]'), "line 4"),
    ("record-is-a-number", lines(b"42"), "line 4"),
    ("output-is-a-number", lines(b'{"instruction": "x", "output": 7}'), "line 4"),
    ("output-missing", lines(b'{"instruction": "x"}'), 'line 4: field "output" is missing'),
]


@pytest.mark.parametrize("case, content, text", DATASETS, ids=[d[0] for d in DATASETS])
def test_bad_dataset_is_refused_by_validate_data_naming_the_problem(tmp_path, capsys, case, content, text):
    """`finetune-trainer validate-data --max-invalid-fraction 0` exits 2 (unusable) and its report
    names the line and what is wrong; it never raises."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)

    code = validate_cli(["--format", "instruction", "--max-invalid-fraction", "0", "--min-examples", "4",
                         str(path)])

    out = capsys.readouterr()
    report = out.out + out.err
    assert code == 2, report[-2000:]
    assert text in report, report[-3000:]


# --- through the operator ----------------------------------------------------------------------


def reconciles(operator) -> float:
    for line in operator.metrics().splitlines():
        if line.startswith("finetune_operator_reconcile_duration_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def quiet_window_rates(operator, jobs: int, seconds: float = 10.0) -> dict:
    """Reconciles and log lines per second over a window in which nothing changes."""
    log = Path(operator.log)
    before_lines, before = len(log.read_bytes().splitlines()), reconciles(operator)
    time.sleep(seconds)
    after_lines, after = len(log.read_bytes().splitlines()), reconciles(operator)
    rates = {"reconcilesPerSecond": round((after - before) / seconds, 2),
             "logLinesPerSecond": round((after_lines - before_lines) / seconds, 2), "jobs": jobs}
    # The resync timer runs every 2 s per job; a hot loop would be orders of magnitude above.
    assert rates["reconcilesPerSecond"] <= jobs * 1.5 + 2, rates
    assert rates["logLinesPerSecond"] <= jobs * 3 + 5, rates
    return rates


@pytest.mark.cluster
def test_missing_references_and_concurrent_writers_end_in_named_conditions_without_hot_looping(
        cluster, namespace, operator):
    """Given jobs naming a missing Secret, a Secret without the key, a missing claim, a missing
    PriorityClass and a missing pvc:// dataset claim, plus hostile but valid strings, then each
    missing reference holds its job Pending with a condition naming the object, the hostile ones
    run to Succeeded; two writers editing one FineTuneJob with the same resourceVersion get one
    409 Conflict; the operator keeps its pid and its reconcile and log rates stay at resync level."""
    pid = operator.process.pid
    cluster.kubectl("create", "secret", "generic", "keyless", "--from-literal=other=x", "-n", namespace)
    cases = {
        "no-secret": (ftj("no-secret", model={"tokenSecretRef": {"name": "absent"}}), "SecretNotFound", "absent"),
        "no-key": (ftj("no-key", model={"tokenSecretRef": {"name": "keyless", "key": "token"}}),
                   "SecretKeyNotFound", "'token'"),
        "no-claim": (ftj("no-claim", storage={"existingClaim": "ghost-claim"}), "ClaimNotFound", "ghost-claim"),
        "no-priority": (ftj("no-priority", resources={"priorityClassName": "ghost-priority"}),
                        "PriorityClassNotFound", "ghost-priority"),
        "no-data-claim": (ftj("no-data-claim", dataset={"source": "pvc://ghost-data/train.jsonl"}),
                          "ClaimNotFound", "ghost-data"),
    }
    for body, _, _ in cases.values():
        apply(cluster, namespace, body)
    hostile = ftj("hostile", dataset={"fieldMap": {"instruction": HOSTILE}},
                  evaluation={"prompts": [{"prompt": "日本語 " + HOSTILE + "\n; reboot", "reference": "`id`"}]})
    apply(cluster, namespace, hostile)

    for name, (_, reason, named) in cases.items():
        s = wait_for(lambda: (s := status(cluster, namespace, name)).get("phase") == "Pending"
                     and any(c.get("reason") == reason for c in s.get("conditions", [])) and s,
                     timeout=60, what=f"{name} to wait with {reason}")
        admitted = next(c for c in s["conditions"] if c["type"] == "Admitted")
        assert admitted["status"] == "False" and named in admitted["message"], admitted
        assert trainer_jobs(cluster, namespace, name) == []
    wait_for(lambda: status(cluster, namespace, "hostile").get("phase") == "Succeeded", timeout=90,
             what="the job with hostile strings to succeed")
    (trainer,) = trainer_jobs(cluster, namespace, "hostile")
    config = trainer_config_of(trainer)
    assert config["dataset"]["fieldMap"] == {"instruction": HOSTILE}

    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(cluster.api_client())
    target = ftj("edited", resources={"nodeSelector": NOWHERE})
    apply(cluster, namespace, target)
    wait_for(lambda: len(trainer_jobs(cluster, namespace, "edited")) == 1, timeout=60, what="the edited job's Job")
    rounds: list[list] = []

    def writer(stale: dict, epochs: int, results: list) -> None:
        body = copy.deepcopy(stale)
        body["spec"]["ttlSecondsAfterFinished"] = epochs  # a field that stays mutable once started
        try:
            custom.replace_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs",
                                                    "edited", body)
            results.append(("ok", epochs))
        except ApiException as e:
            results.append((e.status, epochs))

    # Both writers hold the same resourceVersion; the operator may write in between (then both
    # lose), so rounds repeat until one wins. Never may both win.
    for epochs in range(1000, 1010, 2):
        stale = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs", "edited")
        results: list = []
        threads = [threading.Thread(target=writer, args=(stale, n, results)) for n in (epochs, epochs + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rounds.append(results)
        assert [r for r, _ in results].count("ok") <= 1 and all(r in ("ok", 409) for r, _ in results), results
        if any(r == "ok" for r, _ in results):
            break
    print(f"concurrent writer rounds: {rounds}")
    assert sorted(str(r) for r, _ in results) == ["409", "ok"], rounds
    winner = next(e for r, e in results if r == "ok")
    stored = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs", "edited")
    assert stored["spec"]["ttlSecondsAfterFinished"] == winner
    racing = []

    def patcher(key: str) -> None:
        for i in range(15):
            custom.patch_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs", "edited",
                                                  {"metadata": {"annotations": {key: str(i)}}})
        racing.append(key)

    threads = [threading.Thread(target=patcher, args=(k,)) for k in ("a.example/one", "b.example/two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    annotations = custom.get_namespaced_custom_object("finetune.dev", "v1alpha1", namespace, "finetunejobs",
                                                      "edited")["metadata"]["annotations"]
    assert annotations["a.example/one"] == annotations["b.example/two"] == "14"
    wait_for(lambda: len(trainer_jobs(cluster, namespace, "edited")) == 1, timeout=60, what="the edited job's Job")

    rates = quiet_window_rates(operator, jobs=len(cases) + 2)
    print(f"quiet window: {rates}")
    assert operator.process.poll() is None and operator.process.pid == pid
    assert len(trainer_jobs(cluster, namespace, "edited")) == 1


@pytest.mark.cluster
@pytest.mark.slow
def test_bad_dataset_in_a_real_job_fails_with_a_condition_naming_the_line(cluster, namespace, operator, tiny_model):
    """Given a FineTuneJob on the local node whose dataset has a truncated JSON line 5, when the
    trainer really runs, then the job ends Failed with the trainer's permanent exit code and a
    Failed condition whose message names line 5; nothing is retried."""
    from tests.e2e.test_operator_realrun import volume_path

    name = "baddata"
    apply(cluster, namespace, {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
        "spec": {"suspend": True, "model": {"source": str(tiny_model)},
                 "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
                 "dataset": {"source": f"pvc://{name}-workspace/data/train.jsonl", "format": "instruction",
                             "minExamples": 4, "maxInvalidFraction": 0.0},
                 "training": {"maxSteps": 4, "perDeviceBatchSize": 4, "maxSeqLength": 64, "precision": "fp32"},
                 "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "4Gi",
                               "nodeSelector": {"finetune.dev/local-node": "true"},
                               "tolerations": [{"key": "finetune.dev/local-node", "operator": "Exists",
                                                "effect": "NoSchedule"}]},
                 "storage": {"size": "1Gi"}}})
    wait_for(lambda: status(cluster, namespace, name).get("phase") == "Suspended", timeout=60, what="Suspended")
    root = volume_path(cluster, namespace, f"{name}-workspace")
    records = learnable_instruction_records(24)
    path = write_jsonl(root / "data" / "train.jsonl", records)
    text = path.read_text().splitlines()
    text[4] = text[4][: len(text[4]) // 2]
    path.write_text("\n".join(text) + "\n")

    cluster.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    s = wait_for(lambda: (s := status(cluster, namespace, name)).get("phase") in ("Failed", "Succeeded") and s,
                 timeout=300, what="the real run to end", interval=1)

    assert s["phase"] == "Failed", s
    failed = next(c for c in s["conditions"] if c["type"] == "Failed")
    print(f"Failed condition: {failed['reason']}: {failed['message'][:300]}")
    assert "line 5" in failed["message"], failed
    assert failed["reason"] == "DataValidationFailed", failed
    (job,) = trainer_jobs(cluster, namespace, name)
    assert (job["status"].get("failed") or 0) == 1
