"""The `infercept` command line and LLM's errors for models that are not there."""
from __future__ import annotations

import pytest

from helpers import requires_smollm2
from infercept_jax import LLM
from infercept_jax.cli import main


@pytest.mark.parametrize("model, message", [("no-such-model", "Known names"), ("/nonexistent/dir", "not a known name")])
def test_unknown_model_or_bad_path_is_a_clear_error(model, message):
    with pytest.raises(ValueError, match=message):
        LLM(model)


def test_folder_without_a_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_cli_reports_bad_model_and_exits_2(capsys):
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_needs_a_prompt(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err


@pytest.mark.slow
@requires_smollm2
def test_cli_generates_with_the_default_model(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-tokens", "6", "--json",
                 "--max-model-len", "256", "--kv-cache-gb", "0.1"]) == 0
    out = capsys.readouterr().out
    assert '"finish_reason": "length"' in out and "Paris" in out


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["profile", "--quick"], ["serve"]])
def test_more_devices_than_the_run_has_is_an_error(capsys, command):
    assert main(command + ["--tensor-parallel-size", "2"]) == 2
    assert "tensor_parallel_size=2 needs 2 devices; this run has 1 (cpu)" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--dtype", "bfloat16"], ["--tensor-parallel-size", "2"], ["--attention", "xla"],
                                  ["--swap-transfer", "numpy"], ["--async-scheduling"]])
def test_replay_refuses_real_engine_options_in_the_simulator(capsys, tmp_path, flag):
    command = ["replay", "--trace", "builtin:mixed-small", "--simulate", "--profile", "a100-gptj-6b", "--out", str(tmp_path)]
    assert main(command + flag) == 2
    assert f"{flag[0]} is for the real engine; the simulator runs no model" in capsys.readouterr().err


def test_real_engine_options_of_replay_reach_the_engines(monkeypatch, tmp_path):
    from infercept_jax.experiments import sweeps

    built = {}
    monkeypatch.setattr(sweeps, "real_engines", lambda model, estimator, **options: built.update(options))
    monkeypatch.setattr(sweeps, "run_replays", lambda *args, **kwargs: [])
    monkeypatch.setattr(sweeps, "write_results", lambda results, out: [])
    assert main(["replay", "--trace", "builtin:mixed-small", "--profile", "a100-gptj-6b", "--out", str(tmp_path),
                 "--attention", "pallas", "--swap-transfer", "pinned_host", "--async-scheduling",
                 "--dtype", "bfloat16"]) == 0
    assert {name: built[name] for name in sweeps.REAL_ENGINE_OPTIONS if name in built} == {
        "attention": "pallas", "swap_transfer": "pinned_host", "async_scheduling": True, "dtype": "bfloat16"}


def test_engine_options_of_serve_and_profile_reach_the_engine_config():
    from dataclasses import fields

    from infercept_jax.cli import PROFILE_ENGINE_OPTIONS, SERVE_ENGINE_OPTIONS, build_parser
    from infercept_jax.config import EngineConfig

    assert set(SERVE_ENGINE_OPTIONS) | set(PROFILE_ENGINE_OPTIONS) <= {f.name for f in fields(EngineConfig)}
    args = build_parser().parse_args(["serve", "--attention", "pallas", "--async-scheduling", "--swap-transfer", "numpy"])
    assert (args.attention, args.async_scheduling, args.swap_transfer) == ("pallas", True, "numpy")
    assert build_parser().parse_args(["serve"]).async_scheduling is None      # unset: the engine's default
    args = build_parser().parse_args(["profile", "--attention", "xla", "--swap-transfer", "pinned_host"])
    assert (args.attention, args.swap_transfer) == ("xla", "pinned_host")
