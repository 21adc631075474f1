"""Engine behaviour on a tiny random Llama: batching, chunking, preemption, compile guard, errors."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (FakeRunner, count_compiles, engine_with, random_hf_tensors, requires_smollm2, tiny_spec,
                     write_bos_tokenizer)
from infercept_jax import LLM, SamplingParams
from infercept_jax.detokenizer import partial_marker_length
from infercept_jax.model_runner import Packing
from infercept_jax.sampling import SamplingBatch
from models import registry
from models.llama import Llama
from models.tokenizer import Tokenizer, tokenizer_from_gguf
from scheduling.request import RequestStatus, SegmentHint

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    spec = tiny_spec()
    return Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3))


def make_llm(model, **kw):
    opts = dict(num_kv_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                row_width=8, attn_chunk_tokens=8, warmup=False, strict_compile=False)
    opts.update(kw)
    return LLM.from_model(model, **opts)


def prompts(n, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 256, rng.integers(lo, hi)).tolist() for _ in range(n)]


def test_batch_gives_same_tokens_as_each_request_alone(model):
    llm = make_llm(model)
    ps = prompts(6)
    batched = [o.token_ids for o in llm.generate(ps, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in ps]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


@pytest.mark.parametrize("budget", [1, 3, 7, 16, 64])
def test_chunked_prefill_gives_same_tokens_as_one_prefill(model, budget):
    ps = prompts(3, seed=1, lo=30, hi=60)
    reference = [o.token_ids for o in make_llm(model, max_num_batched_tokens=64).generate(ps, GREEDY)]
    chunked = [o.token_ids for o in make_llm(model, max_num_batched_tokens=budget).generate(ps, GREEDY)]
    assert chunked == reference


def test_preemption_recomputes_and_gives_same_tokens(model):
    ps = prompts(8, seed=2, lo=20, hi=30)
    reference = [o.token_ids for o in make_llm(model).generate(ps, GREEDY)]
    tight = make_llm(model, num_kv_blocks=24)   # 23 usable blocks of 4 tokens for 8 requests of ~40
    outs = tight.generate(ps, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert tight.engine.blocks.num_free == tight.engine.blocks.device.capacity
    tight.engine.blocks.check_invariants()


def test_sampling_is_seeded_per_request_and_independent_of_the_batch(model):
    llm = make_llm(model)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    ps = prompts(4, seed=4)
    alone = llm.generate([ps[0]], p)[0].token_ids
    batched = llm.generate(ps, [p] + [SamplingParams(max_tokens=10, temperature=0.8, seed=i) for i in range(3)])
    assert batched[0].token_ids == alone
    other_seed = llm.generate([ps[0]], SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != alone


def test_top_k_one_is_greedy(model):
    llm = make_llm(model)
    ps = prompts(3, seed=5)
    greedy = [o.token_ids for o in llm.generate(ps, GREEDY)]
    top1 = [o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=12, temperature=1.0, top_k=1,
                                                                  ignore_eos=True))]
    assert top1 == greedy


def test_the_largest_top_k_accepted_filters_nothing(model):
    """top_k = 2**31 - 1 reaches the step (an int32) and keeps every token: the same draws as no filter."""
    llm = make_llm(model)
    ps = prompts(2, seed=5)
    drawn = [[o.token_ids for o in llm.generate(ps, SamplingParams(max_tokens=8, temperature=1.0, top_k=k, seed=3,
                                                                   ignore_eos=True))]
             for k in (0, 2**31 - 1)]
    assert drawn[0] == drawn[1]


def test_stop_token_ids_and_max_tokens(model):
    llm = make_llm(model)
    p = prompts(1, seed=6)[0]
    free = llm.generate([p], GREEDY)[0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    stopped = llm.generate([p], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at],
                                               ignore_eos=True))[0]
    assert stopped.token_ids == free.token_ids[:first + 1]
    assert stopped.finish_reason == "stop"
    assert free.finish_reason == "length"


def test_generation_stops_at_max_model_len(model):
    llm = make_llm(model, max_model_len=20)
    out = llm.generate([list(range(2, 17))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_no_compile_after_warmup(model):
    llm = make_llm(model, warmup=True, strict_compile=True, max_num_batched_tokens=32)
    assert llm.warmup_shapes == len(llm.runner.all_shapes()) > 0
    with count_compiles() as compiles:
        llm.generate(prompts(8, seed=7, lo=2, hi=90), SamplingParams(max_tokens=9, temperature=0.0))
        llm.generate(prompts(1, seed=8), SamplingParams(max_tokens=3, temperature=0.5, top_p=0.5))
        llm.generate(prompts(2, seed=10), SamplingParams(max_tokens=3, temperature=0.5))
        llm.generate(prompts(3, seed=9, lo=60, hi=100), SamplingParams(max_tokens=4, temperature=0.0))
    assert compiles == []


def test_a_packed_tree_unpacks_on_the_device_bit_for_bit():
    sampling = SamplingBatch(temperature=np.array([0.0, -0.5, np.inf], np.float32), top_k=np.array([0, 1, 2], np.int32),
                             top_p=np.array([1.0, 1e-30, np.nan], np.float32),
                             seeds=np.array([0, 2**32 - 1, 12345], np.uint32), steps=np.arange(3, dtype=np.int32))
    tree = {"ids": np.array([[3, -1], [7, 2**31 - 1]], np.int32), "count": np.int32(5), "sampling": sampling}
    buffer, packing = Packing.pack(tree)
    assert buffer.dtype == np.int32 and buffer.shape == (4 + 1 + 5 * 3,)
    back = jax.jit(packing.unpack)(buffer)

    def bytes_of(array):   # NaN and inf compared bit for bit
        return np.asarray(array).reshape(-1).view(np.uint8)

    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(bytes_of(got), bytes_of(want))
    with pytest.raises(TypeError, match="4-byte"):
        Packing.pack({"ids": np.zeros(2, np.int64)})


def test_a_step_gets_its_inputs_as_one_buffer(model):
    """The weights, the two pools, the packed batch, the previous step's tokens: nothing more to copy."""
    runner = make_llm(model).runner
    for shape in runner.all_shapes()[::4]:
        lowered = runner._lower(shape)
        assert len(jax.tree.leaves(lowered.args_info)) == len(runner._params) + 4


