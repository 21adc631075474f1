"""The `infercept` command line.

    infercept generate --prompt "The capital of France is" --max-tokens 16 --temperature 0
    infercept generate --chat --prompt "Write a haiku about the sea." --stream
    infercept profile --model smollm2-135m -o profile.json    # then LLM(..., profile="profile.json")
    infercept workload --kind mixed --n 400 --seed 0 -o mixed.json
    infercept workload --describe merged_exp_uniform.json            # token counts as a replay loads them
    infercept replay --trace mixed.json --simulate --profile a100-gptj-6b --qps 1 --qps 2 --out results/sim
    infercept predictor --trace mixed.json -o length-model.json     # LAMPS-style output-length predictor
    infercept serve --model smollm2-135m --port 8000               # OpenAI-compatible, with transparent resume
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict

from models.shapes import SHAPES


def _generate(args: argparse.Namespace) -> int:
    from infercept_jax import LLM, SamplingParams
    from infercept_jax.parallel import initialize_distributed

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop or [])
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        # No tool calls here, so nothing pauses: the policy does not matter, and preserve needs
        # neither a hardware profile nor a host pool.
        llm = LLM(args.model, max_model_len=args.max_model_len, kv_cache_memory_gb=args.kv_cache_gb,
                  tensor_parallel_size=args.tensor_parallel_size, attention=args.attention,
                  async_scheduling=args.async_scheduling, policy="preserve")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _followed_process_0(llm):
        return 0
    try:
        if args.chat:
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        if args.stream:
            for prompt in prompts:
                for delta in llm.stream(prompt, params):
                    print(delta, end="", flush=True)
                print()
            return 0
        outputs = llm.generate(prompts, params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.close()
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            print(out.text)
    return 0


def _followed_process_0(llm) -> bool:
    """Multi-host: on every process but 0, follow process 0's steps until it closes its LLM, and
    say so (that process has nothing else to do: process 0 alone schedules, prints and serves)."""
    import jax

    if jax.process_index() == 0:
        return False
    llm.follow()
    return True


ATTENTION_HELP = "paged attention kernel (default auto: the Pallas kernel on a GPU, else the XLA path)"
ASYNC_HELP = "schedule and launch each step while the one before runs on the device"
SWAP_TRANSFER_HELP = "host KV pool memory (default auto: pinned_host off the CPU, else numpy)"

# `profile` options that are passed to LLM(...) when given; the rest keep the engine's defaults,
# so the profile describes the engine a user builds with the same options.
PROFILE_ENGINE_OPTIONS = ("dtype", "attention", "swap_transfer", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
                          "block_size",
                          "kv_cache_memory_gb", "swap_space_gb", "tensor_parallel_size")


def _profile(args: argparse.Namespace) -> int:
    from infercept_jax import LLM
    from infercept_jax.parallel import initialize_distributed
    from infercept_jax.profiler import measure_profile

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = {k: getattr(args, k) for k in PROFILE_ENGINE_OPTIONS if getattr(args, k) is not None}
    model = args.model   # what the profile names as its model
    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        # Any policy with a host pool will do; `swap` needs no profile, so none is asked for.
        if args.shape:   # timings do not depend on the weights' values
            import jax.numpy as jnp

            from infercept_jax.llm import resolve_dtype
            from models.llama import Llama

            dtype = resolve_dtype(options.pop("dtype", "auto"))
            llm = LLM.from_model(Llama(SHAPES[args.shape], dtype=dtype), None, policy="swap", **options)
            model = f"{args.shape} shape, random weights, {jnp.dtype(dtype).name}"
        else:
            llm = LLM(args.model, policy="swap", **options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _followed_process_0(llm):
        return 0
    try:
        profile = measure_profile(llm, name=args.name or f"{args.shape or args.model}-measured", model=model,
                                  repeats=args.repeats, quick=args.quick)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.close()
    profile.to_json(args.out)
    print(json.dumps(profile.to_dict(), indent=2))
    target = repr(args.model) if args.shape is None else f"<a {args.shape} model>"
    print(f"wrote {args.out}; use it with LLM({target}, profile={args.out!r}), which also sets the step budget "
          f"to its S = {profile.saturation_tokens} tokens")
    return 0


def _workload(args: argparse.Namespace) -> int:
    from infercept_jax.experiments.workload import ModelTokenizer, describe, generate_workload, load_trace, save_trace

    try:
        if args.describe is not None:
            trace = load_trace(args.describe, ModelTokenizer(args.tokenizer))
        elif args.out is None:
            raise ValueError("give -o/--out to write a generated trace, or --describe FILE to measure one")
        else:
            trace = generate_workload(args.kind, args.n, seed=args.seed, single_call=args.single_call,
                                      max_context=args.max_context)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, stats in describe(trace).items():
        print(f"{kind:>8}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    if args.describe is None:
        save_trace(trace, args.out)
        print(f"wrote {len(trace)} requests to {args.out}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from infercept_jax.experiments.sweeps import replay_command

    try:
        replay_command(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _predictor(args: argparse.Namespace) -> int:
    from infercept_jax.experiments.length_training import fit_length_model, segment_examples
    from infercept_jax.experiments.workload import ModelTokenizer, load_trace
    from scheduling.length_model import evaluate

    try:
        trace = load_trace(args.trace, ModelTokenizer(args.tokenizer))
        if len(trace) < 2:
            raise ValueError(f"has {len(trace)} request(s); need at least 2, to train on some and test on others")
        started = time.perf_counter()
        model, fitted, held_out = fit_length_model(trace, args.test_fraction, args.seed)
        fit_seconds = time.perf_counter() - started
    except json.JSONDecodeError as e:
        print(f"error: {args.trace} is not JSON: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"error: {args.trace}: {e}", file=sys.stderr)
        return 2
    by_kind: dict[str, dict] = defaultdict(dict)
    for key, request in held_out.items():
        by_kind[request.kind or "unknown"][key] = request
    rows = sorted(by_kind.items()) if len(by_kind) > 1 else []
    rows.append(("all", held_out))
    num_segments = sum(len(r.segments) for r in fitted.values())
    print(f"trained on {num_segments} segments of {len(fitted)} requests; held out {len(held_out)} requests")
    print(f"{'kind':>8} {'MAE':>7} {'exact bin':>10} {'within 1 bin':>13} {'baseline MAE':>13} {'segments':>9}")
    for kind, requests in rows:
        stats = evaluate(model, *segment_examples(requests))
        print(f"{kind:>8} {stats['mae_tokens']:7.1f} {stats['bin_accuracy']:10.1%} {stats['within_one_bin']:13.1%} "
              f"{stats['baseline_mae_tokens']:13.1f} {stats['num_examples']:9d}")
    print("MAE in tokens; baseline: always the mean length of the held-out segments")
    features, _ = segment_examples(held_out)
    started = time.perf_counter()
    for f in features:
        model.predict(f)
    per_prediction_us = (time.perf_counter() - started) / max(len(features), 1) * 1e6
    print(f"fitted in {fit_seconds:.1f} s; {per_prediction_us:.0f} µs per prediction")
    try:
        model.save(args.out)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


# `serve` options that are passed to AsyncLLM(...) when given.
SERVE_ENGINE_OPTIONS = ("policy", "profile", "dtype", "attention", "async_scheduling", "swap_transfer", "max_model_len", "kv_cache_memory_gb", "num_kv_blocks",
                        "max_num_seqs", "max_num_batched_tokens", "swap_space_gb", "seed", "tensor_parallel_size")


def _serve(args: argparse.Namespace) -> int:
    import jax
    import uvicorn

    from infercept_jax import LLM
    from infercept_jax.async_llm import AsyncLLM
    from infercept_jax.parallel import initialize_distributed
    from infercept_jax.serving.app import OpenAIServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = {k: getattr(args, k) for k in SERVE_ENGINE_OPTIONS if getattr(args, k) is not None}
    try:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        if jax.process_index() != 0:    # multi-host: process 0 serves HTTP, the others follow its steps
            LLM(args.model, **options).follow()
            return 0
        llm = AsyncLLM(args.model, max_queue=args.max_queue, **options)
        server = OpenAIServer(llm, args.served_model_name or args.model, resume=not args.no_resume,
                              pause_timeout=args.pause_timeout, call_start=args.tool_call_start,
                              call_end=args.tool_call_end)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        llm.shutdown()
        llm.llm.close()
    return 0


TP_HELP = "devices the weights and the KV cache are split over (tensor parallelism; default 1)"


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """A multi-host run: every host starts the same command with its own --process-id."""
    group = parser.add_argument_group("multi-host (one process per host; only process 0 prints or serves)")
    group.add_argument("--coordinator-address", help="host:port of process 0, where the processes meet "
                       "(default: JAX_COORDINATOR_ADDRESS; neither: one process)")
    group.add_argument("--num-processes", type=int, help="processes in the run (default: JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, help="this process's index, 0 to num-processes - 1 "
                       "(default: JAX_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    from infercept_jax.config import ATTENTION_CHOICES, SWAP_TRANSFERS

    parser = argparse.ArgumentParser(prog="infercept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("--model", default="smollm2-135m", help="a known name, an HF folder or a .gguf file")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="a text file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache per device")
    gen.add_argument("--tensor-parallel-size", type=int, default=1, help=TP_HELP)
    gen.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help=ATTENTION_HELP)
    gen.add_argument("--async-scheduling", action="store_true", help=ASYNC_HELP)
    add_distributed_arguments(gen)
    gen.set_defaults(run=_generate)

    prof = sub.add_parser("profile", help="measure this machine's hardware profile (InferCept's constants)")
    which = prof.add_mutually_exclusive_group()
    which.add_argument("--model", default="smollm2-135m", help="a known name, an HF folder or a .gguf file")
    which.add_argument("--shape", choices=sorted(SHAPES),
                       help="random weights of this model shape instead (models/shapes.py): a profile times the "
                            "model, it does not read its weights, so a machine without them can be profiled")
    prof.add_argument("-o", "--out", default="profile.json", help="where to write the profile JSON")
    prof.add_argument("--name", help="the profile's name (default: <model>-measured)")
    prof.add_argument("--quick", action="store_true", help="fewer step sizes and repeats (seconds, rough)")
    prof.add_argument("--repeats", type=int, default=5, help="timings per measurement (median)")
    prof.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    prof.add_argument("--attention", choices=ATTENTION_CHOICES, help=ATTENTION_HELP)
    prof.add_argument("--swap-transfer", choices=SWAP_TRANSFERS, help=SWAP_TRANSFER_HELP)
    prof.add_argument("--max-num-batched-tokens", type=int, help="the largest step profiled (S is at most this)")
    prof.add_argument("--max-num-seqs", type=int)
    prof.add_argument("--max-model-len", type=int)
    prof.add_argument("--block-size", type=int)
    prof.add_argument("--kv-cache-gb", dest="kv_cache_memory_gb", type=float)
    prof.add_argument("--swap-space-gb", type=float)
    prof.add_argument("--tensor-parallel-size", type=int, help=TP_HELP)
    add_distributed_arguments(prof)
    prof.set_defaults(run=_profile)

    from infercept_jax.experiments.sweeps import add_replay_arguments, add_tokenizer_argument
    from infercept_jax.experiments.workload import KINDS
    from scheduling.policies import POLICIES

    work = sub.add_parser("workload", help="generate a synthetic tool-calling trace (spec 1.2 distributions)")
    work.add_argument("--kind", choices=KINDS + ("mixed",), default="mixed")
    work.add_argument("--single-call", action="store_true", help="exactly one call per request")
    work.add_argument("--n", type=int, default=400, help="number of requests")
    work.add_argument("--seed", type=int, default=0)
    work.add_argument("--max-context", type=int, default=2048, help="longest final context in tokens")
    work.add_argument("-o", "--out", help="where to write the trace JSON")
    work.add_argument("--describe", metavar="FILE", help="instead: load a trace file and print its per-kind "
                      "token counts and calls, as a replay would see them")
    add_tokenizer_argument(work)
    work.set_defaults(run=_workload)

    rep = sub.add_parser("replay", help="replay a trace under policies and request rates (real or simulated)")
    add_replay_arguments(rep)
    rep.set_defaults(run=_replay)

    pred = sub.add_parser("predictor", help="train an output-length predictor on a trace (LAMPS-style) and "
                          "report its held-out accuracy")
    pred.add_argument("--trace", required=True, help="trace JSON file")
    pred.add_argument("-o", "--out", required=True, help="where to write the model JSON")
    pred.add_argument("--seed", type=int, default=0, help="for the split and the training order")
    pred.add_argument("--test-fraction", type=float, default=0.2, help="share of requests held out")
    add_tokenizer_argument(pred, "--model")
    pred.set_defaults(run=_predictor)

    serve = sub.add_parser("serve", help="serve the OpenAI API (completions, chat, tools) over HTTP; a tool "
                           "call pauses the request and the next turn resumes it")
    serve.add_argument("--model", default="smollm2-135m", help="a known name, an HF folder or a .gguf file")
    serve.add_argument("--served-model-name", help="the name clients ask for (default: --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-resume", action="store_true",
                       help="end every turn at its tool call, as other servers do (the next turn is a new request)")
    serve.add_argument("--pause-timeout", type=float, default=60.0,
                       help="seconds a paused request waits for its next turn before it is aborted")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests that may wait beyond --max-num-seqs; more get HTTP 429")
    serve.add_argument("--tool-call-start", help="the text that opens a tool call (default <tool_call>)")
    serve.add_argument("--tool-call-end", help="the text that closes a tool call (default </tool_call>)")
    serve.add_argument("--policy", choices=sorted(POLICIES), help="what happens to a paused request's KV "
                       "(default infercept)")
    serve.add_argument("--profile", help="hardware profile: a JSON file from `infercept profile` or a paper name")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--attention", choices=ATTENTION_CHOICES, help=ATTENTION_HELP)
    serve.add_argument("--async-scheduling", action="store_true", default=None, help=ASYNC_HELP)
    serve.add_argument("--swap-transfer", choices=SWAP_TRANSFERS, help=SWAP_TRANSFER_HELP)
    serve.add_argument("--max-model-len", type=int)
    serve.add_argument("--kv-cache-gb", dest="kv_cache_memory_gb", type=float)
    serve.add_argument("--num-kv-blocks", type=int)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("--max-num-batched-tokens", type=int)
    serve.add_argument("--swap-space-gb", type=float)
    serve.add_argument("--tensor-parallel-size", type=int, help=TP_HELP)
    serve.add_argument("--seed", type=int)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_distributed_arguments(serve)
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = args.run(args)
    if hasattr(args, "coordinator_address"):   # a command that may have joined a multi-host run
        import jax

        # Waits for every process (a no-op in a run of one), so process 0, which hosts the
        # coordinator, exits last: JAX aborts a process that outlives it. Not after an error:
        # exiting is then what stops the others.
        jax.distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
