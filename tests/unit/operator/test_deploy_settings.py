"""spec.deploy's values applied to an InferenceService's spec (issue 17): set fields replace
the server's, unset ones keep them, a new server gets the InferenceService defaults, and another
served job that set the same field to another value is a DeployConflict naming the field."""

from __future__ import annotations

import pytest

from finetune_api.models import FineTuneJob
from finetune_operator import status
from finetune_operator.serving import handlers as handler
from tests.fixtures.inference import finetunejob

SERVER = {"model": {"source": "org/base"}, "replicas": 4,
          "resources": {"gpus": 2, "cpu": "4", "nodeSelector": {"pool": "a"}},
          "vllm": {"maxLoraRank": 64, "tensorParallelSize": 2, "dtype": "bfloat16"}}


def job(name: str, **deploy) -> FineTuneJob:
    return FineTuneJob.from_resource(finetunejob(name, deploy={"inferenceService": "s", **deploy}))


def test_set_fields_replace_the_servers_values_and_unset_ones_keep_them():
    tol = {"key": "serving", "operator": "Exists", "effect": "NoSchedule"}
    spec = handler.with_deploy_settings(SERVER, job("a", replicas=1, nodeSelector={"pool": "b"},
                                                    tolerations=[tol], vllm={"maxModelLen": 2048,
                                                                             "extraArgs": ["--enforce-eager"]}), [])
    assert spec["replicas"] == 1
    assert spec["resources"] == {"gpus": 2, "cpu": "4", "nodeSelector": {"pool": "b"}, "tolerations": [tol]}
    assert spec["vllm"] == {"maxLoraRank": 64, "tensorParallelSize": 2, "dtype": "bfloat16",
                            "maxModelLen": 2048, "extraArgs": ["--enforce-eager"]}
    assert handler.with_deploy_settings(SERVER, job("b"), []) == SERVER, "a deploy that sets nothing changes nothing"
    assert SERVER["replicas"] == 4, "the input is not modified"


def test_a_new_server_takes_the_defaults_for_what_deploy_leaves_unset():
    new = handler._new_isvc(job("a"), "s")["spec"]
    assert (new["replicas"], new["resources"], "vllm" in new) == (1, {"gpus": 1}, False)
    cpu = handler._new_isvc(job("a", gpus=0, replicas=2, vllm={"maxLoras": 2}), "s")["spec"]
    assert (cpu["replicas"], cpu["resources"], cpu["vllm"]) == (2, {"gpus": 0}, {"maxLoras": 2, "tensorParallelSize": 1})


def test_gpus_zero_on_a_sharded_server_serves_on_one_cpu_shard_unless_deploy_says_otherwise():
    spec = handler.with_deploy_settings(SERVER, job("a", gpus=0), [])
    assert spec["resources"]["gpus"] == 0 and spec["vllm"]["tensorParallelSize"] == 1


def test_a_conflicting_value_of_another_served_job_is_refused_naming_the_field():
    first = job("first", replicas=2, vllm={"maxLoraRank": 32})
    with pytest.raises(handler.DeployConflict) as e:
        handler.with_deploy_settings(SERVER, job("second", replicas=3), [first])
    assert e.value.reason == "DeployConflict"
    assert str(e.value).startswith("spec.deploy.replicas is 3 here but 2 in FineTuneJob first")
    with pytest.raises(handler.DeployConflict, match="spec.deploy.vllm.maxLoraRank is 64 here but 32"):
        handler.with_deploy_settings(SERVER, job("second", vllm={"maxLoraRank": 64}), [first])
    # Equal values, fields the other job leaves unset, and jobs deploying elsewhere agree.
    agreed = handler.with_deploy_settings(SERVER, job("second", replicas=2, gpus=4), [first])
    assert (agreed["replicas"], agreed["resources"]["gpus"]) == (2, 4)
    elsewhere = FineTuneJob.from_resource(finetunejob("x", deploy={"inferenceService": "other", "replicas": 9}))
    assert handler.with_deploy_settings(SERVER, job("second", replicas=3), [elsewhere])["replicas"] == 3


def test_the_conflict_reason_reaches_the_jobs_condition():
    obs = status.Observation(status.Phase.DEPLOYING, "WaitingForInferenceService", "")
    held = status.deployment_failed(obs, handler.DeployConflict("spec.deploy.replicas ...", reason="DeployConflict"))
    assert (held.phase, held.reason) == (status.Phase.DEPLOYING, "DeployConflict")
    assert status.deployment_failed(obs, RuntimeError("boom")).reason == "DeployFailed"


def test_every_deploy_field_reaches_the_inferenceservice_spec_and_its_deployment():
    """Each field of spec.deploy set on a job that joins an existing server shows in the
    Deployment the server renders (the vLLM command, the pod's placement and resources)."""
    from finetune_api.models import InferenceService
    from finetune_operator.serving import deployment
    from tests.fixtures.inference import BASE, inferenceservice

    tol = {"key": "serving", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30}
    vllm = {"image": "vllm/vllm-openai:v9", "servedModelName": "support", "maxModelLen": 1024,
            "gpuMemoryUtilization": 0.5, "tensorParallelSize": 2, "maxLoraRank": 32, "maxLoras": 3,
            "dtype": "float16", "extraArgs": ["--enforce-eager"]}
    body = finetunejob("a", deploy={"inferenceService": "support", "replicas": 3, "gpus": 2,
                                    "nodeSelector": {"pool": "serving"}, "tolerations": [tol], "vllm": vllm})
    a = FineTuneJob.from_resource(body)
    server = inferenceservice("support", replicas=1, resources={"gpus": 1})
    server["spec"] = handler.with_deploy_settings(handler._with_job(server["spec"], a, "support"), a, [])
    d = deployment.build_deployment(InferenceService.from_resource(server), {"a": a})
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cmd = c["command"]
    flag = {f: cmd[cmd.index(f) + 1] for f in ("--served-model-name", "--max-model-len", "--gpu-memory-utilization",
                                                "--tensor-parallel-size", "--max-lora-rank", "--max-loras", "--dtype")}
    assert flag == {"--served-model-name": "support", "--max-model-len": "1024", "--gpu-memory-utilization": "0.5",
                    "--tensor-parallel-size": "2", "--max-lora-rank": "32", "--max-loras": "3", "--dtype": "float16"}
    assert "--enforce-eager" in cmd and c["image"] == "vllm/vllm-openai:v9" and BASE in cmd
    assert d["spec"]["replicas"] == 3 and c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"]["pool"] == "serving" and tol in pod["tolerations"]


def test_a_deployed_job_whose_deploy_values_change_deploys_again():
    def succeeded(replicas, applied=None):
        body = finetunejob("a", deploy={"inferenceService": "s", "replicas": replicas})
        body["status"]["inferenceService"] = {"name": "s", "url": "http://s"}
        if applied is not None:
            body["metadata"]["annotations"] = {status.DEPLOYED_SETTINGS_ANNOTATION: applied}
        return FineTuneJob.from_resource(body)

    applied = status.deploy_digest(succeeded(2))
    assert not status.late_deploy(succeeded(2, applied)), "nothing changed"
    assert status.late_deploy(succeeded(3, applied)), "replicas changed since they were applied"
    assert not status.late_deploy(succeeded(3)), "no record (deployed by an older operator): left alone"
    assert status.derive(succeeded(3, applied), None, [], now=_now()).reason == "DeployRequested"


def _now():
    import datetime as dt

    return dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)
