"""User-facing configuration: SamplingParams (per request) and EngineConfig (per engine)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from infercept_jax.tools import ToolFormat
from scheduling.estimators import ESTIMATORS
from scheduling.lamps import LampsOptions
from scheduling.policies import HEURISTICS, POLICIES
from scheduling.profile import HardwareProfile

ATTENTION_CHOICES = ("auto", "xla", "pallas")       # auto: the Pallas kernel on GPU, else the XLA path
SWAP_TRANSFERS = ("auto", "pinned_host", "numpy")   # auto: pinned_host off the CPU, else numpy


@dataclass(slots=True)
class SamplingParams:
    """How one request is decoded. Defaults follow vLLM: temperature 1, no top-k/top-p."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off
    seed: int | None = None    # None: drawn from the engine's seed
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # Interception triggers: a tool call in the output, or every N sampled tokens (trace replay).
    tool_format: ToolFormat | None = None
    intercept_after: int | None = None
    max_interceptions: int | None = None      # None: no limit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):       # None as an empty list, as vLLM takes it
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {value!r}")
            setattr(self, name, list(value or []))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**31:    # the step carries it as int32
            raise ValueError(f"top_k must be an integer in [0, 2**31) (0 turns it off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.tool_format is not None and not isinstance(self.tool_format, ToolFormat):
            raise ValueError(f"tool_format must be a ToolFormat, got {type(self.tool_format).__name__}")
        for name in ("intercept_after", "max_interceptions"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine-wide settings; every field is also a keyword argument of `LLM(...)`."""

    dtype: str = "auto"                  # "auto": float32 on CPU, bfloat16 on GPU/TPU
    max_model_len: int | None = None     # None: the model's max_position_embeddings
    block_size: int = 16                 # tokens per KV page
    num_kv_blocks: int | None = None     # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 2.0      # per device
    tensor_parallel_size: int = 1        # devices the weights and the KV pools are split over
    max_num_seqs: int = 64               # requests holding KV at once
    max_num_batched_tokens: int | None = None   # S, query tokens per step; None: the profile's, else
                                                #   the backend's default (build.DEFAULT_TOKEN_BUDGETS)
    row_width: int = 32                  # query tokens per attention row in chunked steps
    attn_chunk_tokens: int = 128         # KV tokens the attention reads per loop iteration
    attention: str = "auto"              # paged attention kernel: xla, pallas; auto: pallas on GPU, else xla
    async_scheduling: bool = False       # schedule and launch step N+1 while step N runs on the device
    warmup: bool = True                  # compile every step shape at start
    strict_compile: bool = True          # raise if a step shape compiles after warm-up
    compile_cache: bool = True           # keep compiled steps on disk (JAX's persistent cache)
    seed: int = 0
    # Interception (InferCept): what happens to a paused request's KV.
    policy: str = "infercept"            # discard, improved-discard, preserve, swap, heuristic, infercept, lamps
    heuristic: str = "H-B"               # H-S, H-D or H-B, for policy="heuristic"
    profile: str | HardwareProfile | None = None   # JSON file, paper profile name or profile; None: uncalibrated
    estimator: str | None = None         # call durations: oracle, noisy-oracle, tool-mean, dynamic;
                                         #   None: dynamic, or tool-mean under the heuristic policy
    estimator_error: float = 0.0         # noisy-oracle: each call's oracle duration times uniform [1-e, 1+e]
    swap_space_gb: float = 1.0           # host KV pool for swapped-out blocks, per device
    num_host_blocks: int | None = None   # None: sized from swap_space_gb
    swap_transfer: str = "auto"          # host pool memory: pinned_host, numpy; auto: pinned_host off the CPU
    lamps: LampsOptions = field(default_factory=LampsOptions)   # policy="lamps" (scheduling/lamps.py)

    def __post_init__(self) -> None:
        positive = ["block_size", "max_num_seqs", "row_width", "attn_chunk_tokens", "tensor_parallel_size"]
        if self.max_num_batched_tokens is not None:
            positive.append("max_num_batched_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be auto, xla or pallas, got {self.attention!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name, least in (("num_kv_blocks", 2), ("max_model_len", 2), ("num_host_blocks", 0)):   # block 0 is reserved
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < least):
                raise ValueError(f"{name} must be None or an integer >= {least}, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _is_finite(self.kv_cache_memory_gb) or not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be a number > 0, got {self.kv_cache_memory_gb!r}")
        if not _is_finite(self.swap_space_gb) or self.swap_space_gb < 0:
            raise ValueError(f"swap_space_gb must be a number >= 0, got {self.swap_space_gb!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.heuristic not in HEURISTICS:
            raise ValueError(f"heuristic must be one of {', '.join(HEURISTICS)}, got {self.heuristic!r}")
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.policy == "heuristic" and self.estimator == "dynamic":
            raise ValueError("the heuristic policy decides once, at the pause, where the dynamic estimate is 0 s, "
                             "so it would preserve every call; use estimator oracle, noisy-oracle or tool-mean "
                             "(or leave it unset: tool-mean)")
        if not (isinstance(self.estimator_error, (int, float)) and math.isfinite(self.estimator_error)
                and self.estimator_error >= 0):
            raise ValueError(f"estimator_error must be a finite number >= 0, got {self.estimator_error!r}")
        if self.estimator_error and self.estimator != "noisy-oracle":
            raise ValueError(f"estimator_error is the noisy-oracle estimator's error; the estimator is "
                             f"{self.resolved_estimator!r}")
        if self.swap_transfer not in SWAP_TRANSFERS:
            raise ValueError(f"swap_transfer must be auto, pinned_host or numpy, got {self.swap_transfer!r}")
        if self.profile is not None and not isinstance(self.profile, (str, HardwareProfile)):
            raise ValueError(f"profile must be a file, a profile name or a HardwareProfile, got {self.profile!r}")
        if not isinstance(self.lamps, LampsOptions):
            raise ValueError(f"lamps must be LampsOptions, got {type(self.lamps).__name__}")

    @property
    def resolved_estimator(self) -> str:
        """The estimator's name, with the default filled in: the heuristic policy decides at the
        pause, where only an estimator that knows something then (tool-mean) is of use."""
        if self.estimator is not None:
            return self.estimator
        return "tool-mean" if self.policy == "heuristic" else "dynamic"

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """The config of `LLM(**kwargs)`: unknown options are refused by name, and `lamps` may be
        a dict of LampsOptions fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        if isinstance(kwargs.get("lamps"), dict):
            lamps_fields = {f.name for f in fields(LampsOptions)}
            unknown = sorted(set(kwargs["lamps"]) - lamps_fields)
            if unknown:
                raise ValueError(f"unknown LAMPS option(s) {unknown}; known: {sorted(lamps_fields)}")
            kwargs["lamps"] = LampsOptions(**kwargs["lamps"])
        return cls(**kwargs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
