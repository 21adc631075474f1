"""One process of the two-process run of tests/test_multihost.py (a script, not a test module).

Started with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID and two CPU devices, so
the engine's mesh spans four devices over two processes. Process 0 runs the engine through pauses
that swap, and prints its tokens and counters as one JSON line; process 1 follows its steps and
prints how many it ran.
"""
from __future__ import annotations

import json

from infercept_jax.parallel import initialize_distributed

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 60))]


def build_llm(tensor_parallel_size: int):
    """A swapping engine on a tiny GQA model (4 KV heads: one per device at TP 4), its pools small
    enough to need the host; steps compile when first used, to keep the test short."""
    from helpers import random_hf_tensors, tiny_spec
    from infercept_jax import LLM
    from infercept_jax.parallel import tp_mesh
    from models.llama import Llama

    spec = tiny_spec(num_heads=8, num_kv_heads=4, head_dim=8)
    model = Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3), mesh=tp_mesh(tensor_parallel_size))
    return LLM.from_model(model, None, tensor_parallel_size=tensor_parallel_size, policy="swap", num_kv_blocks=40,
                          block_size=4, num_host_blocks=40, max_num_seqs=4, max_num_batched_tokens=16,
                          max_model_len=128, compile_cache=False, warmup=False, strict_compile=False)


def greedy_with_pauses():
    from infercept_jax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, intercept_after=4)


def main() -> None:
    initialize_distributed()        # before anything touches a device
    import jax

    from helpers import paused_run

    llm = build_llm(jax.device_count())
    if jax.process_index() == 0:
        try:
            tokens = paused_run(llm, PROMPTS, greedy_with_pauses())
        finally:
            llm.close()
        waste = llm.engine.waste
        report = {"tokens": tokens, "steps": llm.engine.num_steps, "swap_out_blocks": waste.swap_out_blocks,
                  "swap_in_blocks": waste.swap_in_blocks}
    else:
        report = {"steps": llm.follow()}
    print(json.dumps(report), flush=True)
    jax.distributed.shutdown()      # process 0 hosts the coordinator: it must not exit before process 1


if __name__ == "__main__":
    main()
