#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. GPU-only tests are skipped on CPU hosts with their reason;
# on a CUDA host they run too. Extra arguments go to pytest.
#   bash scripts/test.sh           the suite without the long runs (~9 min on 2 cores with a warm .venv)
#   bash scripts/test.sh --slow    the long runs: the 5-minute load soak, the quality evaluation, real
#                                  weights (Qwen2.5-Coder-0.5B), TP/PP engines, the streaming demo
set -euo pipefail
cd "$(dirname "$0")/.."
tier=(-m "not slow")
if [ "${1:-}" = "--slow" ]; then
  tier=(-m slow)
  shift
fi
bash scripts/setup.sh
.venv/bin/ruff check vllm_sinks tests benchmarks examples
exec .venv/bin/python -m pytest -ra --durations=15 "${tier[@]}" "$@"
