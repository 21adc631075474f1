"""The LAMPS-style output-length predictor: what it learns, its prediction rule, its file format,
the evaluation numbers, the examples drawn from a trace, and the `infercept predictor` command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infercept_jax.cli import main
from infercept_jax.experiments.length_training import segment_examples
from infercept_jax.experiments.workload import Segment, TraceRequest, generate_workload, save_trace
from scheduling.length_model import (NUM_BINS, NUM_FEATURES, LengthModel, SegmentFeatures, _active_columns,
                                     evaluate, length_bin, split)
from scheduling.predictors import segment_features
from scheduling.request import Interception, Request


def two_kinds(n: int, seed: int = 0) -> tuple[list[SegmentFeatures], list[int]]:
    """Short-context requests always generate 40 tokens, long-context ones 300."""
    rng = np.random.default_rng(seed)
    features, lengths = [], []
    for _ in range(n):
        long = bool(rng.integers(2))
        context = int(rng.integers(1500, 1900)) if long else int(rng.integers(300, 500))
        features.append(SegmentFeatures(context, int(rng.integers(4)), int(rng.integers(200)),
                                        int(rng.integers(50))))
        lengths.append(300 if long else 40)
    return features, lengths


def constant_model(probabilities: dict[int, float]) -> LengthModel:
    """A model that predicts the same distribution over bins for every segment."""
    p = np.full(NUM_BINS, 1e-12)
    for b, share in probabilities.items():
        p[b] = share
    return LengthModel(np.zeros((NUM_FEATURES, NUM_BINS)), np.log(p))


def test_length_bins_are_ten_tokens_and_the_last_is_open_ended():
    assert [length_bin(n) for n in (0, 9, 10, 45, 499, 500, 10_000)] == [0, 0, 1, 4, 49, 49, 49]


def test_learns_lengths_that_depend_on_context_on_held_out_examples():
    features, lengths = two_kinds(400)
    train, test = split(len(features))
    model = LengthModel.fit([features[i] for i in train], [lengths[i] for i in train])
    assert [model.predict(features[i]) for i in test] == [45 if lengths[i] == 40 else 305 for i in test]
    stats = evaluate(model, [features[i] for i in test], [lengths[i] for i in test])
    assert stats["bin_accuracy"] == stats["within_one_bin"] == 1.0 and stats["mae_tokens"] == 5.0


def test_active_columns_of_hand_made_features():
    # Group offsets 0, 32, 48, 80, 112, 368 (half-octaves of context, calls, half-octaves of the last
    # output and of the last result, context octave x calls, last output octave x last result octave).
    # 300 tokens: 2*log2(301) = 16.5 -> 16, octave 9; 6: 2*log2(7) = 5.6 -> 5, octave 3;
    # 42: 2*log2(43) = 10.8 -> 10, octave 6; calls 2.
    assert _active_columns(SegmentFeatures(300, 2, 6, 42)) == [16, 34, 53, 90, 112 + 9 * 16 + 2, 368 + 3 * 16 + 6]
    # 1 token: 2*log2(2) = 2, octave 1; 0 tokens: 0, octave 0.
    assert _active_columns(SegmentFeatures(1, 0, 1, 0)) == [2, 32, 50, 80, 112 + 16, 368 + 16]
    # Past the last column every group clamps: half-octave 31, 15 calls, octave 15.
    big = 10 ** 6
    assert _active_columns(SegmentFeatures(big, 40, big, big)) == [31, 47, 79, 111, 112 + 15 * 16 + 15, 368 + 255]


def reference_fit(features, lengths, seed=0, epochs=30, batch_size=256, learning_rate=0.02, l2=1e-4):
    """The documented training rule written the plain way: dense one-hot inputs, matrix products and
    the textbook Adam update (first and second moments with bias correction)."""
    x = np.zeros((len(features), NUM_FEATURES))
    for i, f in enumerate(features):
        x[i, _active_columns(f)] = 1.0
    y = np.minimum(np.array(lengths) // 10, NUM_BINS - 1)
    counts = np.bincount(y, minlength=NUM_BINS) + 1.0
    w, b = np.zeros((NUM_FEATURES, NUM_BINS)), np.log(counts / counts.sum())
    moments = {"w": [np.zeros_like(w), np.zeros_like(w)], "b": [np.zeros_like(b), np.zeros_like(b)]}
    rng, t = np.random.default_rng(seed), 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            rows = order[start:start + batch_size]
            z = x[rows] @ w + b
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(rows)), y[rows]] -= 1.0
            p /= len(rows)
            t += 1
            for name, param, g in (("w", w, x[rows].T @ p + l2 * w), ("b", b, p.sum(axis=0))):
                m, v = moments[name]
                m[:] = 0.9 * m + 0.1 * g
                v[:] = 0.999 * v + 0.001 * g * g
                param -= learning_rate * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return w, b


def test_fit_with_its_defaults_matches_a_plain_reference():
    # 600 examples: batches of 256, 256 and 88; lengths of 0 (allowed) and past the last bin.
    features, lengths = two_kinds(600, seed=5)
    lengths = [0 if i % 50 == 0 else 1000 if i % 70 == 0 else n for i, n in enumerate(lengths)]
    model = LengthModel.fit(features, lengths)
    w, b = reference_fit(features, lengths)
    assert np.allclose(model.weights, w, rtol=1e-9, atol=1e-12)
    for f in features[:20]:
        z = w[_active_columns(f)].sum(axis=0) + b
        assert np.allclose(model.probabilities(f), np.exp(z - z.max()) / np.exp(z - z.max()).sum(),
                           rtol=1e-9, atol=1e-15)


def test_fit_stays_finite_when_logits_grow_large():
    # A learning rate of 500 moves weights by hundreds a step, so logits reach the hundreds and more:
    # the softmax must subtract each row's maximum before exponentiating.
    features, lengths = two_kinds(300)
    model = LengthModel.fit(features, lengths, learning_rate=500.0, epochs=5, batch_size=64)
    assert np.isfinite(model.weights).all() and np.isfinite(model.bias).all()
    assert np.abs(model.weights).max() > 300


def test_probabilities_do_not_overflow_on_large_logits():
    bias = np.zeros(NUM_BINS)
    bias[3] = 800.0                                       # exp(800) alone is inf
    model = LengthModel(np.zeros((NUM_FEATURES, NUM_BINS)), bias)
    probs = model.probabilities(SegmentFeatures(10, 0, 0, 0))
    assert np.isfinite(probs).all() and probs[3] == pytest.approx(1.0)
    assert model.predict(SegmentFeatures(10, 0, 0, 0)) == 35


def test_model_shape_is_checked_for_weights_and_bias_alone():
    with pytest.raises(ValueError, match="shape"):
        LengthModel(np.zeros((3, NUM_BINS)), np.zeros(NUM_BINS))
    with pytest.raises(ValueError, match="shape"):
        LengthModel(np.zeros((NUM_FEATURES, NUM_BINS)), np.zeros(3))


def test_predicts_the_median_bin_not_the_most_likely_one():
    model = constant_model({0: 0.4, 5: 0.35, 9: 0.25})
    assert model.predict(SegmentFeatures(100, 0, 0, 0)) == 55
    assert type(model.predict(SegmentFeatures(100, 0, 0, 0))) is int
    assert model.probabilities(SegmentFeatures(100, 0, 0, 0))[[0, 5, 9]] == pytest.approx([0.4, 0.35, 0.25])


def test_fit_is_deterministic_for_a_seed():
    features, lengths = two_kinds(300)
    first, again = (LengthModel.fit(features, lengths, seed=3, epochs=3, batch_size=32) for _ in range(2))
    other = LengthModel.fit(features, lengths, seed=4, epochs=3, batch_size=32)
    assert np.array_equal(first.weights, again.weights) and np.array_equal(first.bias, again.bias)
    assert not np.array_equal(first.weights, other.weights)


@pytest.mark.parametrize("features, lengths, message", [
    ([], [], "no examples"),
    ([SegmentFeatures(10, 0, 0, 0)], [5, 6], "one length per example"),
    ([SegmentFeatures(10, 0, 0, 0)], [-1], ">= 0"),
])
def test_fit_rejects_bad_input(features, lengths, message):
    with pytest.raises(ValueError, match=message):
        LengthModel.fit(features, lengths)


def test_save_and_load_give_the_same_predictions(tmp_path):
    features, lengths = two_kinds(200)
    model = LengthModel.fit(features, lengths, epochs=5)
    path = tmp_path / "model.json"
    model.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "infercept-length-model" and data["version"] == 1
    assert data["num_bins"] == NUM_BINS == 50 and data["bin_tokens"] == 10
    loaded = LengthModel.load(path)
    assert np.array_equal(loaded.weights, model.weights) and np.array_equal(loaded.bias, model.bias)
    assert [loaded.predict(f) for f in features] == [model.predict(f) for f in features]


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    (json.dumps({"a": [{"prompt_tokens": 3, "completion_tokens": 2}]}), "format"),
    (json.dumps({"format": "infercept-length-model", "version": 99}), "version 99"),
    (json.dumps({"format": "infercept-length-model", "version": 1, "weights": [[0.0]], "bias": [0.0]}), "shape"),
    (json.dumps({"format": "infercept-length-model", "version": 1}), "weights"),
])
def test_load_rejects_a_file_that_is_not_a_model(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        LengthModel.load(path)


def test_load_reads_integer_weights_as_floats(tmp_path):
    path = tmp_path / "ints.json"
    path.write_text(json.dumps({"format": "infercept-length-model", "version": 1,
                                "weights": [[0] * NUM_BINS] * NUM_FEATURES, "bias": [0] * NUM_BINS}))
    model = LengthModel.load(path)
    assert model.weights.dtype == model.bias.dtype == np.float64


def test_evaluate_on_a_hand_made_case():
    model = constant_model({2: 1.0})                      # always 25 tokens (bin 2)
    features = [SegmentFeatures(i, 0, 0, 0) for i in range(4)]
    stats = evaluate(model, features, [25, 30, 5, 100])   # bins 2, 3, 0, 10
    assert stats == {"mae_tokens": (0 + 5 + 20 + 75) / 4, "bin_accuracy": 0.25, "within_one_bin": 0.5,
                     "baseline_mae_tokens": (15 + 10 + 35 + 60) / 4, "num_examples": 4}


def test_split_is_a_deterministic_partition():
    train, test = split(100, test_fraction=0.2, seed=1)
    assert len(test) == 20 and sorted(train + test) == list(range(100))
    assert (train, test) == split(100, test_fraction=0.2, seed=1) != split(100, test_fraction=0.2, seed=2)
    with pytest.raises(ValueError, match="test_fraction"):
        split(10, test_fraction=1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        split(10, test_fraction=0.0)
    assert split(10) == split(10, test_fraction=0.2, seed=0)


def test_split_keeps_one_item_on_each_side():
    assert [len(part) for part in split(2)] == [1, 1]
    assert [len(part) for part in split(3, test_fraction=0.1)] == [2, 1]    # rounds to 0, at least 1
    assert [len(part) for part in split(3, test_fraction=0.9)] == [1, 2]    # rounds to 3, at most n - 1
    assert [len(part) for part in split(2, test_fraction=0.9)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        split(1)


def test_evaluate_rejects_mismatched_or_empty_input():
    model = constant_model({2: 1.0})
    with pytest.raises(ValueError, match="as many lengths"):
        evaluate(model, [SegmentFeatures(1, 0, 0, 0)], [1, 2])
    with pytest.raises(ValueError, match="as many lengths"):
        evaluate(model, [], [])


def test_segment_features_of_a_request():
    request = Request("r", list(range(7)), sampling=None, arrival_time=0.0)
    assert segment_features(request) == SegmentFeatures(7, 0, 0, 0)
    request.interceptions = [Interception(("r", i), float(i), segment_tokens=n, result_tokens=r)
                             for i, (n, r) in enumerate([(5, 3), (6, 2), (9, None)])]
    request.token_ids = list(range(30))
    assert segment_features(request) == SegmentFeatures(30, 3, 9, 0)        # the last call; no result yet
    request.interceptions[-1].result_tokens = 4
    assert segment_features(request) == SegmentFeatures(30, 3, 9, 4)


def test_segment_examples_of_a_hand_made_trace():
    trace = {
        "a": TraceRequest("a", 100, (Segment(20, 0.5, 7), Segment(30, 1.0, 4), Segment(9))),
        "b": TraceRequest("b", 50, (Segment(11, 2.0, 3),)),          # a call on its last segment
    }
    features, lengths = segment_examples(trace)
    assert features == [SegmentFeatures(100, 0, 0, 0), SegmentFeatures(127, 1, 20, 7), SegmentFeatures(161, 2, 30, 4),
                        SegmentFeatures(50, 0, 0, 0)]
    assert lengths == [20, 30, 9, 11]


def test_cli_trains_reports_and_writes_a_model(tmp_path, capsys):
    trace_path, model_path = tmp_path / "mixed.json", tmp_path / "model.json"
    save_trace(generate_workload("mixed", 60, seed=1), trace_path)
    assert main(["predictor", "--trace", str(trace_path), "-o", str(model_path), "--test-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "held out 15 requests" in out and "within 1 bin" in out and "baseline MAE" in out
    all_row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["all"])
    assert float(all_row[1]) >= 0 and all_row[2].endswith("%")
    LengthModel.load(model_path).predict(SegmentFeatures(500, 1, 60, 20))


@pytest.mark.parametrize("content, message", [(None, "No such file"), ("[1, 2]", "JSON object"),
                                              ("{", "not JSON")])
def test_cli_reports_a_missing_or_bad_trace_and_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "trace.json"
    if content is not None:
        path.write_text(content)
    assert main(["predictor", "--trace", str(path), "-o", str(tmp_path / "model.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "model.json").exists()


def test_length_model_imports_without_jax():
    code = "import sys, scheduling.length_model; sys.exit('jax' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    assert subprocess.run([sys.executable, "-c", code], cwd=repo).returncode == 0
