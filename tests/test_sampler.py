"""The on-device sampler against numpy references of vLLM's semantics (fixed seeds: no test can flake)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmlora.engine.sampler import (
    SamplingTensors,
    apply_penalties,
    compute_prompt_logprobs,
    make_output_counts,
    make_prompt_mask,
    row_keys,
    sample,
    seed_to_uint32,
    update_counts,
)
from jmlora.engine.sampling_params import SamplingParams as SP


def _sample(logits, params, seeds=None, step=0, pad_to=None, eos=(), **kw):
    """Runs ``sample`` on numpy logits [B, V] with one SamplingParams per row; returns numpy fields."""
    logits = np.asarray(logits, np.float32)
    B = logits.shape[0]
    seeds = list(range(len(params))) if seeds is None else seeds
    st = SamplingTensors.from_params(params, seeds, pad_to or B, eos_token_ids=eos)
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (B,))
    kw.setdefault("needs_penalties", False)
    kw.setdefault("num_logprobs", 0)
    return jax.tree.map(np.asarray, sample(jnp.asarray(logits), st, step, **kw))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _ref_filtered_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """vLLM's filtering in float64: temperature, min-p, top-k, then top-p on the renormalised rest (by sorting).

    Returns the probabilities the sampler should draw from, and the smallest distance of a cumulative sum
    from ``top_p`` (a test precondition: boundary cases would depend on float rounding).
    """
    x = np.asarray(logits, np.float64) / temperature
    p = _softmax(x)
    keep = p >= min_p * p.max()
    if top_k > 0:
        keep &= x >= np.sort(np.where(keep, x, -np.inf))[::-1][top_k - 1]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    margin = np.inf
    if top_p < 1.0:
        order = np.argsort(-q, kind="stable")
        exclusive = np.cumsum(q[order]) - q[order]
        margin = np.abs(exclusive[q[order] > 0] - top_p).min()
        keep_sorted = exclusive < top_p
        keep[order[~keep_sorted]] = False
        q = np.where(keep, q, 0.0)
        q /= q.sum()
    return q, margin


RNG = np.random.default_rng(0)
VOCAB32 = RNG.normal(0.0, 1.5, size=32)                           # V = 32, fixed


# ----------------------------------------------------------------------------------------------- greedy


def test_greedy_rows_take_argmax_and_top_k_1_is_greedy():
    logits = np.random.default_rng(1).normal(size=(7, 500)) * 3
    params = [SP(temperature=0.0), SP(temperature=0.8, top_k=1), None, SP(temperature=1.5, top_k=1),
              SP(temperature=0.0, top_p=0.3), SP(temperature=1e-7), SP(temperature=5.0)]
    for step in (0, 7):
        mixed = _sample(logits, params, step=step)            # greedy rows beside a sampled row
        np.testing.assert_array_equal(mixed.token_ids[:6], logits.argmax(-1)[:6])
        only_greedy = _sample(logits, params[:6] + [None], step=step)      # the all-greedy variant
        np.testing.assert_array_equal(only_greedy.token_ids, logits.argmax(-1))
        assert mixed.top_ids is None and mixed.top_logprobs is None      # num_logprobs=0


def test_top_k_1_on_the_device_path_is_greedy():
    """top_k = 1 through the filtering path itself (not the host's greedy shortcut), beside sampled rows."""
    logits, params = _mixed_filter_batch()
    B = len(params)
    st = SamplingTensors.from_params(params, list(range(B)), B)
    st = st.replace(top_k=jnp.where(jnp.arange(B) % 2 == 0, 1, st.top_k))
    out = sample(jnp.asarray(logits, jnp.float32), st, jnp.arange(B, dtype=jnp.int32), needs_penalties=False,
                 num_logprobs=0, top_k_cap=4)
    np.testing.assert_array_equal(np.asarray(out.token_ids)[::2], logits.argmax(-1)[::2])
    assert (np.asarray(out.token_ids)[1::2] != logits.argmax(-1)[1::2]).any(), "odd rows should sample"


# ----------------------------------------------------------------------------------------- distributions


DISTRIBUTION_CASES = [
    dict(temperature=0.5),
    dict(temperature=1.0),
    dict(temperature=2.0),
    dict(temperature=1.0, top_k=5),
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.3, min_p=0.2),
    dict(temperature=1.0, top_k=12, top_p=0.7, min_p=0.05),
    dict(temperature=2.0, top_k=20, top_p=0.9),
    dict(temperature=0.9, top_p=0.35),
]
DRAWS = 4000


