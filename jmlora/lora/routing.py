"""Per-sequence LoRA routing: each row of a batch gets the adapter in its bank slot.

``lora_delta`` computes ``expand(shrink(x, A[slot]), B[slot])`` for every token, with one of several
formulations behind one function (``impl``):

- ``"gather"``: gather each sequence's A and B (``[B, in, R]``), two batched einsums.
- ``"onehot"``: every token against every slot's A, masked by a one-hot of its slot, then against all of B.
  Reads each slot's weights once (no per-row copies) at the cost of ``S`` times the (tiny) low-rank flops;
  decode-only (``T == 1``), where its extra flops are negligible.
- ``"ragged"``: tokens sorted by slot and two ``lax.ragged_dot`` grouped matmuls (SGMV-like).
- ``"pallas"``: the gathered low-rank Pallas kernels of ``pallas_kernels.lora``, the form picked per shape
  (BGMV or segment); off GPU/TPU their jnp reference.
- ``"pallas_decode"``, ``"pallas_segment"``: the same with the GPU form forced (one program per token, or
  tiles of same-adapter tokens); off GPU/TPU the Triton kernels run in the Pallas interpreter (tests).

Not a user choice: ``FEW_SEGMENT_IMPL`` ("pallas_segment_few"), what the engine's runner picks for a decode
batch it knows holds at most ``FEW_ADAPTERS`` adapters (``decode_impl``): the segment form over only the tiles
such a batch can fill.

Measured choices are in ``benchmarks/RESULTS.md``; ``default_impl`` holds the winner per shape and platform.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jmlora.lora.bank import AdapterBank, TargetBank

Array = jax.Array

LORA_IMPLS = ("gather", "onehot", "ragged", "pallas", "pallas_decode", "pallas_segment")
FEW_SEGMENT_IMPL = "pallas_segment_few"
PACKED_IMPL = "mgpu_packed"  # PACKED_LORA_GEMM's; the projections it does not cover run the segment kernels
_PALLAS_FORMS = {"pallas": "auto", "pallas_decode": "decode", "pallas_segment": "segment", FEW_SEGMENT_IMPL: "segment",
                 PACKED_IMPL: "segment"}


def _pallas_options(impl: str) -> dict:
    """``pallas_kernels.lora`` keyword arguments of a "pallas*" impl."""
    form = _PALLAS_FORMS[impl]
    if form == "auto" or jax.default_backend() in ("gpu", "cuda", "rocm", "tpu"):
        return dict(form=form)
    return dict(form=form, backend="triton", interpret=True)


def default_impl(num_new_tokens: int, batch: int, platform: str) -> str:
    """The formulation measured fastest for a shape (benchmarks/RESULTS.md, "LoRA routing").

    Prefill (T > 1): "gather" on CPU and on the H200 (41 us vs 64 us Pallas, 172 us ragged_dot at 4 x 512
    tokens). Decode: on GPU the Pallas BGMV kernels at every batch size (37 vs 53 us one-hot, 79 us gather at
    64 rows, r = 16; alone, one-hot won at 256 rows, 64 vs 79 us, but inside the decode step XLA re-lays-out
    the whole bank for its einsum every step: 7 ms of copies per step at batch 256, "Decode step profile");
    on CPU "onehot" (2-4x faster than gather).
    """
    del batch
    if num_new_tokens > 1:
        return "gather"
    return "pallas" if platform == "gpu" else "onehot"


# A GPU decode batch of at least FEW_ADAPTERS_MIN_BATCH rows that holds at most FEW_ADAPTERS distinct adapters
# (which only the host knows) runs the segment form over compacted tiles (``FEW_SEGMENT_IMPL``). Measured on the
# H200 (benchmarks/RESULTS.md):
# - twelfth session, 64 rows: grouping 8 shared adapters paid (6.33 -> 5.94 ms per step at 192 tokens, 8.58 ->
#   8.20 at 1152), 64 distinct did not (7.11 -> 7.26, 9.37 -> 9.50 ms); "auto" groups every batch from
#   ``pallas_kernels.lora.SEGMENT_MIN_TOKENS`` (128) rows anyway;
# - twenty-third session: the grouping lays out T / 16 + 65 tiles at decode (65 bank slots), and each is a
#   program of every segment kernel, live or empty; a batch over at most 8 adapters fills at most T / 16 + 9.
#   Only those: 8 shared adapters back to back +12.1-13.1% -> +9.1% over the base step at batch 64 / 192
#   tokens, +16.8-19.9% -> +13.3% at 128, +8.3-9.1% -> +6.2% and +7.1-7.5% -> +6.1% with 1152 tokens;
# - twenty-fourth session, 32 rows (where "auto" is otherwise the per-token form): +10.4% -> +9.3% at 192 tokens,
#   +7.5% -> +6.5% at 1152 (the per-token form itself, forced, timed again in the same process: +10.6%, +7.1%).
FEW_ADAPTERS_MIN_BATCH = 32        # rows
FEW_ADAPTERS = 8


def count_adapters(slot_ids: np.ndarray) -> int:
    """Distinct adapters among a batch's host-side slot ids (slot 0, no adapter, not counted)."""
    return len(np.unique(slot_ids[slot_ids > 0]))


