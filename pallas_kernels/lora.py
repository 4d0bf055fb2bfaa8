"""Public LoRA kernel entry points: backend dispatch, decode/prefill choice, custom VJPs, multi-slice forms.

    y = x @ W + lora_shrink_expand(y?, x, A, B, slot_ids, ranks)   # the model calls the fused op

Layouts (fixed): x [T, H]; a [S, H, R]; b [S, R, O] (scaling folded in); ranks [S] int32 (0 for slot 0 and
empty slots); slot_ids [T] int32 in [0, S), tokens in any order. Padding (columns >= rank of a[s], rows >= rank
of b[s]) may hold anything, NaN included, and never reaches an output.

Output dtypes: ``lora_shrink`` returns float32 h [T, R] (h is tiny; float32 keeps the expand exact);
``lora_expand`` / ``lora_shrink_expand`` return y.dtype.

Backends (``backend=``):
  None          auto: the platform's kernel ("triton" on CUDA/ROCm, "tpu" on TPU), else "reference".
  "reference"   the jnp twins (XLA gather + einsum).
  "triton"      Pallas kernels through the Triton lowering (the GPU choice: see ``gpu_backend``).
  "tpu"         Pallas kernels through Mosaic TPU (decode and segment forms; untuned: no TPU here).
``interpret=True`` runs a kernel backend through the Pallas interpreter (CPU tests).

Forms (``form=``): "decode" (BGMV: one program per token, tokens in any order, each reading its adapter),
"segment" (the prefill form; "prefill" names it too: tokens grouped by slot into tiles of one slot each by a
counting-sort kernel, ``grouping.segment_tiles``, one tensor-core dot per tile against the tile's adapter, rows
gathered and scattered by token index) or "auto": the segment form when R >= 16 (the dot's minimum) and
T >= ``PREFILL_MIN_TOKENS``, or T >= ``SEGMENT_MIN_TOKENS`` for the multi-slice delta op
(``lora_shrink_expand_multi(..., delta=True)``, the decoder's path, whose tiles the decoder builds once per
forward, a multi-step decode call once per call). Tiles hold ``SEGMENT_BLOCK_M`` tokens below
PREFILL_MIN_TOKENS, ``PREFILL_BLOCK_M[R <= 16]`` from there (``segment_block_m``).

Every op is a pure function of its (local) arrays with static shapes: it jits, runs inside ``jax.shard_map``
and has a ``jax.custom_vjp`` (gradients for x, a, b and h; none for slot_ids and ranks) whose backward pass is
grouped jnp (sort + ``lax.ragged_dot``), matching the reference's gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common, expand, grouping, shrink
from pallas_kernels.expand import ref_lora_expand
from pallas_kernels.shrink import ref_lora_shrink

BACKENDS = ("reference", "triton", "tpu")
FORMS = ("auto", "decode", "prefill", "segment")  # "prefill" and "segment" are one form
PREFILL_MIN_TOKENS = 512  # measured on the H200: see benchmarks/KERNELS_NOTES.md
SEGMENT_MIN_TOKENS = 128  # measured in the decode step on the H200: benchmarks/RESULTS.md, "Segment LoRA"
SEGMENT_BLOCK_M = 16  # rows per segment tile below PREFILL_MIN_TOKENS: the tensor-core dot's minimum
# Rows per segment tile from PREFILL_MIN_TOKENS, for R > 16 and R <= 16: two H200 sweeps over the issue's
# prefill shapes (benchmarks/KERNELS_NOTES.md, seventh session): 32-row tiles 2-16% faster at R = 16, mixed
# at R = 64; 128-row tiles 1.6-2.2x slower.
PREFILL_BLOCK_M = (64, 32)
# Up to this bank rank the segment delta's programs sum the shrink's float32 H-slice partials themselves;
# above it XLA sums them once (one small fusion) and the delta reads h: at R = 64 every (tile, O-block)
# program re-reading the partials cost more than the delta's own writes (H200, prefill shapes: the delta
# kernel 18.7 -> 12.9 us at 2048 tokens, 43.6 -> 37.7 us at 8192); at R = 16 both measured the same
# (benchmarks/RESULTS.md, "Kernels"). Applied from PREFILL_MIN_TOKENS: decode-sized calls were not measured.
SEGMENT_PARTIALS_MAX_RANK = 16
# The segment delta from PREFILL_MIN_TOKENS, for R <= 16 and R > 16: (columns per dot, O-blocks per program,
# which loads h once for all of them). H200 sweeps over the prefill shapes (benchmarks/KERNELS_NOTES.md,
# fourteenth session): R = 16, 2 blocks of 256 against 1, 4, 8 and 16: fastest or within 1 us at three of the
# four shapes (8 blocks: 3.2 us faster at 8192 tokens / 4 adapters, 6.6 us slower at 8192 / 64); R = 64, 4
# blocks of 128 against 1-8 blocks of 256: 2.7-5.3 us faster at three shapes, 0.7 us slower at the fourth. 16
# blocks leave too few programs at 2048 tokens. With the blocks as a pipelined loop (twentieth session) the
# choice held: 8 blocks at R = 64 and 4 at R = 16 were slower or equal at every shape.
PREFILL_DELTA_BLOCKS = ((256, 2), (128, 4))
# The same (largest columns per dot, O-blocks per program) below PREFILL_MIN_TOKENS (the decode step's
# grouped calls): one block of up to 256 columns per program. In the decode step on the H200 (twentieth session,
# benchmarks/RESULTS.md "Serving throughput"), 2, 4 and 8 blocks of 256 per program made every step that runs
# the segment form slower (batch 64-256, 64 distinct or 8 shared adapters: +0.5% to +5.6% back to back): fewer
# programs do not make the step cheaper.
DECODE_DELTA_BLOCKS = (256, 1)
# The segment shrink's (num_warps, num_stages) below PREFILL_MIN_TOKENS (16-row tiles: the decode step's
# grouped calls, and prefill chunks that short; None: ``shrink.seg_shrink_stages``). H200, twenty-sixth
# session (benchmarks/RESULTS.md): alone (``benchmarks/decode_lora_probe.py``), 2 warps against 4 took
# 0.8-4.5 us off each shrink of 64 distinct adapters at 128-256 rows and 0.2-0.5 us off 8 adapters' (3 stages
# 0.5-1.8 us there); in the decode step, back to back against the base step, 2 warps took 1.2-2.5 points off
# every batch-128 cell (distinct and 8 shared adapters, 192 and 1152 tokens) and 0.8-1.8 off distinct batch
# 256, and left 8 shared adapters at batch 32, 64 and 256 within 0.4 points; 3 stages, alone or with 2 warps,
# gained less at batch 128.
DECODE_SHRINK_LAUNCH = (2, None)


# Programs the segment shrink aims at (``shrink.seg_block_sizes``) where XLA sums its H-slices' partials
# (``segment_sums_partials``), instead of ``shrink.SEG_PROGRAMS``: fewer H-slices, and from 8192 tokens (128 full
# tiles) one, which leaves nothing to sum (no reduce launch). H200, R = 64, the prefill shapes,
# seventeenth session (benchmarks/RESULTS.md, runs 1-7): 8192 tokens, 1 H-slice against the 4 of 512 programs,
# 90.1-91.6 -> 83.0-85.1 us over 64 adapters and 68.2-70.5 -> 65.2-68.9 us over 4; 2048 tokens, 4 H-slices
# against 8, within the spread (27.7-28.9 -> 26.3-27.9 us over 4 adapters, 46.0-49.1 -> 44.7-50.1 over 64).
# Not measured: other token counts (4096: 2 H-slices) and the engine's multi-slice prefill calls, whose slices
# count as programs too (q/k/v at 2048 tokens: 2 H-slices).
SEGMENT_SUMMED_PROGRAMS = 128


def segment_sums_partials(num_tokens: int, r_max: int) -> bool:
    """Whether the segment delta takes h summed over the H-slices by XLA (``SEGMENT_PARTIALS_MAX_RANK``)."""
    return r_max > SEGMENT_PARTIALS_MAX_RANK and num_tokens >= PREFILL_MIN_TOKENS


def segment_shrink_programs(num_tokens: int, r_max: int) -> int:
    """The programs the segment shrink aims at for T tokens at rank R (``SEGMENT_SUMMED_PROGRAMS``)."""
    return SEGMENT_SUMMED_PROGRAMS if segment_sums_partials(num_tokens, r_max) else shrink.SEG_PROGRAMS


def segment_shrink_launch(num_tokens: int) -> dict:
    """The segment shrink's Triton launch knobs for T tokens (``DECODE_SHRINK_LAUNCH`` below
    PREFILL_MIN_TOKENS, else the kernel's defaults)."""
    if num_tokens >= PREFILL_MIN_TOKENS:
        return {}
    num_warps, num_stages = DECODE_SHRINK_LAUNCH
    return dict(num_warps=num_warps, num_stages=num_stages)


