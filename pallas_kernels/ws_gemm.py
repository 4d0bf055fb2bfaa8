"""Warp-specialized split-K GEMM on Mosaic GPU (Hopper: wgmma + TMA), y = x @ w (+ h @ b), for decode rows.

Why a second GEMM beside ``pallas_kernels.gemm`` (Triton): putting the LoRA expand inside the base GEMM, as a
few more K-steps over a batch's packed h and B, needs a GEMM of our own that is as fast as cuBLAS at the decode
step's 128-256 rows (benchmarks/KERNELS_NOTES.md, "Open"). The Triton GEMM was not (205.8 against 183.7 us per
layer at 256 rows); this kernel is the Hopper form that gets there: per CTA one memory warpgroup streams the
K-blocks of x and w through shared memory (``steps`` deep, TMA) and two compute warpgroups multiply their half
of the CTA tile into their own wgmma accumulators. Work items (M-tile, K-split, N-tile) go round-robin over a
persistent grid of one CTA per SM; with split-K each writes a float32 partial that XLA sums inside the
consumer, as ``pallas_kernels.gemm`` does. The epilogue stores [epi, epi] chunks through shared memory by TMA.

With h [M, L] and b [L, N] (a batch's packed LoRA h and B: each row's h zero outside its own adapter's
columns), the memory warpgroup also copies each first-split item's h and B tiles, once both compute warpgroups
have released the previous item's, and the compute warpgroups run them as L / tile_k more wgmmas after their
pipeline. The decoder does not use these K-steps: ``pallas_kernels.ws_lora`` runs the shrink inside the same
launch too, on a pipeline of its own that streams the h and B tiles through the x and w buffers (these
K-steps' own buffers cost pipeline depth: +20 us at gate/up, 256 rows).

``decoder.DECODE_GEMM_IMPL = "mgpu"`` runs the decode projections listed in ``WS_GEMM_TABLE`` on it (an A/B
knob of ``benchmarks/throughput.py``, off by default: in the step it tied cuBLAS at 256 rows with 1152 tokens
of context, and at 128 rows it slowed the LoRA kernels beside it, since its CTAs hold every SM's shared
memory; benchmarks/RESULTS.md, "Twenty-seventh session"). Off GPU, ``interpret=True`` runs it in Mosaic GPU's
interpreter (TMA, barriers and wgmma simulated on the CPU), which the tests use; ``ref_ws_gemm`` is its jnp twin.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


@dataclasses.dataclass(frozen=True)
class WsGemmConfig:
    """Tiles and pipeline of ``ws_gemm``.

    Attributes:
      tile_m, tile_n: one compute warpgroup's output tile (tile_m a multiple of 64, wgmma's rows).
      wg_dim: how the two compute warpgroups share a CTA tile: "n" side by side ([tile_m, 2 tile_n]) or "m"
        stacked ([2 tile_m, tile_n]).
      split_k: work items per output tile along K; each writes a float32 partial and XLA sums them.
      steps: pipeline depth (K-blocks of x and w in shared memory at once).
      tile_k: the K-block; epi: the epilogue's square store chunk.
    """

    tile_m: int = 64
    tile_n: int = 128
    wg_dim: str = "n"
    split_k: int = 1
    steps: int = 4
    tile_k: int = 64
    epi: int = 64

    @property
    def cta_tile(self) -> tuple[int, int]:
        return (self.tile_m * (1 + (self.wg_dim == "m")), self.tile_n * (1 + (self.wg_dim == "n")))


# (rows, K, N) -> the fastest tiling on the H200 where it came within 10% of XLA's GEMM in the same harness
# (benchmarks/mgpu_gemm_probe.py --ws; benchmarks/RESULTS.md, "Twenty-seventh session", runs 1-2). Device time per
# GEMM, this kernel against XLA's there: 256 rows q/k/v 24.6 / 35.4, o 18.8 / 22.7, gate/up 94.1 / 96.4, down
# 48.5 / 47.0 us; 128 rows gate/up 63.4 / 61.0, down 36.6 / 37.6 us (XLA's GEMM at 128 rows' q/k/v and o is
# beaten by ``pallas_kernels.gemm`` already).
WS_GEMM_TABLE: dict[tuple[int, int, int], WsGemmConfig] = {
    (256, 4096, 6144): WsGemmConfig(64, 128, "m", split_k=1, steps=5),
    (256, 4096, 4096): WsGemmConfig(64, 128, "m", split_k=2, steps=5),
    (256, 4096, 28672): WsGemmConfig(128, 128, "n", split_k=1, steps=4),
    (256, 14336, 4096): WsGemmConfig(64, 128, "m", split_k=2, steps=5),
    (128, 4096, 28672): WsGemmConfig(64, 128, "n", split_k=1, steps=5),
    (128, 14336, 4096): WsGemmConfig(64, 128, "m", split_k=4, steps=4),
}

# The H200's shared memory per block (227 KB) and what ``ws_steps_that_fit`` leaves for Mosaic GPU's barriers.
SMEM_BYTES = 232448
_SMEM_SLACK = 256


def ws_gemm_config(m: int, k: int, n: int) -> WsGemmConfig | None:
    """The table's tiling for ``x [m, k] @ w [k, n]``, or None where no tiling was measured."""
    return WS_GEMM_TABLE.get((m, k, n))


