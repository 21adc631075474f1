"""InferCept's waste model: device memory left unused times how long it stays unused (spec 3.5.1).

All waste values are in token·seconds; multiply by the profile's M (KV bytes per token) for
byte·seconds. The policy only compares wastes, so the common factor M is left out.
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduling.profile import HardwareProfile


def preserve_waste(remaining_s: float, context_tokens: int) -> float:
    """Eq. 2 (spec 3.2): the context idles on the device for the rest of the tool call.

    A call that overran its estimate has a negative remaining time; it is clamped to 0 (the
    released code let the waste go negative, spec 3.5.2 quirks).
    """
    return max(remaining_s, 0.0) * context_tokens


def discard_waste(context_tokens: int, other_tokens: int, profile: HardwareProfile) -> float:
    """Eq. 1 (spec 3.1): recompute the context in one step; the request's own tokens and the
    `other_tokens` of every other running request idle for that whole long step."""
    t = profile.fwd_seconds(context_tokens)
    return t * context_tokens + t * other_tokens


def chunked_discard_waste(context_tokens: int, running_query_tokens: int,
                          running_context_tokens: int, profile: HardwareProfile) -> float:
    """Chunked recompute (eq. 4), as the released code computes it (spec 3.5.2 `discard_waste`).

    The context is recomputed in chunks of c_h = S - running_query_tokens, the budget the
    running requests leave. The first term is the request's own growing KV held over n saturated
    steps; the second is the running requests' KV slowed by each chunk's extra forward time; the
    last term is the final partial chunk. One quirk is fixed: the code takes
    n = ceil(C / c_h) - 1 full chunks, which drops a chunk when C is a whole number of chunks;
    here n = C // c_h, the same everywhere else.
    """
    a_f, c_f, s = profile.fwd_ms_per_token, profile.fwd_base_ms, profile.saturation_tokens
    c_h = max(s - running_query_tokens, 1)
    n = context_tokens // c_h
    f_ch = a_f * c_h / 1000
    f_s = (a_f * s + c_f) / 1000
    w = f_s * (1 + n) * n / 2 * c_h + f_ch * n * running_context_tokens
    last = context_tokens % c_h
    return w + (a_f * last / 1000) * (running_context_tokens + last)


def swap_waste(context_tokens: int, batch_tokens: int, profile: HardwareProfile) -> float:
    """Eq. 3 (spec 3.3): a swap that does not fit in the step's swap budget stalls the batch of
    `batch_tokens` for the copy out and the copy back in."""
    return 2 * profile.swap_seconds(context_tokens) * batch_tokens


@dataclass(frozen=True)
class SwapBudget:
    in_blocks: int
    out_blocks: int


def swap_budget(free_device_tokens: int, free_host_tokens: int, profile: HardwareProfile,
                block_size: int, step_tokens: int) -> SwapBudget:
    """How many blocks one step of `step_tokens` query tokens may swap in and out for free (spec
    3.5.1 item 2, 3.5.2).

    Closed form of the paper's per-step problem with (a) and (c) tight: in + out = N fills the
    copy time hidden behind the forward, and in - out = F - S keeps swapped-in tokens plus S new
    tokens within free device memory plus what is swapped out. If one side comes out negative it
    is 0 and the other side gets all of N. Then (b): swap-out must fit in free host memory plus
    what swap-in frees there. Swap-in is floored to blocks first, so (b) counts only blocks that
    really leave the host. `block_size` is the engine's, which may differ from the profile's.

    N is N(x) of the step's own forward (`HardwareProfile.swap_limit`), not the paper's N(S): a
    step below saturation hides fewer copies, and copies past its forward stall the whole batch
    (docs/policies.md, "the chat gap on the authors' trace")."""
    n, s = profile.swap_limit(step_tokens), profile.saturation_tokens
    f = free_device_tokens
    tokens_in = min(max((n + f - s) / 2, 0.0), n)
    tokens_out = n - tokens_in
    in_blocks = int(tokens_in // block_size)
    tokens_out = min(tokens_out, free_host_tokens + in_blocks * block_size)
    return SwapBudget(in_blocks=in_blocks, out_blocks=int(tokens_out // block_size))
