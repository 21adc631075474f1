"""Hardware profiles and the waste equations, checked against values worked out by hand."""
from __future__ import annotations

import dataclasses

import pytest

from scheduling.accounting import StepUsage, WasteMeter
from scheduling.profile import PAPER_PROFILES, HardwareProfile, _paper_swap_limit, device_pool_blocks, load_profile
from scheduling.waste import (SwapBudget, chunked_discard_waste, discard_waste, preserve_waste,
                              swap_budget, swap_waste)

GPTJ = PAPER_PROFILES["a100-gptj-6b"]
VICUNA = PAPER_PROFILES["a100x2-vicuna-13b"]
S = 384      # a saturated step: the paper's budget N(S)

# Round numbers: T_fwd(400) = (0.05*400 + 10) ms = 30 ms; one token one way = 0.03 s / 600.
ROUND = HardwareProfile(name="round", fwd_ms_per_token=0.05, fwd_base_ms=10.0,
                        saturation_tokens=400, swap_limit_tokens=600.0,
                        kv_bytes_per_token=100_000, block_size=16)


# --- profile ---------------------------------------------------------------------------------

def test_paper_profiles_constants():
    # 6B:  N = (1 + 2*0.00462)*384 + 2*108.99 = 387.54816 + 217.98 = 605.52816
    assert GPTJ.swap_limit_tokens == pytest.approx(605.5, abs=0.1)
    # 13B: N = (1 - 2*0.3297)*384 + 2*93.994 = 130.7904 + 187.988 = 318.7784
    assert VICUNA.swap_limit_tokens == pytest.approx(318.8, abs=0.1)
    assert GPTJ.kv_bytes_per_token == 458_752        # 2*28*4096*2
    assert VICUNA.kv_bytes_per_token == 819_200      # 2*40*5120*2
    assert (GPTJ.block_size, VICUNA.block_size) == (64, 64)
    assert all(name == p.name for name, p in PAPER_PROFILES.items())


def test_paper_swap_limit_rule():
    # The rule behind the two constants above, called at test time: PAPER_PROFILES is built at
    # import, before mutation testing switches a mutant on, so only a call here sees a change.
    assert _paper_swap_limit(0.00462, 108.99, 384) == pytest.approx(605.52816)
    assert _paper_swap_limit(-0.3297, 93.994, 384) == pytest.approx(318.7784)


def test_paper_pools_by_the_reference_rule_on_80_and_40_gib_gpus():
    """Spec 2.2: (GiB x 2^30 x 0.9 / 1e9 - 2 GB of activations) per GPU, less the weights, over the
    bytes of a 64-token block. 80 GiB: 77.309 GB. 6B: (77.309 - 2 - 12.1) GB / 29.360128 MB = 2152.9;
    13B-TP2: (2 * 75.309 - 26) GB / 52.4288 MB = 2376.9. 40 GiB (the papers' cap, spec 6.6):
    38.655 GB; 6B: 24.555 / 0.029360128 = 836.3, 13B: 47.309 / 0.0524288 = 902.3."""
    assert (GPTJ.num_device_blocks, VICUNA.num_device_blocks) == (2152, 2376)
    assert (GPTJ.num_host_blocks, VICUNA.num_host_blocks) == (4681, 2621)   # 128 GiB and 2 x 64 GiB
    assert GPTJ.with_device_memory(40).num_device_blocks == 836
    assert VICUNA.with_device_memory(40).num_device_blocks == 902
    assert GPTJ.with_device_memory(40).num_host_blocks == 4681                 # the host pool stays
    assert device_pool_blocks(80, 1, 12.1, 458_752 * 64) == 2152               # the rule, called at test time


def test_device_memory_that_cannot_hold_the_weights_or_a_profile_without_them_is_refused():
    with pytest.raises(ValueError, match="leaves no room for KV"):
        GPTJ.with_device_memory(14)         # 13.53 GB, less 2 of activations, is under 12.1 of weights
    with pytest.raises(ValueError, match="weights_gb"):
        ROUND.with_device_memory(40)


def test_the_measured_h200_profile_loads_and_sizes_its_pool():
    """The H200 profile measured by bench_swap (../shared/gpu), with the weights of its model:
    1.711e9 parameters x 2 bytes. 40 GiB: (38.655 - 2 - 3.42) GB / (196608 B x 16) = 10565.6."""
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "profiles", "h200-smollm2-1.7b.json")
    h200 = load_profile(path)
    assert (h200.saturation_tokens, h200.block_size, h200.weights_gb) == (384, 16, 3.42)
    assert h200.with_device_memory(40).num_device_blocks == 10565