@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, "DEFAULT")])
def test_a_float32_step_multiplies_in_float32_and_other_dtypes_at_jaxs_default(dtype, precision):
    spec = tiny_spec()
    runner = make_llm(Llama.from_hf_weights(spec, random_hf_tensors(spec, seed=3), dtype=dtype)).runner
    with jax.default_matmul_precision("default"):   # not the tests' own "highest" (conftest.py)
        text = runner._lower(runner.all_shapes()[-1]).as_text()
    assert set(re.findall(r"precision = \[(\w+), \w+\]", text)) == {precision}


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([5] * 600, "max_model_len"),
    ([5, 999999], "outside the vocabulary"),
    ("text", "no tokenizer"),
])
def test_bad_prompt_is_rejected_and_engine_keeps_serving(model, bad, message):
    llm = make_llm(model)
    good = llm.engine.add_request(prompts(1)[0], GREEDY)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(bad, GREEDY)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompts(1)[0], bad], GREEDY)
    finished = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == [good] and len(finished[good].token_ids) == 12
    assert llm.engine.blocks.num_free == llm.engine.blocks.device.capacity


@pytest.mark.parametrize("text, stops, held", [
    ("Hello there", [", friend"], 0),
    ("Hello there,", [", friend"], 1),
    ("Hello there, fr", [", friend"], 4),
    ("Hello there", ["there, f"], 5),
    ("Hello there", ["x", "here!", "ere?"], 4),      # the longest of the stops' prefixes it ends with
    ("abc", ["c"], 0),                               # a whole stop is cut, never held
    ("ab", ["abc"], 2),                              # all of the text
    ("", [", friend"], 0),
])
def test_a_running_output_holds_back_an_end_that_may_begin_a_stop(text, stops, held):
    assert partial_marker_length(text, stops) == held


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2**31), "top_k"),       # past int32, which the step carries it in: it took the engine down
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_stop_lists_may_be_none_as_in_vllm_and_must_be_lists():
    assert SamplingParams(stop=None, stop_token_ids=None).stop == SamplingParams().stop_token_ids == []
    assert SamplingParams(stop="ab").stop == ["ab"]
    for kwargs in (dict(stop_token_ids=5), dict(stop=3)):
        with pytest.raises(ValueError, match="must be a list"):
            SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(call_duration=-1.0), "call_duration"),
    (dict(result_tokens=-1), "result_tokens"),
    (dict(tool=3), "tool"),
])
def test_invalid_segment_hints_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SegmentHint(**kwargs)


