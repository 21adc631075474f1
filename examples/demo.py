"""The demo `make demo` runs: SmolLM2-135M-Instruct serving tool-calling requests on this machine.

1. A few chats, to show the engine (warm-up, continuous batching, streaming).
2. The policy comparison: a built-in mixed workload of the paper's six augmentations (math, QA,
   virtual environment, chat, image, TTS), token counts scaled by 1/8 and tool-call durations by
   1/10 for a CPU, replayed for 30 s at 1 request/s under discard (vLLM), preserve, swap,
   InferCept's min-waste policy and LAMPS (InferCept's holding decisions made in advance plus a
   queue ranked by predicted memory over time), on a small KV pool so that memory is contended. This machine's
   hardware profile is measured first (quick). Prints the table; writes results/demo/.
"""
import os
import time

from infercept_jax import LLM, SamplingParams
from infercept_jax.experiments.sweeps import (builtin_trace, format_table, measure_here, real_engines, run_replays,
                                             write_results)

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a CPU cache is in two sentences.", "Name three planets of the solar system."]
POLICIES = ["discard", "preserve", "swap", "infercept", "lamps"]
POOLS = dict(max_model_len=2048, num_kv_blocks=160, num_host_blocks=512)   # 2,544 device tokens
OUT = "results/demo"


def chats() -> None:
    start = time.perf_counter()
    llm = LLM("smollm2-135m", max_model_len=2048, kv_cache_memory_gb=0.25, policy="preserve")
    print(f"loaded and warmed up in {time.perf_counter() - start:.1f} s "
          f"({llm.warmup_shapes} step shapes compiled in {llm.warmup_seconds:.1f} s)\n")
    start = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], SamplingParams(max_tokens=64, temperature=0.0))
    seconds = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"Q: {question}\nA: {out.text.strip()}\n")
    generated = sum(len(o.token_ids) for o in outputs)
    print(f"{len(outputs)} chats, {generated} tokens in {seconds:.1f} s\n")
    print("streaming: ", end="", flush=True)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a short story about a robot."}])
    for delta in llm.stream(prompt, SamplingParams(max_tokens=60, temperature=0.7, top_p=0.9, seed=0)):
        print(delta, end="", flush=True)
    print("\n")


def compare_policies() -> None:
    os.makedirs(OUT, exist_ok=True)
    start = time.perf_counter()
    profile = measure_here("smollm2-135m", f"{OUT}/profile.json", **POOLS)
    print(f"this machine: T_fwd(x) = {profile.fwd_ms_per_token:.2f} x + {profile.fwd_base_ms:.0f} ms, "
          f"S = {profile.saturation_tokens}, swap {profile.swap_out_gb_per_s:.1f} GB/s out, "
          f"{profile.swap_in_gb_per_s:.1f} GB/s in (measured in {time.perf_counter() - start:.0f} s)\n")
    engines = real_engines("smollm2-135m", profile=f"{OUT}/profile.json", **POOLS)
    results = run_replays(builtin_trace("mixed-small"), engines, POLICIES, [1.0], window=30.0, time_scale=0.1)
    print(format_table(results))
    for path in write_results(results, OUT):
        print(f"wrote {path}")


if __name__ == "__main__":
    chats()
    compare_policies()