def test_fwd_seconds():
    # 6B: (0.0463*384 + 10) ms = 27.7792 ms; 13B: (0.0279*384 + 15.4) ms = 26.1136 ms
    assert GPTJ.fwd_seconds(384) == pytest.approx(0.0277792)
    assert VICUNA.fwd_seconds(384) == pytest.approx(0.0261136)


def test_swap_seconds_from_swap_limit():
    # 1000 tokens * 0.03 s / 600 tokens = 0.05 s
    assert ROUND.swap_seconds(1000) == pytest.approx(0.05)


def test_swap_seconds_from_slower_bandwidth():
    p = dataclasses.replace(ROUND, swap_out_gb_per_s=20.0, swap_in_gb_per_s=25.0)
    # 1000 tokens * 1e5 B / 20e9 B/s = 0.005 s (the slower of 20 and 25 GB/s)
    assert p.swap_seconds(1000) == pytest.approx(0.005)
    # a GB is 10^9 bytes: 10^4 tokens * 10^5 B at 1 GB/s is exactly one second
    assert dataclasses.replace(ROUND, swap_out_gb_per_s=1.0, swap_in_gb_per_s=2.0).swap_seconds(10_000) == 1.0
    # one bandwidth alone is not enough: fall back to the swap limit
    one_way = dataclasses.replace(ROUND, swap_out_gb_per_s=20.0)
    assert one_way.swap_seconds(1000) == pytest.approx(0.05)


def test_json_round_trip(tmp_path):
    p = dataclasses.replace(GPTJ, name="measured", swap_out_gb_per_s=21.5, swap_in_gb_per_s=24.0,
                            num_device_blocks=1000, num_host_blocks=4000)
    path = tmp_path / "profile.json"
    p.to_json(path)
    assert HardwareProfile.from_json(path) == p
    assert HardwareProfile.from_dict(p.to_dict()) == p
    assert load_profile(str(path)) == p


def test_from_dict_rejects_unknown_and_missing_keys():
    d = GPTJ.to_dict()
    with pytest.raises(ValueError, match="saturation_tokns"):
        HardwareProfile.from_dict({**d, "saturation_tokns": 384})
    del d["kv_bytes_per_token"]
    with pytest.raises(ValueError, match="kv_bytes_per_token"):
        HardwareProfile.from_dict(d)


def test_load_profile_by_name_and_unknown(tmp_path):
    assert load_profile("a100-gptj-6b") is GPTJ
    with pytest.raises(ValueError, match="a100x2-vicuna-13b"):
        load_profile(str(tmp_path / "nope.json"))


# --- waste -----------------------------------------------------------------------------------

def test_preserve_waste():
    assert preserve_waste(2.5, 100) == pytest.approx(250.0)
    assert preserve_waste(-1.0, 100) == 0.0   # an overrun call: clamped, not negative


def test_discard_waste():
    # T_fwd(1000) = (0.0463*1000 + 10) ms = 0.0563 s; 0.0563*1000 + 0.0563*3000 = 56.3 + 168.9
    assert discard_waste(1000, 3000, GPTJ) == pytest.approx(225.2)


def test_chunked_discard_waste():
    # c_h = 384 - 84 = 300; n = ceil(1000/300) - 1 = 3
    # f_s = (0.0463*384 + 10)/1000 = 0.0277792; f_ch = 0.0463*300/1000 = 0.01389
    # f_s*(1+3)*3/2*300 = 0.0277792*1800 = 50.00256
    # f_ch*3*2000 = 83.34
    # last = 1000 % 300 = 100: (0.0463*100/1000)*(2000 + 100) = 0.00463*2100 = 9.723
    # total = 50.00256 + 83.34 + 9.723 = 143.06556
    assert chunked_discard_waste(1000, 84, 2000, GPTJ) == pytest.approx(143.06556)


def test_chunked_discard_waste_whole_chunks_and_edges():
    # C = 600 is two whole chunks of 300: n = 2, last = 0 (the released code drops one: n = 1)
    # 0.0277792*3*2/2*300 + 0.01389*2*2000 = 25.00128 + 55.56 = 80.56128
    assert chunked_discard_waste(600, 84, 2000, GPTJ) == pytest.approx(80.56128)
    assert chunked_discard_waste(0, 84, 2000, GPTJ) == 0.0
    # running requests use the whole budget: c_h = max(384 - 400, 1) = 1, n = 3
    # 0.0277792*4*3/2*1 + 0.0000463*3*0 = 0.1666752
    assert chunked_discard_waste(3, 400, 0, GPTJ) == pytest.approx(0.1666752)


