"""Logical axis names and the one table that maps them onto a device mesh.

Every parameter and cache array declares its axes by role (``embed``, ``heads``, ...); ``LOGICAL_RULES``
says which mesh axis, if any, splits each role. A 1-device mesh is the default; the same code shards on
any ``(data, model)`` mesh whose ``model`` size divides the head, KV-head, MLP and vocab counts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

# logical axis -> mesh axis (None: replicated). Tensor parallelism splits heads and the MLP hidden size;
# the vocab is split for the embedding and LM head; the batch is split across data-parallel replicas.
LOGICAL_RULES: dict[str, str | None] = {
    "batch": DATA_AXIS,
    "embed": None,
    "heads": MODEL_AXIS,
    "kv_heads": MODEL_AXIS,
    "head_dim": None,
    "mlp": MODEL_AXIS,
    "vocab": MODEL_AXIS,
    "layers": None,
    "pages": None,
    "page_slot": None,
    "seq": None,
    "lora_slots": None,
    "lora_rank": None,
}


def make_mesh(model_parallel: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, model)`` mesh; by default one device (the first).

    Args:
      model_parallel: size of the tensor-parallel ``model`` axis; the rest of ``devices`` is data-parallel.
      devices: devices to use; defaults to ``jax.devices()[:model_parallel]``.
    """
    if devices is None:
        devices = jax.devices()[:model_parallel]
    if len(devices) % model_parallel:
        raise ValueError(f"{len(devices)} devices cannot form a mesh with model_parallel={model_parallel}")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def logical_to_spec(axes: Sequence[str | None]) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec through ``LOGICAL_RULES``."""
    mesh_axes = []
    for axis in axes:
        if axis is not None and axis not in LOGICAL_RULES:
            raise KeyError(f"unknown logical axis {axis!r}; add it to LOGICAL_RULES")
        mesh_axes.append(None if axis is None else LOGICAL_RULES[axis])
    return PartitionSpec(*mesh_axes)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    """A NamedSharding for an array with the given logical axes.

    If ``shape`` is given, any axis whose size the mesh axis does not divide is replicated instead
    (e.g. 8 KV heads on a 16-way model axis), so a valid sharding always comes back.
    """
    spec = list(logical_to_spec(axes))
    if shape is not None:
        for i, mesh_axis in enumerate(spec):
            if mesh_axis is not None and shape[i] % mesh.shape[mesh_axis]:
                spec[i] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


@functools.cache
def _filled_fn(shape: tuple[int, ...], dtype, value: float, sharding: NamedSharding):
    return jax.jit(lambda: jnp.full(shape, value, dtype), out_shardings=sharding)


def filled(shape: Sequence[int], dtype, sharding: NamedSharding, value: float = 0.0) -> jax.Array:
    """An array of ``value`` made directly on the devices with ``sharding``.

    The jitted maker is cached per (shape, dtype, value, sharding), so re-allocating caches or banks of a
    shape seen before never compiles again.
    """
    return _filled_fn(tuple(shape), jnp.dtype(dtype), float(value), sharding)()
