"""Can a Mosaic GPU (wgmma + TMA) GEMM match XLA's at the decode projections? A first data point for putting
the LoRA expand inside the base GEMM (KERNELS_NOTES.md, "Open"): JAX's own Hopper matmul
(``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, a persistent warp-specialized kernel without split-K)
over a few tilings, against ``jnp.dot`` (XLA: cuBLAS or its Triton GEMM), for the Llama-3-8B projections at
128 and 256 rows, bf16. Device time per GEMM from the profiler; the weight rotates over enough copies to keep
it out of the 60 MB L2.

    PYTHONPATH=. python benchmarks/mgpu_gemm_probe.py
        [--splitk-only | --lora | --ws | --onekernel [--chunked] | --check] [--rows 128|256]

It also times ``splitk_matmul``, a persistent Mosaic GPU GEMM of our own with split-K, at the o and down
projections (N = 4096), where the library kernel has too few output tiles; ``--lora`` times it at every
projection with and without the LoRA expand of 8 rank-16 adapters as extra K-steps (a second pipeline, or
prefetched). ``--ws`` times ``ws_splitk_matmul``, the same with a memory warpgroup and two compute warpgroups
per CTA (now ``pallas_kernels.ws_gemm``), at every projection. ``--onekernel`` times
``pallas_kernels.ws_lora.ws_lora_gemm``, which also computes the shrink and expand of 8 packed adapters inside
the same kernel (extra work items that signal global semaphores; ``--chunked``: the shrink split into
K-chunks), against ``ws_gemm`` at the same tiling. ``--check`` runs ``splitk_matmul`` and ``ws_gemm`` in Mosaic
GPU's interpreter on the CPU against f32 matmuls (``tests/test_ws_lora.py`` checks the one-kernel form) and
lowers every timed tiling for CUDA (Mosaic GPU's shared-memory check runs there; the passes after it, which
reject ops the target lacks, run only in the CUDA plugin on the GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_profile import kernel_times  # noqa: E402

from pallas_kernels.ws_gemm import (  # noqa: E402
    WsGemmConfig,
    ws_gemm,
)
from pallas_kernels.ws_gemm import ws_steps_that_fit as _ws_steps_that_fit  # noqa: E402
from pallas_kernels.ws_lora import WsLoraConfig, lora_steps_that_fit, ref_ws_lora_gemm, ws_lora_gemm  # noqa: E402

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
    # run 6 (twenty-fifth session) timed the eight above; not yet timed: 2-CTA clusters, whose pair shares one
    # operand tile by TMA multicast (halving that operand's L2 traffic)
    for tile_m, tile_n, wg, cluster in ((128, 128, dims.N, dims.M), (128, 128, dims.N, dims.N),
                                        (64, 128, dims.M, dims.M)):
        out.append(hm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=4,
                                   epi_tile_n=64, epi_tile_m=64, grid_minor_dim=dims.N, grid_tile_width=1,
                                   wg_dimension=wg, cluster_dimension=cluster))
    return out


def splitk_matmul(x, w, h=None, b=None, *, block_m=64, block_n=128, block_k=64, split_k=2, steps=4, num_sms=132,
                  lora_prefetch=False, interpret=False):
    """x [M, K] @ w [K, N] (+ h [M, L] @ b [L, N]) by a persistent Mosaic GPU kernel of our own with split-K:
    work items (M-tile, K-split, N-tile), the M-tile fastest so the items that share a weight tile run
    together; each pipelines its K-split's blocks through shared memory into a wgmma accumulator and stores a
    float32 partial; XLA sums the partials (in the step that sum would fuse into the consumer). With h and b
    (a batch's few adapters packed side by side: h masked to each row's own adapter's columns, b their B's
    stacked), the first K-split also runs their L / block_k K-steps into the same accumulator: the LoRA expand
    as part of the GEMM. ``lora_prefetch``: instead of a second pipeline after the main one (which drains the
    first and fills the second in every work item: +18 us at 256 rows' gate/up in run 1), each first-split item
    starts the TMA copies of its h and B tiles before its main pipeline and runs their wgmmas after it. A probe,
    not a library kernel."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = w.shape[1]
    lora_k = 0 if h is None else h.shape[1]
    if m % block_m or n % block_n or k % (block_k * split_k) or lora_k % block_k:
        raise ValueError(f"tiles ({block_m}, {block_n}, {block_k} x split {split_k}) must divide (M, N, K) = "
                         f"({m}, {n}, {k}) and block_k the LoRA K = {lora_k}")
    tiles_m, tiles_n, k_blocks = m // block_m, n // block_n, k // (block_k * split_k)
    lora_blocks = lora_k // block_k

    def body(x_gmem, w_gmem, *refs):
        h_gmem, b_gmem, o_gmem = refs if lora_blocks else (None, None, *refs)
        if lora_blocks and lora_prefetch:
            pl.run_scoped(functools.partial(items, x_gmem, w_gmem, h_gmem, b_gmem, o_gmem),
                          plgpu.SMEM((lora_blocks, block_m, block_k), x.dtype),
                          plgpu.SMEM((lora_blocks, block_k, block_n), w.dtype),
                          plgpu.Barrier(num_arrivals=2 * lora_blocks))
        else:
            items(x_gmem, w_gmem, h_gmem, b_gmem, o_gmem)

    def items(x_gmem, w_gmem, h_gmem, b_gmem, o_gmem, h_smem=None, b_smem=None, lora_barrier=None):
        @plgpu.nd_loop((tiles_m * split_k * tiles_n,), collective_axes="sm")
        def _(info):
            idx = info.index[0]
            mi, rest = idx % tiles_m, idx // tiles_m
            si, ni = rest % split_k, rest // split_k
            if h_smem is not None:
                @pl.when(si == 0)
                def _():
                    for j in range(lora_blocks):
                        plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(mi * block_m, block_m), pl.ds(j * block_k, block_k)],
                                                h_smem.at[j], lora_barrier)
                        plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(j * block_k, block_k), pl.ds(ni * block_n, block_n)],
                                                b_smem.at[j], lora_barrier)

            def acc_scope(acc_ref):
                plgpu.emit_pipeline(
                    lambda _, xs, ws: plgpu.wgmma(acc_ref, xs, ws),
                    grid=(k_blocks,),
                    in_specs=[
                        plgpu.BlockSpec((block_m, block_k), lambda kk: (mi, si * k_blocks + kk), delay_release=1),
                        plgpu.BlockSpec((block_k, block_n), lambda kk: (si * k_blocks + kk, ni), delay_release=1)],
                    max_concurrent_steps=steps,
                )(x_gmem, w_gmem)
                if h_smem is not None:
                    @pl.when(si == 0)
                    def _():
                        plgpu.barrier_wait(lora_barrier)
                        for j in range(lora_blocks):
                            plgpu.wgmma(acc_ref, h_smem.at[j], b_smem.at[j])
                elif lora_blocks:
                    @pl.when(si == 0)
                    def _():
                        plgpu.emit_pipeline(
                            lambda _, hs, bs: plgpu.wgmma(acc_ref, hs, bs),
                            grid=(lora_blocks,),
                            in_specs=[plgpu.BlockSpec((block_m, block_k), lambda kk: (mi, kk), delay_release=1),
                                      plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni), delay_release=1)],
                            max_concurrent_steps=min(steps, lora_blocks),
                        )(h_gmem, b_gmem)
                return acc_ref[...]   # waits for the wgmmas: the next item may overwrite h_smem and b_smem

            acc = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)))

            @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), jnp.float32))
            def _(o_smem):
                o_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(mi * block_m, block_m),
                                                          pl.ds(ni * block_n, block_n)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32), grid=(num_sms,),
                          grid_names=("sm",), interpret=plgpu.InterpretGPUParams() if interpret else None,
                          compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    operands = (x, w) if h is None else (x, w, h, b)
    return jnp.sum(kernel(*operands), axis=0).astype(x.dtype)


