"""Token sampling on the device: penalties, temperature, min-p / top-k / top-p, per-row seeded draws, logprobs.

Plain jnp with static shapes, so it jits once per batch bucket and runs inside a multi-step decode loop
without going back to the host. One row per running sequence; padded rows are allowed (``None`` params).

The order of operations follows vLLM (v1 sampler):

1. ``log_softmax`` of the raw logits: the reported logprobs, ranks and top-k alternatives come from this
   distribution (vLLM's default "raw_logprobs" mode), whatever the penalties or filters do.
2. Penalties (only when ``needs_penalties``): repetition over prompt + output tokens (divide positive logits,
   multiply negative ones), then ``frequency * count`` and ``presence * (count > 0)`` over output tokens.
3. ``min_tokens``: while a row has generated fewer than ``min_tokens`` tokens, its EOS and stop token ids are
   masked out.
4. Greedy rows (temperature 0) take the argmax of these logits.
5. Others: divide by the temperature, then min-p (relative to the most likely token), top-k, then top-p over
   the distribution that min-p and top-k left (renormalised), as vLLM applies top-p after top-k.
6. Draw with the Gumbel-max trick: ``argmax(logits + Gumbel noise)`` is an exact sample of
   ``softmax(logits)``. The noise of a row comes from a key derived from (seed, step) only,
   ``fold_in(key(seed), step)``, so a seeded request draws the same tokens whatever else is in the batch
   and whichever row it sits in. (One ``fold_in``, not two: each threefry hash costs ~0.4 s of CPU
   compile time; other per-step randomness can use a different high key word, see ``row_keys``.)

Top-k / top-p without sorting the vocabulary: the thresholds come from ``lax.top_k(logits, top_k_cap)``
(default 256) plus one full-vocabulary reduction for the normaliser. A row is "covered" when its top-k is at
most the cap and its nucleus ends within the cap's candidates; if any row of the batch is not covered, a
``lax.cond`` computes the thresholds again from a full sort of the vocabulary, so the result is always
exact (the cap only moves the cost). ``top_k_cap >= V`` always sorts. Filtering is a threshold on the
(temperature-scaled) logit, so tokens tied with the last kept token are kept too (vLLM's top-k does the same;
its top-p breaks such exact ties by sort position). Which cap is fastest on a given accelerator is for the
benchmarks to measure; rows that need none of these filters skip them through static flags on
``SamplingTensors``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jmlora.engine.sampling_params import SamplingParams

Array = jax.Array

DEFAULT_TOP_K_CAP = 256
"""Candidates taken by ``lax.top_k`` before falling back to a full sort (see the module docstring)."""



def seed_to_uint32(seed: int) -> int:
    """Maps any Python int seed to the uint32 that keys the device PRNG.

    Seeds in ``[0, 2**32)`` map to themselves; others (negative or wider) are hashed
    (Fibonacci hashing of ``seed mod 2**64``), so every int is a valid seed.

    Args:
      seed: the request's seed.

    Returns:
      An int in ``[0, 2**32)``.
    """
    if 0 <= seed < 1 << 32:
        return seed
    return ((seed % (1 << 64)) * 0x9E3779B97F4A7C15 % (1 << 64)) >> 32


@flax.struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters on the device, one row per running sequence (padded rows allowed).

    Array fields are pytree leaves; the ``needs_*`` / ``all_greedy`` flags are static (part of the tree
    structure), so a jitted step compiles one variant per flag combination and skips unused work.

    Attributes:
      temperature: [B] f32, 0 for greedy rows (and padding).
      top_p: [B] f32, 1 = off.
      top_k: [B] i32, 0 = off.
      min_p: [B] f32, 0 = off.
      presence_penalty: [B] f32.
      frequency_penalty: [B] f32.
      repetition_penalty: [B] f32, 1 = off.
      seeds: [B] uint32 PRNG seed per row (see ``seed_to_uint32``).
      min_tokens: [B] i32, tokens to generate before a stop token may be sampled.
      stop_token_ids: [B, S] i32, the ids that ``min_tokens`` blocks (stop_token_ids + EOS), -1 padded.
      all_greedy: static, every row greedy: no noise, no filtering.
      needs_min_p: static, some sampled row has ``min_p > 0``.
      needs_top_k_top_p: static, some sampled row has top-k or top-p on.
      needs_penalties: static, some row has a penalty on (pass it as ``sample(needs_penalties=...)``).
      needs_min_tokens: static, some row has ``min_tokens > 0`` and stop ids to block.
    """

    temperature: Array
    top_p: Array
    top_k: Array
    min_p: Array
    presence_penalty: Array
    frequency_penalty: Array
    repetition_penalty: Array
    seeds: Array
    min_tokens: Array
    stop_token_ids: Array
    all_greedy: bool = flax.struct.field(pytree_node=False, default=True)
    needs_min_p: bool = flax.struct.field(pytree_node=False, default=False)
    needs_top_k_top_p: bool = flax.struct.field(pytree_node=False, default=False)
    needs_penalties: bool = flax.struct.field(pytree_node=False, default=False)
    needs_min_tokens: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams | None], seeds: Sequence[int], pad_to: int, *,
                    eos_token_ids: Sequence[int] = ()) -> SamplingTensors:
        """Builds the device tensors on the host (numpy), then moves them to the device.

        Args:
          params: one entry per row; None for a padded row (greedy, no penalties).
          seeds: one int per row, the seed of that row's draws: the request's ``seed`` for seeded requests,
            a random one the engine picked otherwise (any int; see ``seed_to_uint32``). Ignored for padding.
          pad_to: the batch size B (>= ``len(params)``); rows beyond ``params`` are padding.
          eos_token_ids: the model's EOS ids; with each row's ``stop_token_ids`` they are what ``min_tokens``
            blocks (also with ``ignore_eos``, as in vLLM).

        Returns:
          The ``SamplingTensors`` with B = ``pad_to`` rows.
        """
        if len(seeds) != len(params):
            raise ValueError(f"seeds must have one entry per row of params ({len(params)}), got {len(seeds)}")
        if pad_to < len(params):
            raise ValueError(f"pad_to must be >= len(params) = {len(params)}, got {pad_to}")
        B = pad_to
        temperature = np.zeros(B, np.float32)
        top_p = np.ones(B, np.float32)
        top_k = np.zeros(B, np.int32)
        min_p = np.zeros(B, np.float32)
        presence = np.zeros(B, np.float32)
        frequency = np.zeros(B, np.float32)
        repetition = np.ones(B, np.float32)
        seed_arr = np.zeros(B, np.uint32)
        min_tokens = np.zeros(B, np.int32)
        stop_lists: list[tuple[int, ...]] = [()] * B
        eos = tuple(int(t) for t in eos_token_ids)
        for i, p in enumerate(params):
            if p is None:
                continue
            if not p.greedy:       # greedy rows keep temperature 0 and no filters
                temperature[i] = p.temperature
                top_p[i] = p.top_p
                top_k[i] = max(p.top_k, 0)
                min_p[i] = p.min_p
            presence[i] = p.presence_penalty
            frequency[i] = p.frequency_penalty
            repetition[i] = p.repetition_penalty
            seed_arr[i] = seed_to_uint32(int(seeds[i]))
            min_tokens[i] = p.min_tokens
            if p.min_tokens > 0:
                stop_lists[i] = tuple(dict.fromkeys(p.stop_token_ids + eos))
        S = max(1, max(len(s) for s in stop_lists))
        S = 1 << (S - 1).bit_length()          # bucket to a power of two: few distinct shapes
        stop_ids = np.full((B, S), -1, np.int32)
        for i, s in enumerate(stop_lists):
            stop_ids[i, :len(s)] = s
        sampled = temperature > 0
        return cls(
            temperature=jnp.asarray(temperature), top_p=jnp.asarray(top_p), top_k=jnp.asarray(top_k),
            min_p=jnp.asarray(min_p), presence_penalty=jnp.asarray(presence),
            frequency_penalty=jnp.asarray(frequency), repetition_penalty=jnp.asarray(repetition),
            seeds=jnp.asarray(seed_arr), min_tokens=jnp.asarray(min_tokens), stop_token_ids=jnp.asarray(stop_ids),
            all_greedy=not sampled.any(),
            needs_min_p=bool((sampled & (min_p > 0)).any()),
            needs_top_k_top_p=bool((sampled & ((top_k > 0) | (top_p < 1))).any()),
            needs_penalties=bool(((presence != 0) | (frequency != 0) | (repetition != 1)).any()),
            needs_min_tokens=bool(((min_tokens > 0) & (stop_ids >= 0).any(axis=1)).any()),
        )


