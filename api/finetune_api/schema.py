"""The one description of the finetune.dev API: every spec section, its defaults, bounds,
docs and rules, and the trainer's config built from the same sections.

`python -m finetune_api.generate` writes from it: crds/*.yaml and the chart's copy,
docs/api.md, the typed models (`finetune_api/models.py`) and the trainer's config classes
(`finetune_api/trainer_config.py`). Nothing of those is edited by hand.

The schemas are OpenAPI v3 structural schemas as Kubernetes wants them. Small
helpers keep them readable: ``string()``, ``integer()``, ``obj()`` ... each take
the description first and the constraints as keywords.
"""

from __future__ import annotations

import enum
from typing import Any

from finetune_api import layout

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
CATEGORY = "finetune"

Schema = dict[str, Any]

# Bounds on strings and lists keep CEL's cost estimate within the API server's budget.
SHORT = 253
LONG = 4096
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# hf id (org/name or name), hf://, pvc://claim/path, s3://bucket/key, https://, or /absolute/path
MODEL_SOURCE = (
    r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*(/[-A-Za-z0-9_.]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
    r"|s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/.*)?"
    r"|https://[^\s]+"
    r"|/[^\s]*"
    r"|[A-Za-z0-9][-A-Za-z0-9_.]*(/[-A-Za-z0-9_.]+)?)$"
)
# Datasets may also be a plain http(s) URL and an hf dataset id.
DATASET_SOURCE = MODEL_SOURCE
# Folder and file names start with a letter, digit or '_' (no '..', no hidden names).
RESULTS_FILE = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/([A-Za-z0-9_][A-Za-z0-9_.-]*/)+|s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9]/([A-Za-z0-9_][A-Za-z0-9_.=-]*/)*)[A-Za-z0-9_][A-Za-z0-9_.-]*\.csv$"
PUSH_URI = r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+|s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/.*)?)$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"


class MethodType(enum.StrEnum):
    """spec.method.type."""

    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


# Methods that train an adapter (method.lora applies to them).
ADAPTER_METHODS = (MethodType.LORA, MethodType.QLORA)
# Enumerations the trainer's command line and the models use too.
METHODS = [m.value for m in MethodType]
DATASET_FORMATS = ["instruction", "completion", "chat", "text", "preference"]
# Training objectives (the trainer's finetune_trainer.objectives registers one module per name).
OBJECTIVES = ["sft", "dpo"]
# TRL 1.16 DPOConfig.loss_type values that need no further parameter.
DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop",
                  "sigmoid_norm"]
LENGTH_POLICIES = ["truncate", "drop"]
PACKING_MODES = ["auto", "on", "off"]
SHARDING_MODES = ["auto", "none", "fsdp"]
PRECISIONS = ["bf16", "fp16", "fp32"]
SOURCE_HELP = (
    "a Hugging Face id (org/name), hf://org/name, pvc://<claim>/<path>, s3://<bucket>/<key>, "
    "https://<url>, or an absolute path inside the trainer image"
)


# --- helpers -----------------------------------------------------------------------------


def _with(schema: Schema, **extra: Any) -> Schema:
    """Adds the optional keywords that are not None, in OpenAPI spelling."""
    spelling = {
        "min_length": "minLength",
        "max_length": "maxLength",
        "min_items": "minItems",
        "max_items": "maxItems",
        "max_properties": "maxProperties",
        "exclusive_minimum": "exclusiveMinimum",
    }
    for key, value in extra.items():
        if value is not None:
            schema[spelling.get(key, key)] = value
    return schema


def string(description: str, *, default: str | None = None, enum: list[str] | None = None,
           pattern: str | None = None, min_length: int | None = None,
           max_length: int | None = SHORT, format: str | None = None) -> Schema:
    if enum is not None:
        max_length = None
        enum = list(enum)  # a copy: a shared list would become a YAML anchor in the CRD
    return _with({"type": "string", "description": description}, default=default, enum=enum,
                 pattern=pattern, min_length=min_length, max_length=max_length, format=format)


def name(description: str, *, label: bool = False, default: str | None = None) -> Schema:
    """A Kubernetes object name (DNS-1123 subdomain, or label for Services and the like)."""
    if label:
        check = rule(f"self.matches(r'{DNS1123_LABEL}')",
                     "must be a DNS-1123 label: lowercase letters, digits and '-', starting and "
                     "ending with a letter or digit, at most 63 characters")
    else:
        check = rule(f"self.matches(r'{DNS1123_SUBDOMAIN}')",
                     "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', "
                     "starting and ending with a letter or digit, at most 253 characters")
    node = string(description, default=default, min_length=1, max_length=63 if label else SHORT)
    node["x-kubernetes-validations"] = [check]
    return node


def location(description: str, allowed: str, regex: str) -> Schema:
    """A URI-like location (model, dataset, adapter, push target) checked with a readable message."""
    node = string(description, min_length=1, max_length=LONG)
    node["x-kubernetes-validations"] = [rule(f"self.matches(r'{regex}')", f"must be {allowed}")]
    return node


def integer(description: str, *, default: int | None = None, minimum: int | None = None,
            maximum: int | None = None, format: str | None = None) -> Schema:
    return _with({"type": "integer", "description": description}, default=default,
                 minimum=minimum, maximum=maximum, format=format)


def number(description: str, *, default: float | None = None, minimum: float | None = None,
           maximum: float | None = None, exclusive_minimum: bool | None = None) -> Schema:
    return _with({"type": "number", "description": description}, default=default,
                 minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum)


def boolean(description: str, *, default: bool | None = None) -> Schema:
    return _with({"type": "boolean", "description": description}, default=default)


def timestamp(description: str) -> Schema:
    return {"type": "string", "format": "date-time", "description": description}


def quantity(description: str, *, default: str | None = None) -> Schema:
    """A resource quantity such as 20Gi or 500m (an int is accepted too)."""
    return _with({"description": description, "anyOf": [{"type": "integer"}, {"type": "string"}],
                  "x-kubernetes-int-or-string": True, "pattern": QUANTITY}, default=default)


def array(items: Schema, description: str, *, default: list | None = None,
          min_items: int | None = None, max_items: int | None = 64,
          list_type: str | None = None) -> Schema:
    return _with({"type": "array", "description": description, "items": items}, default=default,
                 min_items=min_items, max_items=max_items, **{"x-kubernetes-list-type": list_type})


def string_map(description: str, *, max_properties: int = 64) -> Schema:
    return {"type": "object", "description": description, "maxProperties": max_properties,
            "additionalProperties": {"type": "string", "maxLength": SHORT}}


def free_form(description: str) -> Schema:
    """Only for upstream Kubernetes types copied verbatim (affinity, tolerations)."""
    return {"type": "object", "description": description,
            "x-kubernetes-preserve-unknown-fields": True}


# The API server also checks each `default` against the rules of its node, before the nested
# defaults are filled in: a rule on an object defaulted to {} must use has() on its fields.
def rule(expression: str, message: str, *, field_path: str | None = None,
         reason: str | None = None) -> Schema:
    return _with({"rule": expression, "message": message}, fieldPath=field_path, reason=reason)


def obj(description: str, properties: dict[str, Schema], *, required: list[str] | None = None,
        rules: list[Schema] | None = None, default: dict | None = None) -> Schema:
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = required
    if rules:
        schema["x-kubernetes-validations"] = rules
    return _with(schema, default=default)


def secret_key_ref(description: str, *, default_key: str) -> Schema:
    return obj(description, {
        "name": name("Name of the Secret in the same namespace."),
        "key": string("Key in the Secret that holds the token.", default=default_key, min_length=1),
    }, required=["name"])


def local_ref(description: str) -> Schema:
    return obj(description, {"name": name("Name of the object in the same namespace.")},
               required=["name"])


