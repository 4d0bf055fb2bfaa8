"""Skinny GEMM for the decode step's projections: y = x @ w with few rows (tokens) and a large weight.

At decode a projection reads its whole weight for 64-128 rows of x: the GEMM is bound by the weight's bytes,
and what decides its speed is how many bytes are in flight. XLA's choices on the H200 (its Triton GEMM
fusions or cuBLAS, then a separate split-K reduction) leave bandwidth unused at these shapes; this kernel, a
plain tiled Triton GEMM with a deep ``num_stages`` pipeline and split-K partials that XLA sums inside their
consumer, was faster at 6 of the 8 (rows, projection) pairs measured (benchmarks/RESULTS.md, "Twenty-first
session"). ``DECODE_GEMM_TABLE`` holds the winners; ``decode_gemm_config`` returns None for every other shape,
where XLA's GEMM stays.

The kernel is written against the Pallas Triton lowering (GPU); ``ref_gemm`` is its jnp twin, and
``interpret=True`` runs the kernel in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles and pipeline of ``gemm``.

    Attributes:
      block_m, block_n, block_k: a program's rows and columns of y, and the K-step of its loop.
      split_k: programs per output tile along K; each writes a float32 partial and XLA sums them.
      num_warps, num_stages: Triton's warps per program and software-pipeline depth of the K loop.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# (rows, K, N) -> the fastest configuration measured on the H200 where it beat XLA's GEMM; the Llama-3-8B
# projections (q/k/v fused: 4096 x 6144; o: 4096 x 4096; gate/up fused: 4096 x 28672; down: 14336 x 4096).
# Device time per GEMM, this kernel against XLA's (benchmarks/RESULTS.md, "Twenty-first session", runs 1-2,
# benchmarks/pallas_gemm_probe.py): 64 rows 18.1 / 21.1, 12.5 / 16.7, 56.6 / 57.5, 32.2 / 37.4 us; 128 rows
# q/k/v 21.0 / 21.8 and o 13.6 / 17.7 us. Not listed, XLA's was faster: gate/up and down at 128 rows (63.8 /
# 61.4, 37.3 / 36.8 us) and every projection at 256 rows (205.8 against 183.7 us per layer).
DECODE_GEMM_TABLE: dict[tuple[int, int, int], GemmConfig] = {
    (64, 4096, 6144): GemmConfig(64, 64, 64, split_k=2, num_stages=5),
    (64, 4096, 4096): GemmConfig(64, 64, 128, split_k=2, num_stages=5),
    (64, 4096, 28672): GemmConfig(64, 128, 64, split_k=1, num_stages=3),
    (64, 14336, 4096): GemmConfig(64, 64, 128, split_k=2, num_stages=5),
    (128, 4096, 6144): GemmConfig(64, 64, 64, split_k=1, num_stages=5),
    (128, 4096, 4096): GemmConfig(64, 64, 128, split_k=1, num_stages=5),
}


def decode_gemm_config(m: int, k: int, n: int) -> GemmConfig | None:
    """The table's configuration for ``x [m, k] @ w [k, n]``, or None where XLA's GEMM is the faster."""
    return DECODE_GEMM_TABLE.get((m, k, n))


def ref_gemm(x, w):
    """Reference: ``x @ w`` by XLA, float32 accumulation, in x's dtype. x: [M, K]; w: [K, N] -> [M, N]."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _gemm_kernel(x_ref, w_ref, o_ref, *, block_m, block_n, block_k, k_per_split, split_k):
    # x_ref [M, K]; w_ref [K, N]; o_ref [M, N] (split_k 1) or [split_k, M, N] float32 partials.
    # Grid (M-tile, N-tile, K-split), the M-tile fastest: the programs that share a weight tile run together,
    # so the weight is read from HBM once.
    m, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = pl.multiple_of(m * block_m, block_m)
    n0 = pl.multiple_of(n * block_n, block_n)

    def body(i, acc):
        k0 = pl.multiple_of(s * k_per_split + i * block_k, block_k)
        xv = x_ref[pl.ds(m0, block_m), pl.ds(k0, block_k)]  # [BM, BK]
        wv = w_ref[pl.ds(k0, block_k), pl.ds(n0, block_n)]  # [BK, BN]
        return acc + jnp.dot(xv, wv, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_per_split // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    if split_k == 1:
        o_ref[pl.ds(m0, block_m), pl.ds(n0, block_n)] = acc.astype(o_ref.dtype)
    else:
        o_ref[s, pl.ds(m0, block_m), pl.ds(n0, block_n)] = acc


def _check(x, w, config: GemmConfig) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemm needs x [M, K] and w [K, N], got x {tuple(x.shape)} and w {tuple(w.shape)}")
    (m, k), n = x.shape, w.shape[1]
    c = config
    if m % c.block_m or n % c.block_n or k % (c.split_k * c.block_k):
        raise ValueError(f"gemm tiles (block_m {c.block_m}, block_n {c.block_n}, block_k {c.block_k} x split_k "
                         f"{c.split_k}) must divide (M, N, K) = ({m}, {n}, {k})")


def gemm(x, w, config: GemmConfig, *, interpret: bool = False):
    """``x @ w`` by the Pallas Triton skinny GEMM.

    Args:
      x: [M, K]; w: [K, N] (one float dtype).
      config: tiles and pipeline (``decode_gemm_config``); its tiles must divide the shapes.
      interpret: run in the Pallas interpreter (CPU).

    Returns:
      y: [M, N] in x's dtype, accumulated in float32 (split-K partials summed in float32 by XLA).
    """
    _check(x, w, config)
    (m, k), n = x.shape, w.shape[1]
    c = config
    if c.split_k == 1:
        out = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out = jax.ShapeDtypeStruct((c.split_k, m, n), jnp.float32)
    y = pl.pallas_call(
        functools.partial(_gemm_kernel, block_m=c.block_m, block_n=c.block_n, block_k=c.block_k,
                          k_per_split=k // c.split_k, split_k=c.split_k),
        out_shape=out,
        grid=(m // c.block_m, n // c.block_n, c.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name="skinny_gemm",
    )(x, w)
    return y if c.split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The GEMM with the LoRA term of a few adapters: shrink, GEMM and expand in one launch.

# How the weight's columns map to the LoRA slices whose outputs the projection fuses:
#   ("single",)              one slice (o, down);
#   ("halves", width)        slices side by side, each ``width`` columns (gate/up: [E, 2, M]);
#   ("qkv", kv_heads, group, head_dim)  the fused q/k/v layout [E, kv_heads, group + 2, head_dim]: per KV head,
#                            its ``group`` query heads, then its k head and its v head (slices q, k, v).
Layout = tuple


def _tile_slice(n0, layout: Layout, block_n: int):
    """(slice, first column within the slice's B) of the output tile starting at column n0 (traced)."""
    if layout[0] == "single":
        return n0 * 0, n0
    if layout[0] == "halves":
        width = layout[1]
        sl = n0 // width
        return sl, n0 - sl * width
    _, kv_heads, group, head_dim = layout
    del kv_heads
    per_head = (group + 2) * head_dim
    kh, rem = n0 // per_head, n0 % per_head
    g, d0 = rem // head_dim, rem % head_dim
    sl = jnp.where(g < group, 0, g - group + 1)
    col = jnp.where(g < group, (kh * group + g) * head_dim + d0, kh * head_dim + d0)
    return sl, col


def _layout_widths(layout: Layout, n: int) -> list[int]:
    """The output width of each slice (its B's columns)."""
    if layout[0] == "single":
        return [n]
    if layout[0] == "halves":
        return [layout[1]] * (n // layout[1])
    _, kv_heads, group, head_dim = layout
    return [kv_heads * group * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _lora_gemm_kernel(x_ref, w_ref, slot_ref, rank_ref, d_ref, *refs, n_slices, layout, n_m, n_n, block_m,
                      block_n, block_k, k_per_split, split_k, n_distinct, interpret):
    # x_ref [M, K]; w_ref [K, N]; slot_ref [M]; rank_ref [S]; d_ref [D] distinct slots (0 = none);
    # refs: n a_refs [S, K, R], n b_refs [S * R, N_i] (B's rows flattened), count_in [1] (aliased), then the
    # outputs o_ref [M, N] (or [split_k, M, N] float32 partials), h_ref [n, M, D * R] (masked shrinks,
    # packed side by side per distinct slot), count_ref [1] int32 (zero on entry).
    # 1-D grid: programs [0, n * D) are the shrinks (slice, distinct slot); then the GEMM tiles (M-tile
    # fastest, then N-tile, then K-split). A GEMM tile of the first K-split adds its LoRA term after its main
    # loop, once every shrink has counted itself in. Deadlock freedom: GPUs dispatch a grid's blocks in
    # increasing linear index, so every shrink program is running or done before a GEMM program can wait; the
    # interpreter runs the programs in order.
    a_refs, b_refs = refs[:n_slices], refs[n_slices:2 * n_slices]
    o_ref, h_ref, count_ref = refs[2 * n_slices + 1:]
    m_rows, k_dim = x_ref.shape
    r_max = a_refs[0].shape[2]
    n_shrink = n_slices * n_distinct
    p = pl.program_id(0)

    @pl.when(p < n_shrink)
    def _():
        j = p % n_distinct
        slot = d_ref[j]
        rank = rank_ref[slot]
        hcols = lax.broadcasted_iota(jnp.int32, (m_rows, r_max), 1)
        acols = lax.broadcasted_iota(jnp.int32, (block_k, r_max), 1)
        j0 = pl.multiple_of(j * r_max, r_max)
        for i in range(n_slices):
            @pl.when(p // n_distinct == i)
            def _(i=i):
                def body(kk, acc):
                    k0 = pl.multiple_of(kk * block_k, block_k)
                    av = plgpu.load(a_refs[i].at[slot, pl.ds(k0, block_k), :], mask=acols < rank, other=0)
                    return acc + jnp.dot(x_ref[:, pl.ds(k0, block_k)], av, preferred_element_type=jnp.float32)

                @pl.when(rank > 0)
                def _():
                    hj = lax.fori_loop(0, k_dim // block_k, body, jnp.zeros((m_rows, r_max), jnp.float32))
                    keep = (slot_ref[...][:, None] == slot) & (hcols < rank)  # this slot's rows, live columns
                    h_ref[i, :, pl.ds(j0, r_max)] = jnp.where(keep, hj, 0.0).astype(h_ref.dtype)

                @pl.when(rank == 0)  # no adapter in this entry (or a rank-0 slot): zero columns, nothing loaded
                def _():
                    h_ref[i, :, pl.ds(j0, r_max)] = jnp.zeros((m_rows, r_max), h_ref.dtype)

        if not interpret:  # (the interpreter runs a program as one thread: no barrier to lower)
            plgpu.debug_barrier()  # every thread's store is issued before the release below
        plgpu.atomic_add(count_ref, (p * 0,), p * 0 + 1)

    @pl.when(p >= n_shrink)
    def _():
        q = p - n_shrink
        m, n, s = q % n_m, (q // n_m) % n_n, q // (n_m * n_n)
        m0 = pl.multiple_of(m * block_m, block_m)
        n0 = pl.multiple_of(n * block_n, block_n)

        def body(i, acc):
            k0 = pl.multiple_of(s * k_per_split + i * block_k, block_k)
            xv = x_ref[pl.ds(m0, block_m), pl.ds(k0, block_k)]
            return acc + jnp.dot(xv, w_ref[pl.ds(k0, block_k), pl.ds(n0, block_n)],
                                 preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, k_per_split // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        sl, col0 = _tile_slice(n0, layout, block_n)
        col0 = pl.multiple_of(col0, block_n)
        P = n_distinct * r_max
        pidx = lax.broadcasted_iota(jnp.int32, (P,), 0)
        slots = d_ref[pidx // r_max]  # [P] the slot of each packed column
        live = pidx % r_max < rank_ref[slots]
        rows = jnp.where(live, slots * r_max + pidx % r_max, 0)  # dead: a row of slot 0, the zero adapter

        def store(out):
            if split_k == 1:
                o_ref[pl.ds(m0, block_m), pl.ds(n0, block_n)] = out.astype(o_ref.dtype)
            else:
                o_ref[s, pl.ds(m0, block_m), pl.ds(n0, block_n)] = out

        for i in range(n_slices):
            @pl.when((sl == i) & (s == 0))
            def _(i=i):
                bv = b_refs[i][rows, pl.ds(col0, block_n)]  # [P, BN]: issued before the wait
                lax.while_loop(lambda c: c < n_shrink, lambda c: plgpu.atomic_add(count_ref, (q * 0,), c * 0),
                               plgpu.atomic_add(count_ref, (q * 0,), q * 0))
                # [BM, P] from L2 (volatile: never a stale L1 line); the slice index traced (the interpreter's
                # discharge of a load takes no Python int)
                hv = plgpu.load(h_ref.at[q * 0 + i, pl.ds(m0, block_m), :], volatile=True)
                store(acc + jnp.dot(hv, bv, preferred_element_type=jnp.float32))

        if split_k > 1:
            @pl.when(s != 0)
            def _():
                store(acc)


def lora_gemm(x, w, a_slices, b_slices, slot_ids, ranks, distinct, config: GemmConfig, *, layout: Layout = ("single",),
              interpret: bool = False):
    """``x @ w`` plus each row's LoRA term, for a batch with at most ``len(distinct)`` adapters, in one launch.

    Args:
      x: [M, K]; w: [K, N] (the fused projection's weight, columns as ``layout`` says).
      a_slices: per LoRA slice, the bank's A [S, K, R]; b_slices: its B [S, R, N_i] (scaling folded in).
      slot_ids: [M] int32 slot of each row (0: no adapter); ranks: [S] int32.
      distinct: [D] int32 the slots present in slot_ids (others 0; every nonzero slot of slot_ids listed).
      config: the GEMM's tiles (``block_n`` must keep a tile inside one slice).
      layout: how the columns map to the slices (see ``Layout``).

    Returns:
      y: [M, N] in x's dtype. Each row's h = (x @ A[slot])[:, :rank] is rounded to x's dtype before the
      expand, as PEFT computes ``lora_B(lora_A(x))`` in the model's dtype.
    """
    _check(x, w, config)
    (m, k), n = x.shape, w.shape[1]
    c = config
    widths = _layout_widths(layout, n)
    if len(a_slices) != len(widths) or len(b_slices) != len(widths) or sum(widths) != n:
        raise ValueError(f"layout {layout} has {len(widths)} slices of widths {widths} for N={n}; got "
                         f"{len(a_slices)} A and {len(b_slices)} B banks")
    for a, b, width in zip(a_slices, b_slices, widths):
        if a.shape[1] != k or b.shape[2] != width or b.shape[1] != a.shape[2]:
            raise ValueError(f"LoRA slice A {tuple(a.shape)} / B {tuple(b.shape)} does not fit K={k}, width {width}")
    if any(width % c.block_n for width in widths) or (layout[0] == "qkv" and layout[3] % c.block_n):
        raise ValueError(f"block_n={c.block_n} must keep each output tile inside one slice ({layout})")
    r_max = a_slices[0].shape[2]
    n_distinct = distinct.shape[0]
    if k % c.block_k:
        raise ValueError(f"K={k} must be divisible by block_k={c.block_k}")
    n_m, n_n = m // c.block_m, n // c.block_n
    n_slices = len(widths)
    kernel = functools.partial(
        _lora_gemm_kernel, n_slices=n_slices, layout=layout, n_m=n_m, n_n=n_n, block_m=c.block_m, block_n=c.block_n,
        block_k=c.block_k, k_per_split=k // c.split_k, split_k=c.split_k, n_distinct=n_distinct, interpret=interpret)
    if c.split_k == 1:
        out = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out = jax.ShapeDtypeStruct((c.split_k, m, n), jnp.float32)
    b_rows = tuple(b.reshape(-1, b.shape[2]) for b in b_slices)  # [S * R, N_i]: rows gathered by index
    args = (x, w, slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), distinct.astype(jnp.int32), *a_slices,
            *b_rows, jnp.zeros((1,), jnp.int32))
    y, _, _ = pl.pallas_call(
        kernel,
        out_shape=(out, jax.ShapeDtypeStruct((n_slices, m, n_distinct * r_max), x.dtype),
                   jax.ShapeDtypeStruct((1,), jnp.int32)),
        grid=(n_slices * n_distinct + n_m * n_n * c.split_k,),
        input_output_aliases={len(args) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name="lora_gemm",
    )(*args)
    return y if c.split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)


def ref_lora_gemm(x, w, a_slices, b_slices, slot_ids, ranks, distinct=None, config=None, *,
                  layout: Layout = ("single",), interpret: bool = False):
    """Reference of ``lora_gemm`` in jnp (same signature; ``distinct``, ``config``, ``interpret`` unused)."""
    del distinct, config, interpret
    rank_t = jnp.where(slot_ids > 0, ranks[slot_ids], 0)  # [M]
    deltas = []
    for a, b in zip(a_slices, b_slices):
        live = jnp.arange(a.shape[2])[None, :] < rank_t[:, None]  # [M, R]
        a_t = jnp.where(live[:, None, :], a[slot_ids], 0)  # [M, K, R]
        h = jnp.einsum("mk,mkr->mr", x.astype(jnp.float32), a_t.astype(jnp.float32))
        h = jnp.where(live, h, 0.0).astype(x.dtype).astype(jnp.float32)
        b_t = jnp.where(live[:, :, None], b[slot_ids], 0)  # [M, R, N_i]
        deltas.append(jnp.einsum("mr,mrn->mn", h, b_t.astype(jnp.float32)))
    if layout[0] == "qkv":
        _, kv_heads, group, head_dim = layout
        m = x.shape[0]
        dq = deltas[0].reshape(m, kv_heads, group, head_dim)
        dk, dv = (d.reshape(m, kv_heads, 1, head_dim) for d in deltas[1:])
        delta = jnp.concatenate([dq, dk, dv], axis=2).reshape(m, -1)
    else:
        delta = jnp.concatenate(deltas, axis=1)
    y = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return (y + delta).astype(x.dtype)


# (rows, K, N) -> the configuration of ``lora_gemm`` on the H200: the fastest plain-GEMM configuration of
# benchmarks/pallas_gemm_probe.py (runs 1-2) for the shape, whether or not it beat XLA's GEMM (the LoRA form
# replaces the separate LoRA kernels too). 128 rows, gate/up and down: 63.8 and 37.3 us (XLA's: 61.4, 36.8).
LORA_GEMM_TABLE: dict[tuple[int, int, int], GemmConfig] = {
    **DECODE_GEMM_TABLE,
    (128, 4096, 28672): GemmConfig(128, 128, 64, split_k=1, num_warps=8, num_stages=5),
    (128, 14336, 4096): GemmConfig(128, 128, 64, split_k=4, num_warps=8, num_stages=5),
}


def lora_gemm_config(m: int, k: int, n: int, layout: Layout, *, interpret: bool = False) -> GemmConfig | None:
    """``lora_gemm``'s configuration for ``x [m, k] @ w [k, n]`` whose columns ``layout`` splits: the table's on
    GPU (None where it has none), small power-of-two tiles in the interpreter (tests)."""
    widths = _layout_widths(layout, n)
    col_unit = math.gcd(*widths, *([layout[3]] if layout[0] == "qkv" else []))
    if interpret:
        pow2 = lambda v, cap: min(v & -v, cap)  # noqa: E731  (largest power of two dividing v, capped)
        return GemmConfig(pow2(m, 64), pow2(col_unit, 64), pow2(k, 64))
    config = LORA_GEMM_TABLE.get((m, k, n))
    if config is None or col_unit % config.block_n:
        return None
    return config


def batch_distinct(slot_ids, n_distinct: int):
    """The nonzero slots of ``slot_ids``, [n_distinct] int32 padded with 0 (the caller guarantees at most
    n_distinct of them: the host counts them, ``routing.decode_impl``)."""
    big = jnp.iinfo(jnp.int32).max
    vals = jnp.unique(jnp.where(slot_ids > 0, slot_ids, big), size=n_distinct, fill_value=big)
    return jnp.where(vals == big, 0, vals).astype(jnp.int32)
