"""The model runner: the device side of the engine.

It owns the device state (weights, paged KV cache, adapter bank, per-sequence penalty state) and runs the
two jitted steps the scheduler plans:

- **prefill**: chunks of prompts as a ``[B, T]`` batch (both bucketed), sampling for the rows whose chunk
  ends the known tokens;
- **decode**: ``num_lookahead`` consecutive tokens for every running sequence inside one jitted call
  (``lax.scan`` over steps; each step samples on the device and feeds its token to the next), so the host
  is consulted once per ``num_lookahead`` tokens; stop checks happen after the call and surplus tokens are
  discarded.

Shapes depend only on buckets (batch sizes and chunk lengths rounded up to powers of two), never on which
adapters are in the batch, so after ``warmup`` nothing compiles for the default sampling variants. One
exception by design: with LoRA enabled, a decode batch in which no row has an adapter (every row on slot 0)
runs the base executable, without the LoRA kernels, which on the H200 cost 4-24% of such a step for
nothing (``benchmarks/RESULTS.md``, "Twelfth session"), and on GPU a 64-row batch with at most 8 adapters
runs the grouped LoRA form (``routing.decode_impl``); warm-up compiles every such variant per decode bucket
(``decode_variants``). Prefill always takes the adapter inputs when LoRA is enabled (not measured; routing it
too would double the prefill buckets' compilations), so its buckets compile once.
Sampling features that change the sampler's static flags (penalties, top-k/top-p, min-p, min_tokens,
logprobs, prompt_logprobs) compile one more variant per bucket the first time a batch uses them.

The cache has one extra *scratch page* after the pages the page manager owns: page-table padding points
at it, so lookahead positions beyond a sequence's reserved pages write there, and kernel reads of padded
page-table entries stay in bounds.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jmlora.config import EngineConfig, ModelConfig
from jmlora.engine.sampler import SampleResult, SamplingTensors, compute_prompt_logprobs, sample
from jmlora.engine.scheduler import ScheduledChunk
from jmlora.lora.bank import (
    BankSpec,
    adapter_arrays,
    init_adapter_bank,
    write_adapter,
    write_adapter_arrays,
    zero_adapter_arrays,
)
from jmlora.lora.peft import LoRAWeights
from jmlora.lora.routing import LoRABatch, count_adapters, decode_impl, prepare_lora, resolve_impl
from jmlora.model import KVCache, Params, compute_logits, forward, init_kv_cache
from jmlora.model.attention import prefill_attention_impl
from jmlora.sharding import filled, logical_sharding

Array = jax.Array

COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}
"""XLA options of the two jitted steps. On the GPU, XLA records each step into CUDA graphs (command buffers);
by default a graph runs its kernels one after another. ``CONCURRENT`` gives the graph the edges of the
buffer dependencies instead, so a projection's LoRA shrink/delta kernels (which read the same input as the
base matmul, not its output) run beside the matmul rather than after it. H200, Llama-3-8B shape, 192-token
context: the LoRA part of the decode step at batch 32 went from +31% to +22% of the base step (distinct
adapters) and +24% to +14% (8 shared), base unchanged (benchmarks/RESULTS.md, "Ninth session"). The CPU
compiler accepts and ignores this GPU option (tested); TPU compilers read the same DebugOptions and should
too (not tried here). Same results as the serial schedule, bit for bit, on one GPU
(``benchmarks/schedule_check.py``); a tensor-parallel mesh over several GPUs (collectives inside the graph)
has not run under it yet."""


def _pow2_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` up to the first one >= ``hi``, capped at ``hi``."""
    buckets, b = [], lo
    while b < hi:
        buckets.append(b)
        b *= 2
    return buckets + [hi]


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass
class StepOutput:
    """Host copies of one step's samples, rows in chunk order.

    Attributes:
      token_ids: ``[B, K]`` sampled tokens (K = 1 for prefill, num_lookahead for decode).
      logprobs, ranks: ``[B, K]`` of the sampled tokens under the raw model distribution.
      top_ids, top_logprobs: ``[B, K, num_logprobs]`` or None.
      prompt_logprobs: per chunk, None or ``(target_logprobs [n], ranks [n], top_ids [n, k], top_lp [n, k])``
        for the chunk's positions (predicting the token after each position).
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    prompt_logprobs: list | None = None


@dataclasses.dataclass
class DecodeCall:
    """A dispatched decode call whose samples are still on the device (``ModelRunner.start_decode``).

    Attributes:
      chunks: the call's chunks, rows in chunk order.
      num_steps: tokens sampled per row.
      result: the samples, device arrays stacked ``[K, B]``.
      last_tokens: ``[B]`` each row's last sample, on the device: a chained call feeds it without a host trip.
    """

    chunks: list[ScheduledChunk]
    num_steps: int
    result: SampleResult
    last_tokens: Array


class ModelRunner:
    """Device state and jitted steps for one model (see the module docstring).

    Args:
      cfg: the model config.
      params: weights on ``mesh``.
      mesh: the device mesh.
      ecfg: engine config (buckets, cache, LoRA).
      num_pages: KV pages the page manager hands out (the cache holds one more, the scratch page).
      eos_token_ids: for ``min_tokens`` blocking in the sampler.
    """

    def __init__(self, cfg: ModelConfig, params: Params, mesh: Mesh, ecfg: EngineConfig, num_pages: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.cfg, self.params, self.mesh, self.ecfg = cfg, params, mesh, ecfg
        self.eos_token_ids = eos_token_ids
        self.dtype = params.embed.dtype
        self.num_pages = num_pages
        self.scratch_page = num_pages
        # page-table width: a power of two, so the GPU paged-attention kernel (Triton: power-of-two blocks)
        # splits it evenly; entries past a sequence's pages point at the scratch page and are never computed
        pages = math.ceil((cfg.max_model_len + ecfg.num_lookahead) / ecfg.page_size)
        self.pages_per_seq = 1 << (pages - 1).bit_length()
        self.cache: KVCache = init_kv_cache(cfg, num_pages + 1, ecfg.page_size, self.dtype, mesh)
        self.bank_spec = BankSpec(ecfg.max_loras, ecfg.max_lora_rank) if ecfg.enable_lora else None
        self.bank = (init_adapter_bank(cfg, self.bank_spec, dtype=self.dtype, mesh=mesh)
                     if ecfg.enable_lora else None)
        # penalty state, one row per running sequence plus a scratch row for padding
        rows = ecfg.max_num_seqs + 1
        state_sharding = logical_sharding(mesh, (None, "vocab"), (rows, cfg.vocab_size))
        self._state_sharding = state_sharding
        self._replicated = logical_sharding(mesh, ())
        self._zero_tokens_cache: dict[int, jax.Array] = {}
        self._table_cache: tuple | None = None      # (batch and sequence ids, page table, pages per row)
        self.prompt_mask = filled((rows, cfg.vocab_size), jnp.bool_, state_sharding)
        self.output_counts = filled((rows, cfg.vocab_size), jnp.int32, state_sharding)
        self.scratch_row = rows - 1
        self._rows: dict[int, int] = {}
        # seq_id -> leading tokens of the sequence recorded in its penalty-state row (prompt tokens in the
        # prompt mask, outputs in the counts): decode must record the token it feeds when it is not among them
        # (a prefill cut one token short, or an output recomputed after preemption)
        self._recorded: dict[int, int] = {}
        self._sampling_cache: tuple | None = None       # ((batch, seq ids), SamplingTensors) of the last call
        self._free_rows = list(range(rows - 2, -1, -1))
        self.decode_buckets = _pow2_buckets(1, ecfg.max_num_seqs)
        self.prefill_token_buckets = _pow2_buckets(min(16, ecfg.max_prefill_chunk), ecfg.max_prefill_chunk)
        self.prefill_batch_buckets = _pow2_buckets(1, ecfg.max_num_seqs)

    def device_state_lost(self) -> bool:
        """Whether a failed call consumed the donated KV cache or penalty state (their buffers are deleted)."""
        return any(a.is_deleted() for a in (*self.cache.k, *self.cache.v, self.prompt_mask, self.output_counts))

    def reset_device_state(self) -> None:
        """Fresh zeroed KV cache and penalty state; every sequence's state row is forgotten (after a failed
        call consumed them: the engine has failed every request first)."""
        cfg, ecfg = self.cfg, self.ecfg
        self.cache = init_kv_cache(cfg, self.num_pages + 1, ecfg.page_size, self.dtype, self.mesh)
        rows = ecfg.max_num_seqs + 1
        self.prompt_mask = filled((rows, cfg.vocab_size), jnp.bool_, self._state_sharding)
        self.output_counts = filled((rows, cfg.vocab_size), jnp.int32, self._state_sharding)
        self._rows.clear()
        self._recorded.clear()
        self._sampling_cache = None
        self._free_rows = list(range(rows - 2, -1, -1))

    # -- adapters ------------------------------------------------------------------------------------------

    def load_adapter(self, slot: int, weights: LoRAWeights | None, staged: tuple | None = None) -> None:
        """Writes an adapter into a bank slot (async on the device, ordered before the steps queued after it).

        Args:
          slot: 1..max_loras.
          weights: the parsed adapter (or None for the zero adapter); used when nothing was staged.
          staged: ``(device arrays, rank)`` from ``stage_adapter``: the write is then device to device.
        """
        if self.bank is None:
            raise ValueError("this engine was built without enable_lora")
        if staged is not None:
            self.bank = write_adapter_arrays(self.bank, slot, *staged)
        else:
            self.bank = write_adapter(self.bank, slot, weights, self.cfg, self.bank_spec)

    def stage_adapter(self, weights: LoRAWeights) -> tuple:
        """Starts copying a padded adapter to the device without touching the bank; returns what
        ``load_adapter(staged=...)`` takes. ``jax.device_put`` is asynchronous, so the copy overlaps with
        whatever the device is running."""
        layers, rank = adapter_arrays(weights, self.cfg, self.bank_spec, self.dtype)
        return jax.device_put(layers), rank

    # -- penalty-state rows --------------------------------------------------------------------------------

    def _row(self, seq_id: int) -> int:
        row = self._rows.get(seq_id)
        if row is None:
            row = self._rows[seq_id] = self._free_rows.pop()
        return row

    def release(self, seq_id: int) -> None:
        """Frees a finished, aborted or preempted sequence's state row."""
        row = self._rows.pop(seq_id, None)
        self._recorded.pop(seq_id, None)
        if row is not None:
            self._free_rows.append(row)

    @property
    def num_rows_in_use(self) -> int:
        return len(self._rows)

    # -- host-side batch assembly --------------------------------------------------------------------------

    def _page_table(self, chunks: list[ScheduledChunk], batch: int) -> np.ndarray:
        """``[batch, pages_per_seq]``: each chunk's pages, then the scratch page. One flat conversion of all
        page lists (a row-by-row copy of Python lists cost ~1.7 ms at batch 256 on a 2-core host).

        Between two frees of its pages (``Sequence.pages_freed``) a sequence's pages only grow, one more every
        ``page_size`` tokens: for the same sequences in the same rows as the last call, only the pages added
        since are written (the flat conversion took ~1.4 ms per call at batch 256 with 128 pages per row on the
        H200 host, under the profiler)."""
        key = (batch, tuple(c.seq.seq_id for c in chunks))
        lens = [(len(c.seq.pages), c.seq.pages_freed) for c in chunks]
        cached = self._table_cache
        if cached is not None and cached[0] == key:
            table = cached[1]
            for i, (c, (n, freed), (n_old, freed_old)) in enumerate(zip(chunks, lens, cached[2])):
                if freed != freed_old or n < n_old:  # pages freed and allocated again: the whole row
                    table[i, :n] = c.seq.pages
                    table[i, n:] = self.scratch_page
                elif n > n_old:
                    table[i, n_old:n] = c.seq.pages[n_old:]
        else:
            table = np.full((batch, self.pages_per_seq), self.scratch_page, np.int32)
            n_flat = np.asarray([n for n, _ in lens], np.int64)
            flat = np.fromiter(itertools.chain.from_iterable(c.seq.pages for c in chunks), np.int32,
                               int(n_flat.sum()))
            starts = np.repeat(np.cumsum(n_flat) - n_flat, n_flat)
            table[np.repeat(np.arange(len(chunks)), n_flat), np.arange(len(flat)) - starts] = flat
        self._table_cache = (key, table, lens)
        return table.copy()  # the cached table changes in place; the caller's copy goes to the device

    def _sampling(self, chunks: list[ScheduledChunk], batch: int,
                  pending: int = 0) -> tuple[SamplingTensors, np.ndarray, int, bool]:
        params = [c.seq.params for c in chunks]
        # A sequence's sampling params and seed never change, so the device tensors depend only on which
        # sequences fill the batch: consecutive decode calls over the same batch reuse them (building them
        # is ~1.3 ms of host time per call at batch 256).
        key = (batch, tuple(c.seq.seq_id for c in chunks))
        if self._sampling_cache is not None and self._sampling_cache[0] == key:
            st = self._sampling_cache[1]
        else:
            seeds = [c.seq.sampling_seed for c in chunks]
            st = SamplingTensors.from_params(params, seeds, batch, eos_token_ids=self.eos_token_ids)
            self._sampling_cache = (key, st)
        steps = np.zeros(batch, np.int32)
        steps[:len(chunks)] = [c.seq.num_output_tokens + pending for c in chunks]
        num_logprobs = max([p.logprobs or 0 for p in params], default=0)
        num_logprobs = 0 if num_logprobs == 0 else self.ecfg.max_logprobs
        return st, steps, num_logprobs, st.needs_penalties

    def _lora_slots(self, chunks: list[ScheduledChunk], batch: int) -> np.ndarray:
        slots = np.zeros(batch, np.int32)
        slots[:len(chunks)] = [c.seq.lora_slot for c in chunks]
        return slots

    def _lora(self, chunks: list[ScheduledChunk], batch: int) -> LoRABatch | None:
        return None if self.bank is None else LoRABatch(self.bank, jnp.asarray(self._lora_slots(chunks, batch)))

    def _rows_for(self, chunks: list[ScheduledChunk], batch: int) -> np.ndarray:
        rows = np.full(batch, self.scratch_row, np.int32)
        rows[:len(chunks)] = [self._row(c.seq.seq_id) for c in chunks]
        return rows

    # -- steps ---------------------------------------------------------------------------------------------

    def _prefill_fits(self, batch: int, tokens: int) -> bool:
        """The (batch, chunk) buckets that warm-up compiles: padding at most 2x the step's token budget."""
        return batch * tokens <= 2 * max(self.ecfg.max_num_batched_tokens, tokens)

    def prefill(self, chunks: list[ScheduledChunk], while_running: Callable[[], None] | None = None) -> StepOutput:
        """Runs one prefill step; rows of chunks that do not sample hold garbage samples.

        Chunks whose padded ``[B, T]`` batch would exceed the warmed-up buckets (one long chunk among many
        short ones) run as several calls, longest chunks together, so nothing compiles and little is padded.
        ``while_running`` is called after the (first) call is dispatched and before waiting for its results
        (host work that overlaps with the device, e.g. staging adapters)."""
        order = sorted(range(len(chunks)), key=lambda i: -chunks[i].num_tokens)
        groups: list[list[int]] = []
        for i in order:
            if groups:
                T = _bucket(chunks[groups[-1][0]].num_tokens, self.prefill_token_buckets)
                if self._prefill_fits(_bucket(len(groups[-1]) + 1, self.prefill_batch_buckets), T):
                    groups[-1].append(i)
                    continue
            groups.append([i])
        if len(groups) == 1:
            return self._prefill_call(chunks, while_running)
        outs = [self._prefill_call([chunks[i] for i in g], while_running if k == 0 else None)
                for k, g in enumerate(groups)]
        position = {i: (k, j) for k, g in enumerate(groups) for j, i in enumerate(g)}

        def gather(field):
            parts = [getattr(o, field) for o in outs]
            if parts[0] is None:
                return None
            return np.stack([parts[position[i][0]][position[i][1]] for i in range(len(chunks))])

        merged = StepOutput(token_ids=gather("token_ids"), logprobs=gather("logprobs"), ranks=gather("ranks"),
                            top_ids=gather("top_ids"), top_logprobs=gather("top_logprobs"))
        if any(o.prompt_logprobs is not None for o in outs):
            merged.prompt_logprobs = [None if outs[position[i][0]].prompt_logprobs is None
                                      else outs[position[i][0]].prompt_logprobs[position[i][1]]
                                      for i in range(len(chunks))]
        return merged

    def _prefill_call(self, chunks: list[ScheduledChunk], while_running: Callable[[], None] | None) -> StepOutput:
        B = _bucket(len(chunks), self.prefill_batch_buckets)
        T = _bucket(max(c.num_tokens for c in chunks), self.prefill_token_buckets)
        tokens = np.zeros((B, T), np.int32)
        start = np.zeros(B, np.int32)
        num_tokens = np.zeros(B, np.int32)
        prompt_lens = np.zeros(B, np.int32)
        samples = np.zeros(B, bool)
        want_prompt_lp = [c.seq.params.prompt_logprobs is not None for c in chunks]
        targets = np.zeros((B, T), np.int32) if any(want_prompt_lp) else None
        for i, c in enumerate(chunks):
            tokens[i, :c.num_tokens] = c.token_ids
            start[i], num_tokens[i], samples[i] = c.start, c.num_tokens, c.samples
            prompt_lens[i] = c.seq.num_prompt_tokens
            self._recorded[c.seq.seq_id] = c.start + c.num_tokens + int(c.samples)
            if targets is not None and want_prompt_lp[i] and c.start + 1 < c.seq.num_prompt_tokens:
                # (a chunk that starts at or past the prompt's end, e.g. recomputing outputs after a
                # preemption, predicts no prompt token)
                upto = min(c.start + c.num_tokens + 1, c.seq.num_prompt_tokens)
                nxt = c.seq.token_ids(c.start + 1, upto)
                targets[i, :len(nxt)] = nxt
        st, steps, num_logprobs, needs_penalties = self._sampling(chunks, B)
        num_prompt_lp = self.ecfg.max_logprobs if targets is not None else None
        result, prompt_lp, self.cache, self.prompt_mask, self.output_counts = _prefill_step(
            self.params, self.cfg, self.cache, self._lora(chunks, B), jnp.asarray(tokens), jnp.asarray(start),
            jnp.asarray(num_tokens), jnp.asarray(self._page_table(chunks, B)), jnp.asarray(self._rows_for(chunks, B)),
            jnp.asarray(prompt_lens), jnp.asarray(samples), st, jnp.asarray(steps), self.prompt_mask,
            self.output_counts, jnp.asarray(targets) if targets is not None else None,
            lora_impl=self.ecfg.lora_impl, attention_impl=prefill_attention_impl(self.ecfg.attention_impl),
            needs_penalties=needs_penalties, num_logprobs=num_logprobs, num_prompt_logprobs=num_prompt_lp)
        if while_running is not None:
            while_running()
        out = _to_host(result, len(chunks), k_axis=False)
        if prompt_lp is not None:
            host = [np.asarray(a).reshape(B, T, *a.shape[1:]) for a in prompt_lp]
            out.prompt_logprobs = [tuple(a[i, :c.num_tokens] for a in host) if want_prompt_lp[i] else None
                                   for i, c in enumerate(chunks)]
        return out

    def decode(self, chunks: list[ScheduledChunk], num_steps: int,
               while_running: Callable[[], None] | None = None) -> StepOutput:
        """Runs ``num_steps`` decode steps for every chunk's sequence in one jitted call and waits for the
        samples (``while_running``: as in ``prefill``)."""
        call = self.start_decode(chunks, num_steps)
        if while_running is not None:
            while_running()
        return self.finish_decode(call)

    def start_decode(self, chunks: list[ScheduledChunk], num_steps: int, *,
                     after: DecodeCall | None = None) -> DecodeCall:
        """Dispatches ``num_steps`` decode steps for every chunk's sequence and returns without waiting.

        Args:
          chunks: one decode chunk per sequence.
          num_steps: tokens to sample per sequence.
          after: a call dispatched just before over the same sequences in the same order, whose samples the
            host has not appended yet (``Scheduler.schedule_continuation`` planned this one from it): this
            call feeds that call's last samples straight from the device, so the host can read ``after``'s
            results while this call runs.

        Returns:
          A ``DecodeCall``; ``finish_decode`` copies its samples to the host.
        """
        B = _bucket(len(chunks), self.decode_buckets)
        pos = np.zeros(B, np.int32)
        active = np.zeros(B, bool)
        record_fed = np.zeros(B, bool)
        prompt_lens = np.zeros(B, np.int32)
        tokens = None if after is not None else np.zeros(B, np.int32)
        if after is not None and [c.seq.seq_id for c in after.chunks] != [c.seq.seq_id for c in chunks]:
            raise ValueError("a chained decode call must run the same sequences, in the same order, as the call "
                             "it follows")
        n, recorded = len(chunks), self._recorded
        starts = [c.start for c in chunks]
        pos[:n], active[:n] = starts, True
        if tokens is not None:
            tokens[:n] = [c.token_ids[0] for c in chunks]
        prompt_lens[:n] = [c.seq.num_prompt_tokens for c in chunks]
        record_fed[:n] = [recorded.get(c.seq.seq_id, 0) <= c.start for c in chunks]
        for c in chunks:
            recorded[c.seq.seq_id] = c.start + 1 + num_steps
        # the samples of ``after`` are not appended yet: this call's first sample is output number
        # num_output_tokens + after.num_steps of its sequence (seeded sampling depends on it)
        st, steps, num_logprobs, needs_penalties = self._sampling(
            chunks, B, pending=after.num_steps if after is not None else 0)
        # a batch with no adapter in it runs the base executable (no LoRA kernels; see the module docstring),
        # one with adapters the LoRA formulation for how many it holds (``routing.decode_impl``)
        slots = self._lora_slots(chunks, B) if self.bank is not None else None
        use_lora = slots is not None and bool(slots.any())
        lora_impl = decode_impl(self.ecfg.lora_impl, B, count_adapters(slots) if use_lora else 0,
                                jax.default_backend(), self.ecfg.max_lora_rank)
        # The small integer inputs go to the device as one int32 array, replicated over the mesh like the
        # call's outputs, and are split inside the jitted call (``_decode_call``): one host-to-device copy
        # instead of nine (H200 host, batch 256: the nine device_puts took ~2.5 ms of host time per call under
        # the profiler, benchmarks/RESULTS.md, "Twenty-second session"). A chained call's tokens come from the
        # last call's output (same sharding), the others' from this array: one executable for both.
        ints = np.concatenate([self._page_table(chunks, B).ravel(), pos, active, self._rows_for(chunks, B), steps,
                               record_fed, prompt_lens, tokens if after is None else np.zeros(B, np.int32),
                               np.full(B, after is not None), slots if use_lora else np.zeros(0, np.int32)],
                              dtype=np.int32)
        fed = after.last_tokens if after is not None else self._zero_tokens(B)
        result, last_tokens, self.cache, self.prompt_mask, self.output_counts = _decode_call(
            self.params, self.cfg, self.cache, self.bank if use_lora else None, jax.device_put(ints, self._replicated),
            fed, st, self.prompt_mask, self.output_counts, num_steps=num_steps, lora_impl=lora_impl,
            attention_impl=self.ecfg.attention_impl, needs_penalties=needs_penalties, num_logprobs=num_logprobs,
            unroll=self.ecfg.decode_unroll)
        return DecodeCall(list(chunks), num_steps, result, last_tokens)

    def _zero_tokens(self, batch: int) -> jax.Array:
        """A [batch] device array in the place of a chained call's tokens, for calls that bring their own."""
        if batch not in self._zero_tokens_cache:
            self._zero_tokens_cache[batch] = jax.device_put(np.zeros(batch, np.int32), self._replicated)
        return self._zero_tokens_cache[batch]

    @staticmethod
    def finish_decode(call: DecodeCall) -> StepOutput:
        """Waits for a dispatched decode call and copies its samples to the host."""
        return _to_host(call.result, len(call.chunks), k_axis=True)

    def decode_variants(self, batch: int, platform: str | None = None) -> list[int]:
        """Numbers of distinct adapters, one per decode executable that a batch of this bucket can run: 0 (with
        LoRA enabled: the base executable) and, for each LoRA formulation ``routing.decode_impl`` picks in this
        bucket, the smallest number that picks it. Warm-up runs one batch of each."""
        if self.bank is None:
            return [0]
        platform = platform or jax.default_backend()
        counts, impls = [0], set()
        for k in range(1, min(batch, self.ecfg.max_loras) + 1):
            impl = decode_impl(self.ecfg.lora_impl, batch, k, platform, self.ecfg.max_lora_rank)
            if impl not in impls:
                impls.add(impl)
                counts.append(k)
        return counts

    def warmup(self) -> int:
        """Compiles every bucket (greedy and plain sampling variants); returns how many shapes ran."""
        from jmlora.engine.sampling_params import SamplingParams
        from jmlora.engine.sequence import Sequence

        count = 0
        if self.bank is not None:
            # adapter writes compile too: from host arrays and from staged device arrays (slot 1 is empty at
            # start-up; the zero adapter leaves it so)
            zeros = zero_adapter_arrays(self.cfg, self.bank_spec, self.dtype)
            self.load_adapter(1, None)
            self.load_adapter(1, None, staged=(jax.device_put(zeros), 0))
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)):
            for B, num_adapters in [(b, k) for b in self.decode_buckets for k in self.decode_variants(b)]:
                seqs = [_dummy_seq(Sequence, params) for _ in range(B)]
                for i in range(num_adapters):
                    seqs[i].lora_slot = 1 + i
                K = self.ecfg.num_lookahead
                first = self.start_decode([ScheduledChunk(s, 1, 1, True) for s in seqs], K)
                # a chained call (tokens from the device) must find this executable: run one to be sure
                chained = self.start_decode([ScheduledChunk(s, 1 + K, 1, True) for s in seqs], K, after=first)
                self.finish_decode(first)
                self.finish_decode(chained)
                self._release_all(seqs)
                count += 1
            for B in self.prefill_batch_buckets:
                for T in self.prefill_token_buckets:
                    if not self._prefill_fits(B, T):
                        continue
                    seqs = [_dummy_seq(Sequence, params, T) for _ in range(B)]
                    self.prefill([ScheduledChunk(s, 0, T, True) for s in seqs])
                    self._release_all(seqs)
                    count += 1
        jax.block_until_ready(self.cache)
        return count

    def _release_all(self, seqs) -> None:
        for seq in seqs:
            self.release(seq.seq_id)


