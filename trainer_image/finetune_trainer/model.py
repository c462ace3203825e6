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


# training.sharding auto: shard once the training state one process would hold passes this
# share of one GPU's memory (activations, the CUDA context and fragmentation need the rest).
SHARDING_MEMORY_FRACTION = 0.6
# Bytes per model parameter that every process holds without sharding in full fine-tuning:
# fp32 weights, fp32 gradients and AdamW's two fp32 moments.
REPLICATED_BYTES_PER_PARAMETER = 16


def choose_sharding(mode: str, *, method: str, objective: str, world_size: int,
                    gpu_memory: int | None, parameters: int | None, launched: bool = False) -> bool:
    """Whether training shards the model with FSDP (training.sharding).

    `fsdp` is refused where it cannot work: one process has nothing to shard across (unless
    the launcher started that one process, as `make gpu-check` does on one GPU: FSDP then runs
    over a mesh of one, the same code path with nothing sharded), and only full fine-tuning
    with sft is sharded (an FSDP-wrapped LoRA model hung after training in the CPU check).
    `auto` shards full fine-tuning on several GPUs when the replicated state
    (REPLICATED_BYTES_PER_PARAMETER) would take more than SHARDING_MEMORY_FRACTION of one
    GPU's memory; never on CPU, with one process, or for lora/qlora/dpo."""
    if mode == "none":
        return False
    if mode == "fsdp":
        if world_size < 2 and not launched:
            raise ConfigError("training.sharding fsdp needs at least 2 training processes "
                              "(resources.nodes x resources.gpusPerNode); this run has 1")
        if method != "full" or objective != "sft":
            raise ConfigError("training.sharding fsdp is for sft with method.type full; "
                              f"this run is {method}/{objective}")
        return True
    if world_size < 2 or not gpu_memory or not parameters or method != "full" or objective != "sft":
        return False
    return parameters * REPLICATED_BYTES_PER_PARAMETER > SHARDING_MEMORY_FRACTION * gpu_memory


_SHARDING: dict[str, bool] = {}


def sharding_enabled(cfg: TrainerConfig) -> bool:
    """choose_sharding for this run and this device, decided once per process."""
    key = cfg.model.source
    if key not in _SHARDING:
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        gpu_memory = parameters = None
        if cfg.training.sharding == "auto" and world > 1 and torch.cuda.is_available():
            gpu_memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
            parameters = count_parameters(cfg)
        _SHARDING[key] = choose_sharding(cfg.training.sharding, method=cfg.method.type,
                                         objective=cfg.method.objective, world_size=world,
                                         gpu_memory=gpu_memory, parameters=parameters,
                                         launched="TORCHELASTIC_RUN_ID" in os.environ)
        log.info("sharding %s (asked %s)", "fsdp" if _SHARDING[key] else "none", cfg.training.sharding)
    return _SHARDING[key]


def count_parameters(cfg: TrainerConfig) -> int:
    """The model's parameter count from its config, without loading a weight (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    config = AutoConfig.from_pretrained(name, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def fsdp_arguments(gradient_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments for FSDP2 (torch's fully_shard through accelerate): every decoder layer
    sharded, sharded checkpoints (each rank writes its shard; resume reads them back), and
    activation checkpointing by FSDP itself instead of transformers' gradient checkpointing
    (which would all-gather the weights a second time in the backward pass)."""
    return {"fsdp": True, "gradient_checkpointing": False, "gradient_checkpointing_kwargs": None,
            "fsdp_config": {"version": 2, "reshard_after_forward": True,
                            "state_dict_type": "SHARDED_STATE_DICT",
                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "activation_checkpointing": gradient_checkpointing}}


def enable_fsdp_on_cpu(args) -> None:
    """Let accelerate shard on CPU processes (gloo) too: it enables its FSDP plugin only for
    GPU-like devices, although torch's fully_shard and sharded checkpoints work on CPU. Called
    after the TrainingArguments set up the process group, before the trainer's Accelerator
    reads the shared state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    partial = PartialState()
    if partial.distributed_type != DistributedType.MULTI_CPU or args.fsdp_plugin_args is None:
        return
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    partial.distributed_type = DistributedType.FSDP
    state = AcceleratorState(mixed_precision="bf16" if args.bf16 else "no", fsdp_plugin=plugin,
                             dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
    state.distributed_type = DistributedType.FSDP
    if args.bf16:
        plugin.set_mixed_precision("bf16")
    state.fsdp_plugin = plugin


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


def native_dtype(cfg: TrainerConfig, fallback: str = "fp32"):
    """The dtype the base model's weights are stored in (its config.json), or `fallback` (a
    precision name) when the config does not say."""
    import torch
    from transformers import AutoConfig

    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    config = AutoConfig.from_pretrained(name, **kwargs)
    return artifact_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
                          Precision(fallback, fallback).torch_dtype)


def artifact_dtype(config_dtype, fallback):
    """What artifacts and inference copies are kept in: the model's own floating dtype."""
    import torch

    if isinstance(config_dtype, str):
        config_dtype = getattr(torch, config_dtype.replace("torch.", ""), None)
    return config_dtype if config_dtype in (torch.float32, torch.bfloat16, torch.float16) else fallback


def inference_placement(dtype, *, cuda: bool, cpu_bf16: bool):
    """(device, dtype) for a model that only runs forward passes (merge, evaluation): the GPU
    in the model's own dtype when there is one; on a CPU, half precision only where the CPU
    computes it natively (emulated bf16 is slower than fp32, and CPUs have no fast fp16)."""
    import torch

    if cuda:
        return "cuda", dtype
    if dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_bf16):
        return "cpu", dtype
    return "cpu", torch.float32


def load_base_for_inference(cfg: TrainerConfig, dtype=None):
    """The untouched base model, unquantized, for merging adapters and base-vs-tuned evals:
    on the GPU when there is one, in the model's own dtype (inference_placement), or in
    `dtype` when given."""
    import torch
    from transformers import AutoModelForCausalLM

    device, native = inference_placement(native_dtype(cfg, cfg.training.precision),
                                         cuda=torch.cuda.is_available(), cpu_bf16=cpu_supports_bf16())
    name, kwargs = model_location(cfg.model, cfg.paths.resolve)
    kwargs["dtype"] = dtype or native
    return AutoModelForCausalLM.from_pretrained(name, **kwargs).to(device)


def load_saved_for_inference(folder: str | os.PathLike):
    """A saved model (an artifact) for forward passes, placed by inference_placement."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    device, dtype = inference_placement(model.dtype, cuda=torch.cuda.is_available(), cpu_bf16=cpu_supports_bf16())
    return model.to(device=device, dtype=dtype)
