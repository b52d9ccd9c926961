#!/usr/bin/env bash
# Stage Qwen2.5-Coder-1.5B-Instruct for a GPU host that reaches no registry: the assembled GGUF file (prepare.py
# --gguf) split into 60 MiB parts in .qdata/ (ignored by git), with the gguf wheel and the KJV text in
# .qdata/extra/. Each device call carries one part and runs `bash benchmarks/gpu/runs.sh stash_data $OUT`;
# then `runs.sh qwen_prepare` assembles and checks the file there (see runs.sh).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.qdata/' .git/info/exclude 2>/dev/null || echo '/.qdata/' >> .git/info/exclude
gguf=$(python benchmarks/quality/prepare.py --gguf qwen2.5-coder-1.5b-instruct)
rm -rf .qdata && mkdir -p .qdata/extra
split -b 60M -d -a 2 "$gguf" .qdata/q15-part-
python -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d .qdata/extra
cp "$(dirname "$gguf")/kjv.txt" .qdata/extra/
ls .qdata .qdata/extra