def segment_delta_blocks(num_tokens: int, r_max: int, out_dims) -> tuple[int, int]:
    """(block_n, o_blocks) of the segment delta for T tokens at rank R (``PREFILL_DELTA_BLOCKS``, or
    ``DECODE_DELTA_BLOCKS`` below PREFILL_MIN_TOKENS; o_blocks halved until it divides every slice's count of
    blocks)."""
    cap, o_blocks = DECODE_DELTA_BLOCKS if num_tokens < PREFILL_MIN_TOKENS else PREFILL_DELTA_BLOCKS[r_max > 16]
    block_n = min(_common.largest_pow2_divisor(o, cap) for o in out_dims)
    while any((o // block_n) % o_blocks for o in out_dims):
        o_blocks //= 2
    return block_n, o_blocks


def segment_block_m(num_tokens: int, r_max: int) -> int:
    """Rows per segment tile for T tokens at rank R."""
    return SEGMENT_BLOCK_M if num_tokens < PREFILL_MIN_TOKENS else PREFILL_BLOCK_M[r_max <= 16]


def gpu_backend() -> str:
    """The Pallas backend used on NVIDIA/AMD GPUs.

    Chosen by measurement on the H200 (benchmarks/KERNELS_NOTES.md): the Triton lowering, whose pointer
    gathers express the per-token adapter gather directly; keep this the one place that decides.
    """
    return "triton"


def resolve_backend(backend: str | None, interpret: bool = False) -> str:
    """Maps ``backend`` (None = auto) to one of BACKENDS for the default JAX platform."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        return backend
    platform = _common.default_platform()
    if platform in ("cuda", "rocm", "gpu"):
        return gpu_backend()
    if platform == "tpu":
        return "tpu"
    return "reference"


def _kernel_supported(backend: str, r_max: int, dims: tuple[int, ...]) -> str | None:
    """Why the kernels of ``backend`` cannot take these shapes, or None when they can."""
    if backend == "triton":
        if not _common.is_pow2(r_max):
            return f"R={r_max} is not a power of two"
        for d in dims:
            if _common.largest_pow2_divisor(d, 16) < 16:
                return f"dimension {d} is not a multiple of 16"
    if backend == "tpu":
        for d in dims:
            if d % 128:
                return f"dimension {d} is not a multiple of 128"
    return None


def _pick(backend, interpret, r_max, dims):
    chosen = resolve_backend(backend, interpret)
    if chosen == "reference":
        return chosen
    why = _kernel_supported(chosen, r_max, dims)
    if why is not None:
        if backend is not None:  # forced: tell the caller
            raise ValueError(f"backend {chosen!r} cannot run this shape: {why}")
        return "reference"  # auto: fall back to the reference
    return chosen


def _pick_form(form: str, num_tokens: int, r_max: int, min_tokens: int = PREFILL_MIN_TOKENS) -> str:
    """"decode" or "segment" for T tokens at rank R (``min_tokens``: where "auto" starts grouping)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "auto":
        return "segment" if (num_tokens >= min_tokens and r_max >= 16) else "decode"
    if form in ("prefill", "segment"):
        if r_max < 16:
            raise ValueError(f"the {form} form needs R >= 16 (tensor-core dot), got R={r_max}")
        return "segment"
    return form


# ----------------------------------------------------------------------------------------------------------
# Forward implementations (no autodiff), per backend.


def _tiles(slot_ids, ranks, r_max, interpret):
    """The segment kernels' tiles for these tokens (the counting-sort kernel)."""
    return grouping.segment_tiles(slot_ids, ranks, segment_block_m(slot_ids.shape[0], r_max), interpret=interpret)


def _shrink_partials(x, a, slot_ids, ranks, backend, form, interpret, tiles=None):
    """h partials [n_split, T, R] float32 (sum over axis 0 = shrink)."""
    if backend == "reference":
        return ref_lora_shrink(x, a, slot_ids, ranks)[None]
    if backend == "tpu":
        from pallas_kernels import _tpu_lora

        if _pick_form(form, x.shape[0], a.shape[2]) == "segment":
            return _tpu_lora.tpu_seg_shrink(x, a, slot_ids, ranks, tiles=tiles, interpret=interpret)[None]
        return _tpu_lora.tpu_shrink(x, a, slot_ids, ranks, interpret=interpret)[None]
    if _pick_form(form, x.shape[0], a.shape[2]) == "segment":
        tiles = tiles if tiles is not None else _tiles(slot_ids, ranks, a.shape[2], interpret)
        return shrink.seg_shrink_partials_multi(
            x, (a,), tiles, programs=segment_shrink_programs(x.shape[0], a.shape[2]), interpret=interpret,
            **segment_shrink_launch(x.shape[0]))[0]
    return shrink.bgmv_shrink_partials(x, a, slot_ids, ranks, interpret=interpret)


def _expand_from_partials(y, hp, b, slot_ids, ranks, backend, form, interpret, tiles=None):
    if backend == "reference":
        return ref_lora_expand(y, jnp.sum(hp, axis=0), b, slot_ids, ranks)
    if backend == "tpu":
        from pallas_kernels import _tpu_lora

        if _pick_form(form, y.shape[0], b.shape[1]) == "segment":
            return _tpu_lora.tpu_seg_expand(y, jnp.sum(hp, axis=0), b, slot_ids, ranks, tiles=tiles,
                                            interpret=interpret)
        return _tpu_lora.tpu_expand(y, jnp.sum(hp, axis=0), b, slot_ids, ranks, interpret=interpret)
    if _pick_form(form, y.shape[0], b.shape[1]) == "segment":
        tiles = tiles if tiles is not None else _tiles(slot_ids, ranks, b.shape[1], interpret)
        return expand.seg_expand_multi((y,), hp[None], (b,), tiles, interpret=interpret)[0]
    return expand.bgmv_expand(y, hp, b, slot_ids, ranks, interpret=interpret)


def _shared_tiles(backend, form, slot_ids, ranks, r_max, interpret):
    """One grouping shared by the shrink and the expand of a fused segment-form call (None elsewhere)."""
    if backend not in ("triton", "tpu") or _pick_form(form, slot_ids.shape[0], r_max) != "segment":
        return None
    if backend == "tpu":
        from pallas_kernels import _tpu_lora

        return _tpu_lora.segment_tiles(slot_ids, ranks)
    return _tiles(slot_ids, ranks, r_max, interpret)


# ----------------------------------------------------------------------------------------------------------
# Backward: grouped jnp (sort + ragged_dot), no [T, H, R] gather.


def _grouped_shrink(x, a_masked, slot_ids):
    """h [T, R] f32 = x[t] @ a_masked[slot[t]] through a sort and lax.ragged_dot (differentiable)."""
    s = a_masked.shape[0]
    perm = jnp.argsort(slot_ids, stable=True)
    sizes = jnp.bincount(slot_ids, length=s).astype(jnp.int32)
    hs = lax.ragged_dot(x[perm], a_masked, sizes, preferred_element_type=jnp.float32)  # [T, R]
    return jnp.zeros_like(hs).at[perm].set(hs)


def _grouped_expand_delta(h_masked, b_masked, slot_ids):
    """delta [T, O] f32 = h_masked[t] @ b_masked[slot[t]] through a sort and lax.ragged_dot."""
    s = b_masked.shape[0]
    perm = jnp.argsort(slot_ids, stable=True)
    sizes = jnp.bincount(slot_ids, length=s).astype(jnp.int32)
    ds = lax.ragged_dot(
        h_masked[perm].astype(jnp.float32), b_masked.astype(jnp.float32), sizes,
        preferred_element_type=jnp.float32,
    )
    return jnp.zeros_like(ds).at[perm].set(ds)


def _shrink_bwd_math(x, a, slot_ids, ranks, dh):
    def f(x_, a_):
        return _grouped_shrink(x_, _common.masked_bank_a(a_, ranks), slot_ids)

    _, vjp = jax.vjp(f, x, a)
    dx, da = vjp(dh.astype(jnp.float32))
    return dx.astype(x.dtype), da.astype(a.dtype)


def _expand_bwd_math(h, b, slot_ids, ranks, dy):
    rank_t = _common.token_ranks(slot_ids, ranks)
    live = jnp.arange(b.shape[1])[None, :] < rank_t[:, None]

    def f(h_, b_):
        hm = jnp.where(live, h_.astype(jnp.float32), 0.0)
        return _grouped_expand_delta(hm, _common.masked_bank_b(b_, ranks), slot_ids)

    _, vjp = jax.vjp(f, h, b)
    dh, db = vjp(dy.astype(jnp.float32))
    return dh.astype(h.dtype), db.astype(b.dtype)


# ----------------------------------------------------------------------------------------------------------
# Differentiable cores (static config as nondiff args).


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _shrink_core(x, a, slot_ids, ranks, backend, form, interpret):
    return jnp.sum(_shrink_partials(x, a, slot_ids, ranks, backend, form, interpret), axis=0)


def _shrink_core_fwd(x, a, slot_ids, ranks, backend, form, interpret):
    h = _shrink_core(x, a, slot_ids, ranks, backend, form, interpret)
    return h, (x, a, slot_ids, ranks)


def _shrink_core_bwd(backend, form, interpret, res, dh):
    x, a, slot_ids, ranks = res
    dx, da = _shrink_bwd_math(x, a, slot_ids, ranks, dh)
    return dx, da, None, None


_shrink_core.defvjp(_shrink_core_fwd, _shrink_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _expand_core(y, h, b, slot_ids, ranks, backend, form, interpret):
    return _expand_from_partials(y, h[None], b, slot_ids, ranks, backend, form, interpret)


def _expand_core_fwd(y, h, b, slot_ids, ranks, backend, form, interpret):
    out = _expand_core(y, h, b, slot_ids, ranks, backend, form, interpret)
    return out, (h, b, slot_ids, ranks)


def _expand_core_bwd(backend, form, interpret, res, dy):
    h, b, slot_ids, ranks = res
    dh, db = _expand_bwd_math(h, b, slot_ids, ranks, dy)
    return dy, dh, db, None, None


_expand_core.defvjp(_expand_core_fwd, _expand_core_bwd)


def _fused_forward(y, x, a, b, slot_ids, ranks, backend, form, interpret):
    if backend == "triton" and _pick_form(form, x.shape[0], a.shape[2]) == "decode":
        # the shrink hands each token's rank to the expand (one dependent load fewer per expand program)
        hp, token_ranks = shrink.bgmv_shrink_partials(x, a, slot_ids, ranks, token_ranks=True, interpret=interpret)
        return expand.bgmv_expand(y, hp, b, slot_ids, ranks, token_ranks=token_ranks, interpret=interpret), hp
    tiles = _shared_tiles(backend, form, slot_ids, ranks, a.shape[2], interpret)
    hp = _shrink_partials(x, a, slot_ids, ranks, backend, form, interpret, tiles)
    return _expand_from_partials(y, hp, b, slot_ids, ranks, backend, form, interpret, tiles), hp


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _fused_core(y, x, a, b, slot_ids, ranks, backend, form, interpret):
    return _fused_forward(y, x, a, b, slot_ids, ranks, backend, form, interpret)[0]


def _fused_core_fwd(y, x, a, b, slot_ids, ranks, backend, form, interpret):
    out, hp = _fused_forward(y, x, a, b, slot_ids, ranks, backend, form, interpret)
    return out, (x, a, b, jnp.sum(hp, axis=0), slot_ids, ranks)


def _fused_core_bwd(backend, form, interpret, res, dy):
    x, a, b, h, slot_ids, ranks = res
    dh, db = _expand_bwd_math(h, b, slot_ids, ranks, dy)
    dx, da = _shrink_bwd_math(x, a, slot_ids, ranks, dh)
    return dy, dx, da, db, None, None


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd)


def multi_form(form: str, num_tokens: int, r_max: int, delta: bool) -> str:
    """The form ``lora_shrink_expand_multi`` runs for T tokens at rank R (on the Triton backend): "auto"
    groups from SEGMENT_MIN_TOKENS for the delta op (measured in the decode step), from PREFILL_MIN_TOKENS
    in place."""
    return _pick_form(form, num_tokens, r_max, SEGMENT_MIN_TOKENS if delta else PREFILL_MIN_TOKENS)


def segment_tiles_for(slot_ids, ranks, r_max: int, *, form: str = "auto", delta: bool = True,
                      backend: str | None = None, interpret: bool = False):
    """The segment tiles ``lora_shrink_expand_multi`` would build for these tokens (same form, delta, backend
    and interpret), or None when it would not run the segment form. Build them once and pass them to every
    call that shares the slot ids (the decoder does, once per step)."""
    if (resolve_backend(backend, interpret) != "triton"
            or multi_form(form, slot_ids.shape[0], r_max, delta) != "segment"):
        return None
    return _tiles(slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), r_max, interpret)


def _multi_forward(ys, x, a_slices, b_slices, slot_ids, ranks, tiles, backend, form, interpret, delta):
    """Slices sharing x and one ranks vector: returns (outputs, per-slice h [T, R] float32).

    ``delta``: the Triton kernels compute the deltas into fresh arrays and add them with XLA (for ys that
    are slices of one fused projection output) instead of updating each y in place.
    ``tiles``: prebuilt ``_common.SegmentTiles`` for the segment form, or None (built here when needed)."""
    same_r = len({a.shape[2] for a in a_slices} | {b.shape[1] for b in b_slices}) == 1
    if backend == "triton" and same_r:
        picked = multi_form(form, x.shape[0], a_slices[0].shape[2], delta)
        if picked == "segment":
            tiles = tiles if tiles is not None else _tiles(slot_ids, ranks, a_slices[0].shape[2], interpret)
            hp = shrink.seg_shrink_partials_multi(
                x, a_slices, tiles, programs=segment_shrink_programs(x.shape[0], a_slices[0].shape[2]),
                interpret=interpret, **segment_shrink_launch(x.shape[0]))
            hs = tuple(jnp.sum(hp[i], axis=0) for i in range(len(ys)))
            if delta:
                if segment_sums_partials(x.shape[0], a_slices[0].shape[2]):  # once, not per O-block
                    hp = jnp.stack(hs)[:, None]
                block_n, o_blocks = segment_delta_blocks(x.shape[0], a_slices[0].shape[2],
                                                         [b.shape[2] for b in b_slices])
                deltas = expand.seg_delta_multi(ys[0].dtype, hp, b_slices, tiles, block_n=block_n,
                                                o_blocks=o_blocks, interpret=interpret)
                return tuple(y + d for y, d in zip(ys, deltas)), hs
            if len({y.dtype for y in ys}) == 1:
                return expand.seg_expand_multi(ys, hp, b_slices, tiles, interpret=interpret), hs
        else:
            hp = shrink.bgmv_shrink_partials_multi(x, a_slices, slot_ids, ranks, interpret=interpret)
            hs = tuple(jnp.sum(hp[i], axis=0) for i in range(len(ys)))
            if delta:
                deltas = expand.bgmv_delta_multi(ys[0].dtype, hp, b_slices, slot_ids, ranks, interpret=interpret)
                return tuple(y + d for y, d in zip(ys, deltas)), hs
            return expand.bgmv_expand_multi(ys, hp, b_slices, slot_ids, ranks, interpret=interpret), hs
    res = [_fused_forward(y, x, a, b, slot_ids, ranks, backend, form, interpret)
           for y, a, b in zip(ys, a_slices, b_slices)]
    return tuple(o for o, _ in res), tuple(jnp.sum(hp, axis=0) for _, hp in res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _multi_core(ys, x, a_slices, b_slices, slot_ids, ranks, tiles, backend, form, interpret, delta):
    return _multi_forward(ys, x, a_slices, b_slices, slot_ids, ranks, tiles, backend, form, interpret, delta)[0]


def _multi_core_fwd(ys, x, a_slices, b_slices, slot_ids, ranks, tiles, backend, form, interpret, delta):
    outs, hs = _multi_forward(ys, x, a_slices, b_slices, slot_ids, ranks, tiles, backend, form, interpret, delta)
    return outs, (x, a_slices, b_slices, hs, slot_ids, ranks)


def _multi_core_bwd(backend, form, interpret, delta, res, dys):
    x, a_slices, b_slices, hs, slot_ids, ranks = res
    dx, das, dbs = jnp.zeros_like(x), [], []
    for a, b, h, dy in zip(a_slices, b_slices, hs, dys):
        dh, db = _expand_bwd_math(h, b, slot_ids, ranks, dy)
        dx_i, da = _shrink_bwd_math(x, a, slot_ids, ranks, dh)
        dx, das, dbs = dx + dx_i, das + [da], dbs + [db]
    return tuple(dys), dx, tuple(das), tuple(dbs), None, None, None


_multi_core.defvjp(_multi_core_fwd, _multi_core_bwd)


# ----------------------------------------------------------------------------------------------------------
# Public API.


def lora_shrink(x, a, slot_ids, ranks, *, backend=None, form="auto", interpret=False):
    """Gathered low-rank shrink: h[t] = x[t] @ a[slot_ids[t], :, :rank].

    Args:
      x: [T, H] activations (float32 or bfloat16).
      a: [S, H, R] stacked A; columns >= ranks[s] are padding.
      slot_ids: [T] int32 in [0, S).
      ranks: [S] int32.
      backend: None (auto), "reference", "triton" or "tpu".
      form: "auto", "decode", or "segment" (alias "prefill"): see the module docstring.
      interpret: run the kernel through the Pallas interpreter.

    Returns:
      h: [T, R] float32, zero in columns >= the token's rank.
    """
    _common.check_shrink_args(x, a, slot_ids, ranks)
    chosen = _pick(backend, interpret, a.shape[2], (x.shape[1],))
    return _shrink_core(x, a, slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), chosen, form, interpret)


def lora_expand(y, h, b, slot_ids, ranks, *, backend=None, form="auto", interpret=False):
    """Gathered low-rank expand: y_out[t] = y[t] + h[t, :rank] @ b[slot_ids[t], :rank].

    Args:
      y: [T, O] base output (the kernel backends update it in place when it is donated).
      h: [T, R] shrink output (any float dtype); columns >= the token's rank are ignored.
      b: [S, R, O] stacked B (scaling folded in); rows >= ranks[s] are padding.
      slot_ids: [T] int32 in [0, S).
      ranks: [S] int32.
      backend, form, interpret: as in ``lora_shrink``.

    Returns:
      y_out: [T, O] in y.dtype.
    """
    _common.check_expand_args(y, h, b, slot_ids, ranks)
    chosen = _pick(backend, interpret, b.shape[1], (y.shape[1],))
    return _expand_core(
        y, h, b, slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), chosen, form, interpret
    )


