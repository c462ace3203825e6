"""OpenAI fine-tuning requests -> FineTuneJobs, and FineTuneJobs -> OpenAI's job, event and
checkpoint objects (pure functions of finetune_openai.mapping)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune_openai import mapping
from finetune_openai.errors import ApiError
from finetune_openai.mapping import DataFile, build_finetunejob, parse_create, to_checkpoints, to_events, to_job

REPO = Path(__file__).resolve().parents[3]
TRAIN = DataFile("file-" + "a" * 24, "pvc://openai-files/files/file-" + "a" * 24 + ".jsonl", "chat")
VALID = DataFile("file-" + "b" * 24, "pvc://openai-files/files/file-" + "b" * 24 + ".jsonl", "chat")
JOB_ID = "ftjob-" + "c" * 24


def refused(body) -> ApiError:
    with pytest.raises(ApiError) as exc:
        parse_create(body)
    assert exc.value.status == 400
    return exc.value


def body(**extra):
    return {"model": "tiny-llama", "training_file": TRAIN.id, **extra}


def finetunejob(req_body=None, template=None, **kw):
    return build_finetunejob(parse_create(req_body or body()), job_id=JOB_ID, namespace="team-a",
                             model_source="pvc://openai-files/models/tiny-llama", template=template or {},
                             training=TRAIN, validation=kw.get("validation"))


def with_status(obj, status, **annotations):
    obj = json.loads(json.dumps(obj))
    obj["metadata"]["creationTimestamp"] = "2026-11-30T10:00:00Z"
    obj["metadata"]["annotations"].update(annotations)
    obj["status"] = status
    return obj


# --- requests ------------------------------------------------------------------------------------


def test_a_minimal_request_asks_for_auto_hyperparameters():
    req = parse_create(body())
    assert req.hyperparameters.asked("supervised") == {"n_epochs": "auto", "batch_size": "auto",
                                                       "learning_rate_multiplier": "auto"}
    assert req.method == "supervised" and req.metadata == {} and req.suffix is None


@pytest.mark.parametrize("extra, param", [
    ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"warmup": 3}}, "hyperparameters.warmup"),
    ({"suffix": "has space"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"training_file": "not-a-file"}, "training_file"),
    ({"validation_file": 3}, "validation_file"),
    ({"frobnicate": True}, "frobnicate"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 3}}}}, "method.dpo.hyperparameters.beta"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),
    ({"hyperparameters": {"n_epochs": 2}, "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}},
     "hyperparameters"),
])
def test_bad_requests_are_refused_naming_the_parameter(extra, param):
    err = refused(body(**extra))
    assert err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_a_missing_model_is_a_missing_required_parameter():
    err = refused({"training_file": TRAIN.id})
    assert (err.param, err.code) == ("model", "missing_required_parameter")


# --- the FineTuneJob ---------------------------------------------------------------------------


def test_hyperparameters_map_onto_spec_training_under_the_template():
    template = {"method": {"type": "lora"}, "training": {"learningRate": 1e-3, "maxSteps": 10, "precision": "fp32"},
                "resources": {"gpusPerNode": 0}, "deploy": {"gpus": 0}}
    obj = finetunejob(body(seed=7, suffix="pirate", metadata={"team": "a"},
                           method={"type": "supervised", "supervised": {"hyperparameters": {
                               "n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 0.5}}}), template)
    spec = obj["spec"]
    assert spec["training"] == {"epochs": 3, "perDeviceBatchSize": 2, "gradientAccumulationSteps": 1,
                                "learningRate": 5e-4, "seed": 7, "precision": "fp32"}  # maxSteps yields to n_epochs
    assert spec["model"] == {"source": "pvc://openai-files/models/tiny-llama"}
    assert spec["dataset"] == {"source": TRAIN.source, "format": "chat"}
    assert spec["deploy"] == {"gpus": 0, "inferenceService": "ft-tiny-llama"}
    assert spec["method"] == {"type": "lora"} and spec["resources"] == {"gpusPerNode": 0}
    meta = obj["metadata"]
    assert meta["name"] == JOB_ID and meta["namespace"] == "team-a"
    assert meta["labels"] == {mapping.API_LABEL: "true"}
    assert meta["annotations"][mapping.A_SUFFIX] == "pirate"
    assert json.loads(meta["annotations"][mapping.A_METADATA]) == {"team": "a"}
    assert template["training"]["maxSteps"] == 10  # the server's template is not changed


def test_dpo_maps_onto_the_dpo_objective_with_its_beta():
    pairs = DataFile("file-" + "d" * 24, "pvc://openai-files/files/file-" + "d" * 24 + ".jsonl", "preference")
    req = parse_create(body(training_file=pairs.id,
                            method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}))
    obj = build_finetunejob(req, job_id=JOB_ID, namespace="team-a", model_source="pvc://m",
                            template={"method": {"type": "lora"}, "training": {"packing": "on"}},
                            training=pairs, validation=None)
    spec = obj["spec"]
    assert spec["method"] == {"type": "lora", "objective": "dpo", "dpo": {"beta": 0.2}}
    assert spec["dataset"]["format"] == "preference"
    assert spec["training"]["packing"] == "auto" and spec["training"]["epochs"] == 2
    job = to_job(with_status(obj, {"phase": "Training"}))
    assert job["method"]["type"] == "dpo" and job["hyperparameters"]["beta"] == 0.2


def test_dpo_with_auto_beta_keeps_the_schema_default():
    pairs = DataFile("file-" + "d" * 24, "pvc://f/p.jsonl", "preference")
    obj = build_finetunejob(parse_create(body(training_file=pairs.id, method={"type": "dpo"})),
                            job_id=JOB_ID, namespace="team-a", model_source="pvc://m", template={},
                            training=pairs, validation=None)
    assert obj["spec"]["method"] == {"objective": "dpo"}


def test_auto_hyperparameters_leave_the_template_alone():
    template = {"training": {"maxSteps": 10, "learningRate": 1e-3}}
    assert finetunejob(template=template)["spec"]["training"] == {"maxSteps": 10, "learningRate": 1e-3}


def test_the_learning_rate_multiplier_multiplies_the_schema_default_without_a_template_rate():
    crd = yaml.safe_load((REPO / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert training["properties"]["learningRate"]["default"] == mapping.DEFAULT_LEARNING_RATE
    obj = finetunejob(body(hyperparameters={"learning_rate_multiplier": 2}))
    assert obj["spec"]["training"]["learningRate"] == pytest.approx(2 * mapping.DEFAULT_LEARNING_RATE)


def test_a_validation_file_is_the_eval_source():
    obj = finetunejob(body(validation_file=VALID.id), validation=VALID)
    assert obj["spec"]["dataset"] == {"source": TRAIN.source, "format": "chat", "evalSource": VALID.source,
                                      "evalFraction": 0.0}
    assert obj["metadata"]["annotations"][mapping.A_VALIDATION_FILE] == VALID.id


def test_a_template_can_name_the_inference_service():
    obj = finetunejob(template={"deploy": {"inferenceService": "shared"}})
    assert obj["spec"]["deploy"]["inferenceService"] == "shared"


def test_an_idempotency_key_gives_one_job_id_per_namespace():
    a = mapping.job_id_for_key("team-a", "retry-me")
    assert mapping.JOB_ID.match(a) and a == mapping.job_id_for_key("team-a", "retry-me")
    assert a != mapping.job_id_for_key("team-b", "retry-me") != mapping.job_id_for_key("team-a", "other")


def test_names_fit_kubernetes():
    assert len(mapping.new_job_id()) <= 63 - len("-workspace")
    assert mapping.JOB_ID.match(mapping.new_job_id()) and mapping.FILE_ID.match(mapping.new_file_id())
    assert mapping.server_name("Meta-Llama/Llama-3.1-8B" + "x" * 80).startswith("ft-meta-llama-llama-3-1-8b")
    assert len(mapping.server_name("m" * 200)) <= 63


# --- OpenAI objects ----------------------------------------------------------------------------


@pytest.mark.parametrize("phase, suspend, cancelled, state", [
    (None, False, False, "queued"),
    ("Pending", False, False, "queued"),
    ("Validating", False, False, "validating_files"),
    ("Training", False, False, "running"),
    ("Evaluating", False, False, "running"),
    ("Deploying", False, False, "running"),
    ("Comparing", False, False, "running"),
    ("AwaitingApproval", False, False, "running"),
    ("Succeeded", False, False, "succeeded"),
    ("Failed", False, False, "failed"),
    ("Suspended", True, False, "paused"),
    ("Training", True, False, "paused"),
    ("Suspended", False, False, "queued"),
    ("Suspended", True, True, "cancelled"),
    ("Training", True, True, "cancelled"),
])
def test_phases_map_to_openai_statuses(phase, suspend, cancelled, state):
    obj = finetunejob()
    obj["spec"]["suspend"] = suspend
    ann = {mapping.A_CANCELLED: "2026-11-30T10:05:00Z"} if cancelled else {}
    assert to_job(with_status(obj, {"phase": phase} if phase else {}, **ann))["status"] == state


def test_a_succeeded_job_names_its_fine_tuned_model_and_what_it_trained_with():
    obj = finetunejob(body(suffix="pirate", seed=3, hyperparameters={"n_epochs": 2}))
    obj["spec"]["training"].update(perDeviceBatchSize=4, gradientAccumulationSteps=2, learningRate=4e-4)
    job = to_job(with_status(obj, {"phase": "Succeeded", "completionTime": "2026-11-30T10:10:00Z"}))
    assert job["fine_tuned_model"] == f"ft:tiny-llama:pirate:{JOB_ID}"
    assert mapping.job_id_of_model(job["fine_tuned_model"]) == JOB_ID
    assert job["finished_at"] - job["created_at"] == 600
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2.0}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert (job["object"], job["id"], job["model"], job["training_file"], job["seed"], job["organization_id"]) == \
        ("fine_tuning.job", JOB_ID, "tiny-llama", TRAIN.id, 3, "team-a")
    assert job["error"] is None and job["estimated_finish"] is None


def test_a_running_job_has_no_model_yet_and_an_estimated_finish():
    job = to_job(with_status(finetunejob(), {"phase": "Training", "progress": {"step": 3, "etaSeconds": 120}}),
                 now=1_000_000)
    assert job["fine_tuned_model"] is None and job["finished_at"] is None
    assert job["estimated_finish"] == 1_000_120


def test_a_failed_job_reports_the_condition_as_its_error():
    status = {"phase": "Failed", "completionTime": "2026-11-30T10:01:00Z", "conditions": [
        {"type": "Failed", "status": "True", "reason": "DataValidationFailed",
         "message": "line 3: field \"messages\" is missing (format: chat)"}]}
    job = to_job(with_status(finetunejob(), status))
    assert job["error"] == {"code": "DataValidationFailed", "param": "training_file",
                            "message": "line 3: field \"messages\" is missing (format: chat)"}


def test_checkpoint_names_are_not_servable_model_names():
    assert mapping.job_id_of_model(f"ft:tiny-llama:x:{JOB_ID}:ckpt-step-4") is None
    assert mapping.job_id_of_model("tiny-llama") is None


def test_every_kept_checkpoint_is_listed_with_its_own_metrics_newest_first():
    kept = [{"step": 4, "savedAt": "2026-11-30T10:01:00Z", "trainLoss": 2.0, "meanTokenAccuracy": 0.25},
            {"step": 8, "savedAt": "2026-11-30T10:02:00Z", "trainLoss": 1.5, "evalLoss": 1.7,
             "evalMeanTokenAccuracy": 0.5},
            {"step": 12, "savedAt": "2026-11-30T10:03:00Z", "trainLoss": 1.0}]
    status = {"phase": "Training", "startTime": "2026-11-30T10:00:30Z", "progress": {"step": 12},
              "checkpoints": {"latest": "checkpoint-12", "count": 3, "kept": kept}}
    cps = to_checkpoints(with_status(finetunejob(body(suffix="s")), status))
    assert [c["step_number"] for c in cps] == [12, 8, 4]
    assert cps[1]["metrics"] == {"step": 8.0, "train_loss": 1.5, "valid_loss": 1.7, "valid_mean_token_accuracy": 0.5}
    assert cps[2]["metrics"] == {"step": 4.0, "train_loss": 2.0, "train_mean_token_accuracy": 0.25}
    assert cps[2]["created_at"] == mapping.unix("2026-11-30T10:01:00Z")
    assert cps[0]["id"] != cps[1]["id"] and cps[0]["fine_tuned_model_checkpoint"].endswith(":ckpt-step-12")


def test_trained_tokens_is_the_trainers_count_once_the_job_ended():
    running = {"phase": "Training", "progress": {"step": 6, "tokensSeen": 4000}}
    assert to_job(with_status(finetunejob(), running))["trained_tokens"] is None
    done = {"phase": "Succeeded", "completionTime": "2026-11-30T10:10:00Z", "progress": {"step": 12, "tokensSeen": 8123}}
    assert to_job(with_status(finetunejob(), done))["trained_tokens"] == 8123


def test_a_succeeded_job_names_its_result_file_which_the_trainer_writes_on_the_files_claim():
    location = "pvc://openai-files/results/" + JOB_ID + "/results.csv"
    obj = build_finetunejob(parse_create(body()), job_id=JOB_ID, namespace="team-a", model_source="m",
                            template={}, training=TRAIN, validation=None, results_file=location)
    assert obj["spec"]["output"] == {"resultsFile": location}
    running = to_job(with_status(obj, {"phase": "Training"}))
    assert running["result_files"] == []
    done = to_job(with_status(obj, {"phase": "Succeeded", "completionTime": "2026-11-30T10:10:00Z"}))
    assert done["result_files"] == [mapping.result_file_id(JOB_ID)]
    assert mapping.FILE_ID.match(done["result_files"][0]) and mapping.result_file_id("ftjob-" + "d" * 24) != \
        done["result_files"][0]


def test_checkpoints_come_from_status_newest_first():
    status = {"phase": "Training", "startTime": "2026-11-30T10:00:30Z", "progress": {"step": 8},
              "metrics": {"trainLoss": 1.5, "evalLoss": 1.7},
              "checkpoints": {"latest": "/workspace/checkpoints/checkpoint-8", "best": "/workspace/checkpoints/checkpoint-4",
                              "count": 2}}
    cps = to_checkpoints(with_status(finetunejob(body(suffix="s")), status))
    assert [c["step_number"] for c in cps] == [8, 4]
    assert cps[0]["metrics"] == {"step": 8.0, "train_loss": 1.5, "valid_loss": 1.7}
    assert cps[1]["metrics"] == {"step": 4.0}
    assert cps[0]["fine_tuned_model_checkpoint"] == f"ft:tiny-llama:s:{JOB_ID}:ckpt-step-8"
    assert all(c["object"] == "fine_tuning.job.checkpoint" and c["fine_tuning_job_id"] == JOB_ID for c in cps)
    assert to_checkpoints(with_status(finetunejob(), {"phase": "Pending"})) == []


def kube_event(uid, reason, message, when, type_="Normal"):
    return {"metadata": {"uid": uid}, "reason": reason, "message": message, "type": type_, "lastTimestamp": when}


def test_events_merge_kubernetes_events_metrics_and_the_outcome_newest_first():
    status = {"phase": "Succeeded", "completionTime": "2026-11-30T10:09:00Z", "progress": {"step": 12, "totalSteps": 12},
              "metrics": {"trainLoss": 0.25}}
    events = to_events(with_status(finetunejob(), status), [
        kube_event("u1", "Admitted", "the spec's references exist", "2026-11-30T10:00:01Z"),
        kube_event("u2", "OOMKilled", "the trainer ran out of memory", "2026-11-30T10:03:00Z", "Warning"),
    ], now=2_000_000_000)
    assert [e["type"] for e in events][:1] == ["metrics"]
    assert events[0]["data"] == {"step": 12, "total_steps": 12, "train_loss": 0.25}
    messages = [e["message"] for e in events]
    assert messages[1:] == ["The job has successfully completed", "OOMKilled: the trainer ran out of memory",
                            "Admitted: the spec's references exist", "Created fine-tuning job"]
    assert {e["level"] for e in events} == {"info", "warn"}
    assert all(e["object"] == "fine_tuning.job.event" for e in events)

    first = mapping.page(events, after=None, limit=2)
    assert first["has_more"] and len(first["data"]) == 2
    rest = mapping.page(events, after=first["data"][-1]["id"], limit=10)
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in events] and not rest["has_more"]


def test_list_limits_are_checked():
    assert mapping.parse_limit(None) == 20 and mapping.parse_limit("5") == 5
    for bad in ("0", "101", "x"):
        with pytest.raises(ApiError) as exc:
            mapping.parse_limit(bad)
        assert exc.value.param == "limit"


def test_every_phase_of_the_schema_has_its_openai_status():
    """A phase added to the FineTuneJob lifecycle must be mapped here, not shown as queued."""
    from finetune_api.schema import PHASES

    queued = {phase for phase in PHASES
              if to_job(with_status(finetunejob(), {"phase": phase}))["status"] == "queued"}
    assert queued == {"Pending", "Suspended"}, "Suspended with spec.suspend false is a resume on its way"
