"""Where does the segment delta kernel's time go? Its steps added one at a time to a kernel that only stores,
each variant timed with the profiler (per launch), at T = 8192 (output past the L2) and T = 2048 (inside it).

Variants (each includes the ones above it), [32-row tiles x 256 columns] per program, R = 16, bf16 output:

* ``store``: the tile's rows from the tile table, an iota value stored (``locality_probe``'s store);
* ``dot``: the tile's adapter block of B [R, 256] loaded and a dot with a constant h;
* ``gather_h``: h gathered by the tile's rows from [T, R] float32;
* ``partials``: h summed from 2 H-slice partials [2, T, R] (what the library passes at R = 16);
* ``cond``: rank read per tile and the delta under ``lax.cond(rank > 0, ...)`` (the library's kernel);
* ``loop4``: as ``cond``, each program looping over 4 O-blocks with h loaded once.

    PYTHONPATH=. python benchmarks/delta_probe.py
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from locality_probe import per_launch_us, row_map  # noqa: E402

VARIANTS = ("store", "dot", "gather_h", "partials", "cond", "loop4")
R = 16


def _kernel(rows_ref, slot_ref, rank_ref, h_ref, b_ref, o_ref, *, variant, block_m, block_n, n_inner):
    i, j = pl.program_id(0), pl.program_id(1)
    level = VARIANTS.index(variant)
    rows = rows_ref[i, :]
    s = slot_ref[i]
    cols = lax.broadcasted_iota(jnp.int32, (block_m, block_n), 1)
    hcols = lax.broadcasted_iota(jnp.int32, (block_m, R), 1)
    if level >= VARIANTS.index("partials"):
        hv = h_ref[0, rows, :] + h_ref[1, rows, :]
    elif level >= VARIANTS.index("gather_h"):
        hv = h_ref[0, rows, :]
    else:
        hv = jnp.full((block_m, R), 0.5, jnp.float32)
    rank = rank_ref[i] if level >= VARIANTS.index("cond") else R
    hv = jnp.where(hcols < rank, hv, 0.0)
    for k in range(n_inner):
        n0 = pl.multiple_of((j * n_inner + k) * block_n, block_n)
        if level == 0:
            d = (rows[:, None] + cols + n0).astype(jnp.float32)
        else:
            def delta(n0=n0):
                bv = b_ref[s, :, pl.ds(n0, block_n)]
                return jnp.dot(hv.astype(bv.dtype), bv, preferred_element_type=jnp.float32)
            if level >= VARIANTS.index("cond"):
                d = lax.cond(rank > 0, delta, lambda: jnp.zeros((block_m, block_n), jnp.float32))
            else:
                d = delta()
        o_ref[rows, pl.ds(n0, block_n)] = d.astype(o_ref.dtype)


def delta(variant, rows, slots, ranks, h, b, block_n=256, interpret=False):
    n_tiles, block_m = rows.shape
    width = b.shape[2]
    n_inner = 4 if variant == "loop4" else 1
    kernel = functools.partial(_kernel, variant=variant, block_m=block_m, block_n=block_n, n_inner=n_inner)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tiles * block_m, width), jnp.bfloat16),
        grid=(n_tiles, width // (block_n * n_inner)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), name="probe_delta",
        interpret=interpret,
    )(rows, slots, ranks, h, b)


def main():
    print(f"# {jax.devices()[0].device_kind}", flush=True)
    width, n_adapters, k = 4096, 4, 4
    b = jax.random.normal(jax.random.key(1), (n_adapters, R, width), jnp.bfloat16)
    for t in (8192, 2048):
        rows = jnp.asarray(row_map("random", t, 32))
        n_tiles = rows.shape[0]
        slots = jnp.asarray(np.random.default_rng(0).integers(0, n_adapters, n_tiles), jnp.int32)
        ranks = jnp.full((n_tiles,), R, jnp.int32)
        h = jax.random.normal(jax.random.key(2), (2, t, R), jnp.float32)
        nbytes = t * width * 2
        for variant in VARIANTS:
            f = jax.jit(lambda rows, slots, ranks, h, v=variant: [delta(v, rows, slots, ranks, h + i, b)
                                                                    for i in range(k)])
            try:
                us = per_launch_us(lambda f=f, a=(rows, slots, ranks, h): jax.block_until_ready(f(*a)), "probe_delta")
            except Exception as e:
                print(f"T={t} {variant}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            print(f"T={t:5d} {variant:9s}: {us:6.1f} us  {nbytes / us / 1e6:5.2f} TB/s of output", flush=True)


if __name__ == "__main__":
    main()
