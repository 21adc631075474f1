"""Our weights as an orbax checkpoint: the converted-model cache, restored straight into a mesh's splits.

The checkpoint holds `Llama.weights()` in our layout (fused wqkv, stacked layers). A restore asks
orbax for arrays with the target dtype and `PARAM_SPECS` shardings, so each device reads its own
part of each weight from disk, cast on the way: no host copy of the whole model is ever made.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from models.llama import Llama, param_sharding
from models.spec import ModelSpec


def save_weights(model: Llama, path: Path) -> None:
    """Write the model's weights (as they are: dtype and values) to a new checkpoint folder `path`."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(path).absolute(), model.weights())


def restore_llama(spec: ModelSpec, path: Path, *, dtype=jnp.float32, mesh: Mesh | None = None) -> Llama:
    """The model of `spec` with its weights read from the checkpoint at `path`, in `dtype`, each
    weight split over `mesh` (None: the default device) as `PARAM_SPECS` says."""
    path = Path(path).absolute()
    model = Llama.abstract(spec, dtype)
    wanted = {name: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=param_sharding(name, mesh))
              for name, s in model.weights().items()}
    if not path.is_dir():
        raise ValueError(f"no orbax checkpoint at {path}: the folder does not exist")
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path).item_metadata
        if stored is None:
            raise ValueError(f"{path} is not an orbax checkpoint (it has no metadata); if it is a converted "
                             f"model's, delete {path.parent} and it will be converted again")
        stored_shapes = {name: tuple(array.shape) for name, array in stored.tree.items()}
        for name in sorted(stored_shapes.keys() | wanted.keys()):
            has, needs = stored_shapes.get(name), wanted[name].shape if name in wanted else None
            if has != needs:
                raise ValueError(f"the checkpoint at {path} does not fit its model config: weight {name!r} "
                                 f"is {_shape(has)} in the checkpoint and {_shape(needs)} in the model")
        weights = checkpointer.restore(path, wanted)
    for name, array in weights.items():
        getattr(model, name).set_value(array)
    return model


def _shape(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else str(list(shape))
