#!/usr/bin/env bash
# What one GPU shows, unattended, in about 8 minutes:
#   1. proxy steps on a model of Qwen3-0.6B's shapes (random weights, built from its config):
#      step time, tokens per second and peak memory (benchmarks/qwen3_timing.py);
#   2. a short ground truth on SmolLM2-135M-Instruct and on Gemma 3 270M (antonym: the first,
#      middle and last layer and all layers, one training seed, the proxy's horizon);
#   3. a 4-trial search on each of them, through the CLI, with the embedded stores.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]      (default /tmp/autolayer-gpu-check)
#
# Needs a CUDA build of torch in .venv (install it before the project: see the README) and the
# converted models (`make smollm2 gemma3`; tried here when missing). Every part has its own time
# limit and the script goes on past a failed part; it exits non-zero if any part failed. With no
# GPU it says so and exits 0: on a CPU these runs take hours (the README's CPU numbers).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/autolayer-gpu-check}
mkdir -p "$OUT"
failed=0

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device; nothing to check (the CPU numbers are in the README)"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

part() {  # part NAME SECONDS COMMAND...: run one part under its limit, log it, note a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   done in $((SECONDS - start))s"
    else
        echo "   FAILED or timed out after $((SECONDS - start))s: see $OUT/$name.log"
        failed=1
    fi
    grep -E '^\{|^\[|s/step|tokens' "$OUT/$name.log" | tail -8 || true
}

for model in smollm2 gemma3; do
    dir=models/$([ "$model" = smollm2 ] && echo smollm2-135m-instruct || echo gemma3-270m)
    [ -d "$dir" ] || part "make-$model" 300 make "$model"
done

part qwen3-timing 120 "$PY" benchmarks/qwen3_timing.py --steps 6 --out "$OUT/qwen3-0.6b-shapes"

for model in smollm2 gemma3; do
    config=examples/${model}_short.yaml
    last=$([ "$model" = smollm2 ] && echo 29 || echo 17)
    mid=$([ "$model" = smollm2 ] && echo 15 || echo 9)
    part "truth-$model" 90 "$PY" benchmarks/ground_truth.py --config "$config" \
        --layers "0,$mid,$last" --factor 1 --seeds 100 --full-lrs 3e-5 \
        --out "$OUT/truth-$model.json" --root "$OUT/truth-root"
    part "search-$model" 90 .venv/bin/autolayer search --config "$config" \
        --search.n_trials 4 --root "$OUT/search-$model"
done

echo "gpu_check: logs and JSON under $OUT"
exit $failed