@flax.struct.dataclass
class SampleResult:
    """What ``sample`` returns.

    Attributes:
      token_ids: [B] i32 sampled tokens.
      logprobs: [B] f32 log-probability of the sampled token under ``log_softmax(raw logits)``.
      ranks: [B] i32 rank of the sampled token in that distribution (1 = most likely; ties share a rank).
      top_ids: [B, num_logprobs] i32 most likely tokens, or None when ``num_logprobs == 0``.
      top_logprobs: [B, num_logprobs] f32 their log-probabilities, or None.
    """

    token_ids: Array
    logprobs: Array
    ranks: Array
    top_ids: Array | None = None
    top_logprobs: Array | None = None


# ------------------------------------------------------------------------------------------------ penalties


def _ids_or_out_of_range(ids: Array, vocab_size: int, valid: Array | None = None) -> Array:
    """Maps negative (padding) ids, and ids where ``valid`` is False, to ``vocab_size`` (dropped by scatters)."""
    ok = (ids >= 0) if valid is None else (ids >= 0) & valid
    return jnp.where(ok, ids, vocab_size)


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def make_prompt_mask(token_ids: Array, vocab_size: int) -> Array:
    """Which tokens occur in each row's prompt, for the repetition penalty.

    Args:
      token_ids: [B, L] i32 prompt tokens, padded with -1.
      vocab_size: V.

    Returns:
      [B, V] bool.
    """
    B = token_ids.shape[0]
    ids = _ids_or_out_of_range(token_ids, vocab_size)
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], ids].set(True, mode="drop")