def conditions(types: list[str]) -> Schema:
    """metav1.Condition, listed by type."""
    return array(obj(f"A condition; types used: {', '.join(types)}.", {
        "type": string("Type of the condition, e.g. " + types[0] + ".", max_length=316,
                       pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("CamelCase reason for the last transition.", max_length=1024,
                         pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"),
        "message": string("Human-readable message; says what to do when something is wrong.",
                          max_length=32768),
        "lastTransitionTime": timestamp("When the status last changed."),
        "observedGeneration": integer("metadata.generation this condition was computed from.",
                                      minimum=0, format="int64"),
    }, required=["type", "status", "reason", "message", "lastTransitionTime"]),
        "Current state of the resource, one entry per condition type.", max_items=16,
        list_type="map") | {"x-kubernetes-list-map-keys": ["type"]}


# --- FineTuneJob -----------------------------------------------------------------------------

PHASES = ["Pending", "Validating", "Training", "Evaluating", "Comparing", "AwaitingApproval",
          "Deploying", "Succeeded", "Failed", "Suspended"]
# Written by finetune_operator.conditions; the Running condition's reason is the job's latest
# reason (Starting, Preempted, Retrying, ...), which the Reason column shows.
FINETUNEJOB_CONDITIONS = ["Admitted", "Running", "Succeeded", "Failed", "Suspended", "TrackingAvailable",
                          "Pushed", "Compared", "Approved"]
# Spec sections frozen once training started (status.startTime is set).
IMMUTABLE_SECTIONS = ["model", "method", "dataset", "training", "evaluation", "resources",
                      "storage", "output", "tracking"]

MODEL = obj("The base model to fine-tune.", {
    "source": location("Where the base model comes from: " + SOURCE_HELP + ".", SOURCE_HELP, MODEL_SOURCE),
    "revision": string("Git revision (branch, tag or commit) of a Hugging Face model.",
                       min_length=1, pattern=r"^[-A-Za-z0-9_./]+$"),
    "tokenSecretRef": secret_key_ref("Secret holding an access token for the model source "
                                     "(Hugging Face token).", default_key="token"),
    "trustRemoteCode": boolean("Run model code shipped with the checkpoint. Only for sources you trust.",
                               default=False),
}, required=["source"], rules=[
    rule("!has(self.revision) || !(self.source.startsWith('pvc://') || self.source.startsWith('s3://') "
         "|| self.source.startsWith('https://') || self.source.startsWith('/'))",
         "spec.model.revision is only allowed with a Hugging Face source (org/name or hf://org/name)",
         field_path=".revision"),
])

LORA = obj("LoRA adapter settings (method.type lora or qlora).", {
    "r": integer("Rank of the LoRA update matrices.", default=16, minimum=1, maximum=1024),
    "alpha": integer("LoRA scaling factor (alpha / r scales the update).", default=32, minimum=1,
                     maximum=4096),
    "dropout": number("Dropout on the LoRA layers.", default=0.05, minimum=0, maximum=0.9),
    "targetModules": array(string("A module name, e.g. q_proj, or all-linear.", min_length=1,
                                  max_length=128),
                           "Modules that get adapters; all-linear adapts every linear layer but "
                           "the output head.", default=["all-linear"], min_items=1, max_items=64),
    "bias": string("Which biases are trained. Only none: vLLM cannot serve adapters with "
                   "trained biases.", default="none", enum=["none", "all", "lora_only"]),
}, rules=[
    rule("!has(self.bias) || self.bias == 'none'",
         "spec.method.lora.bias: only none is supported (vLLM cannot serve an adapter with trained "
         "biases)", field_path=".bias"),
    rule("!has(self.targetModules) || !('all-linear' in self.targetModules) || "
         "size(self.targetModules) == 1",
         "spec.method.lora.targetModules: all-linear cannot be combined with other module names",
         field_path=".targetModules"),
])

QUANTIZATION = obj("4-bit quantization of the frozen base model (method.type qlora only).", {
    "bits": integer("Bits per weight of the quantized base model.", default=4, minimum=4, maximum=4),
    "quantType": string("4-bit data type.", default="nf4", enum=["nf4", "fp4"]),
    "doubleQuant": boolean("Quantize the quantization constants too (saves ~0.4 bit/param).",
                           default=True),
    "computeDtype": string("Data type of the matmuls.", default="bf16",
                           enum=["bf16", "fp16", "fp32"]),
})

DPO = obj("Direct preference optimisation (method.objective dpo). The reference model is the "
          "base with the adapter disabled (lora, qlora) or a frozen copy of the base (full).", {
    "beta": number("How far the tuned model may move from the reference: higher keeps it "
                   "closer (for lossType ipo, the regularisation tau).", default=0.1, minimum=0,
                   maximum=100, exclusive_minimum=True),
    "lossType": string("The preference loss (TRL's names): sigmoid is the DPO paper's.",
                       default="sigmoid", enum=DPO_LOSS_TYPES),
    "maxPromptLength": integer("Tokens kept of each prompt (its end) when the dataset is "
                               "prepared; unset keeps whole prompts.", minimum=1, maximum=131072),
    "maxCompletionLength": integer("Tokens kept of each chosen and rejected answer (their "
                                   "beginning) when the dataset is prepared; unset keeps whole "
                                   "answers.", minimum=1, maximum=131072),
})

METHOD = obj("How the model is fine-tuned. When lora (or quantization) is omitted for a method that "
             "uses it, the defaults below apply.", {
    "type": string("full updates every weight; lora trains low-rank adapters; qlora trains adapters "
                   "on a 4-bit quantized base.", default="lora", enum=METHODS),
    "objective": string("What training optimises: sft (supervised fine-tuning on instruction, "
                        "completion, chat or text data) or dpo (direct preference optimisation "
                        "on dataset.format preference).", default="sft", enum=OBJECTIVES),
    "lora": LORA,
    "quantization": QUANTIZATION,
    "dpo": DPO,
}, default={"type": "lora", "lora": {}}, rules=[
    rule("!has(self.dpo) || (has(self.objective) && self.objective == 'dpo')",
         "spec.method.dpo is only allowed when spec.method.objective is dpo", field_path=".dpo"),
    rule("!has(self.lora) || self.type in ['lora', 'qlora']",
         "spec.method.lora is only allowed when spec.method.type is lora or qlora",
         field_path=".lora"),
    rule("!has(self.quantization) || self.type == 'qlora'",
         "spec.method.quantization is only allowed when spec.method.type is qlora",
         field_path=".quantization"),
])

DATASET_SOURCE_HELP = ("a Hugging Face dataset id (org/name), hf://org/name, pvc://<claim>/<path> "
                       "(a .jsonl, .json, .parquet or .csv file or folder), s3://<bucket>/<key>, "
                       "https://<url>, or an absolute path")

# dataset.chatTemplate (#16): the one template training, validation and serving render with.
CHAT_TEMPLATE_NAMES = ["model", "chatml", "llama-3.1"]
CHAT_TEMPLATE_LOSS = ["assistant", "all"]
CHAT_TEMPLATE_FILE = r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]+\.(jinja|j2)$"

CHAT_TEMPLATE = obj("The chat template conversations (chat records, and instruction and "
                    "completion records as user/assistant turns) are rendered with, in training, in "
                    "validation (every record is rendered before any GPU time) and in serving "
                    "(the trainer writes it to artifacts/chat_template.jinja and the tokenizer "
                    "config beside the adapter or merged model; vLLM serves with it).", {
    "name": string("model: the base model's own template (a model without one cannot train on "
                   "chat records, and trains instruction records with the Alpaca prompt); chatml or llama-3.1: a template built into the trainer.",
                   default="model", enum=CHAT_TEMPLATE_NAMES),
    "file": location("A Jinja chat template on the job's claim, pvc://<claim>/<path>.jinja; "
                     "replaces the model's own (name must then be model).",
                     "pvc://<claim>/<path>.jinja (or .j2)", CHAT_TEMPLATE_FILE),
    "lossOn": string("assistant: loss only on the assistant turns, each with its end-of-turn "
                     "token (a record whose assistant turns cannot be located in the rendering "
                     "is an error at validation); all: on the whole rendered conversation.",
                     default="assistant", enum=CHAT_TEMPLATE_LOSS),
}, rules=[
    rule("!has(self.file) || !has(self.name) || self.name == 'model'",
         "spec.dataset.chatTemplate: set name or file, not both", field_path=".file"),
], default={})

DATASET = obj("Training data, its format, how it is split and cleaned.", {
    "source": location("Where the training data comes from: " + DATASET_SOURCE_HELP + ".",
                       DATASET_SOURCE_HELP, DATASET_SOURCE),
    "split": string("Split of a Hugging Face dataset.", default="train", min_length=1,
                    max_length=128, pattern=r"^[-A-Za-z0-9_.\[\]:%]+$"),
    "format": string("Record shape. instruction: {instruction, input?, output}; completion: "
                     "{prompt, completion}; chat: {messages: [{role, content}]}; text: {text}; "
                     "preference (method.objective dpo): {prompt, chosen, rejected}, the prompt a "
                     "string or chat messages, or OpenAI's {input: {messages}, preferred_output, "
                     "non_preferred_output}. Instruction and completion records go through the "
                     "chat template when the model has one (user: the instruction, and its input "
                     "after a blank line, or the prompt; assistant: the output or completion), "
                     "else the Alpaca prompt (instruction) or the prompt as it is (completion): "
                     "status.dataset.promptFormat says which.",
                     default="instruction", enum=DATASET_FORMATS),
    "fieldMap": string_map("Renames source fields to the format's field names, "
                           "e.g. {instruction: question, output: answer}.", max_properties=16),
    "evalFraction": number("Fraction of the cleaned data held out for evaluation (0 disables "
                           "evaluation on held-out data unless evalSource is set).", default=0.05,
                           minimum=0, maximum=0.5),
    "maxEvalExamples": integer("At most this many records are held out by evalFraction (the "
                               "held-out set is evaluated at every saveSteps: 5% of a million "
                               "records would be 50,000 evaluations each time). An evalSource is "
                               "used whole.", default=1000, minimum=1),
    "evalSource": location("A separate evaluation set (same forms as source); when set, "
                           "evalFraction is ignored.", DATASET_SOURCE_HELP, DATASET_SOURCE),
    "dedup": obj("Duplicate removal before the split.", {
        "exact": boolean("Remove exact duplicates (after whitespace normalisation).", default=True),
        "nearThreshold": number("Jaccard similarity above which records are near-duplicates "
                                "(MinHash), judged on what the model learns from: system "
                                "messages are left out of the comparison (exact duplicates "
                                "still compare whole records); 1 disables near-duplicate "
                                "removal.", default=0.9,
                                minimum=0.5, maximum=1),
    }, default={}),
    "minExamples": integer("Fail validation when fewer training examples remain after cleaning.",
                           default=10, minimum=1),
    "maxInvalidFraction": number("Fail validation when more than this fraction of records is "
                                 "invalid (malformed or missing fields).", default=0.1, minimum=0,
                                 maximum=1),
    "lengthPolicy": string("What happens to examples longer than training.maxSeqLength tokens.",
                           default="truncate", enum=LENGTH_POLICIES),
    "categoryField": string("Field whose value is reported per category in the dataset report.",
                            min_length=1, max_length=128),
    "chatTemplate": CHAT_TEMPLATE,
    "mix": obj("General-domain data mixed into the training set (to limit forgetting).", {
        "source": location("Where the mixed-in data comes from: " + DATASET_SOURCE_HELP + ".",
                           DATASET_SOURCE_HELP, DATASET_SOURCE),
        "ratio": number("Mixed-in examples per training example.", minimum=0, maximum=10,
                        exclusive_minimum=True),
        "format": string("Record shape of the mixed-in data; dataset.format when unset. It must "
                         "make the same kind of records: instruction and completion (prompt and "
                         "completion), chat, text; with a chat template instruction and completion "
                         "records are conversations, so chat mixes with them.",
                         enum=DATASET_FORMATS),
    }, required=["source", "ratio"]),
}, required=["source"], rules=[
    rule("!has(self.mix) || !has(self.mix.format) || !has(self.format) || "
         "(self.mix.format == 'preference') == (self.format == 'preference')",
         "spec.dataset.mix.format must be preference exactly when spec.dataset.format is "
         "preference (pairs cannot be mixed with single examples)", field_path=".mix.format"),
])

TRAINING = obj("Hyperparameters of the training loop.", {
    "epochs": number("Passes over the training data (ignored when maxSteps is set).", default=1,
                     minimum=0, maximum=1000, exclusive_minimum=True),
    "maxSteps": integer("Stop after this many optimizer steps; overrides epochs.", minimum=1),
    "perDeviceBatchSize": integer("Examples per GPU per forward pass.", default=4, minimum=1,
                                  maximum=4096),
    "gradientAccumulationSteps": integer("Forward passes per optimizer step.", default=1,
                                         minimum=1, maximum=1024),
    "learningRate": number("Peak learning rate.", default=2e-4, minimum=0, maximum=1,
                           exclusive_minimum=True),
    "lrScheduler": string("Learning-rate schedule after warmup.", default="cosine",
                          enum=["linear", "cosine", "cosine_with_restarts", "polynomial",
                                "constant", "constant_with_warmup", "inverse_sqrt"]),
    "warmupSteps": integer("Optimizer steps of linear warmup (wins over warmupRatio).", default=0,
                           minimum=0),
    "warmupRatio": number("Fraction of all steps used for warmup.", default=0.0, minimum=0,
                          maximum=0.5),
    "weightDecay": number("AdamW weight decay.", default=0.0, minimum=0, maximum=1),
    "maxSeqLength": integer("Maximum tokens per example (see dataset.lengthPolicy).", default=1024,
                            minimum=16, maximum=131072),
    "packing": string("Pack several short examples into one sequence. auto: on when a CUDA "
                      "device and a variable-length attention kernel (flash-attn, which the model "
                      "is then loaded with) are both there, off elsewhere; on: always.",
                      default="auto", enum=PACKING_MODES),
    "sharding": string("How the model is spread over the training processes (GPUs x nodes). "
                       "none: every process holds the whole model (DDP). fsdp: weights, "
                       "gradients and optimizer state are sharded across all processes (PyTorch "
                       "FSDP2 through accelerate; checkpoints are sharded too, the saved model is "
                       "whole, in the model's own dtype); for full fine-tuning with objective sft "
                       "on at least 2 processes. auto: fsdp for full fine-tuning on several GPUs "
                       "when one process's replicated training state (16 bytes per parameter: "
                       "fp32 weights, gradients and AdamW's two moments) would take more than "
                       "60% of one GPU's memory; none otherwise.",
                       default="auto", enum=SHARDING_MODES),
    "precision": string("Training precision.", default="bf16", enum=PRECISIONS),
    "optimizer": string("Optimizer (transformers' names).", default="adamw_torch",
                        enum=["adamw_torch", "adamw_torch_fused", "adamw_8bit",
                              "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"]),
    "maxGradNorm": number("Gradient clipping norm (0 disables clipping).", default=1.0, minimum=0,
                          maximum=1000),
    "gradientCheckpointing": boolean("Recompute activations in the backward pass to save memory.",
                                     default=True),
    "loggingSteps": integer("Optimizer steps between loss reports.", default=10, minimum=1),
    "evalSteps": integer("Optimizer steps between evaluations (defaults to saveSteps).", minimum=1),
    "saveSteps": integer("Optimizer steps between checkpoints.", default=100, minimum=1),
    "saveTotalLimit": integer("Checkpoints kept on the volume (the best one is always kept).",
                              default=3, minimum=1, maximum=100),
    "metricForBestModel": string("Metric that picks the best checkpoint: eval_loss or perplexity "
                                 "(the same order, lower is better). bleu, rouge and exactMatch "
                                 "are not computed during training and are refused.",
                                 default="eval_loss",
                                 enum=["eval_loss", "perplexity", "bleu", "rouge", "exactMatch"]),
    "earlyStopping": obj("Stop when the metric for the best model stops improving.", {
        "patience": integer("Evaluations without improvement before stopping.", minimum=1,
                            maximum=1000),
        "threshold": number("Smallest change that counts as an improvement.", default=0.0,
                            minimum=0),
    }, required=["patience"]),
    "seed": integer("Random seed (data shuffling, initialisation of adapters).", default=42,
                    minimum=0, maximum=4294967295),
    "lossSpikeFactor": number("Fail the run when a logged training loss exceeds this multiple of the "
                              "median of the last 20 logged losses and is above the first logged "
                              "loss (divergence guard; a learning run's late, harder batches do not "
                              "trip it); 0 disables it.", default=0.0,
                              minimum=0),
}, default={}, rules=[
    rule("!has(self.evalSteps) || self.saveSteps % self.evalSteps == 0",
         "spec.training.saveSteps must be a multiple of spec.training.evalSteps so that the best "
         "checkpoint can be kept", field_path=".saveSteps"),
    rule("!has(self.metricForBestModel) || self.metricForBestModel in ['eval_loss', 'perplexity']",
         "spec.training.metricForBestModel: only eval_loss or perplexity can pick the best "
         "checkpoint (bleu, rouge and exactMatch are computed after training, not at each "
         "evaluation)", field_path=".metricForBestModel"),
])

EVALUATION = obj("Evaluation after training. Loss and perplexity are always computed.", {
    "metrics": array(string("An optional metric.", enum=["bleu", "rouge", "exactMatch"]),
                     "Extra metrics computed on generations of the base and the fine-tuned "
                     "model: for the first 32 eval records that have an answer "
                     "(status.evaluation.evalSetScores) and for prompts with a reference "
                     "(status.evaluation.scores).",
                     default=[], max_items=3, list_type="set"),
    "prompts": array(obj("A held-out prompt.", {
        "prompt": string("The prompt.", min_length=1, max_length=16384),
        "reference": string("The expected answer (used by bleu, rouge, exactMatch).",
                            max_length=16384),
    }, required=["prompt"]), "Prompts answered by the base and the fine-tuned model for a "
                             "side-by-side comparison in the evaluation report.", max_items=200),
    "maxNewTokens": integer("Tokens generated per prompt.", default=128, minimum=1,
                            maximum=8192),
    "comparison": obj("After training, the base model and the result are served side by side by "
                      "one vLLM server (a comparison Job) and asked the prompts and a sample of "
                      "the eval set: quality, latency and throughput per model in "
                      "status.comparison, and a review page.", {
        "enabled": boolean("Run the comparison (phase Comparing) before the job succeeds or "
                           "deploys.", default=True),
        "sampleSize": integer("Records of the eval split asked besides the prompts (0: prompts "
                              "only).", default=8, minimum=0, maximum=1000),
    }, default={}),
}, default={})

TOLERATION = obj("A toleration (core/v1 Toleration).", {
    "key": string("Taint key; empty with operator Exists matches every taint.", max_length=316),
    "operator": string("Exists or Equal.", enum=["Exists", "Equal"]),
    "value": string("Taint value (operator Equal).", max_length=63),
    "effect": string("NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
                     enum=["", "NoSchedule", "PreferNoSchedule", "NoExecute"]),
    "tolerationSeconds": integer("How long a NoExecute taint is tolerated.", format="int64"),
})

RESOURCES = obj("Compute for the trainer.", {
    "gpusPerNode": integer("GPUs per trainer pod (nvidia.com/gpu); 0 trains on CPU.", default=1,
                           minimum=0, maximum=16),
    "nodes": integer("Trainer pods (one per node), joined by torchrun.", default=1, minimum=1,
                     maximum=256),
    "cpu": quantity("CPU request and limit per trainer pod, e.g. 8 or 500m."),
    "memory": quantity("Memory request and limit per trainer pod, e.g. 64Gi."),
    "nodeSelector": string_map("Node labels the trainer pods must match."),
    "tolerations": array(TOLERATION, "Tolerations for the trainer pods.", max_items=32),
    "affinity": free_form("core/v1 Affinity for the trainer pods, passed through verbatim."),
    "priorityClassName": name("PriorityClass of the trainer pods."),
    "queueName": name("Kueue LocalQueue; the trainer Job is created suspended and Kueue admits it.",
                      label=True),
    "image": string("Trainer image override (defaults to the operator's configured image).",
                    min_length=1, max_length=512, pattern=r"^[^\s]+$"),
    "activeDeadlineSeconds": integer("Fail the job when training runs longer than this.",
                                     minimum=1, format="int64"),
}, default={}, rules=[
    rule("!has(self.nodes) || self.nodes == 1 || (has(self.gpusPerNode) && self.gpusPerNode >= 1)",
         "spec.resources.nodes > 1 requires spec.resources.gpusPerNode >= 1 (multi-node training "
         "runs on GPUs)", field_path=".nodes"),
])

STORAGE = obj("The job volume (data, checkpoints, artifacts, reports).", {
    "existingClaim": name("Use this PersistentVolumeClaim instead of creating one; size, "
                          "storageClassName and accessModes are then ignored."),
    "size": quantity("Size of the created PersistentVolumeClaim.", default="20Gi"),
    "storageClassName": name("StorageClass of the created claim (cluster default when unset)."),
    "accessModes": array(string("An access mode.", enum=["ReadWriteOnce", "ReadWriteMany",
                                                         "ReadWriteOncePod"]),
                         "Access modes of the created claim (ReadWriteOnce when unset; "
                         "multi-node training needs ReadWriteMany).", min_items=1, max_items=3,
                         list_type="set"),
    "reclaimPolicy": string("What happens to the created claim when the FineTuneJob is deleted. "
                            "Retain keeps it (and the checkpoints and artifacts on it); Delete "
                            "removes it. An existing claim is never deleted.",
                            default="Retain", enum=["Retain", "Delete"]),
}, default={}, rules=[
    rule("!has(self.existingClaim) || (!has(self.storageClassName) && !has(self.accessModes))",
         "spec.storage.storageClassName and spec.storage.accessModes are not allowed with "
         "spec.storage.existingClaim", field_path=".existingClaim"),
])

OUTPUT = obj("What the job produces and where it is published.", {
    "merge": boolean("Also write the base model merged with the adapter (LoRA/QLoRA); full "
                     "fine-tuning always writes a full model.", default=False),
    "push": obj("Publish the artifacts when training succeeds.", {
        "uri": location("Where to publish: hf://<org>/<repo> (Hugging Face Hub) or s3://<bucket>/<prefix>.",
                        "hf://<org>/<repo> or s3://<bucket>/<prefix>", PUSH_URI),
        "tokenSecretRef": secret_key_ref("Secret with the Hugging Face Hub token (hf:// only; "
                                         "s3:// credentials come from spec.objectStorage).",
                                         default_key="token"),
        "private": boolean("Create the Hub repository as private (hf:// only).", default=True),
    }, required=["uri"], rules=[
        rule("!has(self.tokenSecretRef) || self.uri.startsWith('hf://')",
             "spec.output.push.tokenSecretRef is for the Hugging Face Hub only; s3:// credentials "
             "come from spec.objectStorage.secretRef", field_path=".tokenSecretRef"),
        rule("!self.uri.startsWith('hf://') || has(self.tokenSecretRef)",
             "spec.output.push.tokenSecretRef is required when pushing to the Hugging Face Hub "
             "(hf://)", field_path=".tokenSecretRef"),
    ]),
    "resultsFile": location("Where the trainer also writes results.csv, the per-step training "
                            "history (step, train_loss, train_accuracy, valid_loss, "
                            "valid_mean_token_accuracy), at each checkpoint and at the end: "
                            "pvc://<claim>/<folder>/<name>.csv or s3://<bucket>/<key>.csv. Another "
                            "claim than the job's is mounted writable at that folder only; an s3:// "
                            "object is uploaded with the credentials of spec.objectStorage. The job "
                            "volume always gets reports/results.csv.",
                            "pvc://<claim>/<folder>/<name>.csv or s3://<bucket>/<key>.csv",
                            RESULTS_FILE),
}, default={})

OBJECT_STORAGE = obj("Credentials for every s3:// location of the job: model and dataset "
                     "sources, dataset.evalSource, dataset.mix.source and output.push. Works "
                     "with any S3-compatible store (AWS S3, MinIO, Ceph RGW, R2). Without it "
                     "s3:// requests are sent unsigned (public buckets).", {
    "secretRef": local_ref("Secret with the AWS SDKs' standard keys, given to the trainer as "
                           "environment variables (never written to its config, the status, "
                           "events or logs): AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and "
                           "optionally AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL (an "
                           "S3-compatible store's URL as pods reach it)."),
}, required=["secretRef"])

TRACKER_URI = r"^https?://[^\s]+$"

TRACKING = obj("Experiment tracking: the trainer logs the resolved training config as "
               "parameters, the dataset hash, the metrics of every logging step, the model card "
               "and the loss plot to each tracker named here. A tracker that is down never fails "
               "training: it shows as the TrackingAvailable condition.", {
    "mlflow": obj("An MLflow tracking server.", {
        "trackingUri": location("The tracking server's URL as pods reach it (http:// or https://).",
                                "an http:// or https:// URL", TRACKER_URI),
        "experiment": string("Experiment to log the run to (created when missing); defaults to "
                             "<namespace>/<name>.", min_length=1, max_length=500),
        "secretRef": local_ref("Secret whose keys MLFLOW_TRACKING_TOKEN, or "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, are given to "
                               "the trainer as environment variables (never written to its config "
                               "or the status)."),
    }, required=["trackingUri"]),
    "tensorboard": obj("TensorBoard event files in tracking/tensorboard/ on the job volume.", {
        "enabled": boolean("Write the event files.", default=True),
    }),
    "wandb": obj("Weights & Biases.", {
        "project": string("W&B project.", min_length=1, max_length=128),
        "entity": string("W&B entity (team or user).", min_length=1, max_length=128),
        "mode": string("online, offline (a run folder in tracking/wandb/ on the job volume, "
                       "for `wandb sync`), or auto: online when the API key is set and the W&B "
                       "server answers, offline otherwise.", default="auto",
                       enum=["auto", "online", "offline"]),
        "baseUrl": location("A self-hosted W&B server's URL.", "an http:// or https:// URL", TRACKER_URI),
        "apiKeySecretRef": secret_key_ref("Secret with the W&B API key (given to the trainer as "
                                          "WANDB_API_KEY).", default_key="token"),
    }, required=["project"]),
    "logAdapter": boolean("Also upload the adapter (or the merged model) as an artifact of the "
                          "MLflow and W&B runs.", default=False),
})

VLLM = obj("vLLM server options.", {
    "image": string("vLLM image override.", min_length=1, max_length=512, pattern=r"^[^\s]+$"),
    "servedModelName": string("Name clients use in the OpenAI API (model field); defaults to "
                              "the object's name.", min_length=1, max_length=128,
                              pattern=r"^[-A-Za-z0-9_./:]+$"),
    "maxModelLen": integer("Context length served.", minimum=16, maximum=1048576),
    "gpuMemoryUtilization": number("Fraction of GPU memory vLLM may use.", default=0.9,
                                   minimum=0.05, maximum=1),
    "tensorParallelSize": integer("GPUs one replica shards the model over (must not exceed "
                                  "resources.gpus).", default=1, minimum=1, maximum=16),
    "maxLoraRank": integer("Largest LoRA rank served (vLLM --max-lora-rank); must be at least "
                           "every adapter's rank.", default=16, minimum=1, maximum=512),
    "maxLoras": integer("Adapters batched at once (vLLM --max-loras).", default=4, minimum=1,
                        maximum=256),
    "dtype": string("Weights and activations data type.", default="auto",
                    enum=["auto", "bfloat16", "float16", "float32"]),
    "extraArgs": array(string("One argument.", min_length=1, max_length=1024),
                       "Extra vLLM arguments, passed as a list (never through a shell).",
                       default=[], max_items=64),
})

def _without_defaults(node: Schema) -> Schema:
    """A copy of an object schema whose fields have no defaults (unset stays unset)."""
    props = {k: {f: v for f, v in child.items() if f != "default"}
             for k, child in node["properties"].items()}
    return {**node, "properties": props}


# What an unset field of spec.deploy means, and what a set one does to an InferenceService.
DEPLOY_SEMANTICS = (
    "replicas, gpus, nodeSelector, tolerations and each vllm field are applied to the "
    "InferenceService's spec when the job deploys, whether deploy creates the "
    "InferenceService or adds the job to an existing one, and again whenever they are changed "
    "on a deployed job (a set field replaces the "
    "InferenceService's value: nodeSelector, tolerations and vllm.extraArgs as a whole); a field "
    "left unset (or an empty nodeSelector/tolerations) keeps the InferenceService's own value, or its "
    "default when deploy creates it. Several jobs may deploy into one InferenceService; when "
    "another job it already serves set the same field to another value, this job is not added: it "
    "stays Deploying with reason DeployConflict naming the field and both values, until one of the "
    "two spec.deploy sections is changed (or the other job leaves the server). Editing the "
    "InferenceService by hand later is kept until a job deploys into it again.")

DEPLOY = obj("Serve the result with an InferenceService once training succeeded. Mutable: "
             "adding it to a finished job deploys it. Deleting the job takes away what deploy added "
             "(its adapter entry; the InferenceService itself when the job created it and nothing "
             "else is left in it). " + DEPLOY_SEMANTICS, {
    "inferenceService": name("Name of the InferenceService to create or add the adapter to "
                             "(defaults to the job's name).", label=True),
    "replicas": integer("vLLM replicas, applied to the InferenceService (unset: the "
                        "InferenceService's own; 1 when deploy creates it).", minimum=0, maximum=64),
    "gpus": integer("GPUs per replica, applied to the InferenceService's resources.gpus (unset: "
                    "its own; 1 when deploy creates it). 0 serves on CPU and sets "
                    "vllm.tensorParallelSize to 1 unless deploy.vllm sets it.", minimum=0, maximum=16),
    "nodeSelector": string_map("Node labels the vLLM pods must match (serving pools often differ "
                               "from training pools); replaces the InferenceService's "
                               "resources.nodeSelector when set."),
    "tolerations": array(TOLERATION, "Tolerations for the vLLM pods; replace the "
                         "InferenceService's resources.tolerations when set.", max_items=32),
    "vllm": _without_defaults(VLLM) | {
        "description": "vLLM server options applied to the InferenceService's spec.vllm, field by "
                       "field: a set field replaces the InferenceService's value, an unset one keeps "
                       "it (the InferenceService's defaults when deploy creates it)."},
    # serving #21: a new version of a served adapter
    "adapterName": string("Name clients use for the adapter (the OpenAI model field); defaults to "
                          "the job's name. A job deploying under a name another job's adapter "
                          "already has there is a new version of it: that entry switches to this "
                          "job, gated by the entry's promotion when it has one (then a refused "
                          "version ends Succeeded with reason NotPromoted).",
                          min_length=1, max_length=128, pattern=r"^[-A-Za-z0-9_.]+$"),
    "requireApproval": boolean("Wait in phase AwaitingApproval after training (and the "
                               "comparison) until a person sets the annotation "
                               "finetune.dev/approved=true (deploy) or =false (the job ends "
                               "Succeeded, not deployed).", default=False),
})

FINETUNEJOB_SPEC = obj("Desired state of a FineTuneJob. Once training started (status.startTime "
                       "is set), everything but suspend, deploy and ttlSecondsAfterFinished is "
                       "immutable.", {
    "model": MODEL,
    "method": METHOD,
    "dataset": DATASET,
    "training": TRAINING,
    "evaluation": EVALUATION,
    "resources": RESOURCES,
    "storage": STORAGE,
    "output": OUTPUT,
    "tracking": TRACKING,
    "objectStorage": OBJECT_STORAGE,
    "deploy": DEPLOY,
    "suspend": boolean("Stop training (pods deleted, volume and checkpoints kept); setting it back "
                       "to false resumes from the latest checkpoint. A job queued in Kueue "
                       "(resources.queueName) is suspended through its Workload (spec.active "
                       "false), so it keeps its place in the queue.", default=False),
    "ttlSecondsAfterFinished": integer("Delete the FineTuneJob this many seconds after it "
                                       "succeeded or failed (kept forever when unset). A job that an "
                                       "InferenceService serves is kept until it no longer does "
                                       "(event KeptWhileServed).",
                                       minimum=0, format="int64"),
}, required=["model", "dataset"], rules=[
    rule("self.method.type != 'qlora' || self.resources.gpusPerNode >= 1",
         "spec.method.type qlora requires spec.resources.gpusPerNode >= 1 (bitsandbytes 4-bit "
         "needs a GPU)", field_path=".method.type"),
    rule("self.method.type != 'full' || !self.output.merge",
         "spec.output.merge is only allowed with spec.method.type lora or qlora (full fine-tuning "
         "always writes a full model)", field_path=".output.merge"),
    rule("!has(self.deploy) || !has(self.deploy.vllm) || !has(self.deploy.vllm.maxLoraRank) || "
         "self.method.type == 'full' || !has(self.method.lora) || "
         "self.method.lora.r <= self.deploy.vllm.maxLoraRank",
         "spec.deploy.vllm.maxLoraRank must be at least spec.method.lora.r", field_path=".deploy"),
    rule("!has(self.training.earlyStopping) || self.dataset.evalFraction > 0.0 || "
         "has(self.dataset.evalSource)",
         "spec.training.earlyStopping needs evaluation data: set spec.dataset.evalFraction > 0 or "
         "spec.dataset.evalSource", field_path=".training.earlyStopping"),
    rule("self.training.precision != 'fp16' || self.resources.gpusPerNode >= 1",
         "spec.training.precision fp16 requires spec.resources.gpusPerNode >= 1",
         field_path=".training.precision"),
    rule("!has(self.method.objective) || self.method.objective != 'dpo' || "
         "self.dataset.format == 'preference'",
         "spec.method.objective dpo needs spec.dataset.format preference (prompts with a chosen and "
         "a rejected answer)", field_path=".method.objective"),
    rule("!has(self.dataset.format) || self.dataset.format != 'preference' || "
         "(has(self.method.objective) && self.method.objective == 'dpo')",
         "spec.dataset.format preference is only for spec.method.objective dpo (sft needs single "
         "examples)", field_path=".dataset.format"),
    rule("self.training.sharding != 'fsdp' || self.resources.nodes * self.resources.gpusPerNode >= 2",
         "spec.training.sharding fsdp needs at least 2 training processes (spec.resources.nodes x "
         "spec.resources.gpusPerNode): one process has nothing to shard across",
         field_path=".training.sharding"),
    rule("self.training.sharding != 'fsdp' || (self.method.type == 'full' && "
         "(!has(self.method.objective) || self.method.objective != 'dpo'))",
         "spec.training.sharding fsdp is for sft with method.type full (lora, qlora and dpo are "
         "not sharded); use auto or none", field_path=".training.sharding"),
    rule("!has(self.method.objective) || self.method.objective != 'dpo' || "
         "self.training.packing != 'on'",
         "spec.training.packing on is not allowed with spec.method.objective dpo (pairs are not "
         "packed)", field_path=".training.packing"),
])

def _model_scores() -> dict[str, Schema]:
    return {model: obj(f"Scores of the {model} model.", {
        metric: number(f"{metric} (sacrebleu's BLEU 0-100; ROUGE F1 and exact match 0-1).", minimum=0)
        for metric in ("bleu", "rouge1", "rouge2", "rougeL", "exactMatch")})
        for model in ("base", "finetuned")}


FINETUNEJOB_STATUS = obj("Observed state of a FineTuneJob, written by the operator and the trainer.", {
    "phase": string("Where the job is in its lifecycle.", enum=PHASES),
    "conditions": conditions(FINETUNEJOB_CONDITIONS),
    "observedGeneration": integer("metadata.generation the status reflects.", minimum=0,
                                  format="int64"),
    "startTime": timestamp("When training started (the trainer Job was created). From then on "
                           "the spec is immutable except suspend, deploy, ttlSecondsAfterFinished."),
    "completionTime": timestamp("When the job succeeded or failed."),
    "progress": obj("Training progress.", {
        "step": integer("Optimizer steps done.", minimum=0, format="int64"),
        "totalSteps": integer("Optimizer steps planned.", minimum=0, format="int64"),
        "epoch": number("Epochs done (fractional).", minimum=0),
        "percent": integer("step / totalSteps in percent.", minimum=0, maximum=100),
        "etaSeconds": integer("Estimated seconds to the end of training.", minimum=0,
                              format="int64"),
        "tokensSeen": integer("Tokens trained on so far: non-padding input tokens over all GPUs "
                              "and epochs (a resumed run continues the count).", minimum=0,
                              format="int64"),
    }),
    "metrics": obj("Latest training metrics.", {
        "trainLoss": number("Training loss (running mean over the logging interval)."),
        "evalLoss": number("Loss on the evaluation set."),
        "perplexity": number("exp(evalLoss)."),
        "learningRate": number("Current learning rate."),
        "tokensPerSecond": number("Training throughput over all GPUs."),
        "rewardsChosen": number("DPO: mean implicit reward of the chosen answers "
                                "(beta x log-probability ratio to the reference)."),
        "rewardsRejected": number("DPO: mean implicit reward of the rejected answers."),
        "rewardsAccuracy": number("DPO: share of pairs whose chosen answer has the higher "
                                  "implicit reward.", minimum=0, maximum=1),
        "rewardsMargin": number("DPO: mean implicit reward of chosen minus rejected."),
    }),
    "evaluation": obj("Results of the evaluation after training.", {
        "evalLoss": number("Loss on the evaluation set (the objective's loss)."),
        "perplexity": number("exp(evalLoss), for language-model losses (sft)."),
        "baseEvalLoss": number("The base model's loss on the same evaluation set (sft): with "
                               "an adapter, measured by the training run's own evaluation with "
                               "the adapter disabled; after full fine-tuning, by a separate pass "
                               "over the base model (single-process runs only)."),
        "basePerplexity": number("exp(baseEvalLoss), to compare with perplexity."),
        "preferenceAccuracy": obj("DPO: share of held-out pairs whose chosen answer has a higher "
                                  "log-probability (summed over its tokens, given the prompt) "
                                  "than the rejected one.", {
            "base": number("Under the base model.", minimum=0, maximum=1),
            "finetuned": number("Under the fine-tuned model.", minimum=0, maximum=1),
            "pairs": integer("Held-out pairs evaluated.", minimum=0, format="int64"),
        }),
        "rewardAccuracy": number("DPO: share of held-out pairs whose chosen answer has the higher "
                                 "implicit reward (fine-tuned against the reference).", minimum=0,
                                 maximum=1),
        "scores": obj("evaluation.metrics on the prompts with a reference, per model.",
                      _model_scores()),
        "evalSetScores": obj("evaluation.metrics on the first eval records that have an answer, "
                             "per model.", {
            "examples": integer("Eval records scored.", minimum=0),
            **_model_scores(),
        }),
        "answers": array(obj("One evaluation prompt answered by both models (each text cut to "
                             "500 characters).", {
            "prompt": string("The prompt.", max_length=500),
            "reference": string("The expected answer, when given.", max_length=500),
            "base": string("The base model's answer.", max_length=500),
            "finetuned": string("The fine-tuned model's answer.", max_length=500),
        }), "Base and fine-tuned answers to evaluation.prompts (the first 20; all of them are in "
            "reports/eval.json).", max_items=20),
    }),
    "dataset": obj("Report of the validation and cleaning step.", {
        "examplesRead": integer("Records read from the sources.", minimum=0, format="int64"),
        "rejected": integer("Records rejected as invalid.", minimum=0, format="int64"),
        "duplicatesRemoved": integer("Exact duplicates removed.", minimum=0, format="int64"),
        "nearDuplicatesRemoved": integer("Near-duplicates removed.", minimum=0, format="int64"),
        "trainExamples": integer("Examples in the final training set.", minimum=0,
                                 format="int64"),
        "evalExamples": integer("Examples in the final evaluation set.", minimum=0,
                                format="int64"),
        "contentHash": string("sha256 of the cleaned training and evaluation sets.",
                              max_length=128),
        "truncated": integer("Examples truncated to training.maxSeqLength.", minimum=0,
                             format="int64"),
        "droppedTooLong": integer("Examples dropped for exceeding training.maxSeqLength "
                                  "(lengthPolicy drop).", minimum=0, format="int64"),
        "droppedNoTrainableTokens": integer("Examples removed because truncation left no "
                                            "token to train on.", minimum=0, format="int64"),
        "mixExamples": integer("Training examples that came from dataset.mix.", minimum=0,
                               format="int64"),
        "tokenLengthPercentiles": obj("Token lengths of the cleaned examples.", {
            "p50": integer("Median length.", minimum=0),
            "p90": integer("90th percentile.", minimum=0),
            "p99": integer("99th percentile.", minimum=0),
            "max": integer("Longest example.", minimum=0),
        }),
        "tokenLengthsApproximate": boolean("True when lengths were estimated from words, "
                                           "without the model's tokenizer."),
        "promptFormat": string("How the prompts were presented to the model: chat-template (the "
                               "model's chat template or dataset.chatTemplate's: chat records, and "
                               "instruction and completion records as user/assistant turns; ask "
                               "through /v1/chat/completions), alpaca (instruction records of a "
                               "model without a chat template: the Alpaca prompt) or raw (prompts "
                               "as they are).", enum=["chat-template", "alpaca", "raw"]),
        "firstErrors": array(string("An error, with its line and field.", max_length=1024),
                             "The first errors found in the data.", max_items=20),
        "warnings": array(string("A warning about the data.", max_length=1024),
                          "Warnings (few examples, unbalanced categories).", max_items=20),
        "problems": array(string("Why the data cannot be used.", max_length=1024),
                          "Why the data is unusable, when it is.", max_items=20),
    }),
    "checkpoints": obj("Checkpoints on the job volume.", {
        "latest": string("Path of the newest complete checkpoint.", max_length=LONG),
        "best": string("Path of the best checkpoint by training.metricForBestModel.",
                       max_length=LONG),
        "count": integer("Complete checkpoints on the volume.", minimum=0),
        "kept": array(obj("A complete checkpoint on the volume and the training metrics logged "
                          "last before it was saved.", {
            "step": integer("Optimizer step it was saved at.", minimum=0, format="int64"),
            "savedAt": timestamp("When it was marked complete."),
            "trainLoss": number("Training loss logged last before it."),
            "evalLoss": number("Evaluation loss logged last before it."),
            "meanTokenAccuracy": number("Share of answer tokens predicted right (training, "
                                        "logged last before it).", minimum=0, maximum=1),
            "evalMeanTokenAccuracy": number("The same on the evaluation set.", minimum=0,
                                            maximum=1),
        }, required=["step"]), "Every complete checkpoint on the volume, oldest first (the "
            "newest 100 when more are kept).", max_items=100),
    }),
    "artifacts": obj("Where the results are.", {
        "adapter": string("Path of the adapter on the job volume (LoRA/QLoRA).", max_length=LONG),
        "merged": string("Path of the merged or fully fine-tuned model on the job volume.",
                         max_length=LONG),
        "volume": string("PersistentVolumeClaim holding the artifacts.", max_length=SHORT),
        "pushed": string("Where the artifacts were published (output.push.uri).", max_length=LONG),
        "pushError": string("Why publishing to output.push.uri failed after its retries (the job "
                            "still succeeded; the Pushed condition says it too).", max_length=1024),
        # serving #21: the train/serve prompt check
        "promptRenderings": array(obj("How the trainer rendered the prompt part of one eval example "
                                      "(also in artifacts/prompt_renderings.json).", {
            "messages": array(obj("A chat message.", {
                "role": string("Its role.", max_length=64),
                "content": string("Its text.", max_length=4096),
            }), "The conversation before the answer (chat data).", max_items=32),
            "prompt": string("The prompt text (prompt/completion and instruction data).", max_length=8192),
            "text": string("The prompt as rendered (the chat template applied).", max_length=16384),
            "tokenIds": array(integer("A token id.", minimum=0), "Its token ids.", max_items=1024),
        }), "The first eval examples' prompts as training saw them; an InferenceService serving the "
            "adapter checks that vLLM renders them the same (condition PromptFormatMismatch).",
            max_items=3),
    }),
    "sources": array(obj("A remote source the trainer downloaded onto the job volume.", {
        "location": string("The source as the spec names it.", max_length=LONG),
        "path": string("Where it is on the job volume.", max_length=LONG),
        "sha256": string("sha256 of its bytes (of a folder: of its files' paths and sha256s, "
                         "sorted).", max_length=64),
        "bytes": integer("Its size in bytes.", minimum=0, format="int64"),
    }), "s3:// and https:// sources as downloaded (the model card lists them too).", max_items=8),
    "attempts": integer("Trainer attempts: the trainer Job's pods created, per node (the first is counted when the Job is created).", minimum=0),
    "restarts": integer("Restarts that resumed from a checkpoint (preemptions, node loss).",
                        minimum=0),
    "gpuHours": number("GPU hours used so far.", minimum=0),
    "gpuSecondsByPod": {"type": "object", "maxProperties": 512,
                        "description": "GPU seconds counted so far per trainer pod uid, written with "
                                       "gpuHours: a pod deleted later (a retry, suspend, a lost node) "
                                       "keeps counting.",
                        "additionalProperties": {"type": "number", "minimum": 0}},
    "estimatedCost": string("Estimated cost of the GPU hours, with its currency (e.g. 12.40 USD).",
                            max_length=64),
    "trainerJob": string("Name of the trainer batch/v1 Job.", max_length=SHORT),
    "trainerImage": string("The trainer image the first trainer Job ran, resolved once (spec.resources.image "
                           "or the operator's --trainer-image); a Job created again (resume, Kueue, a new "
                           "operator version) runs the same one.", max_length=LONG),
    "tracking": obj("The experiment trackers' runs (spec.tracking), written by the trainer.", {
        tracker: obj(f"The {tracker} run.", {
            "state": string("Logging, or Unavailable (the tracker could not be reached or failed; "
                            "training went on without it).", enum=["Logging", "Unavailable"]),
            "message": string("Why the tracker is unavailable.", max_length=1024),
            **fields,
        }) for tracker, fields in {
            "mlflow": {
                "trackingUri": string("The tracking server (without credentials).", max_length=LONG),
                "experiment": string("The experiment.", max_length=500),
                "runId": string("The run's id.", max_length=128),
                "runUrl": string("The run in the MLflow UI.", max_length=LONG),
                "adapterArtifact": string("Artifact path of the uploaded adapter.", max_length=LONG),
            },
            "tensorboard": {
                "logDir": string("Folder of the event files on the job volume.", max_length=LONG),
            },
            "wandb": {
                "mode": string("online or offline.", enum=["online", "offline"]),
                "project": string("The W&B project.", max_length=128),
                "runDir": string("The run folder on the job volume.", max_length=LONG),
                "runUrl": string("The run on the W&B server (online mode).", max_length=LONG),
                "adapterArtifact": string("Name of the uploaded adapter artifact.", max_length=LONG),
            },
        }.items()
    }),
    "inferenceService": obj("The InferenceService serving the result.", {
        "name": string("Its name.", max_length=SHORT),
        "url": string("OpenAI-compatible base URL.", max_length=LONG),
    }),
    "comparison": obj("Base vs fine-tuned, measured through one vLLM server after training "
                      "(spec.evaluation.comparison), written by the comparison Job.", {
        "state": string("Measured, or Unavailable (vLLM could not serve; message says why).",
                        enum=["Measured", "Unavailable"]),
        "message": string("What was measured, or why nothing was.", max_length=LONG),
        "prompts": integer("Evaluation prompts asked.", minimum=0),
        "samples": integer("Eval-set records asked.", minimum=0),
        "report": string("Where the full report (every answer) is: comparison.json on the job "
                         "volume.", max_length=LONG),
        "rows": array(obj("One model's row of the table.", {
            "model": string("base or fine-tuned.", enum=["base", "fine-tuned"]),
            "servedAs": string("The model name it was served as.", max_length=SHORT),
            "exactMatch": number("Share of answers equal to their reference.", minimum=0,
                                 maximum=1),
            "patternMatch": number("Share of answers matching their reference (a regex or a "
                                   "substring).", minimum=0, maximum=1),
            "bleu": number("Corpus BLEU (0-100).", minimum=0),
            "rougeL": number("ROUGE-L F1.", minimum=0, maximum=1),
            "evalLoss": number("Mean token loss of the sampled eval answers (from vLLM's "
                               "prompt log-probabilities)."),
            "latencyP50Ms": number("Median request latency in milliseconds.", minimum=0),
            "latencyP95Ms": number("95th percentile request latency in milliseconds.", minimum=0),
            "outputTokensPerSecond": number("Output tokens per second of request time.",
                                            minimum=0),
            "costPer1kOutputTokens": string("Cost of 1,000 output tokens at the operator's GPU-hour "
                                            "price (only when a price is set).", max_length=64),
        }, required=["model"]), "One row per model, base first.", max_items=2),
    }),
})


def _immutable_once_started(section: str) -> Schema:
    old, new = f"oldSelf.spec.{section}", f"self.spec.{section}"
    return rule(
        f"!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
        f"(has({new}) == has({old}) && (!has({new}) || {new} == {old}))",
        f"spec.{section} is immutable once training started (status.startTime is set); only "
        f"spec.suspend, spec.deploy and spec.ttlSecondsAfterFinished may change. Create a new "
        f"FineTuneJob to change it",
        reason="FieldValueForbidden", field_path=f".spec.{section}")


def _printer_columns_finetunejob() -> list[dict]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
        {"name": "Method", "type": "string", "jsonPath": ".spec.method.type"},
        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
         "description": "Percent of training steps done"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.metrics.trainLoss"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Epoch", "type": "number", "jsonPath": ".status.progress.epoch", "priority": 1},
        {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerNode",
         "priority": 1},
        {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes", "priority": 1},
        {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds",
         "description": "Seconds to the end of training", "priority": 1},
        {"name": "Reason", "type": "string",
         "jsonPath": ".status.conditions[?(@.type==\"Running\")].reason", "priority": 1},
    ]