def test_a_hint_that_is_not_a_segment_hint_is_rejected_and_nothing_queued():
    engine = engine_with(FakeRunner(), num_kv_blocks=16)
    with pytest.raises(ValueError, match="SegmentHint"):
        engine.add_request([5, 6], SamplingParams(max_tokens=2), hint={"call_duration": 1.0})
    assert not engine.requests and not engine.has_work()


def test_unknown_engine_option_is_rejected(model):
    with pytest.raises(ValueError, match="unknown engine option"):
        LLM.from_model(model, not_an_option=1)


def test_abort_frees_blocks_and_unknown_id_raises(model):
    llm = make_llm(model)
    rid = llm.engine.add_request(prompts(1)[0], GREEDY)
    llm.engine.step()
    out = llm.engine.abort(rid)
    assert out.finish_reason == "abort"
    assert llm.engine.blocks.num_free == llm.engine.blocks.device.capacity
    with pytest.raises(KeyError, match="unknown request id"):
        llm.engine.abort("nope")


def test_decodes_mixed_with_a_prompt_use_the_decode_group_and_keep_their_tokens(model):
    llm = make_llm(model, max_num_batched_tokens=32, row_width=8)
    early, late = prompts(5, seed=10, lo=3, hi=8), prompts(1, seed=11, lo=60, hi=61)[0]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in early + [late]]
    shapes = []
    shape_for = llm.runner.shape_for
    llm.runner.shape_for = lambda out: shapes.append(shape_for(out)) or shapes[-1]
    engine = llm.engine
    ids = [engine.add_request(p, GREEDY) for p in early]
    engine.step()
    engine.step()
    ids.append(engine.add_request(late, GREEDY))
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert [done[i] for i in ids] == alone
    mixed = [s for s in shapes if s.decode_rows and s.chunk_rows]
    assert mixed and all(s.row_width == 8 for s in mixed)


def test_no_step_has_a_single_token(model):
    """A 1-token step makes XLA:CPU copy the whole KV pool in every layer; shapes pad to 2."""
    for seqs in (1, 8):
        runner = make_llm(model, max_num_seqs=seqs).runner
        assert min(shape.num_tokens for shape in runner.all_shapes()) >= 2
    llm = make_llm(model, max_num_seqs=1)
    assert len(llm.generate([prompts(1)[0]], GREEDY)[0].token_ids) == 12


def test_a_text_prompt_gets_its_tokenizers_bos_and_a_text_result_does_not(tmp_path):
    tokenizer = Tokenizer.from_folder(write_bos_tokenizer(tmp_path / "tok"))
    engine = engine_with(FakeRunner(), num_kv_blocks=16, vocab_size=4, tokenizer=tokenizer)
    rid = engine.add_request("hi there", SamplingParams(max_tokens=4, intercept_after=1))
    chat = engine.add_request("<s> hi", SamplingParams(max_tokens=1))
    assert engine.requests[rid].prompt_token_ids == [0, 2, 3] and engine.requests[chat].prompt_token_ids == [0, 2]
    while engine.requests[rid].status is not RequestStatus.PAUSED:
        engine.step()
    engine.resume(rid, "there hi")
    assert engine.requests[rid].token_ids[-2:] == [3, 2]