# Opt-in, off because it is slower (``benchmarks/throughput.py --decode-gemm mgpu-lora``): a GPU decode batch over 1
# to FEW_ADAPTERS adapters of rank 16 runs each projection and its LoRA terms in one Mosaic GPU launch
# (``pallas_kernels.ws_lora``) where that kernel's table holds the shape, with the batch's adapters packed side by
# side once per decode call (``pack_adapters``), and the few-adapter segment form elsewhere (``PACKED_IMPL``).
# On the H200 it is correct, but in the step it was slower than the segment kernels beside cuBLAS at 128 rows
# (8 shared adapters: +0.42 ms at 192 tokens, +0.47 at 1152) and tied at 256 / 192. Its GEMM trails cuBLAS, its
# LoRA terms cost more in the step than alone, and JAX re-zeroes its semaphores every launch
# (benchmarks/RESULTS.md, "Twenty-ninth session").
# One device only, as ``decoder.DECODE_GEMM_IMPL = "mgpu"``: a pallas_call is not partitioned over a mesh.
PACKED_LORA_GEMM = False


def decode_impl(impl: str, batch: int, num_adapters: int, platform: str, rank: int) -> str:
    """The LoRA formulation for a decode step whose rows hold ``num_adapters`` distinct adapters (the host
    knows them: the runner picks the step's executable with this).

    "auto" becomes ``FEW_SEGMENT_IMPL`` on GPU from ``FEW_ADAPTERS_MIN_BATCH`` rows when the batch holds 1 to
    ``FEW_ADAPTERS`` adapters and the bank's rank ``rank`` suits the segment kernels (a power of two >= 16: one
    tensor-core dot); anything else is returned unchanged (resolved later by ``resolve_impl``). With
    ``PACKED_LORA_GEMM``, such a batch of rank 16 (8 adapters: the kernel's 128 packed columns) gets
    ``PACKED_IMPL`` instead, at any batch size.
    """
    if PACKED_LORA_GEMM and impl == "auto" and platform == "gpu" and rank == 16 and 0 < num_adapters <= FEW_ADAPTERS:
        return PACKED_IMPL
    if (impl == "auto" and platform == "gpu" and batch >= FEW_ADAPTERS_MIN_BATCH and rank >= 16
            and rank & (rank - 1) == 0 and 0 < num_adapters <= FEW_ADAPTERS):
        return FEW_SEGMENT_IMPL
    return impl


@flax.struct.dataclass
class LoRABatch:
    """The adapter inputs of one forward: the bank and each sequence's slot (0 = no adapter).

    Attributes:
      bank: the adapter bank.
      slot_ids: ``[B]`` int32 slot of each batch row.
      tiles: ``segment_tiles`` already built for these slots, the forward's token count and its LoRA impl, or
        None (the forward builds them). A multi-step decode call builds them once for all its steps.
      packed: with ``PACKED_IMPL``, ``pack_adapters`` of these slots (built once per decode call likewise).
    """

    bank: AdapterBank
    slot_ids: Array
    tiles: Any = None
    packed: Any = None