@functools.cache
def _draw_frequencies() -> np.ndarray:
    """All cases in one batch (one compilation): DRAWS rows per case, seeds 0..DRAWS-1, cap 8 (so the top-k 12
    and 20 cases go through the fallback sort). Returns [cases, 32] empirical frequencies."""
    params = [SP(**case) for case in DISTRIBUTION_CASES for _ in range(DRAWS)]
    seeds = list(range(DRAWS)) * len(DISTRIBUTION_CASES)
    out = _sample(np.tile(VOCAB32, (len(params), 1)), params, seeds, top_k_cap=8)
    tokens = out.token_ids.reshape(len(DISTRIBUTION_CASES), DRAWS)
    return np.stack([np.bincount(t, minlength=32) / DRAWS for t in tokens])


@pytest.mark.parametrize("case_index", range(len(DISTRIBUTION_CASES)),
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in DISTRIBUTION_CASES])
def test_temperature_and_filters_give_vllms_distribution(case_index):
    """Never outside vLLM's allowed set, and frequencies within 0.03 of the renormalised softmax over it.

    4000 draws per case: the standard deviation of each frequency is at most sqrt(0.25 / 4000) = 0.008, so
    0.03 is ~4 sigma; the seeds are fixed, so the outcome is the same on every run.
    """
    q, margin = _ref_filtered_probs(VOCAB32, **DISTRIBUTION_CASES[case_index])
    assert margin > 1e-3, "test precondition: no cumulative sum sits on the top_p boundary"
    freq = _draw_frequencies()[case_index]
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(q)), "sampled a filtered-out token"
    np.testing.assert_allclose(freq, q, atol=0.03)


def _mixed_filter_batch():
    """48 rows over V = 64 with mixed temperature / top-k / top-p / min-p (some beyond a cap of 8)."""
    rng = np.random.default_rng(3)
    V, B = 64, 48
    logits = rng.normal(size=(B, V)) * rng.uniform(0.3, 4.0, size=(B, 1))    # flat and peaked rows
    params = [SP(temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.choice([0, 2, 5, 30, 70])),
                 top_p=float(rng.choice([1.0, 0.3, 0.9, 0.99])), min_p=float(rng.choice([0.0, 0.0, 0.1])))
              for _ in range(B)]
    return logits, params


def test_top_k_cap_gives_the_same_tokens_as_a_full_sort():
    """Mixed rows, some covered by a small cap and some not (so the fallback sort runs): identical draws."""
    logits, params = _mixed_filter_batch()
    V = logits.shape[1]
    assert any(p.top_k == 30 for p in params), "test precondition: a row's top-k exceeds the small caps"
    full = _sample(logits, params, top_k_cap=V)
    np.testing.assert_array_equal(_sample(logits, params, top_k_cap=4).token_ids, full.token_ids)
    covered_only = [SP(temperature=1.0, top_k=3, min_p=0.01)] * len(params)     # never needs the fallback
    np.testing.assert_array_equal(_sample(logits, covered_only, top_k_cap=4).token_ids,
                                  _sample(logits, covered_only, top_k_cap=V).token_ids)


# --------------------------------------------------------------------------------------------------- seeds


def test_seeded_row_is_independent_of_batch_and_row_position():
    rng = np.random.default_rng(4)
    V = 50
    row = rng.normal(size=V) * 0.3                                           # flat: draws vary a lot
    target = SP(temperature=1.0, top_p=0.95, seed=1234)

    def tokens(batch_size, position, others, penalties, target=target):
        """The target row's tokens over steps 0..11, at ``position`` in a batch of ``others``."""
        logits = rng.normal(size=(batch_size, V))
        logits[position] = row
        params = list(others[:batch_size])
        params[position] = target
        seeds = [p.seed if p is not None and p.seed is not None else 99 + i for i, p in enumerate(params)]
        kw = {}
        if penalties:
            kw = dict(needs_penalties=True, prompt_mask=jnp.zeros((batch_size, V), bool),
                      output_counts=jnp.zeros((batch_size, V), jnp.int32))
        return np.array([_sample(logits, params, seeds, step=s, **kw).token_ids[position] for s in range(12)])

    a = tokens(3, 0, [None, SP(temperature=0.5), SP(temperature=0.0)], penalties=False)
    b = tokens(8, 5, [SP(temperature=1.5, top_k=3, repetition_penalty=1.2)] * 8, penalties=True)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 4, "the seeded draws should vary from step to step"
    d = tokens(3, 0, [None, SP(temperature=0.5), SP(temperature=0.0)], penalties=False,
               target=SP(temperature=1.0, top_p=0.95, seed=4321))
    assert not np.array_equal(a, d), "a different seed should give different draws"


