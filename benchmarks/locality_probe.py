"""Does the order of the rows a prefill LoRA kernel touches cost DRAM bandwidth? Row-gathered stores and loads
of [block_m x block] tiles, the pattern of the segment delta and the segment shrink, timed with the profiler
for three row orders over T rows:

* ``contiguous``: tile i holds rows i*BM .. i*BM + BM - 1 (tokens arriving grouped by adapter);
* ``runs``: 128-row runs in random order, contiguous inside (one prompt per run, prompts in any order);
* ``random``: a random permutation of the rows (tokens in random order over the adapters, kernels.py's case).

Beside them XLA's fill and copy of the same bytes. The kernels only move bytes (no dot): a store kernel
writes [T, O] bf16 through [block_m, block_n] tiles, optionally ``n_inner`` O-blocks per program; a load
kernel sums [T, H] bf16 over H-chunks (n_split programs per tile), as the shrink streams x.

    PYTHONPATH=. python benchmarks/locality_probe.py [--t 8192] [--width 4096]
"""

from __future__ import annotations

import argparse
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
from device_profile import kernel_times  # noqa: E402


def row_map(order: str, t: int, block_m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if order == "contiguous":
        rows = np.arange(t)
    elif order == "runs":
        rows = (rng.permutation(t // 128)[:, None] * 128 + np.arange(128)[None, :]).reshape(-1)
    else:
        rows = rng.permutation(t)
    return rows.astype(np.int32).reshape(t // block_m, block_m)


def _store_kernel(rows_ref, o_ref, *, block_m, block_n, n_inner):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = rows_ref[i, :]
    cols = lax.broadcasted_iota(jnp.int32, (block_m, block_n), 1)
    for k in range(n_inner):
        n0 = pl.multiple_of((j * n_inner + k) * block_n, block_n)
        o_ref[rows, pl.ds(n0, block_n)] = (rows[:, None] + cols + n0).astype(o_ref.dtype)


def store(rows, width, block_n=256, n_inner=1, num_warps=4, interpret=False):
    n_tiles, block_m = rows.shape
    kernel = functools.partial(_store_kernel, block_m=block_m, block_n=block_n, n_inner=n_inner)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tiles * block_m, width), jnp.bfloat16),
        grid=(n_tiles, width // (block_n * n_inner)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2), name="probe_store",
        interpret=interpret,
    )(rows)


def _load_kernel(rows_ref, x_ref, o_ref, *, block_m, block_k, k_per_split):
    i, sp = pl.program_id(0), pl.program_id(1)
    rows = rows_ref[i, :]

    def step(s, acc):
        k0 = pl.multiple_of(sp * k_per_split + s * block_k, block_k)
        return acc + x_ref[rows, pl.ds(k0, block_k)].astype(jnp.float32)

    acc = lax.fori_loop(0, k_per_split // block_k, step, jnp.zeros((block_m, block_k), jnp.float32))
    o_ref[i, sp, :] = jnp.sum(acc, axis=1)


def load(rows, x, block_k=128, n_split=2, num_stages=3, interpret=False):
    n_tiles, block_m = rows.shape
    kernel = functools.partial(_load_kernel, block_m=block_m, block_k=block_k, k_per_split=x.shape[1] // n_split)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n_tiles, n_split, block_m), jnp.float32),
        grid=(n_tiles, n_split),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=num_stages), name="probe_load",
        interpret=interpret,
    )(rows, x)


def per_launch_us(fn, family, n_calls=10):
    prof = kernel_times(fn, n_calls)
    for fam, us, launches in prof["kernels"]:
        if fam.startswith(family):
            return us / launches
    raise RuntimeError(f"no kernel {family} in {prof['kernels'][:5]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=8192)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--block-m", type=int, default=32)
    args = p.parse_args()
    t, w, bm = args.t, args.width, args.block_m
    nbytes = t * w * 2
    print(f"# {jax.devices()[0].device_kind}, [T={t}, {w}] bf16 = {nbytes / 1e6:.1f} MB, block_m {bm}", flush=True)
    k = 4  # inputs per call: 4 x 64 MB, past the 60 MB L2
    xs = [jax.random.normal(jax.random.key(i), (t, w), jnp.bfloat16) for i in range(k)]
    v = jnp.float32(1.5)

    fill = jax.jit(lambda v: [jnp.full((t, w), v + i, jnp.bfloat16) for i in range(k)])
    us = kernel_times(lambda: jax.block_until_ready(fill(v)), 10)["total_us"] / k
    print(f"xla fill (write only)         {us:7.1f} us  {nbytes / us / 1e6:5.2f} TB/s", flush=True)
    copy = jax.jit(lambda xs: [x * 1.0001 for x in xs])
    us = kernel_times(lambda: jax.block_until_ready(copy(xs)), 10)["total_us"] / k
    print(f"xla x*c (read + write)        {us:7.1f} us  {2 * nbytes / us / 1e6:5.2f} TB/s (both)", flush=True)

    for order in ("contiguous", "runs", "random"):
        rows = jnp.asarray(row_map(order, t, bm))
        for block_n, n_inner, warps in ((256, 1, 4), (256, 4, 4), (512, 1, 8), (128, 1, 4)):
            f = jax.jit(lambda r, bn=block_n, ni=n_inner, nw=warps: [store(r, w, bn, ni, nw) for _ in range(k)])
            try:
                us = per_launch_us(lambda f=f, rows=rows: jax.block_until_ready(f(rows)), "probe_store")
            except Exception as e:  # a knob Triton rejects: say so and go on
                print(f"store {order} bn {block_n} x{n_inner} warps {warps}: FAILED {type(e).__name__}: "
                      f"{str(e)[:200]}", flush=True)
                continue
            print(f"store {order:10s} bn {block_n:3d} x{n_inner} warps {warps}: {us:7.1f} us  "
                  f"{nbytes / us / 1e6:5.2f} TB/s", flush=True)
        for block_k, n_split, stages in ((128, 2, 3), (128, 4, 3), (256, 2, 2)):
            f = jax.jit(lambda r, xs, bk=block_k, ns=n_split, st=stages: [load(r, x, bk, ns, st) for x in xs])
            try:
                us = per_launch_us(lambda f=f, rows=rows: jax.block_until_ready(f(rows, xs)), "probe_load")
            except Exception as e:
                print(f"load {order} bk {block_k} split {n_split}: FAILED {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
                continue
            print(f"load  {order:10s} bk {block_k:3d} split {n_split} stages {stages}: {us:7.1f} us  "
                  f"{nbytes / us / 1e6:5.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
