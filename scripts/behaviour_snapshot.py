"""Record what the engine decides, so that a refactor can show it changed nothing.

    .venv/bin/python scripts/behaviour_snapshot.py --out /tmp/before           # before the change
    .venv/bin/python scripts/behaviour_snapshot.py --out /tmp/after --compare /tmp/before

Everything goes through the command line and the public Python API, which a refactor keeps:
  * fixed-seed simulator replays (`infercept replay --simulate`): every policy on the mixture and
    on the single-call set, on the 6B and the 13B paper profiles, near and above capacity; LAMPS
    with prediction error, learned lengths, tool-mean durations, no starvation guard, re-ranking
    every 10 steps and swapped-first; InferCept with the dynamic estimator; and a small CPU-like
    profile whose pools are so tight that every policy swaps, discards and preempts;
  * a generated trace (`infercept workload`) and a length model trained on it (`infercept predictor`);
  * a greedy run of SmolLM2-135M on the real engine under every policy, each request paused twice
    on a pool small enough to swap and discard: the tokens, which must not depend on the policy either.

With --compare, every file is compared byte for byte with the other folder's; the exit status is 1
if any differs. The simulator part takes about 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

POLICIES = ("discard", "improved-discard", "preserve", "swap", "heuristic", "infercept", "lamps")
# (name, profile, trace, rates near and above its capacity, window s)
PAPER_RUNS = [
    (f"{profile}-{trace}", profile, f"builtin:{trace}", rates, 240)
    for profile, by_trace in (("a100-gptj-6b", {"mixed": (7.0, 9.0), "mixed-onecall": (13.0, 16.0)}),
                              ("a100x2-vicuna-13b", {"mixed": (6.5, 8.5), "mixed-onecall": (12.5, 15.5)}))
    for trace, rates in by_trace.items()
]
# A CPU-sized machine (the profile measured in the README's real-engine runs) on tight pools.
SMALL_PROFILE = {
    "name": "cpu-small", "fwd_ms_per_token": 1.69, "fwd_base_ms": 105.0, "saturation_tokens": 256,
    "swap_limit_tokens": 2000.0, "kv_bytes_per_token": 46080, "block_size": 16, "swap_out_gb_per_s": 3.0,
    "swap_in_gb_per_s": 2.5, "num_device_blocks": 160, "num_host_blocks": 512, "device": "snapshot",
    "model": "SmolLM2-135M"}
LAMPS_VARIANTS = {
    "error20": ["--prediction-error", "0.2"],
    "toolmean": ["--duration-predictor", "tool-mean"],
    "noguard": ["--starvation-threshold", "0"],
    "rerank10": ["--rerank-interval", "10"],
    "swappedfirst": ["--swapped-first"],
}


def cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "infercept_jax.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"infercept {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def replay_commands(out: str) -> list[list[str]]:
    """Every simulator replay of the snapshot, as `infercept replay` argument lists."""
    commands = []
    for name, profile, trace, rates, window in PAPER_RUNS:
        common = ["replay", "--simulate", "--profile", profile, "--trace", trace, "--window", str(window),
                  "--quiet", *[a for qps in rates for a in ("--qps", str(qps))]]
        commands.append([*common, *[a for p in POLICIES for a in ("--policy", p)], "--out", f"{out}/{name}"])
        commands.append([*common, "--policy", "infercept", "--estimator", "dynamic", "--out", f"{out}/{name}-dynamic"])
        if "6b" in profile:
            for variant, flags in LAMPS_VARIANTS.items():
                commands.append([*common, "--policy", "lamps", *flags, "--out", f"{out}/{name}-lamps-{variant}"])
            commands.append([*common, "--policy", "lamps", "--length-predictor", f"{out}/length-model.json",
                             "--out", f"{out}/{name}-lamps-learned"])
    small = ["replay", "--simulate", "--profile", f"{out}/cpu-small.json", "--trace", "builtin:mixed-small",
             "--window", "300", "--time-scale", "0.1", "--quiet", "--qps", "1", "--qps", "3"]
    commands.append([*small, *[a for p in POLICIES for a in ("--policy", p)], "--out", f"{out}/cpu-small"])
    commands.append([*small, "--policy", "lamps", "--swapped-first", "--out", f"{out}/cpu-small-swappedfirst"])
    return commands


def simulator_snapshot(out: str, workers: int) -> None:
    with open(f"{out}/cpu-small.json", "w") as f:
        json.dump(SMALL_PROFILE, f, indent=2)
    cli("workload", "--kind", "mixed", "--n", "600", "--seed", "3", "-o", f"{out}/trace.json")
    printed = cli("predictor", "--trace", f"{out}/trace.json", "-o", f"{out}/length-model.json")
    with open(f"{out}/predictor.txt", "w") as f:    # without the timing line and the output path
        f.write("".join(line + "\n" for line in printed.splitlines()
                        if "µs" not in line and not line.startswith("wrote ")))
    commands = replay_commands(out)
    with ThreadPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(lambda args: cli(*args), commands), 1):
            print(f"  {done}/{len(commands)} replays", flush=True)
    for path in _files(out):
        if path.endswith(".png"):       # plots: same data, but matplotlib's bytes are not the point
            os.remove(os.path.join(out, path))


def greedy_snapshot(out: str) -> None:
    """Greedy tokens of the real engine under each policy, two pauses per request, tiny pools."""
    from infercept_jax import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
    tokens = {}
    for policy in POLICIES:
        llm = LLM("smollm2-135m", policy=policy, profile="a100-gptj-6b", max_model_len=256, num_kv_blocks=12,
                  num_host_blocks=32, max_num_seqs=4, block_size=8)
        engine = llm.engine
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, intercept_after=7,
                                max_interceptions=2)
        ids = [engine.add_request(llm.tokenizer.encode(p), params) for p in prompts]
        done = {}
        while engine.has_unfinished():
            for step_out in engine.step():
                if step_out.paused:
                    engine.resume(step_out.request_id, [42, 43, 44])
                elif step_out.finished:
                    done[step_out.request_id] = step_out.token_ids
        tokens[policy] = [done[rid] for rid in ids]
    with open(f"{out}/greedy_tokens.json", "w") as f:
        json.dump(tokens, f, indent=1)


def _files(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, name), folder) for d, _, names in os.walk(folder) for name in names)


def compare(a: str, b: str) -> list[str]:
    """The files that are not byte-identical in both folders (or exist in one only)."""
    files_a, files_b = set(_files(a)), set(_files(b))
    differ = sorted(files_a ^ files_b)
    differ += [p for p in sorted(files_a & files_b)
               if not filecmp.cmp(os.path.join(a, p), os.path.join(b, p), shallow=False)]
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="an empty folder for the snapshot")
    parser.add_argument("--compare", help="a snapshot folder to compare against, byte for byte")
    parser.add_argument("--workers", type=int, default=2, help="replays at once")
    parser.add_argument("--no-real", action="store_true", help="skip the real-engine greedy run")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    simulator_snapshot(args.out, args.workers)
    if not args.no_real:
        greedy_snapshot(args.out)
    print(f"wrote {len(_files(args.out))} files to {args.out}")
    if args.compare:
        differ = compare(args.out, args.compare)
        for path in differ:
            print(f"differs: {path}")
        print(f"{len(_files(args.out)) - len(differ)} identical, {len(differ)} different")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
