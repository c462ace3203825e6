"""A tiny Llama-architecture model, built locally, for tests and the demo.

No model can come from a hub here, so tests and the local demo use a randomly
initialised Llama (hidden 128, 2 heads of 64, 2 layers) with a 512-token byte-level
BPE tokenizer trained on a small built-in corpus. It is saved with `save_pretrained`,
so transformers, PEFT, TRL and vLLM (CPU; head_dim 64 is what its attention backend
accepts) all load it like any other checkpoint.

The chat template is ChatML with `{% generation %}` tags around the assistant's turns,
so TRL's `assistant_only_loss` can mask everything else.

Building is idempotent: the output folder records a hash of everything that shapes
the model (the spec below, the corpus, the seed); a folder with the same hash is reused.

    python -m finetune_devcluster.tiny_model OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML; the assistant's content and its closing tag are the trainable part.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

MODEL_SPEC = {
    "vocab_size": 512,
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}

# A few hundred words of plain English plus the shapes the demo data uses (questions,
# answers, numbers, JSON-ish punctuation), enough for 512 merges to be meaningful.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model learns to answer questions from examples of questions and answers.",
    "Instruction: translate the sentence into French. Response: Bonjour, le monde.",
    "What is the capital of France? The capital of France is Paris.",
    "What is two plus two? Two plus two is four.",
    "Summarize the text in one sentence.",
    "Write a short poem about the sea and the sky.",
    "The operator creates a job, the job trains the model, and the model is served.",
    "Kubernetes schedules pods onto nodes; each pod runs one or more containers.",
    "Fine-tuning adapts a pretrained language model to a new task with a small dataset.",
    "You are a helpful assistant. Answer briefly and politely.",
    "user: hello there! assistant: Hello! How can I help you today?",
    "Please list three colors: red, green, blue.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 3.14 -1",
    "The weather today is sunny with a light breeze in the afternoon.",
    "She said, \"I will be there at 10:30.\" He replied: 'Fine, see you then.'",
    "Learning rate, batch size, and the number of epochs are hyperparameters.",
    "A checkpoint stores the weights, the optimizer state and the scheduler state.",
    "Reverse the word: cat -> tac, dog -> god, star -> rats.",
    "Question: Is water wet? Answer: Yes.",
    "Question: Is fire cold? Answer: No.",
    "{\"instruction\": \"Say hi\", \"output\": \"hi\"} [1, 2, 3] (a, b) <tag> #1 @user 50% $5 & more",
    "The cat sat on the mat. The dog sat on the log. The bird sat on the wire.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "January February March April May June July August September October November December",
    "one two three four five six seven eight nine ten eleven twelve twenty hundred",
    "This is a test. This is only a test. Tests should be small, fast and clear.",
    "Once upon a time there was a small robot who wanted to learn how to write stories.",
]
# Every printable character appears at least once, so no common character is split oddly.
CORPUS.append(string.printable)

HASH_FILE = ".tiny-model-hash"
BUILDER_VERSION = 1


def tiny_model_hash(seed: int = 0) -> str:
    """The content hash a tiny model built with `seed` is keyed by."""
    payload = json.dumps(
        {
            "version": BUILDER_VERSION,
            "spec": MODEL_SPEC,
            "corpus": CORPUS,
            "special": SPECIAL_TOKENS,
            "template": CHAT_TEMPLATE,
            "seed": seed,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MODEL_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so frequent words win merges over one-off strings.
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_SPEC["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(folder: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    if len(tokenizer) > MODEL_SPEC["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than the vocab")
    torch.manual_seed(seed)
    config = LlamaConfig(
        **MODEL_SPEC,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def build_tiny_model(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Build the tiny model into `out_dir` (or reuse it if already built) and return it."""
    out = Path(out_dir)
    digest = tiny_model_hash(seed)
    marker = out / HASH_FILE
    if marker.is_file() and marker.read_text().strip() == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and swap it in, so a concurrent reader never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_into(staging, seed)
        (staging / HASH_FILE).write_text(digest + "\n")
        # mkdtemp makes a private folder; the model is read by other users (vLLM's pod).
        staging.chmod(0o755)
        for child in staging.iterdir():
            child.chmod(0o644)
        if marker.is_file() and marker.read_text().strip() == digest:
            return out  # another process won the race
        if out.exists():
            shutil.rmtree(out)
        try:
            staging.rename(out)
        except OSError:
            if not (marker.is_file() and marker.read_text().strip() == digest):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def default_cache_dir(seed: int = 0) -> Path:
    """Where tests and the demo keep the tiny model between runs."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "finetune-operator" / f"tiny-model-{tiny_model_hash(seed)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", help="default: the shared cache folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out_dir or default_cache_dir(args.seed), seed=args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