def _dummy_seq(sequence_cls, params, length: int = 2):
    """A warm-up sequence with no pages: its KV writes land in the scratch page."""
    seq = sequence_cls("warmup", [0] * length, params=params)
    seq.sampling_seed = 0
    return seq


def _to_host(result: SampleResult, n: int, *, k_axis: bool) -> StepOutput:
    # every copy started before the first is waited for: np.asarray alone waits for each copy in turn (H200
    # host, batch 256: ~0.6 ms per array under the profiler)
    for a in jax.tree.leaves(result):
        a.copy_to_host_async()

    def host(a):
        if a is None:
            return None
        a = np.asarray(a)
        a = a.swapaxes(0, 1) if k_axis else a[:, None]       # -> [B, K, ...]
        return a[:n]
    return StepOutput(token_ids=host(result.token_ids), logprobs=host(result.logprobs), ranks=host(result.ranks),
                      top_ids=host(result.top_ids), top_logprobs=host(result.top_logprobs))


def _reset_and_record(prompt_mask, output_counts, rows, tokens, positions, valid, prompt_lens, reset, vocab):
    """Prefill bookkeeping of the penalty state: reset rows starting at position 0, then record the chunk's
    tokens (prompt positions in the prompt mask, recomputed outputs after a preemption in the counts)."""
    prompt_mask = prompt_mask.at[rows].set(prompt_mask[rows] & ~reset[:, None])
    output_counts = output_counts.at[rows].set(jnp.where(reset[:, None], 0, output_counts[rows]))
    is_prompt = positions < prompt_lens[:, None]
    row_idx = jnp.broadcast_to(rows[:, None], tokens.shape)
    prompt_mask = prompt_mask.at[row_idx, jnp.where(valid & is_prompt, tokens, vocab)].set(True, mode="drop")
    output_counts = output_counts.at[row_idx, jnp.where(valid & ~is_prompt, tokens, vocab)].add(1, mode="drop")
    return prompt_mask, output_counts