class LetterTokenizer:
    """Token id i is the letter chr(97 + i % 26): enough to exercise text, stop strings and streaming."""

    eos_token_id = None

    def encode(self, text):
        return [ord(c) - 97 + 26 for c in text]

    encode_prompt = encode       # no special tokens to add

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_truncate_the_text_and_streaming_yields_the_same_text(model):
    llm = LLM.from_model(model, LetterTokenizer(), num_kv_blocks=64, block_size=4, max_num_seqs=4,
                         max_num_batched_tokens=32, row_width=8, warmup=False, strict_compile=False)
    free = llm.generate(["hello"], GREEDY)[0]
    stop = free.text[5:7]
    cut = free.text.index(stop)
    stopped = llm.generate(["hello"], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True))[0]
    assert stopped.text == free.text[:cut] and stopped.finish_reason == "stop"
    kept = llm.generate(["hello"], SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], ignore_eos=True,
                                                  include_stop_str_in_output=True))[0]
    assert kept.text == free.text[:cut + len(stop)]
    assert "".join(llm.stream("hello", GREEDY)) == free.text
    assert llm.engine.requests == {}


# ------------------------------------------------------------------ incremental detokenization
class ScriptedRunner:
    """Samples the next token of each request's script, in no time (no model)."""

    def __init__(self, scripts: dict[str, list[int]]):
        self.scripts = scripts

    def execute(self, output):
        sampled = [(s.request, self.scripts[s.request.request_id][s.request.num_generated_tokens])
                   for s in output.scheduled if s.samples]
        return sampled, 0.0


class PieceTokenizer:
    """SentencePiece-like: pieces carry their leading space as '▁', and decode strips the space at
    the start, so decoding a window is not a slice of the whole decode."""

    pieces = ["▁the", "▁cat", "s", "▁sat", ".", "▁on", "▁a", "▁mat"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


def _texts_while_generating(tokenizer, scripts: dict[str, list[int]]) -> dict[str, list[str]]:
    engine = engine_with(ScriptedRunner(scripts), num_kv_blocks=64, max_model_len=256, vocab_size=50_000,
                         eos_token_ids=(), tokenizer=tokenizer, max_num_seqs=4, max_num_batched_tokens=16)
    for rid, script in scripts.items():
        engine.add_request([0, 1, 2], SamplingParams(max_tokens=len(script), ignore_eos=True), request_id=rid)
    texts: dict[str, list[str]] = {rid: [] for rid in scripts}
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id].append(out.text)
    return texts


@requires_smollm2
def test_incremental_text_equals_decoding_the_whole_output():
    """Every step's text is a prefix of the final one, and the final one is the whole output
    decoded at once: on SmolLM2's byte-level tokenizer with characters split across byte tokens,
    on random ids, and on a tokenizer that strips a leading space."""
    smollm2 = tokenizer_from_gguf(registry._smollm2_gguf())
    rng = np.random.default_rng(0)
    split_chars = smollm2.encode("naïve café 世界 🙂🚀 ok")
    assert any(smollm2.decode([i]).endswith("\ufffd") for i in split_chars)   # really split
    cases = [(smollm2, {"chars": split_chars, "random": rng.integers(0, 49152, 40).tolist()}),
             (PieceTokenizer(), {"pieces": rng.integers(0, 8, 30).tolist()})]
    for tokenizer, scripts in cases:
        for rid, texts in _texts_while_generating(tokenizer, scripts).items():
            whole = tokenizer.decode(scripts[rid])
            assert texts[-1] == whole, rid
            assert all(whole.startswith(t) and not t.endswith("\ufffd") for t in texts[:-1]), rid