def _root(spec: Schema, status: Schema, description: str, rules: list[Schema] | None = None) -> Schema:
    schema: Schema = {
        "type": "object",
        "description": description,
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }
    if rules:
        schema["x-kubernetes-validations"] = rules
    return schema


FINETUNEJOB_SCHEMA = _root(
    FINETUNEJOB_SPEC, FINETUNEJOB_STATUS,
    "FineTuneJob validates a dataset, fine-tunes a language model on it (full, LoRA or QLoRA), "
    "keeps checkpoints, evaluates the result and optionally serves it.",
    rules=[_immutable_once_started(section) for section in IMMUTABLE_SECTIONS],
)


# --- InferenceService ------------------------------------------------------------------------

INFERENCESERVICE_CONDITIONS = ["Ready", "Progressing", "Degraded", "Promoted", "PromptFormatMismatch"]

INFERENCESERVICE_SPEC = obj("Desired state of an InferenceService: a vLLM OpenAI-compatible server "
                            "for a base model with LoRA adapters, or for a merged model.", {
    "model": MODEL,
    "adapters": array(obj("A LoRA adapter served next to the base model.", {
        "name": string("Name clients use in the OpenAI API (model field).", min_length=1,
                       max_length=128, pattern=r"^[-A-Za-z0-9_.]+$"),
        "fineTuneJobRef": local_ref("FineTuneJob whose adapter is served (same namespace)."),
        "path": location("Adapter location instead of a FineTuneJob: " + SOURCE_HELP + ".", SOURCE_HELP,
                         MODEL_SOURCE),
        # serving #21: promotion gated on evaluation
        "promotion": obj("Gate a new version of this adapter (fineTuneJobRef changed to another "
                         "FineTuneJob) on evaluation: it is loaded as <name>-candidate, both "
                         "versions are scored through the server on the new job's "
                         "evaluation.prompts that have a reference, and the name switches to it only "
                         "when it wins; otherwise the current version keeps serving and condition "
                         "Promoted=False (CandidateRefused) names both scores.", {
            "metric": string("What decides: evalLoss, the mean negative log-likelihood of the "
                             "references' tokens given the prompts (lower wins).",
                             default="evalLoss", enum=["evalLoss"]),
            "requireImprovementOver": string("What the candidate must beat: current, the version "
                                             "serving now.", default="current", enum=["current"]),
            "margin": number("How much better it must be (candidate evalLoss <= current evalLoss - "
                             "margin).", default=0.0, minimum=0.0),
        }),
    }, required=["name"], rules=[
        rule("has(self.fineTuneJobRef) != has(self.path)",
             "spec.adapters[]: set exactly one of fineTuneJobRef or path"),
        rule("!has(self.promotion) || has(self.fineTuneJobRef)",
             "spec.adapters[].promotion needs fineTuneJobRef (versions are FineTuneJobs)",
             field_path=".promotion"),
    ]), "LoRA adapters to serve.", default=[], max_items=64, list_type="map")
    | {"x-kubernetes-list-map-keys": ["name"]},
    "mergedModel": obj("Serve a merged (or fully fine-tuned) model instead of model.source.", {
        "fineTuneJobRef": local_ref("FineTuneJob whose merged model is served."),
        "path": location("Merged model location: " + SOURCE_HELP + ".", SOURCE_HELP, MODEL_SOURCE),
    }, rules=[
        rule("has(self.fineTuneJobRef) != has(self.path)",
             "spec.mergedModel: set exactly one of fineTuneJobRef or path"),
    ]),
    "replicas": integer("vLLM replicas (ignored when autoscaling is set).", default=1, minimum=0,
                        maximum=64),
    "resources": obj("Compute per replica.", {
        "gpus": integer("GPUs per replica (nvidia.com/gpu); 0 serves on CPU.", default=1,
                        minimum=0, maximum=16),
        "cpu": quantity("CPU request and limit per replica."),
        "memory": quantity("Memory request and limit per replica."),
        "nodeSelector": string_map("Node labels the pods must match."),
        "tolerations": array(TOLERATION, "Tolerations for the pods.", max_items=32),
        "affinity": free_form("core/v1 Affinity for the pods, passed through verbatim."),
        "priorityClassName": name("PriorityClass of the pods."),
    }, default={}),
    "vllm": VLLM,
    "autoscaling": obj("Scale on vllm:num_requests_waiting (needs KEDA or prometheus-adapter).", {
        "minReplicas": integer("Fewest replicas. 0 (scale to zero) needs KEDA; with the HPA "
                               "(no KEDA) the floor is 1, as autoscaling/v2 refuses 0.",
                               default=1, minimum=0, maximum=64),
        "maxReplicas": integer("Most replicas.", minimum=1, maximum=64),
        "targetRequestsWaiting": integer("Waiting requests per replica that trigger scale-out.",
                                         default=4, minimum=1, maximum=10000),
    }, required=["maxReplicas"], rules=[
        rule("self.minReplicas <= self.maxReplicas",
             "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
             field_path=".minReplicas"),
    ]),
}, required=["model"], rules=[
    rule("!has(self.mergedModel) || size(self.adapters) == 0",
         "spec.adapters are not allowed with spec.mergedModel (a merged model has no adapters)",
         field_path=".adapters"),
    rule("!has(self.vllm) || self.vllm.tensorParallelSize <= self.resources.gpus || "
         "(self.resources.gpus == 0 && self.vllm.tensorParallelSize == 1)",
         "spec.vllm.tensorParallelSize must not exceed spec.resources.gpus", field_path=".vllm"),
])

