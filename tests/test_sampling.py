"""The sampler: which work a batch needs (decided on the host), the top-k/top-p filter against
transformers' logits warpers, and a step free of device-side branches."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from helpers import random_hf_tensors, tiny_spec
from infercept_jax import LLM
from infercept_jax.sampling import FILTERED, GREEDY, RANDOM, SamplingBatch, _filter_top_k_top_p, greedy, sample, \
    sampling_mode
from models.llama import Llama


def batch(temperature, top_k=None, top_p=None) -> SamplingBatch:
    n = len(temperature)
    return SamplingBatch(np.array(temperature, np.float32),
                         np.array(top_k if top_k is not None else [0] * n, np.int32),
                         np.array(top_p if top_p is not None else [1.0] * n, np.float32),
                         np.arange(n, dtype=np.uint32), np.zeros(n, np.int32))


@pytest.mark.parametrize("rows, mode", [
    (batch([0.0, 0.0]), GREEDY),
    (batch([0.0, 0.0], top_k=[5, 0], top_p=[1.0, 0.5]), GREEDY),        # filters of greedy rows filter nothing
    (batch([0.0, 1e-3]), RANDOM),
    (batch([0.0, 0.7], top_k=[5, 0]), RANDOM),                          # the row that filters does not draw
    (batch([0.0, 0.7], top_k=[0, 1]), FILTERED),
    (batch([0.7, 0.7], top_p=[1.0, 0.999]), FILTERED),
])
def test_the_mode_is_the_least_work_that_serves_every_row(rows, mode):
    assert sampling_mode(rows) == mode


def test_the_filter_keeps_what_transformers_keeps():
    """Top-k, then top-p of what is left, row by row with each row's own parameters (HF order)."""
    logits = np.random.default_rng(0).normal(0, 3, (6, 200)).astype(np.float32)
    top_k = np.array([0, 1, 7, 50, 0, 300], np.int32)
    top_p = np.array([0.5, 1.0, 1.0, 0.8, 0.05, 0.95], np.float32)
    ours = np.asarray(_filter_top_k_top_p(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    for row in range(len(logits)):
        scores = torch.from_numpy(logits[row:row + 1])
        if top_k[row]:
            scores = TopKLogitsWarper(int(top_k[row]))(None, scores)
        if top_p[row] < 1.0:
            scores = TopPLogitsWarper(float(top_p[row]))(None, scores)
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(scores.numpy()[0]), err_msg=f"row {row}")
        assert np.isfinite(ours[row]).sum() >= 1


def test_a_draw_is_greedy_where_the_temperature_is_zero_and_seeded_elsewhere():
    logits = jnp.asarray(np.random.default_rng(1).normal(0, 1, (4, 300)).astype(np.float32))
    rows = batch([0.0, 1.0, 1.0, 0.0], top_k=[0, 0, 20, 3])
    for filtered in (False, True):
        tokens = np.asarray(sample(logits, rows, filtered))
        assert tokens[[0, 3]].tolist() == np.asarray(greedy(logits))[[0, 3]].tolist()
        assert tokens.tolist() == np.asarray(sample(logits, rows, filtered)).tolist()
    top = np.argsort(-np.asarray(logits[2]))[:20]
    draws = {int(sample(logits, rows._replace(steps=np.full(4, s, np.int32)), True)[2]) for s in range(40)}
    assert draws <= set(top.tolist()) and len(draws) > 3


def test_the_step_and_the_draws_have_no_device_side_branch():
    """XLA:GPU waits on the host for every conditional's predicate: none in what runs per step."""
    spec = tiny_spec()
    llm = LLM.from_model(Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=0)), None, num_kv_blocks=32,
                         block_size=4, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
                         compile_cache=False, warmup=False)
    runner = llm.runner
    texts = [runner._lower(shape).as_text() for shape in runner.all_shapes()[::3]]
    texts += [runner._lower_draw(4, filtered).as_text() for filtered in (False, True)]
    for text in texts:
        assert not re.search(r"stablehlo\.(case|if)\b", text)