def ws_splitk_matmul(x, w, h=None, b=None, *, num_sms=132, interpret=False, **knobs):
    """``pallas_kernels.ws_gemm.ws_gemm`` (the warp-specialized split-K GEMM, moved into the library in the
    twenty-seventh session) with its tiling as keywords: tile_m, tile_n, split_k, steps, wg_dim."""
    return ws_gemm(x, w, h, b, config=WsGemmConfig(**knobs), num_sms=num_sms, interpret=interpret)


# ``--ws`` (twenty-seventh session, runs 1-2): two 64- or 128-row warpgroup tiles side by side or stacked,
# split 1 / 2 / 4.
def ws_steps_that_fit(cfg, lora_k=0):
    return _ws_steps_that_fit(WsGemmConfig(**cfg), lora_k)


# Pipeline steps as shared memory holds them: 128 x 256 CTA tiles 4; 64 x 256 ones 5 with a bf16 epilogue, 4
# with the float32 partials'; 128 x 128 ones 5 (``--check`` lowers every one of these for CUDA).
WS_CONFIGS = [dict(tile_m=tm, tile_n=128, split_k=sk, steps=4 if tm == 128 or (d == "n" and sk > 1) else 5,
                   wg_dim=d) for tm, d in ((64, "n"), (64, "m"), (128, "n")) for sk in (1, 2, 4)]