def test_row_keys_depend_on_seed_and_step_only():
    seeds = jnp.asarray([7, 7, 8], jnp.uint32)
    step = jnp.asarray([3, 3, 3], jnp.int32)
    data = np.asarray(jax.random.key_data(row_keys(seeds, step)))
    expected = jax.random.fold_in(jax.random.key(7), 3)
    np.testing.assert_array_equal(data[0], np.asarray(jax.random.key_data(expected)))
    np.testing.assert_array_equal(data[0], data[1])
    assert not np.array_equal(data[0], data[2])


def test_seed_to_uint32():
    assert seed_to_uint32(0) == 0 and seed_to_uint32(2**32 - 1) == 2**32 - 1
    for s in (-1, 2**32, 2**40 + 3, -(2**70)):
        assert 0 <= seed_to_uint32(s) < 2**32
    assert seed_to_uint32(-1) != seed_to_uint32(-2)


# ----------------------------------------------------------------------------------------------- penalties


def _ref_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's formulas in numpy, one row at a time."""
    out = np.array(logits, np.float64)
    for b in range(out.shape[0]):
        counts = np.bincount(np.asarray(output[b], int), minlength=out.shape[1])
        seen = counts > 0
        seen[np.asarray(prompt[b], int)] = True
        row = out[b]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[b], row[seen] * repetition[b])
        row -= frequency[b] * counts + presence[b] * (counts > 0)
    return out


def _pad(lists, width):
    arr = np.full((len(lists), width), -1, np.int32)
    for i, x in enumerate(lists):
        arr[i, :len(x)] = x
    return arr


def test_penalties_match_numpy_reference_of_vllm():
    rng = np.random.default_rng(5)
    B, V = 5, 40
    logits = rng.normal(size=(B, V)) * 3
    prompts = [rng.integers(0, V, size=int(rng.integers(1, 10))).tolist() for _ in range(B)]
    outputs = [rng.integers(0, V, size=int(rng.integers(0, 15))).tolist() for _ in range(B)]
    presence = np.array([0.0, 0.5, -1.0, 2.0, 0.0], np.float32)
    frequency = np.array([0.0, 0.3, 0.0, -0.7, 1.5], np.float32)
    repetition = np.array([1.3, 1.0, 0.7, 2.0, 1.1], np.float32)
    mask = make_prompt_mask(jnp.asarray(_pad(prompts, 12)), V)
    counts = make_output_counts(jnp.asarray(_pad(outputs, 16)), V)
    got = apply_penalties(jnp.asarray(logits, jnp.float32), mask, counts, jnp.asarray(presence),
                          jnp.asarray(frequency), jnp.asarray(repetition))
    ref = _ref_penalties(logits, prompts, outputs, presence, frequency, repetition)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)

    # Through sample(): greedy rows pick the argmax of the penalised logits; logprobs stay raw.
    params = [SP(temperature=0.0, presence_penalty=float(presence[b]), frequency_penalty=float(frequency[b]),
                 repetition_penalty=float(repetition[b])) for b in range(B)]
    out = _sample(logits, params, needs_penalties=True, prompt_mask=mask, output_counts=counts)
    np.testing.assert_array_equal(out.token_ids, ref.argmax(-1))
    assert (ref.argmax(-1) != logits.argmax(-1)).any(), "test precondition: penalties change some argmax"
    np.testing.assert_allclose(out.logprobs, _log_softmax(logits)[np.arange(B), out.token_ids], atol=1e-5)


def test_update_counts_accumulates_like_a_recount():
    rng = np.random.default_rng(6)
    B, V, T = 4, 30, 9
    tokens = rng.integers(0, V, size=(B, T))
    active = rng.random(size=(B, T)) > 0.3
    counts = jnp.zeros((B, V), jnp.int32)
    for t in range(T):
        counts = update_counts(counts, jnp.asarray(tokens[:, t], jnp.int32), jnp.asarray(active[:, t]))
    expected = make_output_counts(jnp.asarray(np.where(active, tokens, -1), jnp.int32), V)
    np.testing.assert_array_equal(np.asarray(counts), np.asarray(expected))
    assert int(counts.sum()) == int(active.sum())
    with_pad = update_counts(counts, jnp.asarray([-1, 0, 0, 0], jnp.int32))
    assert int(with_pad.sum()) == int(active.sum()) + 3


def test_min_tokens_blocks_eos_and_stop_token_ids_until_reached():
    V = 10
    logits = np.zeros((2, V))
    logits[:, 3] = 9.0      # EOS is the argmax
    logits[:, 5] = 8.0      # then the stop token id
    logits[:, 7] = 7.0
    params = [SP(temperature=0.0, min_tokens=2, stop_token_ids=[5]), SP(temperature=0.0, stop_token_ids=[5])]
    for step, expected in ((0, [7, 3]), (1, [7, 3]), (2, [3, 3])):
        out = _sample(logits, params, step=step, eos=[3])
        np.testing.assert_array_equal(out.token_ids, expected)
        np.testing.assert_allclose(out.logprobs, _log_softmax(logits)[0, expected], atol=1e-5)