INFERENCESERVICE_STATUS = obj("Observed state of an InferenceService.", {
    "phase": string("Summary of the conditions.", enum=["Pending", "Progressing", "Ready",
                                                         "Degraded", "Failed"]),
    "conditions": conditions(INFERENCESERVICE_CONDITIONS),
    "observedGeneration": integer("metadata.generation the status reflects.", minimum=0,
                                  format="int64"),
    "replicas": integer("Replicas created.", minimum=0),
    "readyReplicas": integer("Replicas passing their readiness probe.", minimum=0),
    "url": string("OpenAI-compatible base URL inside the cluster (http://<svc>.<ns>.svc:8000/v1).",
                  max_length=LONG),
    "servedModels": array(string("A model name.", max_length=SHORT),
                          "Names accepted in the OpenAI API's model field (base and adapters).",
                          max_items=128),
    "revision": string("Hash of the served configuration (changes trigger a rollout).",
                       max_length=128),
    # --- serving #21: adapters loaded at run time (kept together for merges) ---
    "replicaAdapters": array(obj("The adapters one ready replica has loaded (from its /v1/models).", {
        "pod": string("The pod.", max_length=SHORT),
        "adapters": array(obj("A loaded adapter.", {
            "name": string("Its name in the OpenAI API.", max_length=SHORT),
            "version": string("The version loaded: the FineTuneJob's uid, or the adapter's path.",
                              max_length=LONG),
        }), "Loaded adapters.", max_items=128),
        "error": string("Why the replica does not serve the spec's adapters (last attempt).",
                        max_length=LONG),
        "simulated": boolean("The pod runs on a simulated (kwok) node: nothing runs to ask, so it "
                             "is counted as serving the spec's adapters."),
    }), "Per ready replica, the adapters it has loaded; servedModels lists only what every "
        "ready replica serves.", max_items=64),
    "promotions": array(obj("The versions of an adapter with spec.adapters[].promotion.", {
        "name": string("The adapter.", max_length=SHORT),
        "fineTuneJob": string("The FineTuneJob whose adapter is served under the name.", max_length=SHORT),
        "version": string("Its uid.", max_length=SHORT),
        "candidate": string("The last candidate FineTuneJob scored (or being scored).", max_length=SHORT),
        "candidateVersion": string("Its uid.", max_length=SHORT),
        "result": string("Evaluating, Promoted or Refused.", enum=["Evaluating", "Promoted", "Refused"]),
        "currentEvalLoss": number("The serving version's evalLoss."),
        "candidateEvalLoss": number("The candidate's evalLoss."),
        "message": string("What was decided and why.", max_length=LONG),
    }), "Which version serves each gated adapter, and the last decision.", max_items=64),
})

