"""What a step's call costs the host: its inputs packed in one buffer against the same step given its
batch array by array, as the runner called it before `model_runner.Packing`.

Both calls run the same compiled forward pass on the same all-padding batch of one step shape; the
array-by-array one only adds, on the device, the concatenation the packed one does on the host. The
two are timed in alternating rounds in one process (medians of `--calls` calls each): the time
until the call returns (the host's part: the arguments' checks and copies, the launch) and until
its tokens are ready.

    .venv/bin/python scripts/bench_dispatch.py                         # tiny shape, B 1 and 64
    python scripts/bench_dispatch.py --shape smollm2-1.7b --dtype bfloat16    # on a GPU
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from infercept_jax import LLM
from infercept_jax.llm import resolve_dtype
from infercept_jax.model_runner import Packing
from models.llama import Llama
from models.shapes import SHAPES
from scheduling.scheduler import SchedulerOutput


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=list(SHAPES), help="random weights of this shape")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--batches", default="1,64", help="decode batch sizes B (one decode step shape each)")
    p.add_argument("--calls", type=int, default=200, help="calls per round")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def leaf_by_leaf_step(runner, packing: Packing):
    """The runner's step taking its batch as separate arrays (packed again on the device)."""
    def step(params, k_pool, v_pool, batch, previous_tokens):
        leaves = [leaf if leaf.dtype == jnp.int32 else jax.lax.bitcast_convert_type(leaf, jnp.int32)
                  for leaf in jax.tree.leaves(batch)]
        inputs = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
        return runner._step.__wrapped__(params, k_pool, v_pool, inputs, previous_tokens, packing)
    return jax.jit(step, donate_argnums=(1, 2))


def timed_calls(runner, call, make_argument, calls: int) -> tuple[float, float, np.ndarray]:
    """Median µs until `call` returns, and until its tokens are ready; the last call's tokens."""
    returned, ready = [], []
    for _ in range(calls):
        start = time.perf_counter()
        tokens, _, runner.k_pool, runner.v_pool = call(runner._params, runner.k_pool, runner.v_pool,
                                                       make_argument(), runner._previous_tokens)
        returned.append(time.perf_counter() - start)
        jax.block_until_ready(tokens)
        ready.append(time.perf_counter() - start)
    return statistics.median(returned) * 1e6, statistics.median(ready) * 1e6, np.asarray(tokens)


def main(argv=None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    model = Llama(SHAPES[args.shape], dtype=resolve_dtype(args.dtype))
    llm = LLM.from_model(model, None, num_kv_blocks=max(batches) * 4 + 1, block_size=16, max_num_seqs=max(batches),
                         max_num_batched_tokens=max(256, max(batches)), max_model_len=64, warmup=False,
                         strict_compile=False, compile_cache=False)
    runner = llm.runner
    print(f"JAX backend: {jax.default_backend()}; shape {args.shape}; {args.calls} calls x {args.rounds} rounds")
    print("| B | arrays | array by array: returns µs | ready µs | packed (packing included): returns µs | "
          "ready µs |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in batches:
        shape = next(s for s in runner.all_shapes() if s.chunk_rows == 0 and s.num_tokens >= max(2, b))
        batch = runner.prepare(SchedulerOutput(), shape)[0]
        packing = Packing.pack(batch)[1]
        separate = leaf_by_leaf_step(runner, packing).lower(runner._params, runner.k_pool, runner.v_pool, batch,
                                                            runner._previous_tokens).compile()
        packed = runner.compile(shape)
        rounds = {"separate": [], "packed": []}
        for _ in range(args.rounds):
            rounds["separate"].append(timed_calls(runner, separate, lambda: batch, args.calls))
            rounds["packed"].append(timed_calls(runner, packed, lambda: Packing.buffer(batch), args.calls))
            if not np.array_equal(rounds["separate"][-1][2], rounds["packed"][-1][2]):
                raise SystemExit("the two calls sampled different tokens: they are not the same step")
        medians = {k: [statistics.median(r[i] for r in v) for i in (0, 1)] for k, v in rounds.items()}
        print(f"| {shape.num_tokens} | {len(jax.tree.leaves(batch))} | {medians['separate'][0]:.0f} | "
              f"{medians['separate'][1]:.0f} | {medians['packed'][0]:.0f} | {medians['packed'][1]:.0f} |")


if __name__ == "__main__":
    main()