# run 7 (twenty-fifth session) swept split 2 / 4, 4 / 6 steps and 64 / 128 columns at 64 rows (best: 2, 6, 128);
# the twenty-sixth session's run 1 added 128-row tiles (best at 256 rows: o 18.3, down 47.3 us; 64-row tiles stay
# best at 128 rows) and 8 steps (only with 64-row tiles: 128-row ones need 262 of 232 KB of shared memory)
SPLITK_CONFIGS = [dict(split_k=sk, steps=st, block_n=128, block_m=bm) for sk in (2, 4) for st in (6, 8)
                  for bm in (64, 128) if not (bm == 128 and st == 8)]


def _blocking(fn, *args):
    return jax.block_until_ready(fn(*args))


def time_gemm(gemm, x, ws):
    call = jax.jit(lambda x_, ws_: [gemm(x_, w) for w in ws_])
    out = call(x, ws)[0]
    prof = kernel_times(functools.partial(_blocking, call, x, ws), n_calls=5)
    return max(prof["total_us"], 1e-3) / len(ws), out  # 0 off GPU (no device plane)


def check():
    """``splitk_matmul`` (with and without the LoRA K-steps) against f32 matmuls, in Mosaic GPU's interpreter
    (runs on the CPU). Small-integer inputs keep every product and sum exact in bf16/f32."""
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    for m, k, n, split_k, lora, block_m, prefetch in (
            (128, 512, 256, 2, 128, 64, False), (64, 256, 256, 1, 128, 64, False), (128, 512, 256, 4, 0, 64, False),
            (256, 512, 256, 2, 128, 128, False), (128, 512, 256, 2, 128, 64, True), (256, 512, 256, 1, 128, 128, True)):
        keys = jax.random.split(jax.random.key(m + k + split_k), 4)
        x, w, h, b = (jax.random.randint(key, shape, -1, 2).astype(jnp.bfloat16)
                      for key, shape in zip(keys, ((m, k), (k, n), (m, lora), (lora, n))))
        want = f32(x) @ f32(w) + (f32(h) @ f32(b) if lora else 0)
        got = splitk_matmul(x, w, *((h, b) if lora else ()), split_k=split_k, block_m=block_m, num_sms=3,
                            lora_prefetch=prefetch, interpret=True)
        err = float(jnp.max(jnp.abs(f32(got) - want)))
        print(f"check M={m} K={k} N={n} block_m={block_m} split_k={split_k} LoRA K={lora}"
              f"{' prefetched' if prefetch else ''}: max |diff| {err}", flush=True)
        if err:
            raise SystemExit("splitk_matmul does not match")
    for m, k, n, cfg in ((128, 512, 256, dict(tile_m=64, split_k=1, wg_dim="n")),
                         (256, 512, 256, dict(tile_m=64, split_k=2, wg_dim="m")),
                         (128, 512, 512, dict(tile_m=64, split_k=2, wg_dim="n")),
                         (256, 256, 256, dict(tile_m=128, split_k=1, wg_dim="n"))):
        keys = jax.random.split(jax.random.key(m + k + n), 2)
        x, w = (jax.random.randint(key, shape, -1, 2).astype(jnp.bfloat16)
                for key, shape in zip(keys, ((m, k), (k, n))))
        h, b = (jax.random.randint(jax.random.fold_in(keys[0], i), shape, -1, 2).astype(jnp.bfloat16)
                for i, shape in enumerate(((m, 128), (128, n))))
        for lora in (False, True):
            got = ws_splitk_matmul(x, w, *((h, b) if lora else ()), steps=2, num_sms=3, interpret=True, **cfg)
            err = float(jnp.max(jnp.abs(f32(got) - f32(x) @ f32(w) - (f32(h) @ f32(b) if lora else 0))))
            print(f"check ws_splitk_matmul M={m} K={k} N={n} {cfg}{' LoRA K=128' if lora else ''}: max |diff| {err}",
                  flush=True)
            if err:
                raise SystemExit("ws_splitk_matmul does not match")


