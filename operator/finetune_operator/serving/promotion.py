"""Promotion gated on evaluation (`spec.adapters[].promotion`).

`status.promotions` remembers, per gated adapter, which FineTuneJob serves under its name.
When the spec's fineTuneJobRef names another job (a new version), the serving version keeps
its name and the new one is loaded beside it as `<name>-candidate` (the pod template keeps
the serving version's claim mounted: `keep`). Both are then scored through the server,
on one ready replica, on the candidate job's `evaluation.prompts` that have a reference:
evalLoss is the mean negative log-likelihood of the references' tokens given the prompts,
rendered as the trainer rendered them (its status.dataset.promptFormat: the chat template
through vLLM's `/tokenize` with messages, or the Alpaca prompt or the raw prompt as text),
teacher-forced one token at a time (`eval_loss`).
The candidate
wins when its evalLoss <= the current one's - margin: the name is reloaded in place from the
candidate's path and the candidate name unloaded (`Promoted=True`, `Promoted`). When it
loses it is unloaded and the current version keeps serving (`Promoted=False`,
`CandidateRefused`, both scores in the message); the same candidate is not scored again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, Optional

from finetune_api.models import FineTuneJob, InferenceService
from finetune_api.prompts import CHAT_TEMPLATE, text_prompt, unrecorded_prompt_format

from finetune_operator.serving.adapters import Replica, Want, VLLMError

CANDIDATE_SUFFIX = "-candidate"
EVALUATING, PROMOTED, REFUSED = "Evaluating", "Promoted", "Refused"


def candidate_name(name: str) -> str:
    return f"{name}{CANDIDATE_SUFFIX}"


@dataclass(frozen=True)
class Record:
    """One entry of status.promotions."""

    name: str
    job: str
    version: str
    candidate: Optional[str] = None
    candidate_version: Optional[str] = None
    result: Optional[str] = None
    current_loss: Optional[float] = None
    candidate_loss: Optional[float] = None
    message: Optional[str] = None

    def to_status(self) -> dict:
        out = {"name": self.name, "fineTuneJob": self.job, "version": self.version, "candidate": self.candidate,
               "candidateVersion": self.candidate_version, "result": self.result,
               "currentEvalLoss": self.current_loss, "candidateEvalLoss": self.candidate_loss,
               "message": self.message}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_status(cls, d: dict) -> "Record":
        return cls(d.get("name", ""), d.get("fineTuneJob", ""), d.get("version", ""), d.get("candidate"),
                   d.get("candidateVersion"), d.get("result"), d.get("currentEvalLoss"),
                   d.get("candidateEvalLoss"), d.get("message"))


def records(status: Optional[dict]) -> dict[str, Record]:
    return {r.name: r for r in (Record.from_status(d) for d in (status or {}).get("promotions") or [])}


def _uid(job: FineTuneJob) -> str:
    return job.metadata.uid or job.metadata.name


def plan(isvc: InferenceService, jobs: Mapping[str, FineTuneJob], want: dict[str, Want],
         previous: Mapping[str, Record], read_job: Callable[[str], Optional[FineTuneJob]],
         path_of: Callable[[FineTuneJob], str]) -> tuple[dict[str, Want], dict[str, Record], dict[str, FineTuneJob]]:
    """What to load while versions are gated: (want, records, jobs whose claims stay mounted)."""
    want = dict(want)
    out: dict[str, Record] = {}
    keep: dict[str, FineTuneJob] = {}
    for adapter in isvc.spec.adapters:
        if adapter.promotion is None or adapter.fine_tune_job_ref is None:
            continue
        name, new = adapter.name, jobs[adapter.fine_tune_job_ref.name]
        rec = previous.get(name)
        if rec is None or (rec.job == new.metadata.name and rec.version == _uid(new)):
            out[name] = rec or Record(name, new.metadata.name, _uid(new))
            continue
        current = read_job(rec.job)
        if current is None or _uid(current) != rec.version:
            out[name] = Record(name, new.metadata.name, _uid(new), result=PROMOTED,
                               message=f"FineTuneJob {rec.job} (the serving version) is gone: "
                                       f"{new.metadata.name} serves without a comparison")
            continue
        keep[current.metadata.name] = current
        want[name] = Want(path_of(current), _uid(current))
        if rec.candidate == new.metadata.name and rec.candidate_version == _uid(new) and rec.result == REFUSED:
            out[name] = rec
            continue
        want[candidate_name(name)] = Want(path_of(new), _uid(new))
        out[name] = Record(name, rec.job, rec.version, new.metadata.name, _uid(new), EVALUATING,
                           message=f"scoring {new.metadata.name} (as {candidate_name(name)}) against "
                                   f"{rec.job} on the evaluation prompts")
    return want, out, keep


# --- scoring through the server ------------------------------------------------------------------


def trained_prompt_format(job: FineTuneJob) -> str:
    """The prompt format the job's trainer recorded (status.dataset.promptFormat); a job
    without one (trained before it was recorded) by its dataset format: chat and preference
    through the chat template, instruction with the Alpaca prompt, the rest raw."""
    recorded = job.status.dataset.prompt_format if job.status and job.status.dataset else None
    return recorded or unrecorded_prompt_format(job.spec.dataset.format)


def score_items(job: FineTuneJob, fmt: Optional[str] = None) -> list[tuple[dict, str]]:
    """(tokenize request for the prompt, reference) for each of the job's evaluation prompts
    with a reference, in the prompt format `fmt` (default: the one the job was trained with)."""
    fmt = fmt or trained_prompt_format(job)
    items = []
    for p in job.spec.evaluation.prompts if job.spec.evaluation else []:
        if not p.reference:
            continue
        if fmt == CHAT_TEMPLATE:
            request = {"messages": [{"role": "user", "content": p.prompt}], "add_generation_prompt": True}
        else:
            request = {"prompt": text_prompt(fmt, p.prompt)}
        items.append((request, p.reference))
    return items


# Reference tokens scored per prompt (one request each).
MAX_REFERENCE_TOKENS = 64


def eval_loss(server, model: str, items: list[tuple[dict, str]]) -> float:
    """Mean negative log-likelihood of the references' tokens given the prompts (token-weighted).

    Teacher-forced one token at a time: the prompt and the reference's tokens so far, one
    token generated with `allowed_token_ids` = the reference's next token, and its log-probability
    as vLLM reports it (raw, before the mask: `--logprobs-mode` raw_logprobs, vLLM's default).
    Not `prompt_logprobs`: with LoRA, vLLM's CPU build fails the whole engine when such a
    request is batched with another one (its LoRA logits kernel sees one row per prompt token
    but one adapter index per request), and a live server always has other requests.
    """
    total, count = 0.0, 0
    for request, reference in items:
        prompt_ids = list(server.post("/tokenize", {"model": model, **request})["tokens"])
        answer_ids = server.post("/tokenize", {"model": model, "prompt": reference,
                                               "add_special_tokens": False})["tokens"][:MAX_REFERENCE_TOKENS]
        for k, token in enumerate(answer_ids):
            out = server.post("/v1/completions", {
                "model": model, "prompt": prompt_ids + list(answer_ids[:k]), "max_tokens": 1, "temperature": 0,
                "logprobs": 0, "allowed_token_ids": [int(token)]})
            logprob = out["choices"][0]["logprobs"]["token_logprobs"][0]
            if logprob is None:
                raise VLLMError(f"no log-probability for token {token}")
            total -= max(float(logprob), -1e4)  # -inf (a token the model rules out): a large finite loss
            count += 1
    if not count:
        raise VLLMError("no reference token was scored")
    return total / count


def decide(isvc: InferenceService, jobs: Mapping[str, FineTuneJob], recs: dict[str, Record],
           replicas: list[Replica], server_for_pod: Callable[[str], object],
           job_of: Callable[[str], Optional[FineTuneJob]] = lambda name: None) -> dict[str, Record]:
    """Score every candidate that one ready replica serves next to the current version, each
    asked in the prompt format it was trained with (`job_of` reads the current version's job,
    which the spec no longer names; without it both are asked as the candidate was trained)."""
    out = dict(recs)
    gated = {a.name: a for a in isvc.spec.adapters if a.promotion}
    for name, rec in recs.items():
        if rec.result != EVALUATING:
            continue
        cand = candidate_name(name)
        replica = next((r for r in replicas if not r.simulated and not r.error
                        and r.loaded.get(cand) == rec.candidate_version and r.loaded.get(name) == rec.version), None)
        if replica is None:
            continue
        items = score_items(jobs[rec.candidate])
        if not items:
            out[name] = replace(rec, result=REFUSED, message=f"FineTuneJob {rec.candidate} has no "
                                "spec.evaluation.prompts with a reference to score it on; "
                                f"{rec.job} keeps serving")
            continue
        server = server_for_pod(replica.pod)
        try:
            # Each version is asked the way it was trained (a new version may have moved from
            # the Alpaca prompt to the chat template).
            current_job = jobs.get(rec.job) or job_of(rec.job)
            current = eval_loss(server, name, score_items(jobs[rec.candidate], trained_prompt_format(current_job))
                                if current_job is not None else items)
            candidate = eval_loss(server, cand, items)
        except (VLLMError, KeyError, ValueError, IndexError) as e:
            out[name] = replace(rec, message=f"scoring failed (retrying): {e}")
            continue
        margin = gated[name].promotion.margin or 0.0
        scores = (f"evalLoss {candidate:.4f} for {rec.candidate} against {current:.4f} for {rec.job} "
                  f"(margin {margin:g}, on {len(items)} prompts)")
        if math.isfinite(candidate) and candidate <= current - margin:
            out[name] = Record(name, rec.candidate, rec.candidate_version, rec.candidate, rec.candidate_version,
                               PROMOTED, current, candidate, f"promoted {rec.candidate}: {scores}")
        else:
            out[name] = replace(rec, result=REFUSED, current_loss=current, candidate_loss=candidate,
                                message=f"refused {rec.candidate}: {scores}; {rec.job} keeps serving")
    return out


def condition(recs: dict[str, Record]) -> Optional[tuple[str, str, str]]:
    """(status, reason, message) of the Promoted condition, or None when nothing is gated."""
    if not recs:
        return None
    refused = [r for r in recs.values() if r.result == REFUSED]
    if refused:
        return "False", "CandidateRefused", "; ".join(r.message or "" for r in refused)
    evaluating = [r for r in recs.values() if r.result == EVALUATING]
    if evaluating:
        return "False", "Evaluating", "; ".join(r.message or "" for r in evaluating)
    return "True", "Promoted", "; ".join(r.message or f"{r.name}: {r.job} serves" for r in recs.values())