@functools.partial(jax.jit, static_argnames=("cfg", "lora_impl", "attention_impl", "needs_penalties", "num_logprobs",
                                             "num_prompt_logprobs"),
                   donate_argnames=("cache", "prompt_mask", "output_counts"), compiler_options=COMPILER_OPTIONS)
def _prefill_step(params, cfg, cache, lora, tokens, start, num_tokens, page_table, rows, prompt_lens, samples, st,
                  steps, prompt_mask, output_counts, targets, *, lora_impl, attention_impl, needs_penalties,
                  num_logprobs, num_prompt_logprobs):
    """One prefill step: forward over ``tokens [B, T]``, penalty-state bookkeeping, sampling at each row's
    last token; with ``num_prompt_logprobs`` also the logprobs of ``targets [B, T]`` at every position."""
    B, T = tokens.shape
    hidden, cache = forward(params, cfg, tokens, start, num_tokens, page_table, cache, lora, lora_impl,
                            attention_impl)                                             # [B, T, E]
    offsets = jnp.arange(T, dtype=jnp.int32)
    valid = offsets[None, :] < num_tokens[:, None]
    prompt_mask, output_counts = _reset_and_record(prompt_mask, output_counts, rows, tokens,
                                                   start[:, None] + offsets[None, :], valid, prompt_lens,
                                                   start == 0, cfg.vocab_size)
    last = hidden[jnp.arange(B), jnp.maximum(num_tokens - 1, 0)]                      # [B, E]
    logits = compute_logits(params, last)                                              # [B, V]
    result = sample(logits, st, steps, prompt_mask[rows] if needs_penalties else None,
                    output_counts[rows] if needs_penalties else None, needs_penalties=needs_penalties,
                    num_logprobs=num_logprobs)
    new_ids = jnp.where(samples, result.token_ids, cfg.vocab_size)
    output_counts = output_counts.at[rows, new_ids].add(1, mode="drop")
    prompt_lp = None
    if num_prompt_logprobs is not None:
        prompt_lp = prompt_logprobs_in_chunks(params, hidden.reshape(B * T, -1), targets.reshape(-1),
                                              num_prompt_logprobs)
    return result, prompt_lp, cache, prompt_mask, output_counts