INFERENCESERVICE_SCHEMA = _root(
    INFERENCESERVICE_SPEC, INFERENCESERVICE_STATUS,
    "InferenceService serves a base model with LoRA adapters, or a merged model, through vLLM's "
    "OpenAI-compatible API.")


# --- CRDs ------------------------------------------------------------------------------------


def _crd(kind: str, plural: str, short_names: list[str], schema: Schema,
         columns: list[dict]) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower(), "shortNames": short_names,
                      "categories": [CATEGORY]},
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": schema},
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
            }],
        },
    }


def finetunejob_crd() -> dict:
    return _crd("FineTuneJob", "finetunejobs", ["ftj"], FINETUNEJOB_SCHEMA,
                _printer_columns_finetunejob())


def inferenceservice_crd() -> dict:
    return _crd("InferenceService", "inferenceservices", ["ftisvc"], INFERENCESERVICE_SCHEMA, [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas",
         "description": "Replicas ready"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ])


def all_crds() -> list[dict]:
    return [finetunejob_crd(), inferenceservice_crd()]


# --- TrainerConfig (no CRD: the file the operator renders for the trainer) -------------------
# Sections the trainer shares with the spec are the very same nodes (method, dataset, training);
# the others are the spec's section minus what the trainer must not see (Secret references
# become names of environment variables) plus the trainer's own sections.