def lora_configs(m, n):
    """(knobs of our GEMM and of its pipelined LoRA K-steps, knobs with the LoRA tiles prefetched): the best of
    runs 7 (twenty-fifth session) and 1 (twenty-sixth); prefetching with 128-row tiles leaves shared memory for 5
    pipeline steps, not 6."""
    cfg = dict(split_k=2 if n == 4096 else 1, steps=6, block_n=128, block_m=128 if m >= 256 else 64)
    return cfg, dict(cfg, steps=5 if cfg["block_m"] == 128 else cfg["steps"])


def lowering_check():
    """Lowers ``time_lora``'s kernels and ``WS_CONFIGS`` for CUDA on this (CPU) machine: Mosaic GPU's
    shared-memory check runs at lowering, so a tiling that cannot run shows up here, not on the GPU's time."""
    from jax import export

    ok = True
    for m, k, n in SHAPES:
        cfg, fetch_cfg = lora_configs(m, n)
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, k), (k, n), (m, 128), (128, n))]
        onekernel_args = [args[0], args[1], jax.ShapeDtypeStruct((1, k, 128), jnp.bfloat16), args[3],
                          jax.ShapeDtypeStruct((m,), jnp.int32)]
        tilings = [(splitk_matmul, c, nargs) for c, nargs in (
            (cfg, 2), (cfg, 4), (dict(fetch_cfg, lora_prefetch=True), 4), (fetch_cfg, 2))]
        tilings += [(ws_splitk_matmul, c, 2) for c in WS_CONFIGS]
        tilings += [(ws_splitk_matmul, dict(c, steps=ws_steps_that_fit(c, 128)), 4) for c in WS_CONFIGS]
        tilings += [(ws_lora_gemm, dict(config=lora_config(c, ch), rank=16), 5) for c in onekernel_configs(m, k, n)
                    for ch in (1, *shrink_chunks(m, k, n, c))]
        for fn, c, nargs in tilings:  # nargs 4: with the LoRA operands h and b
            try:
                export.export(jax.jit(functools.partial(fn, **c)), platforms=["cuda"])(
                    *(onekernel_args if nargs == 5 else args[:nargs]))
            except Exception as e:  # noqa: BLE001 - report every tiling, then fail
                ok = False
                print(f"lowering M={m} K={k} N={n} {fn.__name__} {c}{' LoRA' if nargs >= 4 else ''}: FAILED "
                      f"{type(e).__name__}: {str(e)[:300]}")
    print("lowering check:", "every tiling lowers for CUDA" if ok else "FAILED", flush=True)
    if not ok:
        raise SystemExit("a tiling does not lower")