def test_swap_waste():
    # 2 * 0.05 s * 500 tokens = 50
    assert swap_waste(1000, 500, ROUND) == pytest.approx(50.0)


# --- swap budget -----------------------------------------------------------------------------
# 6B: N = 605.52816, S = 384.   13B: N = 318.7784, S = 384.

PLENTY = 10**9


def test_swap_budget_both_positive():
    # in = (605.52816 + 640 - 384)/2 = 430.76408 -> 6 blocks of 64; out = 605.52816 - 430.76408
    # = 174.76408 -> 2 blocks
    assert swap_budget(640, PLENTY, GPTJ, 64, S) == SwapBudget(in_blocks=6, out_blocks=2)
    # the engine's block size, not the profile's: 430.76408 // 16 = 26, 174.76408 // 16 = 10
    assert swap_budget(640, PLENTY, GPTJ, 16, S) == SwapBudget(in_blocks=26, out_blocks=10)


def test_swap_budget_in_clamped_to_zero():
    # in = (318.7784 + 0 - 384)/2 = -32.6108 -> 0; out = N = 318.7784 -> 4 blocks
    assert swap_budget(0, PLENTY, VICUNA, 64, S) == SwapBudget(in_blocks=0, out_blocks=4)
    # a whole number of blocks: N = 256 = 4 blocks of 64, all of them out (nothing kept back for in)
    whole = dataclasses.replace(VICUNA, swap_limit_tokens=256.0)
    assert swap_budget(0, PLENTY, whole, 64, S) == SwapBudget(in_blocks=0, out_blocks=4)


def test_swap_budget_out_clamped_to_zero():
    # in = (605.52816 + 1280 - 384)/2 = 750.76 > N -> N = 605.52816 -> 9 blocks; out = 0
    assert swap_budget(1280, PLENTY, GPTJ, 64, S) == SwapBudget(in_blocks=9, out_blocks=0)


def test_swap_budget_of_a_step_below_saturation_hides_fewer_copies():
    # 6B, a step of 134 query tokens: T_fwd = 0.0463*134 + 10 = 16.2042 ms against 27.7792 at S,
    # so N = 605.52816 * 16.2042/27.7792 = 353.22. F = 1280: in = min((353.22 + 896)/2, N) = N ->
    # 5 blocks of 64 (9 at S); out = 0
    assert GPTJ.swap_limit(134) == pytest.approx(605.52816 * 16.2042 / 27.7792)
    assert swap_budget(1280, PLENTY, GPTJ, 64, 134) == SwapBudget(in_blocks=5, out_blocks=0)
    # F = 0: in = (353.22 - 384)/2 < 0 -> 0; out = N -> 5 blocks (9 at S: 605.5 // 64)
    assert swap_budget(0, PLENTY, GPTJ, 64, 134) == SwapBudget(in_blocks=0, out_blocks=5)
    assert swap_budget(0, PLENTY, GPTJ, 64, S) == SwapBudget(in_blocks=1, out_blocks=7)


def test_swap_budget_host_room():
    # 6B, F = 0: in = (605.52816 - 384)/2 = 110.76408 -> 1 block; out = 494.76408, but the host
    # has 0 free + 64 freed by the swap-in -> 64 -> 1 block
    assert swap_budget(0, 0, GPTJ, 64, S) == SwapBudget(in_blocks=1, out_blocks=1)
    # 13B, F = 0: in = 0; out = 318.7784 limited to 128 host tokens -> 2 blocks
    assert swap_budget(0, 128, VICUNA, 64, S) == SwapBudget(in_blocks=0, out_blocks=2)


# --- accounting ------------------------------------------------------------------------------

def test_waste_meter_summary_by_hand():
    meter = WasteMeter(pool_tokens=100, seconds=2.0, steps=3, preserve_token_s=20.0, preserve_short_token_s=6.0,
                       recompute_token_s=10.0,
                       swap_stall_token_s=4.0, recompute_tokens=7, recompute_seconds=0.5,
                       swap_stall_seconds=0.25, swap_out_blocks=2, swap_in_blocks=1, preemptions=1)
    # the pool holds 100 tokens for 2 s = 200 token-seconds
    assert meter.summary() == {
        "waste_preserve_pct": 10.0, "waste_preserve_short_pct": 3.0, "waste_recompute_pct": 5.0, "waste_swap_stall_pct": 2.0,
        "waste_total_pct": 17.0, "seconds": 2.0, "steps": 3, "recompute_tokens": 7,
        "recompute_seconds": 0.5, "swap_stall_seconds": 0.25, "swap_out_blocks": 2, "swap_in_blocks": 1,
        "preemptions": 1}


