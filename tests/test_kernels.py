"""CPU tests of the LoRA kernels (pallas_kernels) in interpret mode, against their jnp references.

Every input is fresh random data: ranks mixed in one bank, repeated slots, zero-adapter rows, empty groups
(hypothesis-drawn group sizes), tokens shuffled, and padding (columns >= rank of A, rows >= rank of B)
poisoned with NaN, which must never reach an output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import expand, grouping, lora, shrink
from pallas_kernels._common import compact_segment_tiles, max_segment_tiles
from pallas_kernels.expand import ref_lora_expand
from pallas_kernels.shrink import ref_lora_shrink

RANKS = (1, 4, 8, 16, 64, 128)
SETTINGS = settings(max_examples=2, deadline=None)
# (backend, form): the GPU and the TPU kernels, each in both forms.
KERNELS = [("triton", "decode"), ("triton", "prefill"), ("tpu", "decode"), ("tpu", "segment")]


def make_inputs(seed, group_sizes, hidden, out_dim, r_max, dtype):
    """Random x, y, NaN-padded banks and shuffled slot ids; slot 0 (rank 0) is the zero adapter."""
    rng = np.random.default_rng(seed)
    s = len(group_sizes)
    ranks = np.array([0] + [int(rng.choice([r for r in RANKS if r <= r_max])) for _ in range(s - 1)], np.int32)
    if s > 2:
        ranks[-1] = 0  # an empty slot: rank 0, tokens routed to it must get nothing
    a = rng.standard_normal((s, hidden, r_max)).astype(np.float32) / np.sqrt(hidden)
    b = rng.standard_normal((s, r_max, out_dim)).astype(np.float32)
    for i, r in enumerate(ranks):
        a[i, :, r:] = np.nan
        b[i, r:, :] = np.nan
    slot_ids = np.repeat(np.arange(s), group_sizes).astype(np.int32)
    rng.shuffle(slot_ids)
    t = len(slot_ids)
    x = rng.standard_normal((t, hidden)).astype(np.float32)
    y = rng.standard_normal((t, out_dim)).astype(np.float32)
    cast = lambda v: jnp.asarray(v, dtype)
    return cast(x), cast(y), cast(a), cast(b), jnp.asarray(slot_ids), jnp.asarray(ranks)


def rel_err(got, want):
    got = jnp.asarray(got, jnp.float32)
    want = jnp.asarray(want, jnp.float32)
    return float(jnp.linalg.norm(got - want) / (jnp.linalg.norm(want) + 1e-30))


def tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 2e-2


group_sizes_st = st.lists(st.integers(0, 40), min_size=3, max_size=7).filter(lambda g: sum(g) > 0)


# The TPU interpreter is the slowest path: it runs f32 only (its bf16 math is the same code path).
@pytest.mark.parametrize(
    "backend,form,dtype",
    [(b, f, d) for b, f in KERNELS for d in (jnp.float32, jnp.bfloat16) if not (b == "tpu" and d == jnp.bfloat16)],
)
@SETTINGS
@given(groups=group_sizes_st, seed=st.integers(0, 2**31 - 1), r_max=st.sampled_from([16, 128]))
def test_shrink_expand_match_reference(backend, form, dtype, groups, seed, r_max):
    x, y, a, b, slot_ids, ranks = make_inputs(seed, groups, 256, 384, r_max, dtype)
    kw = dict(backend=backend, form=form, interpret=True)

    h = jax.jit(functools.partial(lora.lora_shrink, **kw))(x, a, slot_ids, ranks)
    h_ref = ref_lora_shrink(x, a, slot_ids, ranks)
    assert h.dtype == jnp.float32 and h.shape == h_ref.shape
    assert bool(jnp.all(jnp.isfinite(h)))
    assert rel_err(h, h_ref) < tol(dtype)

    out = jax.jit(functools.partial(lora.lora_expand, **kw))(y, h_ref, b, slot_ids, ranks)
    out_ref = ref_lora_expand(y, h_ref, b, slot_ids, ranks)
    assert out.dtype == y.dtype and bool(jnp.all(jnp.isfinite(out)))
    assert rel_err(out - y, out_ref - y) < tol(dtype)

    fused = jax.jit(functools.partial(lora.lora_shrink_expand, **kw))(y, x, a, b, slot_ids, ranks)
    assert bool(jnp.all(jnp.isfinite(fused)))
    assert rel_err(fused - y, out_ref - y) < tol(dtype)
    # Rank-0 rows (slot 0 and the empty slot) come back exactly as y.
    base = np.asarray(ranks)[np.asarray(slot_ids)] == 0
    np.testing.assert_array_equal(np.asarray(fused)[base], np.asarray(y)[base])


# The backward pass is shared jnp code; the forward of every backend is covered above.
@pytest.mark.parametrize("backend,form", [("triton", "decode"), ("triton", "prefill")])
@SETTINGS
@given(groups=group_sizes_st, seed=st.integers(0, 2**31 - 1))
def test_gradients_match_reference(backend, form, groups, seed):
    x, y, a, b, slot_ids, ranks = make_inputs(seed, groups, 128, 256, 16, jnp.float32)
    w = jax.random.normal(jax.random.key(seed % 1000), y.shape)

    def loss_kernel(y_, x_, a_, b_):
        out = lora.lora_shrink_expand(y_, x_, a_, b_, slot_ids, ranks, backend=backend, form=form, interpret=True)
        return jnp.sum(w * out)

    def loss_split(y_, x_, a_, b_):
        kw = dict(backend=backend, form=form, interpret=True)
        h = lora.lora_shrink(x_, a_, slot_ids, ranks, **kw)
        return jnp.sum(w * lora.lora_expand(y_, h, b_, slot_ids, ranks, **kw))

    def loss_ref(y_, x_, a_, b_):
        return jnp.sum(w * ref_lora_expand(y_, ref_lora_shrink(x_, a_, slot_ids, ranks), b_, slot_ids, ranks))

    want = jax.grad(loss_ref, argnums=(0, 1, 2, 3))(y, x, a, b)
    for loss in (loss_kernel, loss_split):
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(y, x, a, b)
        for g, r in zip(got, want):
            assert g.shape == r.shape and g.dtype == r.dtype
            assert bool(jnp.all(jnp.isfinite(g)))  # NaN padding gets zero gradient, never NaN
            assert rel_err(g, r) < 1e-4


def test_multi_slice_shares_x():
    x, y, a, b, slot_ids, ranks = make_inputs(7, [5, 9, 0, 11], 128, 256, 16, jnp.float32)
    _, y2, a2, b2, _, ranks2 = make_inputs(8, [5, 9, 0, 11], 128, 128, 16, jnp.float32)  # O differs
    outs = lora.lora_shrink_expand_multi(
        (y, y2), x, ((a, b), (a2, b2)), slot_ids, (ranks, ranks2), backend="triton", interpret=True
    )
    for out, yy, aa, bb, rr in zip(outs, (y, y2), (a, a2), (b, b2), (ranks, ranks2)):
        want = ref_lora_expand(yy, ref_lora_shrink(x, aa, slot_ids, rr), bb, slot_ids, rr)
        assert out.shape == yy.shape and rel_err(out, want) < 1e-5
    hs = lora.lora_shrink_multi(x, (a, a2), slot_ids, (ranks, ranks2), backend="triton", interpret=True)
    assert rel_err(hs[1], ref_lora_shrink(x, a2, slot_ids, ranks2)) < 1e-5
    with pytest.raises(ValueError, match="pairs"):
        lora.lora_shrink_expand_multi((y,), x, ((a, b), (a2, b2)), slot_ids, ranks)


def _slice_like(seed, ranks, t, hidden, out_dim, r_max, dtype):
    """Another projection's y, A and B for the same slots (same ranks, NaN padding beyond them)."""
    rng = np.random.default_rng(seed)
    s = len(ranks)
    a = rng.standard_normal((s, hidden, r_max)).astype(np.float32) / np.sqrt(hidden)
    b = rng.standard_normal((s, r_max, out_dim)).astype(np.float32)
    for i, r in enumerate(np.asarray(ranks)):
        a[i, :, r:] = np.nan
        b[i, r:, :] = np.nan
    y = rng.standard_normal((t, out_dim)).astype(np.float32)
    return jnp.asarray(y, dtype), jnp.asarray(a, dtype), jnp.asarray(b, dtype)