def report(name, gemm, x, ws, xla_us, bytes_, want=None):
    """Times one GEMM (``time_gemm``) and prints it against XLA's, with its largest difference from ``want``
    when given; a failure is printed, not raised (a probe goes on to the next tiling)."""
    try:
        us, got = time_gemm(gemm, x, ws)
    except Exception as e:  # noqa: BLE001
        print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
        return
    err = "" if want is None else \
        f", max |diff| {float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))):.1e}"
    print(f"  {name}: {us:.1f} us ({bytes_ / us / 1e6:.2f} TB/s, {xla_us / us:.2f}x XLA){err}", flush=True)


def lora_operands(m, n, key):
    """h [m, 128] and b [128, n]: the packed h and B of 8 rank-16 adapters."""
    h = jax.random.normal(jax.random.fold_in(key, 1_000_001), (m, 128), jnp.float32).astype(jnp.bfloat16)
    b = (0.02 * jax.random.normal(jax.random.fold_in(key, 1_000_002), (128, n), jnp.float32)).astype(jnp.bfloat16)
    return dict(h=h, b=b)


def time_lora(m, n, x, ws, xla_us, bytes_, key):
    """Our GEMM with and without the LoRA K-steps of 8 rank-16 adapters (L = 128): as a second pipeline (run 1
    of the twenty-sixth session) and prefetched (``lora_prefetch``; with 128-row tiles at 5 pipeline steps, and
    the plain GEMM again at 5 beside it)."""
    cfg, fetch_cfg = lora_configs(m, n)
    hb = lora_operands(m, n, key)
    runs = [("ours", cfg, {}), ("ours + LoRA K-steps", cfg, hb),
            ("ours + LoRA prefetched", fetch_cfg, dict(hb, lora_prefetch=True))]
    if fetch_cfg != cfg:
        runs.append(("ours", fetch_cfg, {}))
    for name, c, extra in runs:
        report(f"{name} {c}", functools.partial(splitk_matmul, **c, **extra), x, ws, xla_us, bytes_)


# (rows, K, N) -> the two best (tile_m, wg_dim, split_k) of runs 1-2 (twenty-seventh session) per projection
ONEKERNEL_TILINGS = {
    (128, 4096, 6144): [(64, "m", 2), (64, "n", 2)], (128, 4096, 4096): [(64, "m", 4), (64, "n", 4)],
    (128, 4096, 28672): [(64, "n", 1), (64, "m", 1)], (128, 14336, 4096): [(64, "m", 4), (64, "n", 4)],
    (256, 4096, 6144): [(64, "m", 1), (64, "n", 1)], (256, 4096, 4096): [(64, "m", 2), (128, "n", 4)],
    (256, 4096, 28672): [(128, "n", 1), (64, "m", 1)], (256, 14336, 4096): [(64, "m", 2), (128, "n", 4)],
}


def onekernel_configs(m, k, n):
    """The tilings ``--onekernel`` times, each at the deepest pipeline ``ws_gemm`` fits, up to 6 steps (the
    streamed LoRA tiles need no shared memory of their own; ``lora_config`` then fits them to ``ws_lora_gemm``)."""
    out = []
    for tile_m, wg_dim, split_k in ONEKERNEL_TILINGS[(m, k, n)]:
        c = dict(tile_m=tile_m, tile_n=128, split_k=split_k, wg_dim=wg_dim, steps=6)
        out.append(dict(c, steps=ws_steps_that_fit(c)))
    return out


