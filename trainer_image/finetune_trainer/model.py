"""Loading the base model and tokenizer, and wrapping the model for the chosen method.

full: every weight trains (fp32 master weights, mixed precision on top).
lora: the base is frozen (in the compute dtype) and PEFT LoRA adapters train.
qlora: the base is quantized to 4 bits with bitsandbytes (CUDA only) and LoRA trains.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, MethodConfig, ModelConfig, TrainerConfig

log = logging.getLogger(__name__)

# vLLM serves LoRA only on the transformer's linear layers: an adapter that trains (or
# saves whole copies of) the embeddings or the head is rejected at load time.
VLLM_UNSUPPORTED_LORA_TARGETS = ("lm_head", "embed_tokens", "wte", "wpe", "embed_out")


@dataclass(frozen=True)
class Precision:
    """What the config asked for and what this device will really do."""

    requested: str
    effective: str  # bf16 | fp16 | fp32

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.effective]


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a probe missing on this build means "no"
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> Precision:
    import torch

    if requested == "fp32":
        return Precision(requested, "fp32")
    if torch.cuda.is_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("precision bf16 requested but this GPU has no bf16 support; using fp16")
            return Precision(requested, "fp16")
        return Precision(requested, requested)
    if requested == "bf16" and cpu_supports_bf16():
        return Precision(requested, "bf16")
    log.warning("precision %s requested but this CPU has no native %s support; training in fp32",
                requested, requested)
    return Precision(requested, "fp32")


def check_method_supported(method: MethodConfig) -> None:
    """Fail at once, before any data or model is loaded, on what this device cannot do."""
    if method.type == "qlora":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "method.type qlora needs a CUDA GPU: bitsandbytes 4-bit quantization does not run "
                "on CPU. Request GPUs (resources.gpusPerNode) or use method.type lora."
            )
    if method.lora is not None:
        bad = [t for t in method.lora.target_modules if t in VLLM_UNSUPPORTED_LORA_TARGETS]
        if bad:
            raise ConfigError(
                f"method.lora.targetModules: {', '.join(bad)} cannot be served by vLLM; "
                "target the attention/MLP linear layers (or all-linear)"
            )
        if method.lora.bias != "none":
            raise ConfigError("method.lora.bias: only 'none' can be served by vLLM")


def model_location(model: ModelConfig, resolve=lambda s: s) -> tuple[str, dict[str, Any]]:
    """The `from_pretrained` name and kwargs for a model source (local path, hf:// or hub id)."""
    source = resolve(model.source)
    if source.startswith("hf://"):
        source = source[len("hf://"):]
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if not Path(source).exists():
        if model.revision:
            kwargs["revision"] = model.revision
        if model.token_env:
            token = os.environ.get(model.token_env)
            if not token:
                log.warning("model.tokenEnv names %s, which is not set; loading without a token",
                            model.token_env)
            kwargs["token"] = token or None
    return source, kwargs


def load_tokenizer(cfg: TrainerConfig):
    from transformers import AutoTokenizer

    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    from .chat_templates import select

    select(tokenizer, cfg.dataset.chat_template, cfg.paths.resolve)  # saved with the artifacts
    if tokenizer.pad_token is None:
        # Padding with EOS would mask the EOS labels too; a model without a pad token is
        # trained with EOS as pad only as a last resort (TRL does the same).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: TrainerConfig, precision: Precision):
    """The model ready to hand to the trainer (PEFT-wrapped for lora/qlora)."""
    model = load_base_model(cfg, precision)
    if cfg.method.type == "full":
        return model
    from peft import get_peft_model

    model = get_peft_model(model, adapter_config(cfg, model))
    if cfg.training.gradient_checkpointing:
        model.enable_input_require_grads()
    check_adapter_model(cfg, model)
    return model


# How many GPUs the operator gave this pod (spec.resources.gpusPerNode); 0 or unset: CPU.
ENV_GPUS = "FINETUNE_GPUS_PER_NODE"
NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")


class GPUUnavailable(RuntimeError):
    """GPUs were asked for and CUDA cannot use them (no driver, a driver too old for the CUDA
    the wheels were built for, devices not visible): training on CPU instead would be silent
    and hundreds of times slower, and retrying on the same node gives the same result."""


def check_gpus_usable() -> None:
    """Fail fast, with the driver's and CUDA's versions, when the pod was given GPUs that
    torch cannot use."""
    wanted = int(os.environ.get(ENV_GPUS, "0") or 0)
    if wanted <= 0:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= wanted:
        return
    try:
        driver = NVIDIA_DRIVER_VERSION.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        driver = f"no NVIDIA kernel driver ({NVIDIA_DRIVER_VERSION} is missing)"
    why = ""
    if not visible:
        try:
            torch.cuda.init()
        except Exception as exc:  # noqa: BLE001 - its message is the reason, whatever its type
            why = f"; torch says: {str(exc).strip()[:400]}"
    raise GPUUnavailable(
        f"spec.resources.gpusPerNode asks for {wanted} GPU(s) but CUDA sees {visible}: driver: {driver}; "
        f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none (a CPU build)'}"
        f"{why}. Use a node whose NVIDIA driver supports that CUDA version, or a trainer image built "
        f"for the driver's CUDA")


def varlen_attention() -> str | None:
    """The variable-length attention kernel packing can use, as transformers names it, or None:
    flash-attn 2 on a CUDA device when installed."""
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def quantization_config(quant):
    """bitsandbytes' config for method.quantization: `bits` 4 (the only value the schema
    admits), quantType, doubleQuant, and computeDtype for the matmuls and the weights' storage."""
    from transformers import BitsAndBytesConfig

    if quant.bits != 4:
        raise ConfigError(f"method.quantization.bits: {quant.bits} is not supported (4 only)")
    compute = Precision(quant.compute_dtype, quant.compute_dtype).torch_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,
    )