# ------------------------------------------------------------------------------------------------ logprobs


def test_logprobs_ranks_and_top_alternatives_are_those_of_the_raw_distribution():
    rng = np.random.default_rng(7)
    B, V, k = 6, 200, 5
    logits = rng.normal(size=(B, V)) * 2
    params = [SP(temperature=1.7, top_p=0.9, logprobs=k), SP(temperature=0.0), SP(temperature=0.4, top_k=9),
              SP(temperature=1.0, repetition_penalty=1.5), SP(temperature=3.0), None]
    kw = dict(needs_penalties=True, prompt_mask=jnp.ones((B, V), bool), output_counts=jnp.zeros((B, V), jnp.int32))
    out = _sample(logits, params, num_logprobs=k, **kw)
    ref = _log_softmax(logits)
    picked = ref[np.arange(B), out.token_ids]
    np.testing.assert_allclose(out.logprobs, picked, atol=1e-5)
    np.testing.assert_array_equal(out.ranks, 1 + (ref > picked[:, None]).sum(-1))
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, -1), atol=1e-5)
    assert (out.ranks > 1).any(), "test precondition: some sampled token is not the top one"


def test_prompt_logprobs_match_numpy():
    rng = np.random.default_rng(8)
    N, V = 7, 60
    logits = rng.normal(size=(N, V)) * 2
    targets = rng.integers(0, V, size=N)
    lp, rank, top_ids, top_lp = jax.tree.map(
        np.asarray, compute_prompt_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.int32), 3))
    ref = _log_softmax(logits)
    np.testing.assert_allclose(lp, ref[np.arange(N), targets], atol=1e-5)
    np.testing.assert_array_equal(rank, 1 + (ref > ref[np.arange(N), targets][:, None]).sum(-1))
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(top_ids, order)
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, order, -1), atol=1e-5)
    assert compute_prompt_logprobs(jnp.asarray(logits), jnp.asarray(targets), 0)[2].shape == (N, 0)


def test_prompt_logprobs_in_chunks_equal_the_whole_computation():
    """The prefill step computes prompt logprobs a few hundred positions at a time (bounded memory); chunks
    that do not divide the positions (padding) must give exactly the whole computation's values."""
    import types

    from jmlora.engine.model_runner import prompt_logprobs_in_chunks
    from jmlora.model.decoder import compute_logits

    rng = np.random.default_rng(9)
    N, E, V = 37, 16, 50
    params = types.SimpleNamespace(lm_head=jnp.asarray(rng.normal(size=(E, V)), jnp.float32))  # what the LM head reads
    hidden = jnp.asarray(rng.normal(size=(N, E)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=N), jnp.int32)
    whole = compute_prompt_logprobs(compute_logits(params, hidden), targets, 4)
    for rows in (8, 37, 64):
        chunked = prompt_logprobs_in_chunks(params, hidden, targets, 4, rows=rows)
        for a, b in zip(whole, chunked):
            assert b.shape == a.shape
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ input checking


def test_from_params_pads_and_sets_static_flags():
    st = SamplingTensors.from_params([SP(temperature=0.0), SP(top_p=0.5, min_tokens=1, stop_token_ids=[4])],
                                     [1, 2], 4, eos_token_ids=[2])
    assert st.temperature.shape == (4,) and not st.all_greedy and st.needs_top_k_top_p
    assert not st.needs_min_p and not st.needs_penalties and st.needs_min_tokens
    np.testing.assert_array_equal(np.asarray(st.stop_token_ids), [[-1, -1], [4, 2], [-1, -1], [-1, -1]])
    greedy = SamplingTensors.from_params([SP(temperature=0.0, top_k=3, top_p=0.2), None], [0, 0], 2)
    assert greedy.all_greedy and not greedy.needs_top_k_top_p
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.from_params([SP()], [1, 2], 2)
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.from_params([SP(), SP()], [1, 2], 1)


def test_sample_refuses_inconsistent_penalty_arguments():
    logits = jnp.zeros((2, 8))
    st = SamplingTensors.from_params([SP(presence_penalty=0.5), None], [0, 0], 2)
    with pytest.raises(ValueError, match="needs_penalties"):
        sample(logits, st, jnp.zeros(2, jnp.int32), needs_penalties=False, num_logprobs=0)
    with pytest.raises(ValueError, match="prompt_mask"):
        sample(logits, st, jnp.zeros(2, jnp.int32), needs_penalties=True, num_logprobs=0)