@functools.partial(jax.jit, static_argnames=("vocab_size",))
def make_output_counts(token_ids: Array, vocab_size: int) -> Array:
    """Occurrences of each token in each row's generated text so far (e.g. when a preempted sequence resumes).

    Args:
      token_ids: [B, L] i32 generated tokens, padded with -1.
      vocab_size: V.

    Returns:
      [B, V] i32.
    """
    B = token_ids.shape[0]
    ids = _ids_or_out_of_range(token_ids, vocab_size)
    return jnp.zeros((B, vocab_size), jnp.int32).at[jnp.arange(B)[:, None], ids].add(1, mode="drop")


@jax.jit
def update_counts(output_counts: Array, new_tokens: Array, active: Array | None = None) -> Array:
    """Adds one decode step's tokens to the output counts, on the device.

    Args:
      output_counts: [B, V] i32.
      new_tokens: [B] i32 tokens just sampled (negative ids are ignored).
      active: optional [B] bool; rows where it is False (finished or padding) are left unchanged.

    Returns:
      [B, V] i32 updated counts.
    """
    B, V = output_counts.shape
    ids = _ids_or_out_of_range(new_tokens, V, active)
    return output_counts.at[jnp.arange(B), ids].add(1, mode="drop")


@jax.jit
def apply_penalties(logits: Array, prompt_mask: Array, output_counts: Array, presence_penalty: Array,
                    frequency_penalty: Array, repetition_penalty: Array) -> Array:
    """vLLM's repetition, frequency and presence penalties.

    ``l -> l / r if l > 0 else l * r`` for tokens seen in the prompt or the output (``r`` the repetition
    penalty), then ``l -= frequency * count + presence * (count > 0)`` with counts over the output only.

    Args:
      logits: [B, V] f32.
      prompt_mask: [B, V] bool, tokens in the prompt.
      output_counts: [B, V] i32, occurrences in the generated tokens.
      presence_penalty, frequency_penalty, repetition_penalty: [B] f32.

    Returns:
      [B, V] f32 penalised logits.
    """
    in_output = output_counts > 0                                           # [B, V]
    rep = jnp.where(prompt_mask | in_output, repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency_penalty[:, None] * output_counts.astype(logits.dtype)
    return logits - presence_penalty[:, None] * in_output.astype(logits.dtype)


def _block_stop_tokens(logits: Array, stop_token_ids: Array, block: Array) -> Array:
    """Sets the logits of each blocked row's stop ids to -inf. stop_token_ids: [B, S] (-1 pad), block: [B]."""
    B, V = logits.shape
    ids = _ids_or_out_of_range(stop_token_ids, V, block[:, None])
    return logits.at[jnp.arange(B)[:, None], ids].set(-jnp.inf, mode="drop")


# ------------------------------------------------------------------------------------------------ filtering


def _thresholds(vals: Array, x: Array, row_max: Array, top_k: Array, top_p: Array, complete: bool
                ) -> tuple[Array, Array]:
    """Top-k / top-p logit thresholds of each row from its K largest logits.

    Args:
      vals: [B, K] the K largest entries of ``x`` per row, descending (K = V when ``complete``).
      x: [B, V] temperature-scaled logits after min-p (-inf = removed).
      row_max: [B] max of ``x``.
      top_k: [B] i32, 0 = off (already < V).
      top_p: [B] f32, 1 = off.
      complete: static, ``vals`` holds the whole vocabulary.

    Returns:
      threshold [B] (keep ``x >= threshold``), covered [B] bool (the K candidates sufficed).
    """
    K = vals.shape[1]
    k_on = top_k > 0
    kth = jnp.take_along_axis(vals, (jnp.clip(top_k, 1, K) - 1)[:, None], axis=1)[:, 0]
    k_thr = jnp.where(k_on, kth, -jnp.inf)                                   # [B]
    # Normaliser of the distribution that min-p and top-k leave, over the full vocabulary (one reduction).
    z = jnp.sum(jnp.where(x >= k_thr[:, None], jnp.exp(x - row_max[:, None]), 0.0), axis=-1)
    p = jnp.where(vals >= k_thr[:, None], jnp.exp(vals - row_max[:, None]), 0.0) / z[:, None]   # [B, K]
    inclusive = jnp.cumsum(p, axis=-1)
    keep = inclusive - p < top_p[:, None]          # mass of strictly better tokens below top_p
    m = jnp.sum(keep, axis=-1)                     # >= 1: the best token always stays
    p_on = top_p < 1.0
    p_thr = jnp.where(p_on, jnp.take_along_axis(vals, (m - 1)[:, None], axis=1)[:, 0], -jnp.inf)
    if complete:
        covered = jnp.ones(top_k.shape, bool)
    else:
        last = vals[:, -1]
        nucleus_inside = (m < K) | (inclusive[:, -1] >= top_p) | (last < k_thr) | (last == -jnp.inf)
        covered = (~k_on | (top_k <= K)) & (~p_on | nucleus_inside)
    return jnp.maximum(k_thr, p_thr), covered


def _filter_top_k_top_p(x: Array, top_k: Array, top_p: Array, cap: int) -> Array:
    """Masks (to -inf) the tokens outside each row's top-k and nucleus; exact for every ``cap``."""
    V = x.shape[-1]
    row_max = jnp.max(x, axis=-1)
    top_k = jnp.where(top_k >= V, 0, top_k)

    def full_sort() -> Array:
        vals = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
        return _thresholds(vals, x, row_max, top_k, top_p, complete=True)[0]

    if cap >= V:
        threshold = full_sort()
    else:
        vals, _ = lax.top_k(x, cap)
        threshold, covered = _thresholds(vals, x, row_max, top_k, top_p, complete=False)
        # Each row keeps its own path (covered rows: the cap's thresholds), so a row's result never depends
        # on whether another row in the batch needed the full sort.
        sorted_threshold = lax.cond(jnp.all(covered), lambda: threshold, full_sort)
        threshold = jnp.where(covered, threshold, sorted_threshold)
    return jnp.where(x < threshold[:, None], -jnp.inf, x)


def _filter_min_p(x: Array, min_p: Array) -> Array:
    """Masks tokens whose probability is below ``min_p`` times the row's largest one."""
    ratio = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))                  # p / p_max
    return jnp.where(ratio < min_p[:, None], -jnp.inf, x)


