# syntax=docker/dockerfile:1
# The operator's image: kopf, the Kubernetes client and prometheus-client; no ML library
# (the project is installed without its `trainer` extra).
#
#   docker build -f operator.Dockerfile -t ghcr.io/finetune-dev/finetune-operator:0.1.0 .
#   kind load docker-image ghcr.io/finetune-dev/finetune-operator:0.1.0    # for kind-config.yaml

# BASE_IMAGE: any Debian-like image with python3 (3.11) and its venv module. Published
# builds use the upstream default; `make images` (hack/build-images.sh) swaps in a base
# made from Debian's packages when no registry is reachable.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/build-venv
ENV PATH=/opt/build-venv/bin:${PATH}
# Only what the wheel is built from: the operator and the API package it shares with the
# trainer (schema, models, trainer config, exit codes). No trainer code; hack/ is dev tooling.
COPY pyproject.toml README.md ./
COPY api/ api/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
# The dependencies first, in a layer of their own (pyproject's `dependencies` under the
# project's pins: kopf, kubernetes, prometheus-client, ...), so that a change to the
# project's sources rebuilds only the small layers below.
COPY pyproject.toml requirements/constraints.txt /tmp/deps/
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/deps/requirements.txt \
 && pip install -c /tmp/deps/constraints.txt -r /tmp/deps/requirements.txt \
 && rm -rf /tmp/deps
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/finetune_operator-*.whl \
 && rm -rf /wheels \
 && pip check \
 && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'peft', 'trl', 'finetune_trainer')))"
# A fixed non-root UID that the chart's securityContext (runAsUser 65532) matches.
# (Debian bases already have a group named `operator`, GID 37: the user is `finetune`.)
RUN groupadd --gid 65532 finetune && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin finetune
USER 65532:65532
WORKDIR /tmp
# --metrics-port (8080) and --liveness-port (8081)
EXPOSE 8080 8081
ENTRYPOINT ["finetune-operator"]
