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

    def fwd_seconds(self, num_tokens: float) -> float:
        """T_fwd(x) in seconds: the linear step-time model of spec 3.5.2."""
        return (self.fwd_ms_per_token * num_tokens + self.fwd_base_ms) / 1000

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


# Pool sizes follow the reference's rule (spec 2.2): device blocks = (memory * 0.9 - weights - peak
# activations) / bytes per block, assuming A100-80GB and about 2 GB of activations per GPU; host
# blocks = the benchmarks' --swap-space (128 GiB for 6B, 64 GiB per GPU for 13B-TP2) / bytes per block.
PAPER_PROFILES: dict[str, HardwareProfile] = {
    "a100-gptj-6b": HardwareProfile(
        name="a100-gptj-6b", fwd_ms_per_token=0.0463, fwd_base_ms=10.0, saturation_tokens=384,
        swap_limit_tokens=_paper_swap_limit(0.00462, 108.99, 384),    # about 605.5
        kv_bytes_per_token=2 * 28 * 4096 * 2, block_size=64,           # 458752
        num_device_blocks=2152,       # (77.3 - 12.1 - 2) GB / 29.36 MB
        num_host_blocks=4681,         # 128 GiB / 29.36 MB
        device="1x A100 (paper constants)", model="GPT-J-6B"),
    "a100x2-vicuna-13b": HardwareProfile(
        name="a100x2-vicuna-13b", fwd_ms_per_token=0.0279, fwd_base_ms=15.4, saturation_tokens=384,
        swap_limit_tokens=_paper_swap_limit(-0.3297, 93.994, 384),    # about 318.8
        kv_bytes_per_token=2 * 40 * 5120 * 2, block_size=64,           # 819200
        num_device_blocks=2376,       # (2 * 77.3 - 26 - 4) GB / 52.43 MB
        num_host_blocks=2621,         # 2 * 64 GiB / 52.43 MB
        device="2x A100, TP=2 (paper constants)", model="Vicuna-13B"),
}


def load_profile(name_or_path: str) -> HardwareProfile:
    """A paper profile by name, or a profile JSON file by path."""
    if name_or_path in PAPER_PROFILES:
        return PAPER_PROFILES[name_or_path]
    if os.path.isfile(name_or_path):
        return HardwareProfile.from_json(name_or_path)
    raise ValueError(f"unknown hardware profile {name_or_path!r}: not a file and not one of "
                     f"{sorted(PAPER_PROFILES)}")
