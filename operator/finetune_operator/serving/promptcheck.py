"""The train/serve prompt check: does vLLM render prompts the way training did?

The trainer records the prompt part of its first eval examples as token ids
(`status.artifacts.promptRenderings`, from `finetune_trainer.renderings`). Before the server
is declared Ready the operator asks one ready replica's `/tokenize` for the same
conversations, under the adapter's name (`messages` with the generation prompt, so vLLM
applies the chat template it serves with; or the prompt text with the tokenizer's special
tokens). A difference (another chat template, `--chat-template`, another tokenizer) is the
condition `PromptFormatMismatch=True`, naming the first differing token and both renderings,
and the server is Degraded: fine-tunes answer worse when served with another template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from finetune_api.models import FineTuneJob, InferenceService, PromptRendering

from finetune_operator.serving.adapters import Replica, VLLMError

SHOWN_CHARS = 300


@dataclass
class PromptCheck:
    checked: list[str] = field(default_factory=list)     # "<adapter>: n examples"
    mismatches: list[str] = field(default_factory=list)  # one message per adapter
    errors: list[str] = field(default_factory=list)


def _request(model: str, r: PromptRendering) -> Optional[dict]:
    if r.messages:
        return {"model": model, "messages": [{"role": m.role, "content": m.content} for m in r.messages],
                "add_generation_prompt": True}
    if r.prompt is not None:
        return {"model": model, "prompt": r.prompt}
    return None


def _piece(server, model: str, ids: list[int], pos: int) -> str:
    if pos >= len(ids):
        return "(end)"
    text = server.post("/detokenize", {"model": model, "tokens": [ids[pos]]}).get("prompt", "")
    return f"{ids[pos]} {text!r}"


def _short(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def compare(server, model: str, renderings: list[PromptRendering]) -> tuple[int, Optional[str]]:
    """(examples checked, the first difference or None)."""
    checked = 0
    for i, r in enumerate(renderings):
        request = _request(model, r)
        if request is None:
            continue
        served = list(server.post("/tokenize", request)["tokens"])
        trained = list(r.token_ids)
        checked += 1
        if served == trained:
            continue
        pos = next((k for k, (a, b) in enumerate(zip(trained, served)) if a != b), min(len(trained), len(served)))
        served_text = server.post("/detokenize", {"model": model, "tokens": served}).get("prompt", "")
        return checked, (f"example {i}: the first difference is at token {pos}: training had "
                         f"{_piece(server, model, trained, pos)}, the server has {_piece(server, model, served, pos)}; "
                         f"training rendered {_short(r.text or '')} ({len(trained)} tokens), the server "
                         f"renders {_short(served_text)} ({len(served)} tokens)")
    return checked, None


def check(isvc: InferenceService, jobs: Mapping[str, FineTuneJob], replicas: list[Replica],
          server_for_pod: Callable[[str], object]) -> PromptCheck:
    """Check every served adapter whose job recorded renderings, on one ready replica."""
    result = PromptCheck()
    for adapter in isvc.spec.adapters:
        ref = adapter.fine_tune_job_ref
        job = jobs.get(ref.name) if ref else None
        renderings = (job.status.artifacts.prompt_renderings if job and job.status.artifacts else None) or []
        if not renderings:
            continue
        replica = next((r for r in replicas if not r.simulated and not r.error and adapter.name in r.loaded), None)
        if replica is None:
            continue
        try:
            n, mismatch = compare(server_for_pod(replica.pod), adapter.name, renderings)
        except (VLLMError, KeyError, ValueError) as e:
            result.errors.append(f"{adapter.name}: {e}")
            continue
        if mismatch:
            result.mismatches.append(f"{adapter.name} (FineTuneJob {ref.name}) on pod {replica.pod}: {mismatch}")
        else:
            result.checked.append(f"{adapter.name}: {n} example(s)")
    return result