@pytest.mark.parametrize("form,dtype,delta", [("decode", jnp.float32, False), ("decode", jnp.bfloat16, False),
                                              ("decode", jnp.float32, True), ("decode", jnp.bfloat16, True),
                                              ("prefill", jnp.float32, False), ("segment", jnp.bfloat16, False),
                                              ("segment", jnp.float32, True), ("segment", jnp.bfloat16, True)])
@SETTINGS
@given(groups=group_sizes_st, seed=st.integers(0, 2**31 - 1))
def test_multi_slice_one_bank_matches_reference(form, dtype, delta, groups, seed):
    """q/k/v-like slices (widths 384, 128, 128) over one bank: one shrink + one expand launch (decode); with
    ``delta`` the expand writes the deltas (zero rows for rank 0) and XLA adds them."""
    x, y, a, b, slot_ids, ranks = make_inputs(seed, groups, 256, 384, 16, dtype)
    t = x.shape[0]
    y2, a2, b2 = _slice_like(seed + 1, ranks, t, 256, 128, 16, dtype)
    y3, a3, b3 = _slice_like(seed + 2, ranks, t, 256, 128, 16, dtype)
    ys, adapters = (y, y2, y3), ((a, b), (a2, b2), (a3, b3))
    run = jax.jit(functools.partial(lora.lora_shrink_expand_multi, backend="triton", form=form, interpret=True,
                                    delta=delta))
    outs = run(ys, x, adapters, slot_ids, ranks)
    base = np.asarray(ranks)[np.asarray(slot_ids)] == 0
    for out, yy, (aa, bb) in zip(outs, ys, adapters):
        want = ref_lora_expand(yy, ref_lora_shrink(x, aa, slot_ids, ranks), bb, slot_ids, ranks)
        assert out.shape == yy.shape and out.dtype == yy.dtype and bool(jnp.all(jnp.isfinite(out)))
        assert rel_err(out - yy, want - yy) < tol(dtype)
        np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(yy)[base])   # rank 0: untouched