def load_base_model(cfg: TrainerConfig, precision: Precision):
    """The base model as the method trains it: fp32 for full, the compute dtype for lora,
    4-bit and prepared for k-bit training for qlora. Not yet wrapped with adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    method = cfg.method
    if cfg.training.packing != "off" and (kernel := varlen_attention()):
        kwargs["attn_implementation"] = kernel  # what makes packed rows cheap
    if method.type == "full":
        # fp32 master weights; mixed precision autocasts the compute.
        kwargs["dtype"] = torch.float32
    elif method.type == "lora":
        kwargs["dtype"] = precision.torch_dtype
    else:
        kwargs["quantization_config"] = quantization_config(method.quantization)
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        gc = cfg.training.gradient_checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc,
            gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None)
    return model


def adapter_config(cfg: TrainerConfig, model):
    """PEFT's LoraConfig for the method's lora section (all-linear as vLLM-readable names)."""
    from peft import LoraConfig

    method = cfg.method
    targets = method.lora.target_modules
    return LoraConfig(
        r=method.lora.r,
        lora_alpha=method.lora.alpha,
        lora_dropout=method.lora.dropout,
        target_modules=linear_layer_names(model) if targets == ["all-linear"] else list(targets),
        bias=method.lora.bias,
        task_type="CAUSAL_LM",
    )


def check_adapter_model(cfg: TrainerConfig, model) -> None:
    """Refuse an adapter vLLM cannot load; log what trains."""
    if getattr(model.peft_config["default"], "modules_to_save", None):
        raise ConfigError("the LoRA config would save whole modules (modules_to_save); vLLM rejects that")
    lora = model.peft_config["default"]
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%s alpha=%s on %s: %d of %d parameters train (%.2f%%)", lora.r, lora.lora_alpha,
             lora.target_modules, trainable, total, 100.0 * trainable / max(total, 1))
    if cfg.method.lora.r > 16:
        log.warning("LoRA rank %d is above vLLM's default --max-lora-rank 16; serving must raise it",
                    cfg.method.lora.r)


def linear_layer_names(model) -> list[str]:
    """`all-linear` as short names (q_proj, ...): what PEFT means by it, in the form vLLM
    reads from adapter_config.json (PEFT would otherwise write every layer's full path)."""
    output = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is output or not name:
            continue
        # torch.nn.Linear, and bitsandbytes' Linear4bit/Linear8bitLt under QLoRA.
        if type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    names -= set(VLLM_UNSUPPORTED_LORA_TARGETS)
    if not names:
        raise ConfigError("method.lora.targetModules all-linear: the model has no linear layers to adapt")
    return sorted(names)


def load_base_for_inference(cfg: TrainerConfig, dtype=None):
    """The untouched base model, unquantized, for merging adapters and base-vs-tuned evals."""
    import torch
    from transformers import AutoModelForCausalLM

    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    kwargs["dtype"] = dtype or torch.float32
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)