PROMPT_LOGPROB_ROWS = 512
"""Positions whose float32 logits are alive at once when computing prompt logprobs (512 x 128k vocab: 0.26 GB)."""


def prompt_logprobs_in_chunks(params: Params, hidden: Array, targets: Array, num_logprobs: int,
                              rows: int = PROMPT_LOGPROB_ROWS) -> tuple[Array, Array, Array, Array]:
    """``compute_prompt_logprobs(compute_logits(params, hidden), targets, num_logprobs)`` over ``rows`` positions
    at a time (a ``lax.map``): a whole prefill step's ``[N, V]`` float32 logits (2.1 GB at 4096 positions and
    a 128k vocabulary, plus log-softmax temporaries) are never alive at once.

    Args:
      hidden: ``[N, E]`` final hidden states; targets: ``[N]`` the token after each position.

    Returns:
      As ``compute_prompt_logprobs``: ``[N]``, ``[N]``, ``[N, k]``, ``[N, k]``.
    """
    n = hidden.shape[0]
    if n <= rows:
        return compute_prompt_logprobs(compute_logits(params, hidden), targets, num_logprobs)
    chunks = -(-n // rows)
    pad = chunks * rows - n
    h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(chunks, rows, hidden.shape[1])
    t = jnp.pad(targets, (0, pad)).reshape(chunks, rows)
    out = jax.lax.map(lambda ht: compute_prompt_logprobs(compute_logits(params, ht[0]), ht[1], num_logprobs),
                      (h, t))
    return tuple(x.reshape(chunks * rows, *x.shape[2:])[:n] for x in out)


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps", "lora_impl", "attention_impl", "needs_penalties",
                                             "num_logprobs", "unroll"),
                   donate_argnames=("cache", "prompt_mask", "output_counts"), compiler_options=COMPILER_OPTIONS)
