"""Offline profiling (spec 3.5.3): the constants the InferCept policy decides with, measured on this
machine with an LLM's own runner, as a HardwareProfile.

    llm = LLM("smollm2-135m")
    measure_profile(llm, name="my-box", model="smollm2-135m").to_json("profile.json")
    LLM("smollm2-135m", profile="profile.json")

Everything runs through the path the engine uses, `runner.execute` of synthetic SchedulerOutputs
(steps, and swap copies without a step), on blocks the block manager hands out (and takes back), so
other sequences' KV is never touched. Every time is the median of `repeats` runs
after an untimed one (compilation, first touch).
"""
from __future__ import annotations

import logging
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import nnls

from infercept_jax.config import SamplingParams
from kvcache.swap import HostKVPool
from models.llama import matmul_precision
from scheduling.profile import HardwareProfile
from scheduling.request import Request
from scheduling.output import ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)

SATURATION_EFFICIENCY = 0.9   # S: the first step size reaching this share of the best tokens/s
DECODE_SEQS = 8               # the decode set that shares every profiled step
DECODE_CONTEXT = 256
_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs, after one untimed run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_machine(dtype) -> dict:
    """This machine's roofline, for the benchmarks: read bandwidth (a jitted sum over a float32
    array of 512 MiB on CPU, 4 GiB on an accelerator) and matmul FLOP/s in `dtype` at the
    engine's precision for it (n x n by n x n, n = 2048 on CPU, 8192 on an accelerator), medians of 5."""
    on_cpu = jax.default_backend() == "cpu"
    x = jnp.ones((512 if on_cpu else 4096) * 2**20 // 4, jnp.float32)
    total = jax.jit(jnp.sum)
    read_s = median_seconds(lambda: total(x).block_until_ready(), 5)
    n = 2048 if on_cpu else 8192
    a = jnp.ones((n, n), dtype)
    with matmul_precision(dtype):
        matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    matmul_s = median_seconds(lambda: matmul(a, a).block_until_ready(), 5)
    return {"read_bytes_per_s": x.nbytes / read_s, "matmul_flops_per_s": 2 * n**3 / matmul_s}


def synthetic_request(request_id: str, num_tokens: int, num_computed: int, vocab_size: int,
                      rng: np.random.Generator) -> Request:
    """A request of random tokens, the first `num_computed` of which count as already in the KV."""
    request = Request(request_id, rng.integers(0, vocab_size, num_tokens).tolist(), _GREEDY, arrival_time=0.0)
    request.num_computed_tokens = num_computed
    return request


def time_step(llm, output: SchedulerOutput) -> float:
    """Seconds of one `runner.execute(output)` until the step and its copies are done."""
    start = time.perf_counter()
    llm.runner.execute(output)
    jax.block_until_ready((llm.runner.k_pool, llm.runner.v_pool))
    return time.perf_counter() - start


def forward_times(llm, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median ms of a step of x query tokens for each x in `sizes`.

    A step is a decode set (a few requests of DECODE_CONTEXT tokens, one query token each, what a
    serving step usually carries) plus one prompt chunk of the rest of the x tokens. Their KV
    blocks are taken from the block manager and given back at the end.
    """
    runner, blocks, engine = llm.runner, llm.engine.blocks, llm.engine
    bs = blocks.block_size
    decodes = min(DECODE_SEQS, runner.max_num_seqs - 1, min(sizes) // 2)
    chunk_blocks = -(-(max(sizes) - decodes) // bs)
    per_decode = (blocks.num_free - chunk_blocks) // max(decodes, 1) * bs
    context = min(DECODE_CONTEXT, engine.max_model_len - 1, per_decode)
    if context < 1:
        raise ValueError(f"{blocks.num_free} free KV blocks are too few to profile steps of "
                         f"{max(sizes)} tokens; give the engine more KV memory")
    rng = np.random.default_rng(0)
    vocab = runner.spec.vocab_size
    decode_set = [synthetic_request(f"profile-decode-{i}", context, context - 1, vocab, rng)
                  for i in range(decodes)]
    times = {}
    try:
        for r in decode_set:
            blocks.ensure(r.request_id, context)
        for x in sizes:
            chunk = synthetic_request("profile-chunk", x - decodes, 0, vocab, rng)
            blocks.ensure(chunk.request_id, chunk.num_tokens)
            output = SchedulerOutput([ScheduledRequest(r, 1) for r in decode_set]
                                     + [ScheduledRequest(chunk, chunk.num_tokens)])
            times[x] = 1e3 * median_seconds(lambda: time_step(llm, output), repeats)
            blocks.free(chunk.request_id)
            log.info("step of %d query tokens (%d decodes of %d tokens + a %d-token chunk): %.2f ms",
                     x, decodes, context, x - decodes, times[x])
    finally:
        for rid in [r.request_id for r in decode_set] + ["profile-chunk"]:
            blocks.free(rid)
    return times


def fit_linear(times: dict[int, float]) -> tuple[float, float]:
    """Least squares T_fwd(x) = a*x + c (ms) with a, c >= 0: a free fit can get a negative
    intercept from noise, which would give small steps negative times in the waste model."""
    xs = np.array(sorted(times), float)
    (a, c), _ = nnls(np.stack([xs, np.ones_like(xs)], axis=1), np.array([times[x] for x in sorted(times)]))
    return float(a), float(c)


def saturation_point(times: dict[int, float]) -> int:
    """S, the knee: the smallest x whose throughput x / T(x) reaches SATURATION_EFFICIENCY of the
    best measured throughput.

    Below it a step leaves compute idle (time grows slower than x); from it on the device is busy
    and time grows about linearly with x. The x are the runner's token buckets (a step is padded to
    one), so S is one of them and at most the engine's max_num_batched_tokens.
    """
    best = max(x / t for x, t in times.items())
    return min(x for x, t in times.items() if x / t >= SATURATION_EFFICIENCY * best)


def host_pool(llm) -> HostKVPool:
    """The LLM's host KV pool; only policies that swap have one."""
    if llm.runner.host_pool is None:
        raise ValueError("this LLM has no host KV pool; build it with a policy that swaps "
                         "(swap, heuristic or infercept) and some swap space")
    return llm.runner.host_pool


def swap_bandwidth(llm, num_blocks: int, repeats: int) -> tuple[float, float]:
    """(device->host, host->device) GB/s of copying `num_blocks` KV blocks through the host pool.

    Both are steps with copies and no tokens, through `runner.execute` as the engine makes them
    (so the other processes of a multi-host run make them too). Swap-out lasts until the pages
    are in host memory; swap-in lasts until the device pools are updated.
    """
    runner, blocks, pool = llm.runner, llm.engine.blocks, host_pool(llm)

    def swap_out():
        runner.execute(SchedulerOutput(swap_out=out_pairs))
        pool.wait()

    def swap_in():
        runner.execute(SchedulerOutput(swap_in=in_pairs))
        jax.block_until_ready((runner.k_pool, runner.v_pool))

    seq = "profile-swap"
    try:
        blocks.ensure(seq, num_blocks * blocks.block_size)
        out_pairs = blocks.swap_out(seq, num_blocks)
        out_s = median_seconds(swap_out, repeats)
        in_pairs = blocks.swap_in(seq, num_blocks)
        in_s = median_seconds(swap_in, repeats)
    finally:
        blocks.free(seq)
    nbytes = num_blocks * pool.block_bytes
    return nbytes / out_s / 1e9, nbytes / in_s / 1e9


def measure_profile(llm, *, name: str = "measured", model: str = "", repeats: int = 5,
                    quick: bool = False) -> HardwareProfile:
    """Profile this machine with `llm`'s runner, pools and step budget (spec 3.5.3).

    T_fwd is fitted over steps of every token bucket from 16 to max_num_batched_tokens; S is its
    knee (`saturation_point`). Bandwidths are measured with the largest swap copy (or what the
    pools have room for). N(S) = T_fwd(S) * min(out, in bandwidth) / M: copies in both directions
    are assumed to share one link, one after the other, so N tokens in+out take at most one
    forward of S tokens. `quick`: half the sizes and three repeats (tests, smoke runs).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runner, blocks, pool = llm.runner, llm.engine.blocks, host_pool(llm)
    sizes = runner.chunk_buckets
    if quick:
        sizes = sorted(set(sizes[::2] + sizes[-1:]))
        repeats = min(repeats, 3)
    times = forward_times(llm, sizes, repeats)
    a, c = fit_linear(times)
    s = saturation_point(times)
    kv_bytes = runner.spec.kv_bytes_per_token(runner.k_pool.dtype.itemsize)
    num_blocks = min(pool.buckets[-1], blocks.num_free, blocks.host.num_free)
    if num_blocks < 1:
        raise ValueError("no free device or host KV blocks to measure swap bandwidth with")
    out_gbps, in_gbps = swap_bandwidth(llm, num_blocks, repeats)
    fwd_s = (a * s + c) / 1e3
    devices = list(runner.mesh.devices.flat)   # the devices the step runs on (tensor parallel: several)
    return HardwareProfile(
        name=name, fwd_ms_per_token=a, fwd_base_ms=c, saturation_tokens=s,
        swap_limit_tokens=fwd_s * min(out_gbps, in_gbps) * 1e9 / kv_bytes,
        kv_bytes_per_token=kv_bytes, block_size=blocks.block_size,
        swap_out_gb_per_s=out_gbps, swap_in_gb_per_s=in_gbps,
        num_device_blocks=blocks.device.num_blocks, num_host_blocks=blocks.host.num_blocks,
        device=f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})", model=model,
        weights_gb=runner.weight_bytes / 1e9, num_gpus=len(devices))