@pytest.mark.parametrize("form,delta", [("decode", False), ("decode", True), ("segment", True)])
def test_multi_slice_gradients_match_reference(form, delta):
    x, y, a, b, slot_ids, ranks = make_inputs(3, [4, 7, 0, 9], 128, 256, 16, jnp.float32)
    y2, a2, b2 = _slice_like(4, ranks, x.shape[0], 128, 128, 16, jnp.float32)
    w = (jax.random.normal(jax.random.key(1), y.shape), jax.random.normal(jax.random.key(2), y2.shape))

    def loss(fn, ys, x_, a_, b_, a2_, b2_):
        outs = fn(ys, x_, ((a_, b_), (a2_, b2_)))
        return sum(jnp.sum(wi * o) for wi, o in zip(w, outs))

    kernel = functools.partial(lora.lora_shrink_expand_multi, slot_ids=slot_ids, ranks=ranks, backend="triton",
                               form=form, interpret=True, delta=delta)

    def reference(ys, x_, adapters):
        return tuple(ref_lora_expand(yy, ref_lora_shrink(x_, aa, slot_ids, ranks), bb, slot_ids, ranks)
                     for yy, (aa, bb) in zip(ys, adapters))

    args = ((y, y2), x, a, b, a2, b2)
    got = jax.jit(jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3, 4, 5)))(*args)
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2, 3, 4, 5))(*args)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == r.shape and bool(jnp.all(jnp.isfinite(g))) and rel_err(g, r) < 1e-4


