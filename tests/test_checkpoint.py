"""models/checkpoint.py: our weights saved with orbax and restored exactly, in the asked dtype, with
clear errors for a checkpoint that is missing or does not fit the model."""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import pytest

from helpers import assert_same_weights, random_hf_tensors, tiny_spec
from models import checkpoint
from models.checkpoint import restore_llama, save_weights
from models.llama import Llama


@pytest.mark.parametrize("tied, read_bytes", [(False, checkpoint.READ_BYTES), (True, 1)],
                         ids=["untied-all-layers-in-one-read", "tied-a-layer-per-read"])
def test_round_trip_is_exact_and_casts_like_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tied: bool,
                                                    read_bytes: int) -> None:
    monkeypatch.setattr(checkpoint, "READ_BYTES", read_bytes)
    spec = tiny_spec(tied, num_layers=3)
    tensors = random_hf_tensors(spec, seed=9)
    model = Llama.from_hf_weights(spec, tensors)
    save_weights(model, tmp_path / "ckpt")
    assert_same_weights(restore_llama(spec, tmp_path / "ckpt"), model)
    # A float32 checkpoint restored into bfloat16 gives the weights a bfloat16 load of the tensors gives.
    assert_same_weights(restore_llama(spec, tmp_path / "ckpt", dtype=jnp.bfloat16),
                        Llama.from_hf_weights(spec, tensors, dtype=jnp.bfloat16))


def test_bad_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    spec = tiny_spec()
    with pytest.raises(ValueError, match="no orbax checkpoint at .*missing: the folder does not exist"):
        restore_llama(spec, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not an orbax checkpoint"):
        restore_llama(spec, tmp_path / "empty")

    save_weights(Llama.from_hf_weights(spec, random_hf_tensors(spec)), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"weight 'layers/2/attn_norm' is absent in the checkpoint and \[64\] in"):
        restore_llama(tiny_spec(num_layers=3), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"weight 'layers/0/w_down' is \[128, 64\] in the checkpoint and \[96, 64\]"):
        restore_llama(tiny_spec(intermediate_size=96), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"weight 'lm_head' is \[64, 256\] in the checkpoint and absent in the model"):
        restore_llama(tiny_spec(tied=True), tmp_path / "ckpt")
