"""Loading Hugging Face safetensors checkpoints into sharded ``Params``.

Tensors are read one at a time from memory-mapped files, converted to the target dtype and layout on the
host, and placed straight onto the devices with their target sharding, so peak host memory stays near one
tensor beyond what the devices hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmlora.config import ModelConfig
from jmlora.model.params import Params, assemble_params, param_specs
from jmlora.safetensors_io import FLOAT_DTYPES, SafetensorsError, SafetensorsFile
from jmlora.sharding import MODEL_AXIS, logical_sharding, make_mesh

logger = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Buffers some checkpoints carry that the decoder recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint whose tensors are missing, misshapen or unreadable."""


def resolve_dtype(dtype: str, cfg: ModelConfig):
    """Maps "auto" (the checkpoint's dtype), "float32", "bfloat16" or "float16" to a jnp dtype."""
    name = cfg.dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[name]


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Maps every tensor name of a checkpoint to the safetensors file that holds it.

    Reads ``model.safetensors.index.json`` when present (sharded checkpoints), else the single
    ``*.safetensors`` file.

    Raises:
      FileNotFoundError: no safetensors weights (including a ``.bin``-only checkpoint), or an index that
        names a missing file.
      CheckpointError: a malformed index.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise FileNotFoundError(f"{index} names {path.name}, which does not exist")
        return files
    candidates = sorted(model_dir.glob("*.safetensors"))
    if not candidates:
        bins = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: convert it to safetensors)" if bins else ""
        raise FileNotFoundError(f"no safetensors weights in {model_dir}{hint}")
    if len(candidates) > 1:
        raise CheckpointError(f"{model_dir} has several .safetensors files but no model.safetensors.index.json")
    with SafetensorsFile(candidates[0]) as f:
        return {name: candidates[0] for name in f.keys()}


def iter_checkpoint(model_dir: str | Path, cfg: ModelConfig, dtype,
                    model_parallel: int = 1) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields ``(spec.path, array in our layout and dtype)`` for every parameter of
    ``param_specs(cfg, model_parallel)``, one parameter (one tensor, or the few a fused weight joins) at a time.

    Raises:
      CheckpointError: a missing tensor, a tensor of the wrong shape or a non-float dtype, naming it.
      SafetensorsError: a truncated or malformed file, naming it.
    """
    files = weight_files(model_dir)
    specs = param_specs(cfg, model_parallel)
    np_dtype = np.dtype(dtype)
    with ExitStack() as stack:
        opened: dict[Path, SafetensorsFile] = {}

        def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
            path = files.get(name)
            if path is None:
                raise CheckpointError(f"checkpoint {model_dir} has no tensor {name!r}")
            if path not in opened:
                opened[path] = stack.enter_context(SafetensorsFile(path))
            f = opened[path]
            if name not in f:
                raise CheckpointError(f"{path} has no tensor {name!r} (the index says it does)")
            if f.shape(name) != shape:
                raise CheckpointError(f"tensor {name!r} in {path.name} has shape {list(f.shape(name))}, "
                                      f"expected {list(shape)} from config.json")
            if f.dtype_name(name) not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name!r} in {path.name} has non-float dtype {f.dtype_name(name)}")
            tensor = f.get(name)
            if not np.isfinite(tensor.astype(np.float32)).all():
                raise CheckpointError(f"tensor {name!r} in {path.name} holds NaN or infinite values")
            return tensor

        for spec in specs:
            tensors = [read(name, shape) for name, shape in spec.hf]
            yield spec.path, np.ascontiguousarray(spec.from_hf(tensors).astype(np_dtype))
    used = {name for s in specs for name, _ in s.hf}
    unused = sorted(n for n in files if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if cfg.tie_word_embeddings and "lm_head.weight" in unused:
        unused.remove("lm_head.weight")  # tied checkpoints sometimes store the head anyway
    if unused:
        logger.warning("checkpoint %s has %d tensors the decoder does not use: %s", model_dir, len(unused),
                       ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else ""))


def load_params(model_dir: str | Path, cfg: ModelConfig, *, dtype="auto", mesh: Mesh | None = None) -> Params:
    """Loads a Hugging Face safetensors checkpoint onto the mesh.

    Args:
      model_dir: the model directory (config.json + *.safetensors [+ index]).
      cfg: its ModelConfig.
      dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
      mesh: target device mesh; defaults to one device.

    Returns:
      Params with every array placed with its sharding from the logical-axis rules.
    """
    mesh = mesh or make_mesh()
    jdtype = resolve_dtype(dtype, cfg) if isinstance(dtype, str) else dtype
    model_parallel = mesh.shape[MODEL_AXIS]
    specs = {s.path: s for s in param_specs(cfg, model_parallel)}
    values = {}
    try:
        for path, array in iter_checkpoint(model_dir, cfg, jdtype, model_parallel):
            spec = specs[path]
            values[path] = jax.device_put(array, logical_sharding(mesh, spec.axes, spec.shape))
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    return assemble_params(cfg, values)
