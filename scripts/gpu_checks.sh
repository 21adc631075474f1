#!/usr/bin/env bash
# The GPU checks of issues 13 and 14 in one run, for a session that is lent a GPU machine (JAX with
# CUDA, torch and transformers, no package registry). Prepared on CPU and not yet run on a GPU.
#
# Here, before the run: `pip download --no-deps -d .whl gguf` (the one pure-Python package the
# project needs that the machine lacks; `.whl/` is git-ignored), then through the device tool:
#     run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# The device tool brings back at most 8 files from $OUT, so there are two: `gpu_checks.log`, the
# machine and the last lines of every step, and `results.tar.gz`, every step's whole log and JSON
# and the decode trace, packed again after each step. Each step has its own timeout, so one that
# hangs costs only its share, and the steps run in the order of what matters: if the run's 600 s
# cut it, the last steps are what is lost, and what the steps before wrote comes back.
# `SHAPE_NAME=tiny bash scripts/gpu_checks.sh` is a dry run of the same steps on a CPU (slow: the
# kernel tests run in Pallas's interpreter there).
set -o pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
RES=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import jax; print(jax.__version__, jax.devices())"; } 2>&1 | tee "$LOG"

# step NAME SECONDS LINES COMMAND...: run it with its output in $RES/NAME.log, its last LINES lines
# in the log, then pack $RES.
step() {
    local name=$1 limit=$2 lines=$3
    shift 3
    echo "=== $name (limit ${limit} s, started $(date +%T))" | tee -a "$LOG"
    timeout "$limit" "$@" > "$RES/$name.log" 2>&1
    local status=$?
    tail -n "$lines" "$RES/$name.log" | tee -a "$LOG"
    echo "=== $name: exit status $status" | tee -a "$LOG"
    tar czf "$OUT/results.tar.gz" -C "$RES" .
}

SHAPE_NAME=${SHAPE_NAME:-smollm2-1.7b}
SHAPE="--shape $SHAPE_NAME --contexts 512 --decode-tokens 64"

# 1. Correctness on the GPU: the Pallas kernel compiled by Triton against the XLA path, async
#    scheduling, the sampler's draws, the model against transformers in float32 (the SmolLM2 tests
#    skip: no weights here). Every test runs (no -x), one line per failure, so one failure does not
#    hide the others.
step tests 240 40 python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_attention_kernels.py \
    tests/test_async_scheduling.py tests/test_sampling.py tests/test_model.py

# 2. The engine against transformers on SmolLM2-1.7B's shape in bf16 (issue 13's table).
step bench_engine 180 30 python3 scripts/bench_engine.py $SHAPE --batches 1,8,64 --hf-max-tokens 0 \
    --out "$RES/bench_engine.json"

# 3. Where a decode step's device time goes: a profiler trace of 5 decode steps at B 64 and 1.
for batch in 64 1; do
    step "trace_b$batch" 75 45 python3 scripts/trace_steps.py --shape "$SHAPE_NAME" --batch "$batch" \
        --context 512 --out "$RES/trace_b$batch"
    # The perfetto file holds what the other two formats hold.
    find "$RES/trace_b$batch" \( -name '*.xplane.pb' -o -name '*.trace.json.gz' \) -delete
done
tar czf "$OUT/results.tar.gz" -C "$RES" .

# 4. Swap through the pinned host pool against the link (issue 14).
step bench_swap 120 40 python3 scripts/bench_swap.py --shape "$SHAPE_NAME" --quick --dtype bfloat16 \
    --kv-cache-gb 4 --swap-space-gb 4 --out "$RES/bench_swap.json"

# 5. The attention alone: decode (split-K against one program per (row, KV head) and the XLA path),
#    then prefill rows (the chunk kernel against the XLA path).
step bench_attention 60 20 python3 scripts/bench_attention.py --shape "$SHAPE_NAME" --batches 1,64 \
    --contexts 512,4096 --out "$RES/bench_attention.json"
step bench_attention_prefill 45 8 python3 scripts/bench_attention.py --shape "$SHAPE_NAME" --rows prefill \
    --batches 8 --contexts 512 --kernels xla,pallas --out "$RES/bench_attention_prefill.json"

# 6. Async scheduling against step 2's synchronous engine.
step bench_engine_async 90 12 python3 scripts/bench_engine.py $SHAPE --batches 1,64 --skip-hf \
    --async-scheduling --out "$RES/bench_engine_async.json"

# 7. The machine's profile for the engine as a user builds it (issue 14): the same pools as step 4,
#    so its compiled steps come from the cache.
step profile 150 25 python3 -m infercept_jax.cli profile --shape "$SHAPE_NAME" --dtype bfloat16 \
    --kv-cache-gb 4 --swap-space-gb 4 --name "h200-$SHAPE_NAME-bf16" --out "$RES/h200-$SHAPE_NAME.profile.json"

# 8. The XLA attention path in the whole engine, for the comparison with the kernel.
step bench_engine_xla 90 12 python3 scripts/bench_engine.py $SHAPE --batches 1,64 --skip-hf --attention xla \
    --out "$RES/bench_engine_xla.json"

# 9. A step's call with its inputs in one buffer against array by array: the host's side of a step.
step bench_dispatch 75 8 python3 scripts/bench_dispatch.py --shape "$SHAPE_NAME" --dtype bfloat16 --calls 100 --rounds 3