def time_onekernel(m, k, n, x, ws, xla_us, bytes_, key, want, chunked=False):
    """``pallas_kernels.ws_lora.ws_lora_gemm`` (GEMM, shrink and expand of 8 packed adapters in one launch) at
    ``onekernel_configs``'s tilings, against the plain ``ws_gemm`` at the same tiling. A run of its own: a
    semaphore mistake hangs the kernel, and ``timeout`` should then cost no other numbers. (Runs 1-5 of the
    twenty-eighth session timed this kernel's probe-local first form against ``ws_streamed_matmul``, the same
    pipeline without the shrink items, since removed: it timed within 0.3 us of ``ws_gemm``.)"""
    packed = packed_adapters(m, k, n, key)
    want_lora = ref_ws_lora_gemm(x, ws[0], **packed, rank=16)
    # a second x, run once: a semaphore that lets an expand read h before its shrink stored it shows here even
    # where the timed launches' h buffer still holds the previous launch's (equal) h
    x2 = jax.random.normal(jax.random.fold_in(key, 7), x.shape, jnp.float32).astype(jnp.bfloat16)
    for c in onekernel_configs(m, k, n):
        plain = lora_config(c, 1).gemm
        report(f"ws_gemm {plain}", functools.partial(ws_gemm, config=plain), x, ws, xla_us, bytes_, want)
        for chunks in shrink_chunks(m, k, n, c) if chunked else (1,):
            gemm = functools.partial(ws_lora_gemm, **packed, config=lora_config(c, chunks), rank=16)
            report(f"one kernel: GEMM + shrink ({chunks} K-chunks) + expand", gemm, x, ws, xla_us, bytes_, want_lora)
            check_fresh(gemm, x2, ws[1], packed)


def lora_config(c, chunks):
    """A ``onekernel_configs`` tiling at the deepest pipeline ``ws_lora_gemm`` fits, with ``chunks``."""
    gemm = WsGemmConfig(c["tile_m"], c.get("tile_n", 128), c["wg_dim"], c["split_k"], c["steps"])
    return WsLoraConfig(dataclasses.replace(gemm, steps=lora_steps_that_fit(gemm)), chunks)