def lora_shrink_expand(y, x, a, b, slot_ids, ranks, *, backend=None, form="auto", interpret=False):
    """Fused LoRA delta: y_out[t] = y[t] + (x[t] @ a[s, :, :rank]) @ b[s, :rank], s = slot_ids[t].

    The kernel path launches the shrink and the expand back to back; the shrink's per-H-slice partial sums
    go straight into the expand (no reduced h in between). A single launch would need a grid-wide reduction
    over H before any output column, so two launches measure better.

    Args:
      y: [T, O]; x: [T, H]; a: [S, H, R]; b: [S, R, O]; slot_ids: [T] int32; ranks: [S] int32.
      backend, form, interpret: as in ``lora_shrink``.

    Returns:
      y_out: [T, O] in y.dtype.
    """
    _common.check_shrink_args(x, a, slot_ids, ranks)
    _common.check_expand_args(y, jnp.zeros((x.shape[0], a.shape[2])), b, slot_ids, ranks)
    chosen = _pick(backend, interpret, a.shape[2], (x.shape[1], y.shape[1]))
    return _fused_core(
        y, x, a, b, slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), chosen, form, interpret
    )


def lora_shrink_expand_multi(ys, x, adapters, slot_ids, ranks, *, backend=None, form="auto", interpret=False,
                             delta=False, tiles=None):
    """Multi-slice LoRA for projections that share one input (q/k/v, gate/up).

    Args:
      ys: tuple of base outputs, ys[i]: [T, O_i] (O_i may differ, as for q/k/v).
      x: [T, H] shared input.
      adapters: tuple of (a_i [S, H, R_i], b_i [S, R_i, O_i]), one per slice.
      slot_ids: [T] int32.
      ranks: [S] int32 shared by all slices (an adapter bank: the Triton decode form then runs every slice
        in one shrink and one expand launch), or a tuple of one [S] array per slice (one call per slice).
      backend, interpret: as in ``lora_shrink``.
      form: as in ``lora_shrink`` (slices with different R run one at a time).
      delta: the Triton decode and segment forms write the deltas into fresh arrays and add them with XLA,
        which fuses each add into the output's consumer, instead of updating each y in place. For ys that are slices of
        one fused projection output (in place, XLA would first copy every slice out), and for outputs whose
        consumer can take the add (the decoder's residual adds). Same result up to the rounding of the delta
        to y's dtype before the add.
      tiles: the segment form's tiles from ``segment_tiles_for`` with these slot ids and ranks (built here
        when None).

    Returns:
      tuple of y_out[i]: [T, O_i] in ys[i].dtype.
    """
    if len(ys) != len(adapters):
        raise ValueError(f"got {len(ys)} outputs but {len(adapters)} (a, b) pairs")
    if isinstance(ranks, (tuple, list)):
        if len(ranks) != len(ys):
            raise ValueError(f"got {len(ranks)} rank vectors for {len(ys)} slices")
        return tuple(
            lora_shrink_expand(y, x, a, b, slot_ids, r, backend=backend, form=form, interpret=interpret)
            for y, (a, b), r in zip(ys, adapters, ranks)
        )
    # one ranks vector (an adapter bank): the decode kernels take every slice in one shrink + one expand launch
    for y, (a, b) in zip(ys, adapters):
        _common.check_shrink_args(x, a, slot_ids, ranks)
        _common.check_expand_args(y, jnp.zeros((x.shape[0], a.shape[2])), b, slot_ids, ranks)
    # every slice must suit the backend (the fallback for mixed ranks runs one slice at a time)
    chosen = {_pick(backend, interpret, a.shape[2], (x.shape[1], y.shape[1])) for y, (a, _) in zip(ys, adapters)}
    chosen = "reference" if "reference" in chosen else chosen.pop()
    for a, _ in adapters:  # a forced form: the same errors on every backend (R >= 16 for the segment form)
        _pick_form(form, x.shape[0], a.shape[2])
    return _multi_core(tuple(ys), x, tuple(a for a, _ in adapters), tuple(b for _, b in adapters),
                       slot_ids.astype(jnp.int32), ranks.astype(jnp.int32), tiles, chosen, form, interpret, delta)


def lora_shrink_multi(x, a_slices, slot_ids, ranks, *, backend=None, form="auto", interpret=False):
    """Multi-slice shrink: one h [T, R_i] float32 per A in ``a_slices`` (shared x)."""
    if not isinstance(ranks, (tuple, list)):
        ranks = (ranks,) * len(a_slices)
    return tuple(
        lora_shrink(x, a, slot_ids, r, backend=backend, form=form, interpret=interpret)
        for a, r in zip(a_slices, ranks)
    )
