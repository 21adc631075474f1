"""scripts/bench_engine.py on the tiny shape: random weights that transformers and the engine read
alike, and the rows the benchmark writes (shape, dtype, backend, host and device time, rooflines)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import paged_logits
from infercept_jax.llm import resolve_dtype
from models.llama import Llama
from models.shapes import SHAPES

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "bench_engine.py"
_SPEC = importlib.util.spec_from_file_location("bench_engine", _PATH)
bench_engine = sys.modules["bench_engine"] = importlib.util.module_from_spec(_SPEC)   # its dataclass looks itself up
_SPEC.loader.exec_module(bench_engine)

# A step budget of 16 tokens: three step shapes to compile, once (the second run finds them in the
# compile cache).
TINY = ["--shape", "tiny", "--batches", "1,2", "--contexts", "24", "--decode-tokens", "3",
        "--max-num-batched-tokens", "16"]


def test_transformers_gets_the_engines_random_weights():
    torch = pytest.importorskip("torch")
    spec = SHAPES["tiny"]
    weights = bench_engine.random_weights(spec, seed=0)
    again = bench_engine.random_weights(spec, seed=0)
    assert all(np.array_equal(weight, again[name]) for name, weight in weights.items())      # seeded
    assert np.std(weights["model.embed_tokens.weight"]) == pytest.approx(0.02, rel=0.05)
    model = bench_engine.BenchModel("tiny", spec, np.float32, weights)
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, 20).tolist()
    ours = paged_logits(Llama.from_hf_weights(spec, weights), ids)
    with torch.no_grad():
        hf = bench_engine.load_hf(model)                  # on the GPU when torch sees one
        theirs = hf(torch.tensor([ids], device=hf.device)).logits[0].cpu().numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_the_engine_rows_have_the_shape_dtype_backend_and_host_and_device_time(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench_engine.main([*TINY, "--skip-hf", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    dtype, backend = np.dtype(resolve_dtype("auto")).name, jax.default_backend()   # float32 on CPU
    assert (result["model"], result["weights"], result["dtype"]) == ("tiny", "random", dtype)
    assert (result["attention"], result["step_budget"]) == ("xla", 16)     # auto on CPU
    assert result["backend"] == backend
    assert result["param_count"] == 2_885_888 and result["machine"]["read_bytes_per_s"] > 0
    assert [(row["batch"], row["ctx"]) for row in result["rows"]] == [(1, 24), (2, 24)]
    for row in result["rows"]:
        engine = row["engine"]
        assert engine["decode_device_ms"] > 0 and engine["decode_step_ms"] > 0
        assert engine["decode_host_ms"] == pytest.approx(engine["decode_step_ms"] - engine["decode_device_ms"])
        assert row["decode_roofline_ms"] > 0 and row["prefill_roofline_ms"] > 0 and engine["prefill_tok_s"] > 0
        assert "hf" not in row
    table = capsys.readouterr().out
    assert "| shape | dtype | backend | batch | ctx |" in table and "| host ms | device ms |" in table
    assert f"| tiny | {dtype} | {backend} | 2 | 24 |" in table


def test_transformers_runs_beside_the_engine(tmp_path):
    result = bench_engine.main([*TINY, "--out", str(tmp_path / "bench.json")])
    for row in result["rows"]:
        assert row["hf"]["prefill_tok_s"] > 0 and row["hf"]["generate_s"] > 0 and "hf_compiled" not in row


def test_an_unknown_shape_or_a_budget_below_the_batch_is_refused(capsys):
    for argv, message in [(["--shape", "gpt-5"], "invalid choice: 'gpt-5'"),
                          ([*TINY, "--batches", "32"], "--max-num-batched-tokens must be at least")]:
        with pytest.raises(SystemExit):
            bench_engine.parse_args(argv)
        assert message in capsys.readouterr().err


def test_bench_dispatch_times_the_packed_step_against_the_same_step_array_by_array(capsys):
    """Both calls sample the same tokens (the script refuses to time two different steps), and a
    row per batch comes out."""
    path = _PATH.parent / "bench_dispatch.py"
    spec = importlib.util.spec_from_file_location("bench_dispatch", path)
    bench_dispatch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_dispatch)
    bench_dispatch.main(["--batches", "2,8", "--calls", "3", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["2", "8"]
    assert all(float(cell) > 0 for row in rows for cell in row.strip("| ").split("|")[2:])