def check_fresh(gemm, x2, w, packed):
    """One more launch on a fresh x, against ``ref_ws_lora_gemm``."""
    try:
        got, ref = jax.jit(gemm)(x2, w).astype(jnp.float32), ref_ws_lora_gemm(x2, w, **packed, rank=16)
        lora_term = ref.astype(jnp.float32) - x2.astype(jnp.float32) @ w.astype(jnp.float32)
        print(f"    fresh x: max |diff| {float(jnp.max(jnp.abs(got - ref.astype(jnp.float32)))):.1e} (the LoRA "
              f"term up to {float(jnp.max(jnp.abs(lora_term))):.1e})", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"    fresh x: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)


def shrink_chunks(m, k, n, c, num_sms=132, tile_k=64):
    """The shrink's K-chunk counts ``--onekernel --chunked`` times: 8 K-blocks per chunk (4 were no faster in
    run 2; the whole K, run 3, was 4-114 us slower), and where the GEMM items leave CTAs idle, as many chunks as
    fill them (a divisor of K's blocks), so that no CTA runs a chunk and then a GEMM item (run 4: the shapes
    of about one wave, o and down, paid 5-14 us)."""
    cta_m, cta_n = WsGemmConfig(c["tile_m"], c.get("tile_n", 128), c["wg_dim"]).cta_tile
    tiles_m, blocks = m // cta_m, k // tile_k
    idle = num_sms - tiles_m * c["split_k"] * (n // cta_n)
    fill = max([d for d in range(1, blocks + 1) if blocks % d == 0 and d * tiles_m <= idle], default=None)
    return tuple(sorted({blocks // 8, *([fill] if fill else [])}))


def packed_adapters(m, k, n, key):
    """The packed A [1, k, 128] and B [128, n] of 8 rank-16 adapters, one target, and each row's adapter (rows
    round-robin)."""
    a = (0.02 * jax.random.normal(jax.random.fold_in(key, 1_000_003), (1, k, 128), jnp.float32)).astype(jnp.bfloat16)
    b = lora_operands(m, n, key)["b"]
    return dict(a=a, b=b, pos=jnp.arange(m, dtype=jnp.int32) % 8)


def time_ws(m, n, x, ws, xla_us, bytes_, key, want):
    """``ws_splitk_matmul`` over ``WS_CONFIGS``, each with and without the LoRA K-steps (at the pipeline depth
    shared memory leaves them, and without them again at that depth where it is shallower)."""
    hb = lora_operands(m, n, key)
    for c in WS_CONFIGS:
        if m % (c["tile_m"] * (1 + (c["wg_dim"] == "m"))) or n % (c["tile_n"] * (1 + (c["wg_dim"] == "n"))):
            continue
        lora_c = dict(c, steps=ws_steps_that_fit(c, 128))
        runs = [("ws", c, {}, want), ("ws + LoRA K-steps", lora_c, hb, None)]
        if lora_c != c:
            runs.append(("ws", lora_c, {}, want))
        for name, cc, extra, w in runs:
            report(f"{name} {cc}", functools.partial(ws_splitk_matmul, **cc, **extra), x, ws, xla_us, bytes_, w)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--splitk-only", action="store_true", help="only the o and down shapes, only our split-K kernel")
    p.add_argument("--lora", action="store_true", help="every shape: our GEMM with and without the LoRA K-steps")
    p.add_argument("--ws", action="store_true", help="every shape: the warp-specialized split-K GEMM (WS_CONFIGS)")
    p.add_argument("--onekernel", action="store_true",
                   help="every shape: ws_lora_gemm (GEMM + shrink + expand of 8 adapters) against the plain GEMM")
    p.add_argument("--chunked", action="store_true",
                   help="with --onekernel: the shrink split into K-chunks (shrink_chunks) instead of whole")
    p.add_argument("--rows", type=int, default=None, help="only the shapes of this many rows (128 or 256)")
    p.add_argument("--check", action="store_true",
                   help="only check our kernels in the interpreter and lower their tilings for CUDA (CPU)")
    args = p.parse_args()
    if args.check:
        check()
        return lowering_check()
    print(f"device {jax.devices()[0].device_kind}", flush=True)
    for m, k, n in SHAPES:
        if (args.splitk_only and n != 4096) or (args.rows and m != args.rows):
            continue
        copies = max(2, -(-240 * 2**20 // (k * n * 2)))
        key = jax.random.key(m + k + n)
        x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
        ws = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32)).astype(jnp.bfloat16)
              for i in range(copies)]
        xla_us, want = time_gemm(jnp.dot, x, ws)
        bytes_ = k * n * 2 + m * (k + n) * 2
        print(f"M={m} K={k} N={n}: XLA {xla_us:.1f} us ({bytes_ / xla_us / 1e6:.2f} TB/s)", flush=True)
        if args.lora:
            time_lora(m, n, x, ws, xla_us, bytes_, key)
            continue
        if args.onekernel:
            time_onekernel(m, k, n, x, ws, xla_us, bytes_, key, want, chunked=args.chunked)
            continue
        if args.ws:
            time_ws(m, n, x, ws, xla_us, bytes_, key, want)
            continue
        try:
            from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
            cfgs = configs()
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            print(f"  mosaic gpu unavailable: {type(e).__name__}: {e}", flush=True)
            continue
        gemms = [] if args.splitk_only else [
            (f"tile {c.tile_m}x{c.tile_n} wg {c.wg_dimension} steps {c.max_concurrent_steps} cluster "
             f"{c.cluster_dimension}",
             functools.partial(hm.matmul, c=None, config=c)) for c in cfgs]
        if n == 4096:  # o and down: too few output tiles without split-K
            gemms += [(f"ours split-K {c}", functools.partial(splitk_matmul, **c)) for c in SPLITK_CONFIGS]
        for name, gemm in gemms:
            report(name, gemm, x, ws, xla_us, bytes_, want)


if __name__ == "__main__":
    main()