TRAINER_CONFIG_KIND = "TrainerConfig"

TRAINER_MODEL = obj("The base model as the trainer loads it (pvc:// sources already resolved to "
                    "paths on the pod).", {
    **{key: node for key, node in MODEL["properties"].items() if key != "tokenSecretRef"},
    "tokenEnv": string("Environment variable that holds the Hub token (filled from "
                       "spec.model.tokenSecretRef); never the token itself.", min_length=1,
                       max_length=128),
}, required=["source"])

TRAINER_EVALUATION = obj(EVALUATION["description"], {
    **EVALUATION["properties"],
    "promptsSource": string("A JSON-lines file of {prompt, reference} records answered next to "
                            "prompts (a path, or pvc:// / volume:// on the job volume).",
                            min_length=1, max_length=LONG),
}, default={})

TRAINER_OUTPUT = obj("What the trainer writes and publishes.", {
    "merge": OUTPUT["properties"]["merge"],
    "pushUri": string("Where to publish (spec.output.push.uri).", min_length=1, max_length=LONG),
    "pushTokenEnv": string("Environment variable that holds the push credentials.",
                           min_length=1, max_length=128),
    "pushPrivate": boolean("Create a Hub repository as private (spec.output.push.private).",
                           default=True),
    "resultsFile": string("Path on the pod where results.csv is also written "
                          "(spec.output.resultsFile).", min_length=1, max_length=LONG),
}, default={})