def _decode_steps(params, cfg, cache, lora, tokens, pos, active, page_table, rows, st, steps, prompt_mask,
                  output_counts, record_fed, prompt_lens, *, num_steps, lora_impl, attention_impl, needs_penalties,
                  num_logprobs, unroll=False):
    """``num_steps`` decode steps: each feeds every active row's newest token at its position, samples on
    the device and feeds the sample to the next step. Returns ``SampleResult`` fields stacked ``[K, B]``.
    Rows with ``record_fed`` first record their fed token in the penalty state (prompt mask if it is a
    prompt position, ``< prompt_lens``, else the output counts). ``unroll`` unrolls the steps into
    straight-line code (no device while loop). Also returns each row's last sample ``[B]`` (it feeds a
    chained call)."""
    n_new = active.astype(jnp.int32)
    fed_is_prompt = pos < prompt_lens
    prompt_mask = prompt_mask.at[rows, jnp.where(record_fed & fed_is_prompt, tokens, cfg.vocab_size)].set(
        True, mode="drop")
    output_counts = output_counts.at[rows, jnp.where(record_fed & ~fed_is_prompt, tokens, cfg.vocab_size)].add(
        1, mode="drop")

    # the segment kernels' tiles depend on the slots only: built once for all the steps
    lora = prepare_lora(lora, 1, resolve_impl(lora_impl, 1, tokens.shape[0]), cfg.num_kv_heads)

    def step(carry, k):
        cache, tok, output_counts = carry
        hidden, cache = forward(params, cfg, tok[:, None], pos + k, n_new, page_table, cache, lora, lora_impl,
                                attention_impl)
        logits = compute_logits(params, hidden[:, 0])                                   # [B, V]
        result = sample(logits, st, steps + k, prompt_mask[rows] if needs_penalties else None,
                        output_counts[rows] if needs_penalties else None, needs_penalties=needs_penalties,
                        num_logprobs=num_logprobs)
        output_counts = output_counts.at[rows, jnp.where(active, result.token_ids, cfg.vocab_size)].add(
            1, mode="drop")
        return (cache, result.token_ids, output_counts), result

    (cache, last_tokens, output_counts), results = jax.lax.scan(step, (cache, tokens, output_counts),
                                                                jnp.arange(num_steps, dtype=jnp.int32),
                                                                unroll=num_steps if unroll else 1)
    return results, last_tokens, cache, prompt_mask, output_counts