# ------------------------------------------------------------------------------------------------ sampling


def row_keys(seeds: Array, step: Array) -> Array:
    """Per-row PRNG keys of the sampling noise, ``fold_in(key(seed), step)``: a function of (seed, step) only.

    ``key(seed)`` of a uint32 seed has the key words ``(0, seed)``; another stream of per-step randomness
    (if one is ever needed) can use ``(tag, seed)`` with ``tag != 0`` and never collide with this one.

    Args:
      seeds: [B] uint32.
      step: [B] i32 tokens generated so far.

    Returns:
      [B] typed PRNG keys.
    """
    return jax.vmap(lambda seed, s: jax.random.fold_in(jax.random.key(seed), s))(seeds, step)


def _token_logprobs(raw_logprobs: Array, ids: Array) -> tuple[Array, Array]:
    """Log-probability [N] and 1-based rank [N] of ``ids`` [N] under ``raw_logprobs`` [N, V]."""
    lp = jnp.take_along_axis(raw_logprobs, ids[:, None], axis=-1)[:, 0]
    rank = 1 + jnp.sum(raw_logprobs > lp[:, None], axis=-1, dtype=jnp.int32)
    return lp, rank


@functools.partial(jax.jit, static_argnames=("needs_penalties", "num_logprobs", "top_k_cap"))
def sample(logits: Array, st: SamplingTensors, step: Array, prompt_mask: Array | None = None,
           output_counts: Array | None = None, *, needs_penalties: bool, num_logprobs: int,
           top_k_cap: int = DEFAULT_TOP_K_CAP) -> SampleResult:
    """Samples one token per row (see the module docstring for the order of operations).

    Args:
      logits: [B, V] raw model logits (cast to float32).
      st: the rows' ``SamplingTensors`` (B rows).
      step: [B] i32 tokens each row has generated so far: keys the row's noise and drives ``min_tokens``.
      prompt_mask: [B, V] bool tokens of each prompt (``make_prompt_mask``); needed when ``needs_penalties``.
      output_counts: [B, V] i32 generated-token counts (``make_output_counts`` / ``update_counts``); the same.
      needs_penalties: static; apply the penalties. Must be True when ``st.needs_penalties``.
      num_logprobs: static; how many top alternatives to return per row (0 = none).
      top_k_cap: static; candidates for top-k / top-p before a full sort (``>= V``: always sort).

    Returns:
      ``SampleResult`` with [B] token ids, their raw logprobs and ranks, and the top ``num_logprobs``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {logits.shape}")
    B, V = logits.shape
    if st.temperature.shape != (B,) or step.shape != (B,):
        raise ValueError(f"st rows {st.temperature.shape} and step {step.shape} must match logits rows ({B},)")
    if st.needs_penalties and not needs_penalties:
        raise ValueError("needs_penalties must be True: some rows of st have a penalty on")
    if needs_penalties and (prompt_mask is None or output_counts is None):
        raise ValueError("needs_penalties=True needs prompt_mask and output_counts")
    if not 0 <= num_logprobs <= V:
        raise ValueError(f"num_logprobs must be in [0, {V}], got {num_logprobs}")

    logits = logits.astype(jnp.float32)
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)                       # [B, V]
    x = logits
    if needs_penalties:
        x = apply_penalties(x, prompt_mask, output_counts, st.presence_penalty, st.frequency_penalty,
                            st.repetition_penalty)
    if st.needs_min_tokens:
        x = _block_stop_tokens(x, st.stop_token_ids, step < st.min_tokens)
    token_ids = jnp.argmax(x, axis=-1).astype(jnp.int32)                    # greedy choice
    if not st.all_greedy:
        greedy = st.temperature <= 0.0
        x = x / jnp.where(greedy, 1.0, st.temperature)[:, None]
        if st.needs_min_p:
            x = _filter_min_p(x, st.min_p)
        if st.needs_top_k_top_p:
            x = _filter_top_k_top_p(x, st.top_k, st.top_p, top_k_cap)
        keys = row_keys(st.seeds, step)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys)   # [B, V]
        sampled = jnp.argmax(x + gumbel, axis=-1).astype(jnp.int32)
        token_ids = jnp.where(greedy, token_ids, sampled)

    lp, rank = _token_logprobs(raw_logprobs, token_ids)
    if num_logprobs == 0:
        return SampleResult(token_ids=token_ids, logprobs=lp, ranks=rank)
    top_logprobs, top_ids = lax.top_k(raw_logprobs, num_logprobs)
    return SampleResult(token_ids=token_ids, logprobs=lp, ranks=rank, top_ids=top_ids.astype(jnp.int32),
                        top_logprobs=top_logprobs)


@functools.partial(jax.jit, static_argnames=("num_logprobs",))
def compute_prompt_logprobs(logits: Array, target_ids: Array, num_logprobs: int
                            ) -> tuple[Array, Array, Array, Array]:
    """Log-probabilities of the actual next prompt tokens, and the top alternatives, for ``prompt_logprobs``.

    Row ``i`` holds the logits computed at prompt position ``i`` and ``target_ids[i]`` the token at position
    ``i + 1``; the engine reports the result at position ``i + 1`` (position 0 has None, as in vLLM).

    Args:
      logits: [N, V] raw logits.
      target_ids: [N] i32 the tokens that actually follow.
      num_logprobs: static number of top alternatives per row (may be 0).

    Returns:
      target_logprobs [N] f32, target_ranks [N] i32 (1 = most likely), top_ids [N, k] i32,
      top_logprobs [N, k] f32 with k = ``num_logprobs``.
    """
    if logits.ndim != 2 or target_ids.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [N, V] and target_ids [N], got {logits.shape} and {target_ids.shape}")
    V = logits.shape[1]
    if not 0 <= num_logprobs <= V:
        raise ValueError(f"num_logprobs must be in [0, {V}], got {num_logprobs}")
    raw_logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp, rank = _token_logprobs(raw_logprobs, target_ids.astype(jnp.int32))
    top_logprobs, top_ids = lax.top_k(raw_logprobs, num_logprobs)
    return lp, rank, top_ids.astype(jnp.int32), top_logprobs
