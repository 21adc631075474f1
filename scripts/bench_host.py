"""What the engine's Python costs per step when outputs are long: scheduling, bookkeeping and text.

The model is replaced by a runner that samples a random id in no time, so every millisecond
measured is host work the accelerator would wait for. B requests generate L tokens each; the
run is timed with SmolLM2's tokenizer (text decoded every token, as `LLM.generate` and streaming
need) and without one (token ids only), so the difference is the text's cost per step.

    .venv/bin/python scripts/bench_host.py                       # B = 64, L = 512 and 2048
    .venv/bin/python scripts/bench_host.py --batch 8 --length 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from infercept_jax.build import build_engine
from infercept_jax.config import EngineConfig, SamplingParams
from models.registry import load_tokenizer


class RandomTokenRunner:
    """Samples a random vocabulary id for every request that finished its in-flight tokens."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size

    def execute(self, output):
        done = [s.request for s in output.scheduled if s.samples]
        return [(r, int(t)) for r, t in zip(done, self.rng.integers(3, self.vocab_size, len(done)))], 0.0


def host_ms_per_step(tokenizer, batch: int, length: int, vocab_size: int) -> float:
    block_size = 16
    blocks = batch * (-(-(length + 32) // block_size)) + 1
    config = EngineConfig(policy="preserve", num_kv_blocks=blocks, block_size=block_size, max_model_len=length + 32,
                          max_num_seqs=batch, max_num_batched_tokens=max(batch, 32 * batch))
    engine = build_engine(config, lambda *_: RandomTokenRunner(vocab_size), kv_bytes_per_token=1,
                          vocab_size=vocab_size, model_max_len=config.max_model_len, tokenizer=tokenizer)
    for _ in range(batch):
        engine.add_request(list(range(10, 42)), SamplingParams(max_tokens=length, ignore_eos=True))
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) * 1000 / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, action="append", help="output tokens per request (repeatable)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row; the median is reported")
    args = p.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    print("| B | L | host ms/step, ids only | with text | text ms/step |\n|---|---|---|---|---|")
    for length in args.length or [512, 2048]:
        ids, text = (statistics.median(host_ms_per_step(t, args.batch, length, tokenizer.vocab_size)
                                       for _ in range(args.repeats)) for t in (None, tokenizer))
        print(f"| {args.batch} | {length} | {ids:.2f} | {text:.2f} | {text - ids:.2f} |", flush=True)


if __name__ == "__main__":
    main()
