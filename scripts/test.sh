#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. GPU-only tests are skipped on CPU hosts with their reason;
# on a CUDA host they run too. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check vllm_sinks tests benchmarks examples
exec .venv/bin/python -m pytest -ra "$@"