TRAINER_JOB_REF = obj("The FineTuneJob the trainer reports to.", {
    "name": string("Its name.", default="local", min_length=1),
    "namespace": string("Its namespace.", default="default", min_length=1),
    "uid": string("Its uid.", max_length=128),
}, default={})

TRAINER_PATHS = obj("Where the job volume is mounted (its layout: finetune_api.layout).", {
    "root": string("Mount path of the job volume.", default=layout.WORKSPACE, min_length=1,
                   max_length=LONG),
    "jobFolder": string("This job's own folder on the volume, relative to root: checkpoints, "
                        "artifacts, reports, the data cache and tracking files go there ('' is the "
                        "volume's top, for a claim of the job's own; jobs/<name> on a shared "
                        "storage.existingClaim).", default="", max_length=LONG),
}, default={})

TRAINER_REPORTING = obj("How the trainer reports progress.", {
    "statusPatch": boolean("Patch the FineTuneJob's status (needs in-cluster credentials).",
                           default=False),
    "metricsPort": integer("Port of the Prometheus /metrics server; unset: no server.",
                           minimum=1, maximum=65535),
    "statusInterval": number("Seconds between two status patches.", default=5.0, minimum=0),
    "reviewConfigMap": string("ConfigMap (created by the operator, owned by the job) into which "
                              "the comparison Job publishes the review page's material "
                              "(comparison.json, loss.png, dataset.json); unset: not published.",
                              min_length=1, max_length=SHORT),
}, default={})

