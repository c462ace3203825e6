"""The review page of a FineTuneJob: one self-contained HTML document (no external assets,
no script; readable with JavaScript off) with the comparison table, the loss curve (inlined
as a data: URI), the dataset report, every evaluation prompt with the base and fine-tuned
answers side by side and the reference, a verdict form per answer (factuality, relevance,
style, safety) and an approve / reject form.

Standard library only: the comparison Job renders it onto the job volume
(`artifacts/report.html`, next to the model card) and the operator renders the same page on
its HTTP port (`/jobs/<namespace>/<name>/report`) from the job, the review ConfigMap the
comparison Job fills, and the verdicts recorded so far. The forms post plain HTML forms
with a bearer-token field, so recording works without JavaScript too.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Mapping

ASPECTS = ("factuality", "relevance", "style", "safety")
VERDICTS = ("good", "bad", "unsure")
# Annotations on the FineTuneJob (the approval one is status.APPROVED_ANNOTATION's value).
VERDICTS_ANNOTATION = "finetune.dev/review-verdicts"
# What the comparison Job puts in the review ConfigMap (`<job>-review`).
COMPARISON_KEY = "comparison.json"
LOSS_PLOT_KEY = "loss.png"
DATASET_KEY = "dataset.json"
REPORT_FILE = "report.html"

_COLUMNS = (("model", "Model"), ("exactMatch", "Exact match"), ("patternMatch", "Pattern match"),
            ("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("evalLoss", "Eval loss"),
            ("latencyP50Ms", "Latency p50 (ms)"), ("latencyP95Ms", "Latency p95 (ms)"),
            ("outputTokensPerSecond", "Output tokens/s"), ("costPer1kOutputTokens", "Cost / 1K output tokens"))

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:78em;color:#1d232a}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f5}.num{text-align:right;font-variant-numeric:tabular-nums}
.answers{display:grid;grid-template-columns:1fr 1fr 1fr;gap:.6em}
.answer{border:1px solid #ccd;border-radius:4px;padding:.5em;white-space:pre-wrap;word-break:break-word}
.answer h4{margin:0 0 .3em 0;font-size:.9em;color:#556}
.item{margin:1em 0;padding:.6em;border-left:4px solid #88a}
.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;background:#f6f7f9;padding:.4em}
fieldset{border:1px solid #dde;margin:.3em 0}legend{font-size:.85em;color:#556}
.meta{color:#556}.state{font-weight:bold}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def format_value(value: Any) -> str:
    """A table cell as text: 4 significant digits for floats, "-" when absent (the page and
    the demo's text table)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(value: Any) -> str:
    return _e(format_value(value))


def comparison_table(rows: list[Mapping[str, Any]]) -> str:
    shown = [(k, title) for k, title in _COLUMNS if any(k in r for r in rows)]
    head = "".join(f"<th>{_e(title)}</th>" for _, title in shown)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(r.get(k))}</td>" if k == "model" else f'<td class="num">{_num(r.get(k))}</td>'
                         for k, _ in shown) + "</tr>"
        for r in rows)
    return f'<table id="comparison"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _dataset_section(dataset: Mapping[str, Any] | None) -> str:
    if not dataset:
        return "<p>No dataset report yet.</p>"
    rows = []
    for key, value in dataset.items():
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value) or "none"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        rows.append(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>")
    return f'<table id="dataset">{"".join(rows)}</table>'


def _verdict_fields(index: int, side: str, recorded: Mapping[str, Any]) -> str:
    parts = []
    for aspect in ASPECTS:
        current = recorded.get(aspect)
        options = "".join(
            f'<label><input type="radio" name="{side}-{index}-{aspect}" value="{v}"'
            f'{" checked" if current == v else ""}> {v}</label> ' for v in VERDICTS)
        parts.append(f"<div>{aspect}: {options}</div>")
    return f'<fieldset><legend>verdict on the {side} answer</legend>{"".join(parts)}</fieldset>'


def _answers_section(answers: list[Mapping[str, Any]], verdicts: Mapping[str, Any], forms: bool) -> str:
    if not answers:
        return "<p>No answers yet: the comparison has not run or could not reach vLLM.</p>"
    items = []
    for i, a in enumerate(answers):
        recorded = verdicts.get(str(i)) or {}
        reference = a.get("reference")
        cells = (f'<div class="answer base"><h4>base ({_num(a.get("baseMs"))} ms)</h4>{_e(a.get("base"))}</div>'
                 f'<div class="answer fine-tuned"><h4>fine-tuned ({_num(a.get("fineTunedMs"))} ms)</h4>'
                 f'{_e(a.get("fineTuned"))}</div>'
                 f'<div class="answer reference"><h4>reference</h4>'
                 f'{_e(reference) if reference is not None else "<em>none</em>"}</div>')
        form = ""
        if forms:
            form = (_verdict_fields(i, "base", recorded.get("base") or {})
                    + _verdict_fields(i, "fine-tuned", recorded.get("fine-tuned") or {}))
        items.append(f'<div class="item" id="answer-{i}"><div class="meta">#{i + 1} '
                     f'({_e(a.get("kind", "prompt"))})</div><div class="prompt">{_e(a.get("prompt"))}</div>'
                     f'<div class="answers">{cells}</div>{form}</div>')
    return "".join(items)


def render(job: Mapping[str, Any], comparison: Mapping[str, Any] | None = None, *,
           loss_png: bytes | None = None, dataset: Mapping[str, Any] | None = None,
           actions: str | None = None) -> str:
    """The page. `job`: the FineTuneJob resource (dict); `comparison`: comparison.json;
    `dataset`: the dataset report (default: status.dataset); `actions`: the URL prefix the
    forms post to (`/jobs/<ns>/<name>`), None for the file on the volume (no forms)."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    spec = job.get("spec") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace", "")
    annotations = meta.get("annotations") or {}
    comparison = comparison or {}
    summary = status.get("comparison") or {}
    rows = summary.get("rows") or comparison.get("rows") or []
    try:
        verdicts = json.loads(annotations.get(VERDICTS_ANNOTATION) or "{}").get("answers") or {}
    except (ValueError, AttributeError):
        verdicts = {}
    state = summary.get("state") or comparison.get("state") or "not run yet"
    message = summary.get("message") or comparison.get("message") or ""
    parts = [f"<h1>Review: FineTuneJob {_e(namespace)}/{_e(name)}</h1>",
             f'<p class="meta">Model {_e((spec.get("model") or {}).get("source"))}, method '
             f'{_e((spec.get("method") or {}).get("type"))}; phase <span class="state" id="phase">'
             f'{_e(status.get("phase"))}</span>; approval: {_e(annotations.get("finetune.dev/approved", "none"))}</p>',
             "<h2>Base vs fine-tuned</h2>",
             f'<p>Comparison: <span class="state">{_e(state)}</span>. {_e(message)}</p>',
             comparison_table(rows) if rows else "<p>No table yet.</p>",
             "<h2>Loss curve</h2>"]
    if loss_png:
        data = base64.b64encode(loss_png).decode()
        parts.append(f'<img id="loss" alt="training and evaluation loss" src="data:image/png;base64,{data}">')
    else:
        parts.append("<p>No loss curve yet.</p>")
    parts += ["<h2>Dataset</h2>", _dataset_section(dataset if dataset is not None else status.get("dataset")),
              "<h2>Answers</h2>"]
    answers = list(comparison.get("answers") or [])
    if actions:
        parts.append(f'<form method="post" action="{_e(actions)}/verdicts">'
                     + _answers_section(answers, verdicts, True)
                     + '<p><label>Bearer token (needs update on this FineTuneJob): '
                       '<input type="password" name="token" autocomplete="off"></label> '
                       '<button type="submit" id="record">Record verdicts</button></p></form>')
        parts.append("<h2>Approval</h2>"
                     f'<form method="post" action="{_e(actions)}/approval">'
                     '<p><label>Reason: <input type="text" name="reason" size="60"></label></p>'
                     '<p><label>Bearer token: <input type="password" name="token" autocomplete="off"></label> '
                     '<button type="submit" name="approved" value="true" id="approve">Approve and deploy</button> '
                     '<button type="submit" name="approved" value="false" id="reject">Reject</button></p></form>')
    else:
        parts.append(_answers_section(answers, verdicts, False))
        parts.append(f"<p>Approve with <code>kubectl annotate ftj {_e(name)} -n {_e(namespace)} "
                     "finetune.dev/approved=true</code> (or <code>=false</code>).</p>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Review {_e(namespace)}/{_e(name)}</title><style>{_STYLE}</style></head><body>"
            + "".join(parts) + "</body></html>")


def parse_verdicts(form: Mapping[str, str]) -> dict[str, dict[str, dict[str, str]]]:
    """The verdict form's fields (`<side>-<index>-<aspect>` = good|bad|unsure) as
    {index: {side: {aspect: verdict}}}; anything else is ignored."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for key, value in form.items():
        for side in ("base", "fine-tuned"):
            prefix = f"{side}-"
            if not key.startswith(prefix):
                continue
            index, _, aspect = key[len(prefix):].partition("-")
            if index.isdigit() and aspect in ASPECTS and value in VERDICTS:
                out.setdefault(index, {}).setdefault(side, {})[aspect] = value
    return out
