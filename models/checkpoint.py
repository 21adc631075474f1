"""Our weights as an orbax checkpoint: the converted-model cache, restored straight into a mesh's splits.

The checkpoint holds `Llama.weights()` in our layout (fused wqkv, gate/up), with the stacked layer
weights stored one entry per layer: `{"embed": ..., "layers": {"0": {"wqkv": ...}, ...}}`. A
restore asks orbax for arrays in the target dtype with the `PARAM_SPECS` shardings, so each device
reads its own part from disk, cast on the way, and it asks for a few layers at a time, written into
the stacked weights in place (`Llama.from_parts`): orbax reads an array into a host buffer before
placing it, and a whole stacked weight at a time would cost a second copy of it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from models.llama import LAYER_WEIGHTS, Llama, layer_sharding, param_sharding
from models.spec import ModelSpec

# At most this many bytes of layers (or one layer) are read per orbax call: a call costs ~20 ms per
# array, so a small model is read in a few calls, and a large one holds one extra layer at a time.
READ_BYTES = 256 << 20


def save_weights(model: Llama, path: Path) -> None:
    """Write the model's weights (as they are: dtype and values) to a new checkpoint folder `path`."""
    weights = model.weights()
    tree: dict[str, Any] = {name: w for name, w in weights.items() if name not in LAYER_WEIGHTS}
    tree["layers"] = {str(i): {name: weights[name][i] for name in LAYER_WEIGHTS}
                      for i in range(model.spec.num_layers)}
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), args=ocp.args.PyTreeSave(tree))


def restore_llama(spec: ModelSpec, path: Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> Llama:
    """The model of `spec` with its weights read from the checkpoint at `path`, in `dtype`, each
    weight split over `mesh` (None: the default device) as `PARAM_SPECS` says."""
    path = Path(path).absolute()
    shapes = Llama.abstract(spec, dtype).weights()
    whole = {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=param_sharding(name, mesh))
             for name, s in shapes.items() if name not in LAYER_WEIGHTS}
    layer = {name: jax.ShapeDtypeStruct(shapes[name].shape[1:], dtype, sharding=layer_sharding(name, mesh))
             for name in LAYER_WEIGHTS}
    if not path.is_dir():
        raise ValueError(f"no orbax checkpoint at {path}: the folder does not exist")
    with ocp.PyTreeCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata
        if stored is None:
            raise ValueError(f"{path} is not an orbax checkpoint (it has no metadata); if it is a converted "
                             f"model's, delete {path.parent} and it will be converted again")
        _check_shapes(path, _flat_shapes(stored.tree), _flat_shapes({
            **whole, "layers": {str(i): layer for i in range(spec.num_layers)}}))

        def restore(item: dict) -> dict:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))

        per_read = max(1, READ_BYTES // sum(math.prod(s.shape) * s.dtype.itemsize for s in layer.values()))
        read: dict[str, dict] = {}

        def layer_weights(i: int) -> dict:
            """Layer i's weights, read together with the next layers that fit in READ_BYTES."""
            if str(i) not in read:
                ids = range(i, min(i + per_read, spec.num_layers))
                read.update(restore({"layers": {str(j): layer for j in ids}})["layers"])
            return read.pop(str(i))

        return Llama.from_parts(spec, restore(whole), layer_weights, dtype=dtype, mesh=mesh)


def _flat_shapes(tree: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{"layers/0/wqkv": shape, ...} of a nested dict of arrays or array metadata."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat_shapes(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = tuple(value.shape)
    return out


def _check_shapes(path: Path, stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> None:
    for name in sorted(stored.keys() | wanted.keys()):
        has, needs = stored.get(name), wanted.get(name)
        if has != needs:
            raise ValueError(f"the checkpoint at {path} does not fit its model config: weight {name!r} "
                             f"is {_shape(has)} in the checkpoint and {_shape(needs)} in the model")


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))
