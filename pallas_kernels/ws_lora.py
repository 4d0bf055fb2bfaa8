"""The decode projection and its LoRA terms in one Mosaic GPU launch (Hopper: wgmma + TMA).

    y = x @ w + sum over targets t of mask(x @ a[t]) @ b     (only the N-tiles of target t read its h)

for a decode batch over a few adapters (at most L / rank, 8 at rank 16), packed side by side: a [T, K, L] holds
the A matrices of the batch's adapters for each of the T targets that share the input x (q/k/v, or gate/up, or
one), b [L, N] their B matrices, each column band of w's output holding its own target's, and pos [M] each
row's adapter position in the pack (-1: none). ``mask`` keeps in each row only its own adapter's ``rank``
columns of h. No LoRA kernel runs before or beside the GEMM: the LoRA kernels beside cuBLAS's GEMMs cost 27
(128 rows) to 64 us (256 rows) per layer of the step with 8 shared adapters (benchmarks/RESULTS.md,
"Twenty-seventh session"); this kernel measured +13.5 and +17.3 us per layer over the same kernel without
LoRA ("Twenty-eighth session").

The kernel is ``pallas_kernels.ws_gemm``'s warp-specialized GEMM (one memory and two compute warpgroups per
CTA, persistent, split-K with float32 partials summed by XLA) on a pipeline of its own, with:

- the LoRA expand as L / tile_k more K-steps of each first-split work item, whose h and B tiles stream through
  the same shared-memory buffers as x and w (no pipeline depth lost), the pipeline running on from one item
  into the next without draining;
- T * tiles_m * chunks shrink work items, scheduled first (the first items of the first CTAs): item (t, chunk,
  mi) multiplies x's rows mi by a[t] over one K-chunk, masks the rows, and stores its part of h[t] into a
  second output by TMA. Chunk 0 stores; the other chunks wait for that store and add theirs by a TMA reduction
  (bf16 adds in the L2). A whole-K shrink item ran at one CTA's bandwidth, 20-100 us (twenty-eighth session);
- global semaphores (``pl.get_global``, persistent across launches, so every launch leaves them at 0):
  "ready" per M-tile, signalled by every shrink warpgroup once its part is in global memory; "stored" per
  (target, M-tile, warpgroup), chunk 0's store; "passed" per M-tile. A first-split item's memory warpgroup
  waits, before its LoRA K-steps, until "ready" holds every shrink warpgroup's signal, without taking it
  (taking waits are compare-and-swap loops on one word, and serialized the waiters: +7-20 us at o and down
  in the twenty-eighth session's run 3), then signals "passed". The CTA that ran item (mi, 0, 0) takes all
  three back at its very end, once every waiter of M-tile mi has passed. Nothing waits on an item scheduled
  after it on its own CTA, so the persistent grid cannot deadlock.

Off GPU, ``interpret=True`` runs it in Mosaic GPU's interpreter with one CTA and one shrink chunk and without
the semaphores (the interpreter has neither global semaphores nor TMA reductions; one CTA runs the items in
order, shrink items first), which the tests use; ``ref_ws_lora_gemm`` is its jnp twin. The semaphores and
the chunked shrink are checked on the H200 only (``benchmarks/mgpu_gemm_probe.py --onekernel --chunked``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.ws_gemm import SMEM_BYTES, WsGemmConfig, check_ws_gemm, persistent_kernel, store_tile


@dataclasses.dataclass(frozen=True)
class WsLoraConfig:
    """``ws_lora_gemm``'s GEMM tiling and the number of K-chunks each M-tile's shrink is split into."""

    gemm: WsGemmConfig
    chunks: int = 8


# (rows, K, N) -> the fastest tiling and chunk count on the H200 (benchmarks/mgpu_gemm_probe.py --onekernel
# --chunked, twenty-eighth session run 5; 8 rank-16 adapters, one target). Device time per launch, against the
# same kernel without LoRA at its best tiling: 128 rows q/k/v 22.2 / 21.7, o 20.1 / 15.3, gate/up 65.4 / 63.5,
# down 42.9 / 36.6 us; 256 rows q/k/v 25.9 / 24.2, o 24.8 / 18.7, gate/up 98.4 / 93.8, down 53.4 / 48.5 us.
# The fused q/k/v weights interleave q, k and v per head, so their tiling keeps CTA tiles one head (128) wide.
WS_LORA_TABLE: dict[tuple[int, int, int], WsLoraConfig] = {
    (128, 4096, 6144): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=2, steps=5), chunks=8),
    (128, 4096, 4096): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=4, steps=5), chunks=8),
    (128, 4096, 28672): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=1, steps=6), chunks=8),
    (128, 14336, 4096): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=4, steps=5), chunks=4),
    (256, 4096, 6144): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=1, steps=6), chunks=8),
    (256, 4096, 4096): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=2, steps=5), chunks=2),
    (256, 4096, 28672): WsLoraConfig(WsGemmConfig(128, 128, "n", split_k=1, steps=4), chunks=8),
    (256, 14336, 4096): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=2, steps=5), chunks=2),
}


def ws_lora_config(m: int, k: int, n: int) -> WsLoraConfig | None:
    """The table's tiling for ``x [m, k] @ w [k, n]`` with LoRA, or None where none was measured."""
    return WS_LORA_TABLE.get((m, k, n))