def resolve_impl(impl: str, num_new_tokens: int, batch: int = 1) -> str:
    """Maps "auto" to the measured default for the shape on this platform (``default_impl``); validates names.
    ``FEW_SEGMENT_IMPL`` and ``PACKED_IMPL`` (from ``decode_impl``) are accepted too."""
    if impl == "auto":
        return default_impl(num_new_tokens, batch, jax.default_backend())
    if impl not in LORA_IMPLS and impl not in (FEW_SEGMENT_IMPL, PACKED_IMPL):
        raise ValueError(f"lora impl must be 'auto' or one of {LORA_IMPLS}, got {impl!r}")
    return impl


def lora_delta(x: Array, tb: TargetBank, slot_ids: Array, ranks: Array, impl: str) -> Array:
    """The LoRA term of one projection for every token.

    Args:
      x: ``[B, T, in]`` projection input.
      tb: the target's bank, ``a [S, in, R]``, ``b [S, R, out]``.
      slot_ids: ``[B]`` int32 slot of each row.
      ranks: ``[S]`` int32 true rank of each slot.
      impl: one of ``LORA_IMPLS``.

    Returns:
      ``[B, T, out]`` in x's dtype. The shrink result is rounded to x's dtype before the expand, as PEFT
      does when it runs ``lora_B(lora_A(x))`` in the model's dtype.
    """
    B, T, n_in = x.shape
    if impl == "gather":
        a = tb.a[slot_ids]                                                              # [B, in, R]
        b = tb.b[slot_ids]                                                              # [B, R, out]
        h = jnp.einsum("bti,bir->btr", x, a)
        return jnp.einsum("btr,bro->bto", h, b)
    if impl == "onehot":
        S = tb.a.shape[0]
        onehot = jax.nn.one_hot(slot_ids, S, dtype=x.dtype)                              # [B, S]
        h = jnp.einsum("bti,sir->btsr", x, tb.a)
        h = h * onehot[:, None, :, None]                                                # [B, T, S, R]
        return jnp.einsum("btsr,sro->bto", h, tb.b)
    if impl == "ragged":
        S = tb.a.shape[0]
        token_slots = jnp.repeat(slot_ids, T)                                           # [N]
        order = jnp.argsort(token_slots, stable=True)
        group_sizes = jnp.bincount(token_slots, length=S).astype(jnp.int32)            # [S]
        xs = x.reshape(B * T, n_in)[order]                                              # [N, in]
        h = jax.lax.ragged_dot(xs, tb.a, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
        ys = jax.lax.ragged_dot(h, tb.b, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
        y = jnp.zeros_like(ys).at[order].set(ys)                                        # unsort
        return y.reshape(B, T, -1)
    if impl in _PALLAS_FORMS:
        if impl != "pallas":  # a forced GPU form: the fused multi-slice op, whose h is not rounded in between
            return apply_lora(jnp.zeros((B, T, tb.b.shape[-1]), x.dtype), x, tb, slot_ids, ranks, impl)
        from pallas_kernels.lora import lora_expand, lora_shrink

        token_slots = jnp.repeat(slot_ids, T)
        xf = x.reshape(B * T, n_in)
        h = lora_shrink(xf, tb.a, token_slots, ranks).astype(x.dtype)
        y = lora_expand(jnp.zeros((B * T, tb.b.shape[-1]), x.dtype), h, tb.b, token_slots, ranks)
        return y.reshape(B, T, -1).astype(x.dtype)
    raise ValueError(f"unknown lora impl {impl!r}")


def prepare_lora(lora: LoRABatch | None, num_new_tokens: int, impl: str, num_kv_heads: int | None = None
                 ) -> LoRABatch | None:
    """``lora`` with what a forward with LoRA impl ``impl`` (resolved) builds from the slots once, before its
    layers: the segment tiles (``segment_tiles``), and with ``PACKED_IMPL`` at decode the packed adapters
    (``pack_adapters``, which needs the model's ``num_kv_heads``). Already built: unchanged, so a multi-step
    decode call prepares once for all its steps."""
    if lora is None or lora.tiles is not None or lora.packed is not None:
        return lora
    if impl == PACKED_IMPL and num_new_tokens == 1:  # the segment tiles only where a projection falls back
        if num_kv_heads is None:
            raise ValueError(f"prepare_lora with {PACKED_IMPL!r} needs the model's num_kv_heads")
        return lora.replace(packed=pack_adapters(lora, num_kv_heads))
    return lora.replace(tiles=segment_tiles(lora, num_new_tokens, impl))


# The projections that share an input, by the name of their group in ``pack_adapters``, in the order of the
# decoder's fused outputs.
PACKED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                 "down": ("down_proj",)}
# A's packed columns per group, padded with zeros to the widest CTA tile ``pallas_kernels.ws_lora.WS_LORA_TABLE``
# gives the group (gate/up at 256 rows: 256), once per decode call; narrower tiles read the first columns. The
# kernel would otherwise pad a copy per projection and step (~6 MB per layer there).
PACKED_A_COLUMNS = {"gate_up": 256}


def pack_adapters(lora: LoRABatch, num_kv_heads: int) -> dict:
    """A decode batch's adapters (at most ``FEW_ADAPTERS``: the runner picks ``PACKED_IMPL`` only for batches it
    knows hold no more) side by side, for ``pallas_kernels.ws_lora``.

    Returns:
      ``{"pos": [B] int32 each row's adapter position in the pack (-1: slot 0, no adapter), "layers": per layer,
      {group: (a [T, in, max(8 R, PACKED_A_COLUMNS[group])], b [8 R, out])}}`` for each ``PACKED_GROUPS`` group whose
      targets the bank all holds; b's columns in the decoder's fused output layout (``w_qkv``'s [E, K, G + 2,
      D]: per KV head its q heads, then k, then v; ``w_gate_up``'s gate then up). Unused pack positions hold slot
      0's (zero) adapter.
    """
    S = lora.bank.num_slots
    ids = lora.slot_ids
    live = jnp.unique(jnp.where(ids > 0, ids, S), size=FEW_ADAPTERS, fill_value=S)         # sorted; S: unused
    pos = jnp.where(ids > 0, jnp.argmax(ids[:, None] == live[None, :], axis=1), -1).astype(jnp.int32)
    slots = jnp.where(live < S, live, 0)

    def a_of(tb: TargetBank, columns: int) -> Array:                                       # [in, >= 8 R]
        a = jnp.transpose(tb.a[slots], (1, 0, 2)).reshape(tb.a.shape[1], -1)
        return jnp.pad(a, ((0, 0), (0, max(columns - a.shape[1], 0))))

    def b_of(tb: TargetBank) -> Array:                                                      # [8 R, out]
        return tb.b[slots].reshape(-1, tb.b.shape[2])

    layers = []
    for targets in lora.bank.layers:
        layer = {}
        for group, names in PACKED_GROUPS.items():
            if not all(t in targets for t in names):
                continue
            a = jnp.stack([a_of(targets[t], PACKED_A_COLUMNS.get(group, 0)) for t in names])
            bs = [b_of(targets[t]) for t in names]
            if group == "qkv":
                b = jnp.concatenate([b.reshape(b.shape[0], num_kv_heads, -1) for b in bs], axis=2)
                b = b.reshape(bs[0].shape[0], -1)
            else:
                b = jnp.concatenate(bs, axis=1)
            layer[group] = (a, b)
        layers.append(layer)
    return {"pos": pos, "layers": tuple(layers)}


def segment_tiles(lora: LoRABatch, num_new_tokens: int, impl: str):
    """The "pallas*" kernels' segment tiles for this batch (tokens grouped by slot), or None where they run
    another form. Built once per forward and shared by every layer's LoRA calls (``apply_lora``'s ``tiles``).

    With ``FEW_SEGMENT_IMPL`` the batch holds at most ``FEW_ADAPTERS`` adapters (the runner's guarantee), so at
    most FEW_ADAPTERS + 1 slots with slot 0: the live tiles are moved to the front and the empty rest dropped
    (``pallas_kernels._common.compact_segment_tiles``), so the kernels' grids skip them."""
    from pallas_kernels._common import compact_segment_tiles
    from pallas_kernels.lora import segment_tiles_for

    tb = next(iter(lora.bank.layers[0].values()), None) if lora.bank.layers else None
    if impl not in _PALLAS_FORMS or tb is None:
        return None
    token_slots = jnp.repeat(lora.slot_ids, num_new_tokens)
    tiles = segment_tiles_for(token_slots, lora.bank.ranks, tb.a.shape[2], **_pallas_options(impl))
    if tiles is not None and impl in (FEW_SEGMENT_IMPL, PACKED_IMPL):
        tiles = compact_segment_tiles(tiles, token_slots.shape[0] // tiles.tokens.shape[1] + FEW_ADAPTERS + 1)
    return tiles


def apply_lora(y: Array, x: Array, tb: TargetBank, slot_ids: Array, ranks: Array, impl: str,
               tiles=None) -> Array:
    """``y`` plus the LoRA term of one projection (``lora_delta``), in y's dtype.

    Args:
      y: ``[B, T, ...out]`` the base projection's output.
      x: ``[B, T, in]`` its input.
      tb, slot_ids, ranks, impl: as in ``lora_delta``.
      tiles: the "pallas*" impls only: ``segment_tiles`` of this batch (None: built inside when needed).

    The "pallas" formulation runs one shrink and one expand kernel; the shrink's float32 partial sums go
    straight into the expand, so h is not rounded to x's dtype in between as PEFT rounds it: the result is the
    more exact one. At decode the expand writes the delta and XLA adds it to y inside y's consumer (the
    residual add), as for the fused projections (``apply_lora_group``); against updating y in place it
    measured the same on the H200 (benchmarks/RESULTS.md, "Serving throughput"). The others add
    ``lora_delta``.
    """
    B, T = x.shape[:2]
    if impl in _PALLAS_FORMS:
        from pallas_kernels.lora import lora_shrink_expand_multi

        (out,) = lora_shrink_expand_multi((y.reshape(B * T, -1),), x.reshape(B * T, -1), ((tb.a, tb.b),),
                                          jnp.repeat(slot_ids, T), ranks, delta=True, tiles=tiles,
                                          **_pallas_options(impl))
        return out.reshape(y.shape)
    return y + lora_delta(x, tb, slot_ids, ranks, impl).reshape(y.shape).astype(y.dtype)


def apply_lora_group(ys: tuple[Array, ...], x: Array, tbs: tuple[TargetBank, ...], slot_ids: Array, ranks: Array,
                     impl: str, tiles=None) -> tuple[Array, ...]:
    """``apply_lora`` for projections that share their input x (q/k/v, gate/up).

    With "pallas" every projection's LoRA term comes from one shrink and one expand launch (decode form);
    the other formulations apply each projection in turn. At decode the kernels return deltas that XLA adds
    inside each output's consumer (as in ``apply_lora``): the ys are usually slices of one fused projection
    output, which updating in place would first copy out (``lora_shrink_expand_multi``'s ``delta``).
    """
    if impl not in _PALLAS_FORMS:
        return tuple(apply_lora(y, x, tb, slot_ids, ranks, impl, tiles) for y, tb in zip(ys, tbs))
    from pallas_kernels.lora import lora_shrink_expand_multi

    B, T = x.shape[:2]
    outs = lora_shrink_expand_multi(tuple(y.reshape(B * T, -1) for y in ys), x.reshape(B * T, -1),
                                    tuple((tb.a, tb.b) for tb in tbs), jnp.repeat(slot_ids, T), ranks, delta=True,
                                    tiles=tiles, **_pallas_options(impl))
    return tuple(o.reshape(y.shape) for o, y in zip(outs, ys))
