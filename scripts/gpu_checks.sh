#!/usr/bin/env bash
# The GPU checks of issues 13 and 14 in one run, for a session that is lent a GPU machine (JAX with
# CUDA, torch and transformers, no package registry). Prepared on CPU and not yet run on a GPU.
#
# Here, before the run: `pip download --no-deps -d .whl gguf` (the one pure-Python package the
# project needs that the machine lacks; `.whl/` is git-ignored), then through the device tool:
#     run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Everything it writes lands in $OUT. Each step has its own timeout, so one that hangs costs only
# its share; the steps are in the order of what matters, so if the run's 600 s cut it, what is cut
# is the last, and the files of the steps done still come back. `SHAPE_NAME=tiny bash scripts/gpu_checks.sh` is a
# dry run of the same steps on a CPU (slow: the kernel tests run in Pallas's interpreter there).
set -o pipefail
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.85
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# 1. Correctness on the GPU: the Pallas kernel compiled by Triton against the XLA path, async
#    scheduling, the sampler's draws, the model against transformers in float32 (the SmolLM2 tests
#    skip: no weights here). Every test runs (no -x), one line per failure, so one failure does not
#    hide the others.
timeout 240 python3 -m pytest -q --tb=line -p no:cacheprovider tests/test_attention_kernels.py \
    tests/test_async_scheduling.py tests/test_sampling.py tests/test_model.py 2>&1 | tail -40 | tee "$OUT/tests.log"

# 2. The engine against transformers on SmolLM2-1.7B's shape in bf16 (issue 13's table): the
#    kernel (auto), then the XLA path and async scheduling for the comparison.
SHAPE_NAME=${SHAPE_NAME:-smollm2-1.7b}
SHAPE="--shape $SHAPE_NAME --contexts 512 --decode-tokens 64"
timeout 180 python3 scripts/bench_engine.py $SHAPE --batches 1,8,64 --hf-max-tokens 0 \
    --out "$OUT/bench_engine.json" 2>&1 | tail -40 | tee "$OUT/bench_engine.log"
timeout 90 python3 scripts/bench_engine.py $SHAPE --batches 1,64 --skip-hf --async-scheduling \
    --out "$OUT/bench_engine_async.json" 2>&1 | tail -25 | tee "$OUT/bench_engine_async.log"
timeout 90 python3 scripts/bench_engine.py $SHAPE --batches 1,64 --skip-hf --attention xla \
    --out "$OUT/bench_engine_xla.json" 2>&1 | tail -25 | tee "$OUT/bench_engine_xla.log"

# 3. Swap through the pinned host pool against the link (issue 14), and the measured profile.
timeout 120 python3 scripts/bench_swap.py --shape $SHAPE_NAME --quick --dtype bfloat16 \
    --kv-cache-gb 4 --swap-space-gb 4 --out "$OUT/bench_swap.json" 2>&1 | tail -40 | tee "$OUT/bench_swap.log"

# 4. The attention alone: decode (split-K against one program per (row, KV head) and the XLA path),
#    then prefill rows (the chunk kernel against the XLA path).
timeout 60 python3 scripts/bench_attention.py --shape $SHAPE_NAME --batches 1,64 --contexts 512,4096 \
    --out "$OUT/bench_attention.json" 2>&1 | tail -20 | tee "$OUT/bench_attention.log"
timeout 45 python3 scripts/bench_attention.py --shape $SHAPE_NAME --rows prefill --batches 8 --contexts 512 \
    --kernels xla,pallas --out "$OUT/bench_attention_prefill.json" 2>&1 | tail -8 | tee "$OUT/bench_attention_prefill.log"

# 5. The machine's profile for the engine as a user builds it (issue 14): the same pools as step 3,
#    so its compiled steps come from the cache. Last, as the step that matters least if time runs out.
timeout 150 python3 -m infercept_jax.cli profile --shape $SHAPE_NAME --dtype bfloat16 --kv-cache-gb 4 \
    --swap-space-gb 4 --name "h200-$SHAPE_NAME-bf16" --out "$OUT/h200-$SHAPE_NAME.profile.json" 2>&1 | tail -30 \
    | tee "$OUT/profile.log"