def test_inside_shard_map():
    """The ops are pure functions of local arrays: tokens sharded over every available device."""
    devs = jax.devices()
    n = len(devs)
    x, y, a, b, slot_ids, ranks = make_inputs(3, [4 * n, 3 * n, 5 * n], 128, 256, 16, jnp.float32)
    mesh = jax.sharding.Mesh(np.array(devs), ("data",))
    p_tok = jax.sharding.PartitionSpec("data")
    p_rep = jax.sharding.PartitionSpec()

    def step(y_, x_, a_, b_, s_, r_, form, check_vma):
        f = functools.partial(lora.lora_shrink_expand, backend="triton", form=form, interpret=True)
        return jax.shard_map(
            f, mesh=mesh, in_specs=(p_tok, p_tok, p_rep, p_rep, p_tok, p_rep), out_specs=p_tok,
            check_vma=check_vma,
        )(y_, x_, a_, b_, s_, r_)

    want = ref_lora_expand(y, ref_lora_shrink(x, a, slot_ids, ranks), b, slot_ids, ranks)
    for form in ("decode", "prefill"):
        # Typing with check_vma=True (the compiled path): output specs carry the inputs' varying axes.
        spec = jax.eval_shape(functools.partial(step, form=form, check_vma=True), y, x, a, b, slot_ids, ranks)
        assert spec.shape == y.shape and spec.dtype == y.dtype
        # The Pallas interpreter itself does not support check_vma=True (jax 0.11.2), hence False here.
        out = jax.jit(functools.partial(step, form=form, check_vma=False))(y, x, a, b, slot_ids, ranks)
        assert rel_err(out, want) < 1e-5


@settings(max_examples=6, deadline=None)
@given(slots=st.lists(st.integers(0, 6), min_size=1, max_size=300), block_m=st.sampled_from([1, 4, 16, 64]),
       chunk=st.sampled_from([None, 32]), parts=st.sampled_from([None, 1, 3, 8]))
