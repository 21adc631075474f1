"""Where device memory went, step by step (spec 5.1): the share of memory x time wasted, by cause.

* preserve: device KV of paused requests, held while their tool runs; and apart, the part of it
  held in steps where some request needed device blocks that were not free: memory that someone
  could have used (spec 8.1), where the rest was held while the pool had room for everyone;
* recompute: the step's compute time (less any swap stall) spent recomputing discarded or
  preempted context, times the KV the step's batch holds (it all waits on work that was done
  before);
* swap stall: host time the step spent on swap copies that did not overlap compute, times the KV
  the batch holds.

Each is in token-seconds; `summary()` divides by the whole pool's token-seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

from scheduling.output import SchedulerOutput
from scheduling.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class StepUsage:
    """A step's share of the accounting, in tokens and blocks."""
    held_paused: int        # device KV tokens of paused requests
    batch_tokens: int       # KV tokens the step's batch holds once it has run
    recompute: int          # of its query tokens, those that had KV before
    num_tokens: int
    memory_short: bool
    swap_out_blocks: int
    swap_in_blocks: int
    preemptions: int


@dataclass
class WasteMeter:
    pool_tokens: int                  # device pool capacity in tokens
    seconds: float = 0.0
    steps: int = 0
    preserve_token_s: float = 0.0
    preserve_short_token_s: float = 0.0     # of preserve_token_s, in steps short of device memory
    recompute_token_s: float = 0.0
    swap_stall_token_s: float = 0.0
    recompute_tokens: int = 0
    recompute_seconds: float = 0.0
    swap_stall_seconds: float = 0.0
    swap_out_blocks: int = 0
    swap_in_blocks: int = 0
    preemptions: int = 0

    @staticmethod
    def measure(sched: Scheduler, out: SchedulerOutput) -> "StepUsage":
        """What step `out` holds and recomputes, read when it is launched (before its tokens count
        as computed); `add` charges it for its time once the step is done."""
        bs = sched.blocks.block_size
        return StepUsage(
            held_paused=sum(sched.blocks.num_blocks_of(r.request_id) for r in sched.paused.values()) * bs,
            batch_tokens=sum(s.request.num_computed_tokens + s.num_query_tokens for s in out.scheduled),
            recompute=sum(max(0, min(s.request.recompute_until, s.request.num_computed_tokens + s.num_query_tokens)
                                 - s.request.num_computed_tokens) for s in out.scheduled),
            num_tokens=out.num_tokens, memory_short=out.memory_short, swap_out_blocks=len(out.swap_out),
            swap_in_blocks=len(out.swap_in), preemptions=len(out.preempted))

    def add(self, usage: "StepUsage", seconds: float, stall_seconds: float) -> None:
        """Charge a measured step for the `seconds` it took, `stall_seconds` of them in swap copies.
        Recompute gets its share of the compute time only: the stall is charged apart."""
        compute_s = max(seconds - stall_seconds, 0.0)
        recompute_s = compute_s * usage.recompute / usage.num_tokens if usage.num_tokens else 0.0
        self.seconds += seconds
        self.steps += 1
        self.preserve_token_s += usage.held_paused * seconds
        if usage.memory_short:
            self.preserve_short_token_s += usage.held_paused * seconds
        self.recompute_tokens += usage.recompute
        self.recompute_seconds += recompute_s
        self.recompute_token_s += recompute_s * usage.batch_tokens
        self.swap_stall_seconds += stall_seconds
        self.swap_stall_token_s += stall_seconds * usage.batch_tokens
        self.swap_out_blocks += usage.swap_out_blocks
        self.swap_in_blocks += usage.swap_in_blocks
        self.preemptions += usage.preemptions

    def summary(self) -> dict[str, float]:
        """Percent of the pool's memory x time wasted by each cause, plus the raw counters."""
        total = self.pool_tokens * self.seconds
        pct = (lambda x: 100.0 * x / total) if total else (lambda x: 0.0)
        return {
            "waste_preserve_pct": pct(self.preserve_token_s),
            "waste_preserve_short_pct": pct(self.preserve_short_token_s),
            "waste_recompute_pct": pct(self.recompute_token_s),
            "waste_swap_stall_pct": pct(self.swap_stall_token_s),
            "waste_total_pct": pct(self.preserve_token_s + self.recompute_token_s + self.swap_stall_token_s),
            "seconds": self.seconds, "steps": self.steps,
            "recompute_tokens": self.recompute_tokens, "recompute_seconds": self.recompute_seconds,
            "swap_stall_seconds": self.swap_stall_seconds, "swap_out_blocks": self.swap_out_blocks,
            "swap_in_blocks": self.swap_in_blocks, "preemptions": self.preemptions,
        }