def test_the_swap_stall_of_a_step_is_not_also_charged_to_its_recompute():
    """A step of 1 s, 0.4 s of it stalled on copies, that only recomputes: 0.6 s of recompute and
    0.4 s of stall, together the step's 1 s of the batch's memory, not 1.4 s."""
    meter = WasteMeter(pool_tokens=10)
    usage = StepUsage(held_paused=0, batch_tokens=10, recompute=5, num_tokens=5, memory_short=False,
                      swap_out_blocks=1, swap_in_blocks=0, preemptions=0)
    meter.add(usage, seconds=1.0, stall_seconds=0.4)
    s = meter.summary()
    assert s["recompute_seconds"] == pytest.approx(0.6)
    assert (s["waste_recompute_pct"], s["waste_swap_stall_pct"]) == (pytest.approx(60.0), pytest.approx(40.0))
    assert s["waste_total_pct"] == pytest.approx(100.0)


def test_waste_meter_summary_before_any_step_is_zero():
    summary = WasteMeter(pool_tokens=100).summary()
    assert [summary[k] for k in ("waste_preserve_pct", "waste_recompute_pct", "waste_swap_stall_pct",
                                 "waste_total_pct")] == [0.0] * 4


def test_waste_meter_record_by_hand():
    from types import SimpleNamespace as NS

    from kvcache.block_manager import BlockManager
    blocks = BlockManager(16, 4)
    blocks.ensure("p", 8)                                            # a paused request holds 2 blocks
    sched = NS(blocks=blocks, paused={"p": NS(request_id="p")})
    # two scheduled requests: 10 computed + 6 new tokens, 4 of them (10..13) recomputed; 20 + 2, none
    a = NS(request=NS(num_computed_tokens=10, recompute_until=14), num_query_tokens=6)
    b = NS(request=NS(num_computed_tokens=20, recompute_until=5), num_query_tokens=2)
    out = NS(scheduled=[a, b], num_tokens=8, swap_out=[(1, 0)], swap_in=[(2, 3), (4, 5), (6, 7)],
             preempted=["x", "y"], memory_short=False)
    meter = WasteMeter(pool_tokens=60)
    meter.add(meter.measure(sched, out), seconds=2.0, stall_seconds=0.5)
    meter.add(meter.measure(sched, NS(**{**vars(out), "memory_short": True})), seconds=2.0, stall_seconds=0.5)
    s = meter.summary()
    # each step: paused 8 tokens x 2 s = 16; recompute (2 - 0.5 stalled) s x 4/8 = 0.75 s x batch
    # (16 + 22) = 28.5; stall 0.5 s x 38 = 19; the pool is 60 tokens x 4 s = 240 token-seconds
    assert (s["seconds"], s["steps"], s["recompute_tokens"]) == (4.0, 2, 8)
    assert s["recompute_seconds"] == pytest.approx(1.5)
    assert s["waste_preserve_pct"] == pytest.approx(100 * 32 / 240)
    assert s["waste_preserve_short_pct"] == pytest.approx(100 * 16 / 240)   # the second step only
    assert s["waste_recompute_pct"] == pytest.approx(100 * 57 / 240)
    assert s["waste_swap_stall_pct"] == pytest.approx(100 * 38 / 240)
    assert (s["swap_stall_seconds"], s["swap_out_blocks"], s["swap_in_blocks"], s["preemptions"]) == (1.0, 2, 6, 4)
    empty = NS(scheduled=[], num_tokens=0, swap_out=[], swap_in=[], preempted=[], memory_short=False)
    meter.add(meter.measure(sched, empty), seconds=1.0, stall_seconds=0.0)      # a step with nothing scheduled
    assert meter.summary()["recompute_seconds"] == pytest.approx(1.5) and meter.steps == 3
    meter.add(meter.measure(sched, NS(**{**vars(out), "memory_short": True})), seconds=2.0, stall_seconds=0.5)
    assert meter.preserve_short_token_s == pytest.approx(16 + 16)     # both short steps add up
