"""Benchmark the server with agent sessions over HTTP: transparent resume against `--no-resume`.

Each session is an agent loop through the `openai` client: it asks for the weather in a city, the
model calls `get_weather`, the "tool" sleeps for a latency drawn from the workload generator's
distribution of the chosen kinds (spec 1.2), and the session sends the conversation back with the
result; the model answers; the next question follows. The conversation opens with solved examples
(which also keep a 135M model to the call format) up to `--context-tokens`. With resume the turn
after a tool result continues the paused request; with `--no-resume` (what other servers do) it is
a new request that prefills the whole conversation again.

Both modes run the same sessions (same seed) on a fresh `infercept serve` process each, started by
this script. Reported per mode: time to first token of the turns after a tool result (and of the
question turns), turns completed per second, the server's memory waste, and the KV it kept.

    .venv/bin/python scripts/bench_serve.py --sessions 2 --sessions 12        # TTFT, then a saturating load
    .venv/bin/python scripts/bench_serve.py --soak 600 --sessions 8           # 10 min of disconnects and timeouts

It needs the test extra (the `openai` client and httpx): the venv `make test` builds has it.

`--soak S` runs sessions for S seconds against one resume server: a session stops reading a stream
midway (a disconnect) or walks away after a tool call (left to `--pause-timeout`) at random. At the
end the script checks that every request got its answer or was dropped on purpose, and that the
server holds no request and no KV block.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import openai

from infercept_jax.experiments.records import write_result
from infercept_jax.experiments.workload import PARAMS

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CITIES = ["Rome", "Oslo", "Lima", "Berlin", "Paris", "Tokyo", "Madrid", "Cairo", "Sydney", "Toronto", "Mumbai",
          "Seoul", "Nairobi", "Dublin", "Vienna", "Lisbon", "Prague", "Warsaw", "Athens", "Helsinki", "Chicago",
          "Denver", "Boston", "Havana", "Quito", "Bogota", "Santiago", "Manila", "Hanoi", "Jakarta", "Bangkok",
          "Delhi", "Dubai", "Doha", "Riyadh", "Tunis", "Dakar", "Accra", "Lagos", "Zurich"]
WEATHER = ["Sunny, 24 C", "Snow, -3 C", "Cloudy, 18 C", "Rain, 12 C", "Windy, 9 C", "Fog, 6 C", "Clear, 30 C"]
MODEL = "bench-model"


def call_text(city: str) -> str:
    return '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "%s"}}\n]</tool_call>' % city


def opening(rng: random.Random, context_tokens: int) -> list[dict]:
    """Solved examples, about 75 tokens each, up to about `context_tokens` with the tool prompt."""
    messages = []
    for _ in range(max(1, (context_tokens - 150) // 75)):
        city, weather = rng.choice(CITIES), rng.choice(WEATHER)
        messages += [{"role": "user", "content": f"Tell me the weather in {city}."},
                     {"role": "assistant", "content": call_text(city)}, {"role": "tool", "content": weather},
                     {"role": "assistant", "content": f"In {city} it is {weather}."}]
    return messages


@dataclass
class Tally:
    ttft_after_tool: list[float] = field(default_factory=list)
    ttft_question: list[float] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    no_call: int = 0              # question turns the model answered without calling the tool
    sent: int = 0                 # HTTP requests sent
    answered: int = 0             # ... that came back complete (any status but 5xx)
    disconnected: int = 0         # ... that the session dropped on purpose mid-stream
    walked_away: int = 0          # tool calls whose result the session never sent
    failed: list[str] = field(default_factory=list)   # 5xx, broken streams, timeouts: lost requests


async def turn(client: openai.AsyncOpenAI, messages: list[dict], tally: Tally, disconnect: bool
               ) -> tuple[float | None, str, list, str | None]:
    """One streamed turn: (time to first token, text, tool calls, finish reason); finish None if dropped."""
    tally.sent += 1
    start, first, text, calls, finish = time.perf_counter(), None, "", [], None
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=48, stream=True)
        async for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and (delta.content or delta.tool_calls) and first is None:
                first = time.perf_counter() - start
            if delta is not None:
                text += delta.content or ""
                calls += delta.tool_calls or []
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if disconnect and first is not None:
                await stream.close()
                tally.disconnected += 1
                return first, text, calls, None
    except (openai.APIError, httpx.HTTPError) as exc:
        tally.failed.append(f"{type(exc).__name__}: {exc}")
        return None, text, calls, None
    if finish is None:
        tally.failed.append("a stream ended without a finish reason")
    else:
        tally.answered += 1
        tally.turns += 1
    return first, text, calls, finish


async def session(url: str, index: int, args, tally: Tally, stop_at: float) -> None:
    rng = random.Random(args.seed * 1000 + index)
    kinds = args.tool_kinds.split(",")
    messages = opening(rng, args.context_tokens)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        await asyncio.sleep(rng.uniform(0, args.stagger))
        for question in range(10**9 if args.soak else args.questions):
            if time.perf_counter() >= stop_at:
                return
            city = rng.choice(CITIES)
            messages = messages + [{"role": "user", "content": f"Tell me the weather in {city}."}]
            drop = args.soak and rng.random() < args.disconnect_rate
            ttft, text, calls, finish = await turn(client, messages, tally, drop)
            if finish is None:
                return
            tally.ttft_question.append(ttft)
            if finish != "tool_calls":
                tally.no_call += 1
                messages = messages + [{"role": "assistant", "content": text}]
                continue
            tally.tool_calls += 1
            if args.soak and rng.random() < args.walk_away_rate:
                tally.walked_away += 1
                return
            call = calls[0]
            call_time = PARAMS[rng.choice(kinds)].cycle[0].api_time
            await asyncio.sleep(call_time.draw(np.random.default_rng(rng.randrange(2**32))))
            messages = messages + [
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": rng.choice(WEATHER)}]
            drop = args.soak and rng.random() < args.disconnect_rate
            ttft, text, _, finish = await turn(client, messages, tally, drop)
            if finish is None:
                return
            tally.ttft_after_tool.append(ttft)
            messages = messages + [{"role": "assistant", "content": text}]


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


class Server:
    """`infercept serve` in a child process on a free port."""

    def __init__(self, args, resume: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "infercept_jax.cli", "serve", "--model", args.model, "--served-model-name",
                   MODEL, "--port", str(self.port), "--policy", args.policy, "--max-model-len", str(args.max_model_len),
                   "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-gb", str(args.kv_cache_gb),
                   "--pause-timeout", str(args.pause_timeout), "--log-level", "warning"]
        if not resume:
            command.append("--no-resume")
        self.log = open(os.path.join(args.out_dir, f"server-{'resume' if resume else 'no-resume'}.log"), "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        started = time.perf_counter()
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.start_seconds = time.perf_counter() - started

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"n": 0}
    values.sort()
    return {"n": len(values), "mean": statistics.fmean(values), "p50": values[len(values) // 2],
            "p90": values[min(len(values) - 1, int(0.9 * len(values)))]}


async def run_sessions(url: str, args, sessions: int, seconds: float | None) -> tuple[Tally, float]:
    tally = Tally()
    stop_at = time.perf_counter() + seconds if seconds else float("inf")
    started = time.perf_counter()
    await asyncio.gather(*(session(url, i, args, tally, stop_at) for i in range(sessions)))
    return tally, time.perf_counter() - started


def measure(args, resume: bool, sessions: int) -> dict:
    server = Server(args, resume)
    try:
        tally, wall = asyncio.run(run_sessions(server.url, args, sessions, None))
        m = metrics(server.url)
    finally:
        server.stop()
    return {"mode": "resume" if resume else "no-resume", "sessions": sessions, "wall_s": wall,
            "server_start_s": server.start_seconds, "turns": tally.turns, "turns_per_s": tally.turns / wall,
            "tool_calls": tally.tool_calls, "question_turns_without_call": tally.no_call,
            "ttft_after_tool_s": summarize(tally.ttft_after_tool), "ttft_question_s": summarize(tally.ttft_question),
            "memory_waste_pct": m['infercept_memory_waste_percent{cause="total"}'],
            "turns_resumed": m['infercept_turns_total{kind="resumed"}'],
            "cached_prompt_tokens": m["infercept_cached_prompt_tokens_total"],
            "recompute_tokens": m["infercept_recompute_tokens_total"], "lost": tally.failed}


def soak(args, sessions: int) -> dict:
    """Sessions for `--soak` seconds, each replaced when it ends, then the leak and loss counts."""
    server = Server(args, resume=True)
    tally = Tally()

    async def keep_running():
        stop_at = time.perf_counter() + args.soak
        index = 0

        async def worker(slot: int):
            nonlocal index
            while time.perf_counter() < stop_at:
                index += 1
                await session(server.url, index, args, tally, stop_at)

        await asyncio.gather(*(worker(s) for s in range(sessions)))

    try:
        started = time.perf_counter()
        asyncio.run(keep_running())
        wall = time.perf_counter() - started
        deadline = time.perf_counter() + args.pause_timeout + 30      # walked-away requests time out
        while True:
            m = metrics(server.url)
            busy = sum(m[f'infercept_requests{{state="{s}"}}'] for s in ("waiting", "running", "swapped", "paused"))
            blocks = m['infercept_kv_blocks_used{pool="device"}'] + m['infercept_kv_blocks_used{pool="host"}']
            if (busy == 0 and blocks == 0) or time.perf_counter() > deadline:
                break
            time.sleep(1)
    finally:
        server.stop()
    return {"mode": "soak", "sessions": sessions, "wall_s": wall, "sent": tally.sent, "answered": tally.answered,
            "disconnected": tally.disconnected, "walked_away": tally.walked_away, "lost": tally.failed,
            "turns": tally.turns, "requests_left": busy, "blocks_left": blocks,
            "pause_timeouts": m["infercept_pause_timeouts_total"], "turns_resumed": m['infercept_turns_total{kind="resumed"}']}


def print_table(rows: list[dict]) -> None:
    print(f"{'mode':>10} {'sessions':>8} {'turns/s':>8} {'TTFT after tool (mean/p90 s)':>29} "
          f"{'TTFT question (mean s)':>23} {'waste %':>8} {'kept KV tok':>11} {'calls':>6} {'lost':>5}")
    for r in rows:
        t, q = r["ttft_after_tool_s"], r["ttft_question_s"]
        after = f"{t['mean']:.3f} / {t['p90']:.3f}" if t["n"] else "-"
        print(f"{r['mode']:>10} {r['sessions']:>8} {r['turns_per_s']:>8.3f} {after:>29} "
              f"{q.get('mean', float('nan')):>23.3f} {r['memory_waste_pct']:>8.2f} {r['cached_prompt_tokens']:>11.0f} "
              f"{r['tool_calls']:>6} {len(r['lost']):>5}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sessions", type=int, action="append", help="concurrent sessions (repeatable; default 2)")
    parser.add_argument("--questions", type=int, default=3, help="questions per session (each: a call, a result)")
    parser.add_argument("--context-tokens", type=int, default=2000, help="the conversation's length at the start")
    parser.add_argument("--tool-kinds", default="qa,ve,math", help="workload kinds whose call times the tool sleeps")
    parser.add_argument("--stagger", type=float, default=2.0, help="sessions start within this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", default="infercept")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--kv-cache-gb", type=float, default=2.0)
    parser.add_argument("--pause-timeout", type=float, default=10.0)
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak instead of the comparison")
    parser.add_argument("--disconnect-rate", type=float, default=0.1, help="soak: share of turns dropped midway")
    parser.add_argument("--walk-away-rate", type=float, default=0.1, help="soak: share of calls never answered")
    parser.add_argument("--out-dir", default="results/bench_serve")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    sessions = args.sessions or [2]
    started = time.perf_counter()
    record = {"args": vars(args), "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]}
    print(f"cpu_count {record['cpu_count']}; 1-minute load average at start {record['load_average_at_start']:.2f}",
          flush=True)
    if args.soak:
        result = soak(args, sessions[0])
        print(json.dumps(result, indent=2))
        record["soak"] = result
        ok = not result["lost"] and result["requests_left"] == 0 and result["blocks_left"] == 0
        print(f"soak: {result['sent']} requests, {len(result['lost'])} lost, {result['requests_left']:.0f} left in "
              f"the engine, {result['blocks_left']:.0f} KV blocks leaked: {'OK' if ok else 'FAILED'}")
    else:
        rows = []
        for n in sessions:
            for resume in (True, False):
                rows.append(measure(args, resume, n))
                print_table(rows[-1:])
        print()
        print_table(rows)
        for n in sessions:
            on, off = (next(r for r in rows if r["sessions"] == n and r["mode"] == m) for m in ("resume", "no-resume"))
            if on["ttft_after_tool_s"]["n"] and off["ttft_after_tool_s"]["n"]:
                print(f"{n} sessions: TTFT after a tool result {off['ttft_after_tool_s']['mean'] / on['ttft_after_tool_s']['mean']:.1f}x "
                      f"lower with resume; turns/s {on['turns_per_s'] / off['turns_per_s']:.2f}x")
        record["rows"] = rows
        ok = all(not r["lost"] for r in rows)
    write_result(os.path.join(args.out_dir, "soak.json" if args.soak else "compare.json"), record, started)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
