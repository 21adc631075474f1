"""Hardware profiles: the offline-profiled constants the InferCept policy needs (spec 3.5.3).

A profile is measured once per machine and model, stored as JSON, and loaded by name or path.
`PAPER_PROFILES` holds the constants of the released code so the policy can be checked against the
paper's numbers without profiling an A100.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HardwareProfile:
    """What the InferCept policy needs to know about a machine+model (spec 3.5.3)."""

    name: str
    fwd_ms_per_token: float      # a_f in T_fwd(x) = a_f*x + c_f ms, x = query tokens of a step
    fwd_base_ms: float           # c_f
    saturation_tokens: int       # S: the step token budget (knee of T_fwd)
    swap_limit_tokens: float     # N(S): KV tokens copied in+out during one forward of S tokens
    kv_bytes_per_token: int      # M
    block_size: int
    swap_out_gb_per_s: float | None = None   # measured device->host bandwidth (GB/s = 1e9 B/s)
    swap_in_gb_per_s: float | None = None    # measured host->device bandwidth
    num_device_blocks: int | None = None
    num_host_blocks: int | None = None
    device: str = ""             # free-text description of the hardware
    model: str = ""
    weights_gb: float | None = None   # the model's weights over all its GPUs (GB = 1e9 B), to size a pool
    num_gpus: int = 1

    def fwd_seconds(self, num_tokens: float) -> float:
        """T_fwd(x) in seconds: the linear step-time model of spec 3.5.2."""
        return (self.fwd_ms_per_token * num_tokens + self.fwd_base_ms) / 1000

    def swap_limit(self, num_tokens: float) -> float:
        """N(x): KV tokens copied in+out behind a forward of x query tokens without lengthening it,
        N(S) scaled by T_fwd(x) / T_fwd(S) at the same copy rate. The paper budgets every step at
        N(S), as if each were saturated; a step of fewer tokens hides fewer copies."""
        return self.swap_limit_tokens * self.fwd_seconds(num_tokens) / self.fwd_seconds(self.saturation_tokens)

    def swap_seconds(self, num_tokens: float) -> float:
        """T_swap(x): seconds to copy `num_tokens` of KV one way (eq. 3).

        With both bandwidths measured, the slower direction is used, so a swap-out and its later
        swap-in each cost at most this. Otherwise the time comes from the swap limit: N tokens
        (in and out together) move during one forward of S tokens, so one token one way costs
        fwd_seconds(S) / N.
        """
        if self.swap_out_gb_per_s is not None and self.swap_in_gb_per_s is not None:
            bytes_per_s = min(self.swap_out_gb_per_s, self.swap_in_gb_per_s) * 1e9
            return num_tokens * self.kv_bytes_per_token / bytes_per_s
        return num_tokens * self.fwd_seconds(self.saturation_tokens) / self.swap_limit_tokens

    def with_device_memory(self, gib_per_gpu: float) -> HardwareProfile:
        """This machine and model with `gib_per_gpu` of memory on each GPU, its device pool sized by
        the reference's rule: the papers capped the GPUs at 40 GB for 6B and 13B (spec 6.6)."""
        if self.weights_gb is None:
            raise ValueError(f"profile {self.name!r} does not give the size of its weights (weights_gb), so "
                             "its device pool cannot be derived from the device memory")
        blocks = device_pool_blocks(gib_per_gpu, self.num_gpus, self.weights_gb,
                                    self.kv_bytes_per_token * self.block_size)
        return dataclasses.replace(self, num_device_blocks=blocks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        """Build a profile, naming any unknown or missing key (a typo must not pass silently)."""
        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING}
        unknown = sorted(set(d) - known)
        missing = sorted(required - set(d))
        if unknown or missing:
            raise ValueError(f"bad hardware profile: unknown keys {unknown}, "
                             f"missing keys {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> HardwareProfile:
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _paper_swap_limit(a: float, b: float, s: int) -> float:
    """N(S) = (1+2a)*S + 2b: in+out of the released code's swap budgets (spec 3.5.2)."""
    return (1 + 2 * a) * s + 2 * b


GPU_MEMORY_UTILIZATION = 0.9    # the share of GPU memory the reference gives weights, activations and KV
ACTIVATIONS_GB_PER_GPU = 2.0    # peak activation memory assumed on each GPU


def device_pool_blocks(gib_per_gpu: float, num_gpus: int, weights_gb: float, bytes_per_block: int) -> int:
    """The reference's device pool (spec 2.2): (memory x 0.9 - peak activations) on each GPU, less
    the weights, in KV blocks. Memory in GiB, as GPUs are labelled (an A100-80GB has 80 GiB)."""
    usable_gb = num_gpus * (gib_per_gpu * 2**30 * GPU_MEMORY_UTILIZATION / 1e9 - ACTIVATIONS_GB_PER_GPU) - weights_gb
    blocks = int(usable_gb * 1e9 // bytes_per_block)
    if blocks <= 0:
        raise ValueError(f"{gib_per_gpu:g} GiB per GPU on {num_gpus} GPU(s) leaves no room for KV next to "
                         f"{weights_gb:g} GB of weights and {ACTIVATIONS_GB_PER_GPU:g} GB of activations per GPU")
    return blocks


def _paper_profile(name: str, a: float, b: float, *, weights_gb: float, num_gpus: int, swap_space_gib: float,
                   kv_bytes_per_token: int, **constants: Any) -> HardwareProfile:
    """A profile of the released code's constants on A100-80GB GPUs; host blocks = the benchmark's
    --swap-space / bytes per block."""
    bytes_per_block = kv_bytes_per_token * 64
    return HardwareProfile(
        name=name, saturation_tokens=384, swap_limit_tokens=_paper_swap_limit(a, b, 384),
        kv_bytes_per_token=kv_bytes_per_token, block_size=64, weights_gb=weights_gb, num_gpus=num_gpus,
        num_device_blocks=device_pool_blocks(80, num_gpus, weights_gb, bytes_per_block),
        num_host_blocks=int(swap_space_gib * 2**30 // bytes_per_block), **constants)


PAPER_PROFILES: dict[str, HardwareProfile] = {
    "a100-gptj-6b": _paper_profile(      # N(S) about 605.5; 2152 device blocks, 4681 host blocks
        "a100-gptj-6b", 0.00462, 108.99, fwd_ms_per_token=0.0463, fwd_base_ms=10.0,
        kv_bytes_per_token=2 * 28 * 4096 * 2, weights_gb=12.1, num_gpus=1, swap_space_gib=128,
        device="1x A100 (paper constants)", model="GPT-J-6B"),
    "a100x2-vicuna-13b": _paper_profile(  # N(S) about 318.8; 2376 device blocks, 2621 host blocks
        "a100x2-vicuna-13b", -0.3297, 93.994, fwd_ms_per_token=0.0279, fwd_base_ms=15.4,
        kv_bytes_per_token=2 * 40 * 5120 * 2, weights_gb=26.0, num_gpus=2, swap_space_gib=2 * 64,
        device="2x A100, TP=2 (paper constants)", model="Vicuna-13B"),
}


PAPERS_DEVICE_MEMORY_GIB = 40.0   # the papers capped each GPU at 40 GB for 6B and 13B (spec 6.6)


def capped(profile: HardwareProfile, device_memory_gib: float) -> tuple[HardwareProfile, str]:
    """The profile with its device pool sized from `device_memory_gib` per GPU where it gives the
    size of its weights (0: its own pool), and where the pool's size came from."""
    if device_memory_gib and profile.weights_gb is not None:
        return profile.with_device_memory(device_memory_gib), f"{device_memory_gib:g} GiB per GPU"
    return profile, "the profile's own pool"


def load_profile(name_or_path: str) -> HardwareProfile:
    """A paper profile by name, or a profile JSON file by path."""
    if name_or_path in PAPER_PROFILES:
        return PAPER_PROFILES[name_or_path]
    if os.path.isfile(name_or_path):
        return HardwareProfile.from_json(name_or_path)
    raise ValueError(f"unknown hardware profile {name_or_path!r}: not a file and not one of "
                     f"{sorted(PAPER_PROFILES)}")