def test_segment_tiles_cover_every_token_once(slots, block_m, chunk, parts):
    """The jnp grouping's invariants, and the counting-sort kernel (interpret mode) equal to it."""
    ranks = jnp.asarray([0, 4, 16, 8, 0, 16, 1], jnp.int32)
    slot_ids = jnp.asarray(slots, jnp.int32)
    tiles = jax.jit(grouping.ref_segment_tiles, static_argnums=2)(slot_ids, ranks, block_m)
    tokens, length, slot, rank = (np.asarray(v) for v in tiles)
    assert tokens.shape == (max_segment_tiles(len(slots), 7, block_m), block_m)
    used = length > 0
    assert used.sum() == sum(-(-slots.count(s) // block_m) for s in set(slots))   # the fewest live tiles
    assert np.all(rank[~used] == 0) and np.all(slot[~used] == 0) and np.all(tokens[~used] == 0)
    covered, order = [], []
    for toks, n, s, r in zip(tokens[used], length[used], slot[used], rank[used]):
        assert 1 <= n <= block_m and r == ranks[s]
        assert np.all(np.asarray(slots)[toks] == s)                               # one slot per tile
        assert np.all(toks[n:] == toks[n - 1])                                    # padding repeats the last
        covered += toks[:n].tolist()
        order.append((s, toks[0]))
    assert sorted(covered) == list(range(len(slots)))                             # every token exactly once
    assert covered == sorted(covered, key=lambda t: slots[t])                     # by slot, stable inside
    kernel = jax.jit(functools.partial(grouping.segment_tiles_triton, block_m=block_m, chunk=chunk, parts=parts,
                                       interpret=True))(slot_ids, ranks)
    for name, want, got in zip(tiles._fields, tiles, kernel):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)


@pytest.mark.parametrize("parts", [None, 2, 3, 8])
def test_segment_tiles_split_over_parts_equal_the_reference(parts, monkeypatch):
    """Each slot's scatter split over several programs (``parts``; the default from GROUPING_PART_TOKENS, made
    small here so it splits, and a count that does not divide T): the same tiles as the jnp grouping."""
    monkeypatch.setattr(grouping, "GROUPING_PART_TOKENS", 256)                       # default: 4 parts at T = 1000
    rng = np.random.default_rng(3)
    ranks = jnp.asarray([0, 16, 8, 16, 4, 16], jnp.int32)
    slot_ids = jnp.asarray(rng.integers(0, 6, 1000), jnp.int32)
    want = grouping.ref_segment_tiles(slot_ids, ranks, 16)
    got = grouping.segment_tiles_triton(slot_ids, ranks, 16, parts=parts, chunk=256, interpret=True)
    for name, w, g in zip(want._fields, want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_slots=st.integers(1, 4), t=st.integers(1, 48))
def test_compacted_tiles_keep_every_live_tile(seed, n_slots, t):
    """A batch over P of a large bank's slots: ``compact_segment_tiles`` to T // block_m + P tiles keeps every
    live tile (the segment kernels' results unchanged, delta form), and its grid drops the empty ones."""
    rng = np.random.default_rng(seed)
    bank_slots, block_m = 20, 16
    present = rng.choice(bank_slots, n_slots, replace=False)                      # slot 0 among them, or not
    groups = np.zeros(bank_slots, np.int64)
    groups[present] = np.bincount(rng.choice(n_slots, t), minlength=n_slots)
    x, y, a, b, slot_ids, ranks = make_inputs(seed, list(groups), 64, 128, 16, jnp.float32)
    tiles = lora.segment_tiles_for(slot_ids, ranks, 16, form="segment", backend="triton", interpret=True)
    cut = compact_segment_tiles(tiles, t // block_m + n_slots)
    assert cut.length.shape[0] == min(t // block_m + n_slots, tiles.length.shape[0])
    assert int(jnp.sum(cut.length)) == t                                          # every token, once
    run = jax.jit(functools.partial(lora.lora_shrink_expand_multi, backend="triton", form="segment", interpret=True,
                                    delta=True))
    (full,), (compact,) = run((y,), x, ((a, b),), slot_ids, ranks, tiles=tiles), run((y,), x, ((a, b),), slot_ids,
                                                                                  ranks, tiles=cut)
    np.testing.assert_array_equal(np.asarray(compact), np.asarray(full))


def test_segment_form_validation():
    x, y, a, b, slot_ids, ranks = make_inputs(1, [3, 4, 2], 128, 128, 16, jnp.float32)
    kw = dict(backend="triton", form="segment", interpret=True)
    for delta in (False, True):
        with pytest.raises(ValueError, match="R >= 16"):
            lora.lora_shrink_expand_multi((y,), x, ((a[:, :, :8], b[:, :8]),), slot_ids, ranks, delta=delta, **kw)
    with pytest.raises(ValueError, match="R >= 16"):   # on the reference backend too
        lora.lora_shrink_expand_multi((y,), x, ((a[:, :, :8], b[:, :8]),), slot_ids, ranks, form="segment")
    # auto groups from SEGMENT_MIN_TOKENS tokens for the delta op, from PREFILL_MIN_TOKENS in place (R >= 16)
    assert lora.multi_form("auto", lora.SEGMENT_MIN_TOKENS, 16, True) == "segment"
    assert lora.multi_form("auto", lora.SEGMENT_MIN_TOKENS - 1, 16, True) == "decode"
    assert lora.multi_form("auto", lora.SEGMENT_MIN_TOKENS, 8, True) == "decode"
    assert lora.multi_form("auto", lora.SEGMENT_MIN_TOKENS, 16, False) == "decode"
    assert lora.multi_form("auto", lora.PREFILL_MIN_TOKENS, 16, False) == "segment"
    assert lora.multi_form("prefill", 1, 16, False) == "segment"                    # one form, two names
    assert lora.segment_block_m(lora.PREFILL_MIN_TOKENS - 1, 16) == lora.SEGMENT_BLOCK_M
    assert lora.segment_block_m(lora.PREFILL_MIN_TOKENS, 64) == lora.PREFILL_BLOCK_M[0]
    assert lora.segment_block_m(lora.PREFILL_MIN_TOKENS, 16) == lora.PREFILL_BLOCK_M[1]
    assert lora.segment_tiles_for(slot_ids, ranks, 16) is None                      # CPU: the reference runs
    assert lora.segment_tiles_for(slot_ids, ranks, 16, form="segment", backend="triton", interpret=True) is not None


def test_backend_resolution_and_validation():
    x, y, a, b, slot_ids, ranks = make_inputs(1, [3, 4, 2], 128, 128, 16, jnp.float32)
    assert lora.resolve_backend(None) == "reference"  # CPU platform
    assert lora.resolve_backend("tpu") == "tpu"
    with pytest.raises(ValueError, match="backend"):
        lora.lora_shrink(x, a, slot_ids, ranks, backend="cuda")
    with pytest.raises(ValueError, match="form"):
        lora.lora_shrink(x, a, slot_ids, ranks, backend="triton", form="fast", interpret=True)
    with pytest.raises(ValueError, match="x has shape"):
        lora.lora_shrink(x[0], a, slot_ids, ranks)
    with pytest.raises(ValueError, match="a has shape"):
        lora.lora_shrink(x, a[:, :64], slot_ids, ranks)
    with pytest.raises(ValueError, match="slot_ids"):
        lora.lora_shrink(x, a, slot_ids[:-1], ranks)
    with pytest.raises(ValueError, match="ranks"):
        lora.lora_expand(y, jnp.zeros((x.shape[0], 16)), b, slot_ids, ranks[:-1])
    # A shape the Triton kernels cannot take: forced -> ValueError, auto -> the reference.
    a12 = jnp.zeros((3, 128, 12), jnp.float32)
    with pytest.raises(ValueError, match="power of two"):
        lora.lora_shrink(x, a12, slot_ids, ranks, backend="triton", interpret=True)
    with pytest.raises(ValueError, match="prefill form needs R >= 16"):
        lora.lora_shrink(x, a[:, :, :8], slot_ids, ranks, backend="triton", form="prefill", interpret=True)


def test_prefill_sized_calls_use_wide_tiles():
    """From PREFILL_MIN_TOKENS the segment form runs with PREFILL_BLOCK_M-row tiles (the prefill path of the
    engine and of ``lora_shrink_expand``): in place and as deltas, against the reference; R = 16 and 32. The
    delta runs several O-blocks per program (512 columns: two blocks of 256 at R = 16, four of 128 at R = 32)."""
    t = lora.PREFILL_MIN_TOKENS + 40
    assert lora.segment_delta_blocks(t, 16, [512]) == (256, 2)
    assert lora.segment_delta_blocks(t, 32, [512]) == (128, 4)
    assert lora.segment_delta_blocks(t, 16, [256, 512]) == (256, 1)     # o_blocks divides every slice's blocks
    assert lora.segment_delta_blocks(t, 32, [256, 512]) == (128, 2)
    for dims in ([512], [512, 96]):  # decode-sized (DECODE_DELTA_BLOCKS): one block, the kernel's default width
        assert lora.segment_delta_blocks(t - 41, 16, dims) == (expand.seg_delta_block_n(dims), 1)
    # Where XLA sums the shrink's H-slices (R > 16 from PREFILL_MIN_TOKENS), the shrink aims at fewer programs:
    # one H-slice once the full tiles alone make SEGMENT_SUMMED_PROGRAMS (8192 tokens of 64-row tiles), so
    # nothing is left to sum. At R = 16 and at decode sizes the split stays as it was.
    def n_split(tokens, r_max):
        programs = lora.segment_shrink_programs(tokens, r_max)
        return shrink.seg_block_sizes(tokens, 4096, 1, lora.segment_block_m(tokens, r_max), programs)[1]

    assert [n_split(tk, 64) for tk in (2048, 4096, 8192)] == [4, 2, 1]
    assert [n_split(tk, 16) for tk in (2048, 4096, 8192)] == [8, 4, 2]
    assert lora.segment_shrink_programs(t - 41, 64) == shrink.SEG_PROGRAMS
    for r_max in (16, 32):
        x, y, a, b, slot_ids, ranks = make_inputs(5, [t // 4, t // 2, t - 3 * (t // 4)], 128, 512, r_max,
                                                  jnp.float32)
        tiles = lora.segment_tiles_for(slot_ids, ranks, r_max, delta=False, backend="triton", interpret=True)
        assert tiles.tokens.shape[1] == lora.PREFILL_BLOCK_M[r_max <= 16]
        want = ref_lora_expand(y, ref_lora_shrink(x, a, slot_ids, ranks), b, slot_ids, ranks)
        fused = jax.jit(functools.partial(lora.lora_shrink_expand, backend="triton", interpret=True))
        assert rel_err(fused(y, x, a, b, slot_ids, ranks) - y, want - y) < 1e-5
        (out,) = lora.lora_shrink_expand_multi((y,), x, ((a, b),), slot_ids, ranks, backend="triton",
                                               interpret=True, delta=True, tiles=tiles)
        assert rel_err(out - y, want - y) < 1e-5


@pytest.mark.parametrize("in_place", [False, True])
def test_segment_delta_several_o_blocks_per_program(in_place):
    """``o_blocks`` (O-blocks per program of the segment delta/expand, h loaded once for all of them) gives the
    single-block result for two slices (8 and 4 blocks of 32 columns: groups of 2 and 4; the blocks as a loop),
    NaN padding and rank-0 tokens included; a count that does not divide a slice's blocks is refused."""
    x, y, a, b, slot_ids, ranks = make_inputs(7, [9, 30, 0, 17, 5], 128, 256, 16, jnp.float32)
    y2, a2, b2 = _slice_like(8, ranks, x.shape[0], 128, 128, 16, jnp.float32)
    tiles = grouping.segment_tiles_triton(slot_ids, ranks, 16, interpret=True)
    hp = shrink.seg_shrink_partials_multi(x, (a, a2), tiles, interpret=True)
    want = [ref_lora_expand(yy, ref_lora_shrink(x, aa, slot_ids, ranks), bb, slot_ids, ranks) - yy
            for yy, aa, bb in ((y, a, b), (y2, a2, b2))]
    for o_blocks in (1, 2, 4):
        kw = dict(block_n=32, o_blocks=o_blocks, interpret=True)
        if in_place:
            outs = expand.seg_expand_multi((y, y2), hp, (b, b2), tiles, **kw)
            outs = [o - yy for o, yy in zip(outs, (y, y2))]
        else:
            outs = expand.seg_delta_multi(y.dtype, hp, (b, b2), tiles, **kw)
        for got, w in zip(outs, want):
            assert bool(jnp.all(jnp.isfinite(got))) and rel_err(got, w) < 1e-5, o_blocks
    with pytest.raises(ValueError, match="o_blocks=8 must divide"):
        expand.seg_delta_multi(y.dtype, hp, (b, b2), tiles, block_n=32, o_blocks=8, interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_shrink_spec_load_and_token_ranks(dtype):
    """The decode shrink with A's rows loaded before the rank is known (``spec_load``) or after it, over
    several H-slices: the reference's h, NaN padding (columns >= rank, all of an empty slot's columns) dropped.
    The token ranks it hands out equal ranks[slot_ids], and the expand given them (one load fewer per
    program) equals the expand that looks each rank up; rank-0 rows of y untouched."""
    x, y, a, b, slot_ids, ranks = make_inputs(11, [6, 9, 0, 12, 5, 7], 256, 384, 16, dtype)
    want_h = ref_lora_shrink(x, a, slot_ids, ranks)
    want = ref_lora_expand(y, want_h, b, slot_ids, ranks)
    for spec_load in (False, True):
        hp, token_ranks = shrink.bgmv_shrink_partials(x, a, slot_ids, ranks, block_k=32, n_split=4,
                                                      spec_load=spec_load, token_ranks=True, interpret=True)
        assert hp.shape == (4, x.shape[0], 16) and bool(jnp.all(jnp.isfinite(hp)))
        assert rel_err(jnp.sum(hp, axis=0), want_h) < tol(dtype), spec_load
        np.testing.assert_array_equal(np.asarray(token_ranks), np.asarray(ranks)[np.asarray(slot_ids)])
        out = expand.bgmv_expand(y, hp, b, slot_ids, ranks, block_n=128, token_ranks=token_ranks, interpret=True)
        assert bool(jnp.all(jnp.isfinite(out))) and rel_err(out - y, want - y) < tol(dtype), spec_load
        looked_up = expand.bgmv_expand(y, hp, b, slot_ids, ranks, block_n=128, interpret=True)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(looked_up))
        base = np.asarray(token_ranks) == 0
        np.testing.assert_array_equal(np.asarray(out)[base], np.asarray(y)[base])