def ws_steps_that_fit(config: WsGemmConfig, lora_k: int = 0, itemsize: int = 2) -> int:
    """The deepest pipeline, at most ``config.steps``, whose shared memory fits: x and w blocks per step, the
    epilogue's two chunks per compute warpgroup (float32 with split-K), and ``lora_k`` columns of h and rows of B
    (Mosaic GPU checks this when lowering; the H200 then measured ~100 bytes of barriers)."""
    cta_m, cta_n = config.cta_tile
    block = (cta_m + cta_n) * config.tile_k * itemsize
    epilogue = 2 * config.epi * config.epi * (itemsize if config.split_k == 1 else 4)
    fixed = epilogue + (lora_k // config.tile_k) * block + _SMEM_SLACK
    return min(config.steps, (SMEM_BYTES - fixed) // block)


def ref_ws_gemm(x, w, h=None, b=None):
    """Reference: ``x @ w (+ h @ b)`` by XLA, float32 accumulation, in x's dtype."""
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if h is not None:
        y = y + jnp.dot(h, b, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _num_sms() -> int:
    return getattr(jax.devices()[0], "core_count", None) or 132


def check_ws_gemm(x, w, h, b, config: WsGemmConfig) -> None:
    """Raises ValueError naming what in the operands or the tiling ``ws_gemm`` cannot run."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"ws_gemm needs x [M, K] and w [K, N], got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if (h is None) != (b is None):
        raise ValueError("ws_gemm takes h and b together (the LoRA K-steps) or neither")
    if h is not None and (h.ndim != 2 or b.ndim != 2 or h.shape[0] != x.shape[0]
                          or b.shape != (h.shape[1], w.shape[1])):
        raise ValueError(f"ws_gemm needs h [M, L] and b [L, N] beside x {tuple(x.shape)} and w {tuple(w.shape)}, got "
                         f"h {tuple(h.shape)} and b {tuple(b.shape)}")
    if config.wg_dim not in ("m", "n"):
        raise ValueError(f"wg_dim must be 'm' or 'n', got {config.wg_dim!r}")
    (m, k), n = x.shape, w.shape[1]
    c = config
    cta_m, cta_n = c.cta_tile
    if (c.tile_m % 64 or m % cta_m or n % cta_n or k % (c.tile_k * c.split_k) or c.tile_m % c.epi
            or c.tile_n % c.epi or (h is not None and h.shape[1] % c.tile_k)):
        raise ValueError(f"ws_gemm tiles (CTA tile ({cta_m}, {cta_n}), tile_k {c.tile_k} x split_k {c.split_k}, "
                         f"epilogue chunk {c.epi}, tile_m a multiple of 64) must divide (M, N, K) = ({m}, {n}, {k}), "
                         f"the warpgroup tile ({c.tile_m}, {c.tile_n}) and the LoRA K")
    if k // (c.tile_k * c.split_k) < 2:  # Mosaic GPU's pipeline releases each block one step late
        raise ValueError(f"ws_gemm needs at least 2 K-blocks per K-split, got K {k} = {k // (c.tile_k * c.split_k)} "
                         f"x tile_k {c.tile_k} x split_k {c.split_k}")
    lora_k = 0 if h is None else h.shape[1]
    if c.steps < 1 or ws_steps_that_fit(c, lora_k, x.dtype.itemsize) < c.steps:
        raise ValueError(f"ws_gemm tiling {c} with LoRA K {lora_k}: shared memory ({SMEM_BYTES} bytes) holds "
                         f"{ws_steps_that_fit(c, lora_k, x.dtype.itemsize)} pipeline steps, not {c.steps}")


def ws_gemm(x, w, h=None, b=None, *, config: WsGemmConfig, num_sms: int | None = None, interpret: bool = False):
    """``x @ w (+ h @ b)`` by the warp-specialized split-K Mosaic GPU GEMM.

    Args:
      x: [M, K]; w: [K, N] (bf16 on the GPU).
      h, b: optional [M, L] and [L, N], run as L / tile_k more K-steps of the first K-split.
      config: tiles and pipeline (``ws_gemm_config``); they must divide the shapes and fit shared memory.
      num_sms: CTAs of the persistent grid (default: the device's SMs).
      interpret: run in Mosaic GPU's interpreter (CPU).

    Returns:
      y: [M, N] in x's dtype, accumulated in float32 (split-K partials summed in float32 by XLA).
    """
    check_ws_gemm(x, w, h, b, config)
    c = config
    tile_m, tile_n, tile_k, split_k, steps, wg_dim, epi = (c.tile_m, c.tile_n, c.tile_k, c.split_k, c.steps,
                                                           c.wg_dim, c.epi)
    (m, k), n = x.shape, w.shape[1]
    lora_blocks = 0 if h is None else h.shape[1] // tile_k
    cta_m, cta_n = c.cta_tile
    num_sms = num_sms or _num_sms()
    tiles_m, tiles_n, k_blocks = m // cta_m, n // cta_n, k // (tile_k * split_k)
    out_dtype = x.dtype if split_k == 1 else jnp.float32

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_blocks,), memory_registers=40, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=steps, compute_context=context,
            in_specs=[plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), delay_release=1),
                      plgpu.BlockSpec((tile_k, cta_n), lambda kk: (kk, 0), delay_release=1)])

    def kernel_body(x_gmem, w_gmem, *refs):
        h_gmem, b_gmem, o_gmem = refs if lora_blocks else (None, None, *refs)
        unused = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the bodies
        lora_scratch = dict(
            h_smem=plgpu.SMEM((lora_blocks, cta_m, tile_k), x.dtype),
            b_smem=plgpu.SMEM((lora_blocks, tile_k, cta_n), w.dtype),
            ready=plgpu.Barrier(num_arrivals=2 * lora_blocks),           # the copies of one item's LoRA tiles
            free=plgpu.Barrier(num_arrivals=2),  # both compute warpgroups done with them (after wgmma_wait(0))
        ) if lora_blocks else {}

        @functools.partial(pl.run_scoped, allocs=pipeline(unused, unused).get_allocations(x_gmem, w_gmem),
                           out_smem=plgpu.SMEM((2, epi, epi), out_dtype), **lora_scratch, collective_axes="wg")
        def _(allocs, out_smem, h_smem=None, b_smem=None, ready=None, free=None):
            wg = lax.axis_index("wg")
            wg_m = pl.ds(wg * tile_m, tile_m) if wg_dim == "m" else slice(None)
            wg_n = pl.ds(wg * tile_n, tile_n) if wg_dim == "n" else slice(None)
            if lora_blocks:
                @pl.when(wg < 2)
                def _():
                    plgpu.barrier_arrive(free)  # nothing to release before the first item

            @plgpu.nd_loop((tiles_m * split_k * tiles_n,), collective_axes="sm")
            def _(info):
                idx = info.index[0]
                mi, rest = idx % tiles_m, idx // tiles_m
                si, ni = rest % split_k, rest // split_k
                cta_rows, cta_cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
                out = o_gmem.at[cta_rows, cta_cols] if split_k == 1 else o_gmem.at[si, cta_rows, cta_cols]
                if lora_blocks:
                    @pl.when(jnp.logical_and(wg == 2, si == 0))   # the memory warpgroup
                    def _():
                        plgpu.barrier_wait(free)
                        for j in range(lora_blocks):
                            plgpu.copy_gmem_to_smem(h_gmem.at[cta_rows, pl.ds(j * tile_k, tile_k)], h_smem.at[j],
                                                    ready)
                            plgpu.copy_gmem_to_smem(b_gmem.at[pl.ds(j * tile_k, tile_k), cta_cols], b_smem.at[j],
                                                    ready)

                def context(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                    def _(acc_ref):
                        run(acc_ref)
                        if lora_blocks:
                            @pl.when(si == 0)
                            def _():
                                plgpu.barrier_wait(ready)
                                for j in range(lora_blocks):
                                    plgpu.wgmma(acc_ref, h_smem.at[j].at[wg_m], b_smem.at[j].at[:, wg_n])
                                plgpu.wgmma_wait(0)
                                plgpu.barrier_arrive(free)
                        store_tile(acc_ref[...].astype(out_dtype), out.at[wg_m, wg_n], out_smem.at[wg], epi)

                def mma(_, xs, ws, acc_ref):
                    plgpu.wgmma(acc_ref, xs.at[wg_m], ws.at[:, wg_n])
                    plgpu.wgmma_wait(1)  # the step before is done: its buffers go back to the memory warpgroup
                    return acc_ref

                pipeline(mma, context)(x_gmem.at[cta_rows, pl.ds(si * k_blocks * tile_k, k_blocks * tile_k)],
                                       w_gmem.at[pl.ds(si * k_blocks * tile_k, k_blocks * tile_k), cta_cols],
                                       allocations=allocs)

            if lora_blocks:
                @pl.when(wg == 2)
                def _():
                    plgpu.barrier_wait(free)  # the last item's release, before the scratch goes away
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out_shape = (m, n) if split_k == 1 else (split_k, m, n)
    kernel = persistent_kernel(kernel_body, jax.ShapeDtypeStruct(out_shape, out_dtype), num_sms, interpret)
    y = kernel(x, w) if h is None else kernel(x, w, h, b)
    return y if split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)


def store_tile(acc, dst, smem, epi: int, reduction_op=None):
    """One compute warpgroup's epilogue: its output tile ``acc`` into ``dst`` (global memory) by TMA, in
    [epi, epi] chunks through ``smem`` (waiting before each chunk until the one before has been read); with
    ``reduction_op="add"`` added to what ``dst`` holds (a TMA reduction in the L2, in ``dst``'s dtype)."""
    tile_m, tile_n = acc.shape
    for ei in range(tile_m // epi):
        for ej in range(tile_n // epi):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            smem[...] = acc[ei * epi:(ei + 1) * epi, ej * epi:(ej + 1) * epi]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(smem, dst.at[pl.ds(ei * epi, epi), pl.ds(ej * epi, epi)],
                                    reduction_op=reduction_op)


def persistent_kernel(body, out_type, num_sms: int, interpret: bool):
    """``body`` as a Mosaic GPU kernel of one CTA per SM (``"sm"``) and three warpgroups (``"wg"``: 0 and 1
    compute, 2 memory), in warpgroup semantics; in the interpreter when ``interpret``."""
    return plgpu.kernel(body, out_type=out_type, grid=(num_sms,), grid_names=("sm",), num_threads=3,
                        thread_name="wg", interpret=plgpu.InterpretGPUParams() if interpret else None,
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))