_SPEC_MLFLOW, _SPEC_WANDB = TRACKING["properties"]["mlflow"], TRACKING["properties"]["wandb"]
TRAINER_TRACKING = obj("spec.tracking without its Secret references: the credentials reach the "
                       "trainer as the trackers' own environment variables (MLFLOW_TRACKING_TOKEN, "
                       "MLFLOW_TRACKING_USERNAME/PASSWORD, WANDB_API_KEY).", {
    "mlflow": obj(_SPEC_MLFLOW["description"], {
        key: node for key, node in _SPEC_MLFLOW["properties"].items() if key != "secretRef"},
        required=["trackingUri"]),
    "tensorboard": TRACKING["properties"]["tensorboard"],
    "wandb": obj(_SPEC_WANDB["description"], {
        key: node for key, node in _SPEC_WANDB["properties"].items() if key != "apiKeySecretRef"},
        required=["project"]),
    "logAdapter": TRACKING["properties"]["logAdapter"],
})

TRAINER_CONFIG = obj("The trainer's one input, rendered by the operator from a FineTuneJob.", {
    "job": TRAINER_JOB_REF,
    "model": TRAINER_MODEL,
    "method": METHOD,
    "dataset": DATASET,
    "training": TRAINING,
    "evaluation": TRAINER_EVALUATION,
    "output": TRAINER_OUTPUT,
    "paths": TRAINER_PATHS,
    "reporting": TRAINER_REPORTING,
    "tracking": TRAINER_TRACKING,
}, required=["model", "dataset"])


# --- Python class names ------------------------------------------------------------------------
# The generator names the dataclass of each object node after this table (one path per node;
# a node reused elsewhere keeps its name). A new object section needs one line here.

PYTHON_CLASSES: dict[str, dict[str, str]] = {
    "FineTuneJob": {
        "": "FineTuneJob",
        "spec": "FineTuneJobSpec",
        "spec.model": "Model",
        "spec.model.tokenSecretRef": "SecretKeyRef",
        "spec.method": "Method",
        "spec.method.lora": "LoRA",
        "spec.method.quantization": "Quantization",
        "spec.method.dpo": "Dpo",
        "spec.dataset": "Dataset",
        "spec.dataset.dedup": "Dedup",
        "spec.dataset.mix": "DatasetMix",
        "spec.dataset.chatTemplate": "ChatTemplate",
        "spec.training": "Training",
        "spec.training.earlyStopping": "EarlyStopping",
        "spec.evaluation": "Evaluation",
        "spec.evaluation.prompts[]": "EvalPrompt",
        "spec.evaluation.comparison": "Comparison",
        "spec.resources": "TrainerResources",
        "spec.resources.tolerations[]": "Toleration",
        "spec.storage": "Storage",
        "spec.output": "Output",
        "spec.output.push": "Push",
        "spec.output.push.tokenSecretRef": "SecretKeyRef",
        "spec.tracking": "Tracking",
        "spec.tracking.mlflow": "MlflowTracking",
        "spec.tracking.mlflow.secretRef": "LocalRef",
        "spec.tracking.tensorboard": "TensorboardTracking",
        "spec.tracking.wandb": "WandbTracking",
        "spec.tracking.wandb.apiKeySecretRef": "SecretKeyRef",
        "spec.objectStorage": "ObjectStorage",
        "spec.objectStorage.secretRef": "LocalRef",
        "spec.deploy": "Deploy",
        "spec.deploy.vllm": "DeployVLLM",
        "status": "FineTuneJobStatus",
        "status.conditions[]": "Condition",
        "status.progress": "Progress",
        "status.metrics": "TrainingMetrics",
        "status.evaluation": "EvaluationResults",
        "status.evaluation.preferenceAccuracy": "PreferenceAccuracy",
        "status.evaluation.scores": "GenerationScores",
        "status.evaluation.scores.base": "MetricScores",
        "status.evaluation.scores.finetuned": "MetricScores",
        "status.evaluation.evalSetScores": "EvalSetScores",
        "status.evaluation.evalSetScores.base": "MetricScores",
        "status.evaluation.evalSetScores.finetuned": "MetricScores",
        "status.evaluation.answers[]": "EvalAnswer",
        "status.dataset": "DatasetReport",
        "status.dataset.tokenLengthPercentiles": "TokenLengthPercentiles",
        "status.checkpoints": "Checkpoints",
        "status.checkpoints.kept[]": "KeptCheckpoint",
        "status.artifacts": "Artifacts",
        "status.artifacts.promptRenderings[]": "PromptRendering",
        "status.artifacts.promptRenderings[].messages[]": "RenderedMessage",
        "status.sources[]": "SourceDigest",
        "status.inferenceService": "Endpoint",
        "status.comparison": "ComparisonResult",
        "status.comparison.rows[]": "ComparisonRow",
        "status.tracking": "TrackingStatus",
        "status.tracking.mlflow": "MlflowRunStatus",
        "status.tracking.tensorboard": "TensorboardStatus",
        "status.tracking.wandb": "WandbRunStatus",
    },
    "InferenceService": {
        "": "InferenceService",
        "spec": "InferenceServiceSpec",
        "spec.adapters[]": "Adapter",
        "spec.adapters[].fineTuneJobRef": "LocalRef",
        "spec.mergedModel": "MergedModel",
        "spec.mergedModel.fineTuneJobRef": "LocalRef",
        "spec.resources": "ServingResources",
        "spec.vllm": "VLLM",
        "spec.autoscaling": "Autoscaling",
        "status": "InferenceServiceStatus",
        "status.conditions[]": "Condition",
        "status.replicaAdapters[]": "ReplicaAdapters",
        "status.promotions[]": "AdapterPromotion",
        "spec.adapters[].promotion": "Promotion",
        "status.replicaAdapters[].adapters[]": "LoadedAdapter",
    },
    "TrainerConfig": {
        "": "TrainerConfig",
        "job": "JobRef",
        "model": "ModelConfig",
        "evaluation": "EvaluationConfig",
        "output": "OutputConfig",
        "paths": "PathsConfig",
        "reporting": "ReportingConfig",
        "tracking": "TrackingConfig",
        "tracking.mlflow": "MlflowTrackingConfig",
        "tracking.tensorboard": "TensorboardTracking",
        "tracking.wandb": "WandbTrackingConfig",
    },
}
