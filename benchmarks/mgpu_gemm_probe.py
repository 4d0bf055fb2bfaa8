"""Can a Mosaic GPU (wgmma + TMA) GEMM match XLA's at the decode projections? A first data point for putting
the LoRA expand inside the base GEMM (KERNELS_NOTES.md, "Open"): JAX's own Hopper matmul
(``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, a persistent warp-specialized kernel without split-K)
over a few tilings, against ``jnp.dot`` (XLA: cuBLAS or its Triton GEMM), for the Llama-3-8B projections at
128 and 256 rows, bf16. Device time per GEMM from the profiler; the weight rotates over enough copies to keep
it out of the 60 MB L2.

    PYTHONPATH=. python benchmarks/mgpu_gemm_probe.py
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_profile import kernel_times  # noqa: E402

SHAPES = [(m, k, n) for m in (128, 256) for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))]


def configs():
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    dims = hm.MatmulDimension
    out = []
    for tile_m, tile_n, wg in ((64, 128, dims.M), (128, 64, dims.N), (128, 128, dims.N), (64, 64, dims.M)):
        for steps in (4, 6):
            out.append(hm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=steps,
                                       epi_tile_n=64, epi_tile_m=64, grid_minor_dim=dims.N, grid_tile_width=1,
                                       wg_dimension=wg))
    return out


def _blocking(fn, *args):
    return jax.block_until_ready(fn(*args))


def time_gemm(gemm, x, ws):
    call = jax.jit(lambda x_, ws_: [gemm(x_, w) for w in ws_])
    out = call(x, ws)[0]
    prof = kernel_times(functools.partial(_blocking, call, x, ws), n_calls=5)
    return max(prof["total_us"], 1e-3) / len(ws), out  # 0 off GPU (no device plane)


def main():
    print(f"device {jax.devices()[0].device_kind}", flush=True)
    for m, k, n in SHAPES:
        copies = max(2, -(-240 * 2**20 // (k * n * 2)))
        key = jax.random.key(m + k + n)
        x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
        ws = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)).astype(jnp.bfloat16)
              for i in range(copies)]
        xla_us, want = time_gemm(jnp.dot, x, ws)
        bytes_ = k * n * 2 + m * (k + n) * 2
        print(f"M={m} K={k} N={n}: XLA {xla_us:.1f} us ({bytes_ / xla_us / 1e6:.2f} TB/s)", flush=True)
        try:
            from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
            cfgs = configs()
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            print(f"  mosaic gpu unavailable: {type(e).__name__}: {e}", flush=True)
            continue
        for cfg in cfgs:
            name = f"tile {cfg.tile_m}x{cfg.tile_n} wg {cfg.wg_dimension} steps {cfg.max_concurrent_steps}"
            try:
                us, got = time_gemm(functools.partial(hm.matmul, c=None, config=cfg), x, ws)
            except Exception as e:  # noqa: BLE001
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
            print(f"  {name}: {us:.1f} us ({bytes_ / us / 1e6:.2f} TB/s, {xla_us / us:.2f}x XLA), max |diff| "
                  f"{err:.1e}", flush=True)


if __name__ == "__main__":
    main()