@functools.partial(jax.jit, static_argnames=("cfg", "num_steps", "lora_impl", "attention_impl", "needs_penalties",
                                             "num_logprobs", "unroll"),
                   donate_argnames=("cache", "prompt_mask", "output_counts"), compiler_options=COMPILER_OPTIONS)
def _decode_call(params, cfg, cache, bank, ints, fed, st, prompt_mask, output_counts, *, num_steps, lora_impl,
                 attention_impl, needs_penalties, num_logprobs, unroll=False):
    """``_decode_steps`` with its integer inputs packed by ``ModelRunner.start_decode`` into ``ints`` (int32):
    the page table ``[B, P]`` flattened, then rows of ``[B]``: positions, active, state rows, output counts so
    far, record_fed, prompt lengths, the host's tokens, whether to feed ``fed`` (a chained call's tokens, from
    the device) instead, and with ``bank`` (None: no adapters) each row's slot."""
    B = fed.shape[0]
    n_rows = 8 + (bank is not None)
    P = ints.shape[0] // B - n_rows
    table = ints[:B * P].reshape(B, P)
    pos, active, rows, steps, record_fed, prompt_lens, tokens, use_fed, *slots = ints[B * P:].reshape(n_rows, B)
    tokens = jnp.where(use_fed != 0, fed, tokens)
    lora = LoRABatch(bank, slots[0]) if bank is not None else None
    return _decode_steps.__wrapped__(  # the traced body: a nested jit may not carry compiler options
        params, cfg, cache, lora, tokens, pos, active != 0, table, rows, st, steps, prompt_mask, output_counts,
        record_fed != 0, prompt_lens, num_steps=num_steps, lora_impl=lora_impl, attention_impl=attention_impl,
        needs_penalties=needs_penalties, num_logprobs=num_logprobs, unroll=unroll)