def lora_steps_that_fit(config: WsGemmConfig, itemsize: int = 2) -> int:
    """The deepest pipeline, at most ``config.steps``, whose shared memory fits ``ws_lora_gemm``: x and w blocks
    per step, the epilogue's two chunks per compute warpgroup (float32 with split-K), the h epilogue's two bf16
    chunks, the rows' adapter positions and ~512 bytes of barriers."""
    cta_m, cta_n = config.cta_tile
    block = (cta_m + cta_n) * config.tile_k * itemsize
    epi = config.epi * config.epi
    fixed = 2 * epi * (itemsize if config.split_k == 1 else 4) + 2 * epi * itemsize + 2 * config.tile_m * 4 + 512
    return min(config.steps, (SMEM_BYTES - fixed) // block)


def ref_ws_lora_gemm(x, w, a, b, pos, *, rank: int, tile_target: Callable | None = None, cta_n: int | None = None):
    """Reference: ``ws_lora_gemm`` by XLA, float32 accumulation, h rounded to x's dtype as the kernel stores it.
    ``tile_target`` and ``cta_n`` as the kernel's (the target of each cta_n-wide column band)."""
    f32 = jnp.float32
    a = a[:, :, :b.shape[0]]                                           # A's zero columns from L on (as packed)
    keep = (jnp.arange(a.shape[-1])[None, :] // rank) == pos[:, None]                  # [M, L]
    h = jnp.where(keep[None], jnp.einsum("mk,tkl->tml", x, a, preferred_element_type=f32), 0).astype(x.dtype)
    n = w.shape[1]
    if a.shape[0] == 1:
        col_target = jnp.zeros((n,), jnp.int32)
    else:
        col_target = jnp.repeat(jnp.array([int(tile_target(jnp.int32(i))) for i in range(n // cta_n)]), cta_n)
    lora = jnp.einsum("tml,ln->tmn", h, b, preferred_element_type=f32)                   # [T, M, N]
    lora = jnp.take_along_axis(lora, col_target[None, None, :], axis=0)[0]
    return (jnp.dot(x, w, preferred_element_type=f32) + lora).astype(x.dtype)


def check_ws_lora_gemm(x, w, a, b, pos, config: WsLoraConfig, rank: int) -> None:
    """Raises ValueError naming what in the operands or the tiling ``ws_lora_gemm`` cannot run."""
    check_ws_gemm(x, w, None, None, config.gemm)
    (m, k), n = x.shape, w.shape[1]
    c = config.gemm
    cta_n = c.cta_tile[1]
    if (a.ndim != 3 or a.shape[1] != k or b.ndim != 2 or b.shape[1] != n or a.shape[2] < b.shape[0]
            or pos.shape != (m,)):
        raise ValueError(f"ws_lora_gemm needs a [T, K, >= L], b [L, N] and pos [M] beside x {tuple(x.shape)} and w "
                         f"{tuple(w.shape)}, got a {tuple(a.shape)}, b {tuple(b.shape)}, pos {tuple(pos.shape)}")
    lora = b.shape[0]
    if rank < 1 or lora % rank or lora % c.tile_k or lora > cta_n:
        raise ValueError(f"ws_lora_gemm's packed LoRA width L = {lora} must be a multiple of the rank {rank} and of "
                         f"tile_k {c.tile_k}, and at most the CTA tile's {cta_n} columns")
    if config.chunks < 1 or (k // c.tile_k) % config.chunks:
        raise ValueError(f"ws_lora_gemm's shrink chunks ({config.chunks}) must divide K's {k // c.tile_k} blocks")
    if lora_steps_that_fit(c, x.dtype.itemsize) < c.steps:
        raise ValueError(f"ws_lora_gemm tiling {c}: shared memory ({SMEM_BYTES} bytes) holds "
                         f"{lora_steps_that_fit(c, x.dtype.itemsize)} pipeline steps, not {c.steps}")


def ws_lora_gemm(x, w, a, b, pos, *, config: WsLoraConfig, rank: int, tile_target: Callable | None = None,
                 num_sms: int | None = None, interpret: bool = False):
    """``x @ w`` plus the LoRA terms of a batch's packed adapters, in one launch (module docstring).

    Args:
      x: [M, K]; w: [K, N] (bf16 on the GPU).
      a: [T, K, L'] the packed A of each target; columns [j rank, (j + 1) rank) belong to adapter j, and those
        from L on are zeros: L' at least L, and at least the CTA tile's width, or a is padded to it (a copy).
      b: [L, N] the packed B, each column band holding its own target's adapters.
      pos: [M] int32, each row's adapter j, or -1 for none.
      config: the GEMM tiling and shrink chunks (``ws_lora_config``).
      rank: the adapters' (padded) rank.
      tile_target: with T > 1, maps a CTA tile's column index ``ni`` (a traced int32) to its target (the fused
        q/k/v weights interleave them per head; gate/up are two halves).
      num_sms: CTAs of the persistent grid (default: the device's SMs); 1 in the interpreter.
      interpret: Mosaic GPU's interpreter (CPU): one CTA, one shrink chunk, no semaphores.

    Returns:
      y: [M, N] in x's dtype.
    """
    check_ws_lora_gemm(x, w, a, b, pos, config, rank)
    if a.shape[0] > 1 and tile_target is None:
        raise ValueError(f"ws_lora_gemm with {a.shape[0]} targets needs tile_target")
    cta_n = config.gemm.cta_tile[1]
    if a.shape[2] < cta_n:  # the shrink items multiply a [tile_k, cta_n] block as the GEMM items do w's (a copy
        a = jnp.pad(a, ((0, 0), (0, 0), (0, cta_n - a.shape[2])))  # per call: callers pass a that wide)
    if interpret:
        num_sms, chunks, sync = 1, 1, False
    else:
        from pallas_kernels.ws_gemm import _num_sms
        num_sms, chunks, sync = num_sms or _num_sms(), config.chunks, True
    return _lora_gemm(x, w, a, b, pos.astype(jnp.int32), config.gemm, rank=rank, chunks=chunks, sync=sync,
                      tile_target=tile_target or (lambda ni: jnp.int32(0)), num_sms=num_sms, interpret=interpret)


def _await_last_releases(empty, total, steps):
    """The memory warpgroup's last waits: the compute warpgroups' releases of the last min(total, steps) of the
    ``total`` pipeline steps, each awaited once, so no barrier is left mid-phase when the scratch goes away."""
    last = jnp.minimum(total, steps)

    def drain(j, carry):
        plgpu.barrier_wait(empty.at[(total - last + j) % steps])
        return carry
    lax.fori_loop(0, last, drain, None)


def _lora_gemm(x, w, a, b, pos, c: WsGemmConfig, *, rank, chunks, sync, tile_target, num_sms, interpret):
    tile_m, tile_n, tile_k, split_k, steps, wg_dim, epi = (c.tile_m, c.tile_n, c.tile_k, c.split_k, c.steps,
                                                           c.wg_dim, c.epi)
    (m, k), n = x.shape, w.shape[1]
    targets, lora = a.shape[0], b.shape[0]
    cta_m, cta_n = c.cta_tile
    lora_blocks, chunk_blocks = lora // tile_k, k // tile_k // chunks
    tiles_m, tiles_n, k_blocks = m // cta_m, n // cta_n, k // (tile_k * split_k)
    n_shrink = targets * chunks * tiles_m
    n_items = n_shrink + tiles_m * split_k * tiles_n
    out_dtype = x.dtype if split_k == 1 else jnp.float32
    signals = 2 * chunks * targets  # "ready" signals per M-tile: one per shrink warpgroup

    def coords(idx):
        """(shrink item?, M-tile, K-split or shrink chunk, N-tile, target): shrink items first, M fastest."""
        shrink = idx < n_shrink
        j = jnp.maximum(idx - n_shrink, 0)
        rest_s, rest_g = idx // tiles_m, j // tiles_m
        ni = rest_g // split_k
        return (shrink, jnp.where(shrink, idx % tiles_m, j % tiles_m),
                jnp.where(shrink, rest_s % chunks, rest_g % split_k), ni,
                jnp.where(shrink, rest_s // chunks, tile_target(ni)))

    def item_steps(shrink, si):
        return jnp.where(shrink, chunk_blocks, k_blocks + jnp.where(si == 0, lora_blocks, 0))

    def body(x_gmem, w_gmem, a_gmem, b_gmem, pos_gmem, o_gmem, h_gmem):
        # [0, tiles_m): "ready"; [tiles_m, 2 tiles_m): "passed"; then "stored" per (target, M-tile, warpgroup)
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR(((2 + 2 * targets) * tiles_m,))) if sync else None
        ready, passed = (lambda mi: sems.at[mi]), (lambda mi: sems.at[tiles_m + mi])
        stored = lambda t, mi, wg: sems.at[2 * tiles_m + 2 * (t * tiles_m + mi) + wg]  # noqa: E731

        @functools.partial(pl.run_scoped, x_smem=plgpu.SMEM((steps, cta_m, tile_k), x.dtype),
                           w_smem=plgpu.SMEM((steps, tile_k, cta_n), w.dtype),
                           out_smem=plgpu.SMEM((2, epi, epi), out_dtype),
                           h_out_smem=plgpu.SMEM((2, epi, epi), x.dtype),
                           pos_smem=plgpu.SMEM((2, tile_m), jnp.int32),
                           full=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
                           empty=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
                           pos_ready=plgpu.Barrier(num_barriers=2), collective_axes="wg")
        def _(x_smem, w_smem, out_smem, h_out_smem, pos_smem, full, empty, pos_ready):
            wg = lax.axis_index("wg")

            @pl.when(wg == 2)
            def _memory():
                plgpu.set_max_registers(40, action="decrease")

                @plgpu.nd_loop((n_items,), collective_axes="sm", init_carry=jnp.int32(0))
                def total(info, carry):
                    shrink, mi, si, ni, t = coords(info.index[0])
                    rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)

                    def step(s, g):  # g: the global step count, the same in all three warpgroups
                        slot = g % steps

                        @pl.when(g >= steps)  # the first round of buffers is free
                        def _():
                            plgpu.barrier_wait(empty.at[slot])

                        @pl.when(shrink)
                        def _():
                            kk = pl.ds((si * chunk_blocks + s) * tile_k, tile_k)
                            plgpu.copy_gmem_to_smem(x_gmem.at[rows, kk], x_smem.at[slot], full.at[slot])
                            plgpu.copy_gmem_to_smem(a_gmem.at[t, kk, pl.ds(0, cta_n)], w_smem.at[slot],
                                                    full.at[slot])

                        @pl.when(jnp.logical_and(~shrink, s < k_blocks))
                        def _():
                            kk = pl.ds((si * k_blocks + s) * tile_k, tile_k)
                            plgpu.copy_gmem_to_smem(x_gmem.at[rows, kk], x_smem.at[slot], full.at[slot])
                            plgpu.copy_gmem_to_smem(w_gmem.at[kk, cols], w_smem.at[slot], full.at[slot])

                        @pl.when(jnp.logical_and(~shrink, s >= k_blocks))
                        def _():
                            if sync:
                                @pl.when(s == k_blocks)  # every shrink warpgroup of M-tile mi has signalled
                                def _():
                                    plgpu.semaphore_wait(ready(mi), signals, decrement=False, memory_scope="gpu")
                                    plgpu.semaphore_signal(passed(mi), 1, memory_scope="gpu")
                            ll = pl.ds((s - k_blocks) * tile_k, tile_k)
                            plgpu.copy_gmem_to_smem(h_gmem.at[t, rows, ll], x_smem.at[slot], full.at[slot])
                            plgpu.copy_gmem_to_smem(b_gmem.at[ll, cols], w_smem.at[slot], full.at[slot])
                        return g + 1

                    return lax.fori_loop(0, item_steps(shrink, si), step, carry)

                _await_last_releases(empty, total, steps)
                if sync:
                    for mi in range(tiles_m):  # every waiter of M-tile mi has passed: its semaphores back to 0
                        @pl.when(lax.axis_index("sm") == (n_shrink + mi) % num_sms)
                        def _(mi=mi):
                            plgpu.semaphore_wait(passed(mi), tiles_n, memory_scope="gpu")
                            plgpu.semaphore_wait(ready(mi), signals, memory_scope="gpu")
                            for t_ in range(targets if chunks > 1 else 0):
                                for wg_ in range(2):
                                    plgpu.semaphore_wait(stored(t_, mi, wg_), 1, memory_scope="gpu")

            def _store_h(acc, mi, si, t, wg):
                """A shrink warpgroup's epilogue: its rows keep their own adapter's columns, into h[t]."""
                wg_row0 = mi * cta_m + (wg * tile_m if wg_dim == "m" else 0)
                plgpu.copy_gmem_to_smem(pos_gmem.at[pl.ds(wg_row0, tile_m)], pos_smem.at[wg], pos_ready.at[wg])
                plgpu.barrier_wait(pos_ready.at[wg])
                row_pos = plgpu.load(pos_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                col = plgpu.broadcasted_iota(jnp.int32, (tile_m, tile_n), 1, layout=plgpu.Layout.WGMMA)
                col0 = wg * tile_n if wg_dim == "n" else 0
                part = jnp.where((col + col0) // rank == row_pos[:, None], acc, 0.0).astype(x.dtype)
                wg_m = pl.ds(wg * tile_m, tile_m) if wg_dim == "m" else slice(None)
                wg_n = pl.ds(wg * tile_n, tile_n) if wg_dim == "n" else slice(None)
                dst = h_gmem.at[t, pl.ds(mi * cta_m, cta_m), :].at[wg_m, wg_n]

                @pl.when(si == 0)
                def _():
                    store_tile(part, dst, h_out_smem.at[wg], epi)
                    if chunks > 1:
                        plgpu.wait_smem_to_gmem(0)
                        plgpu.semaphore_signal(stored(t, mi, wg), 1, memory_scope="gpu")

                if chunks > 1:
                    @pl.when(si > 0)
                    def _():
                        plgpu.semaphore_wait(stored(t, mi, wg), 1, decrement=False, memory_scope="gpu")
                        store_tile(part, dst, h_out_smem.at[wg], epi, reduction_op="add")
                if sync:
                    plgpu.wait_smem_to_gmem(0)  # h is in global memory before the signal
                    plgpu.semaphore_signal(ready(mi), 1, memory_scope="gpu")

            @pl.when(wg < 2)
            def _compute():
                plgpu.set_max_registers(232, action="increase")
                wg_m = pl.ds(wg * tile_m, tile_m) if wg_dim == "m" else slice(None)
                wg_n = pl.ds(wg * tile_n, tile_n) if wg_dim == "n" else slice(None)

                @plgpu.nd_loop((n_items,), collective_axes="sm", init_carry=jnp.int32(0))
                def _(info, carry):
                    shrink, mi, si, ni, t = coords(info.index[0])
                    rows, cols = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)

                    def run(acc_ref):
                        def step(s, g):
                            slot = g % steps
                            plgpu.barrier_wait(full.at[slot])
                            plgpu.wgmma(acc_ref, x_smem.at[slot].at[wg_m], w_smem.at[slot].at[:, wg_n])
                            plgpu.wgmma_wait(1)  # the step before is done: its buffer goes back

                            @pl.when(s > 0)
                            def _():
                                plgpu.barrier_arrive(empty.at[(g - 1) % steps])
                            return g + 1

                        g = lax.fori_loop(0, item_steps(shrink, si), step, carry)
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(empty.at[(g - 1) % steps])
                        acc = acc_ref[...]

                        @pl.when(shrink)
                        def _():
                            _store_h(acc, mi, si, t, wg)

                        @pl.when(~shrink)
                        def _():
                            out = o_gmem.at[rows, cols] if split_k == 1 else o_gmem.at[si, rows, cols]
                            store_tile(acc.astype(out_dtype), out.at[wg_m, wg_n], out_smem.at[wg], epi)
                        return g

                    return pl.run_scoped(run, plgpu.ACC((tile_m, tile_n), jnp.float32))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    y_type = jax.ShapeDtypeStruct((m, n) if split_k == 1 else (split_k, m, n), out_dtype)
    h_type = jax.ShapeDtypeStruct((targets, m, cta_n), x.dtype)
    y, _ = persistent_kernel(body, (y_type, h_type), num_sms, interpret)(x, w, a, b, pos)
    return y if split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)
