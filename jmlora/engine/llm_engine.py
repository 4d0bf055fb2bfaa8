"""``LLMEngine``: requests in, streaming ``RequestOutput``s out, one ``step()`` at a time.

``step()`` is the algorithm: schedule, load the adapters the plan needs, run the step on the device,
append the samples and check stop conditions, emit outputs. Embed it in any loop (the batch API, a server,
a training job) with ``add_request`` / ``step`` / ``abort``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jmlora.config import EngineConfig
from jmlora.engine.detokenizer import IncrementalDetokenizer
from jmlora.engine.model_runner import ModelRunner, StepOutput
from jmlora.engine.page_manager import PageManager
from jmlora.engine.sampling_params import RequestOutputKind, SamplingParams
from jmlora.engine.scheduler import Scheduler, SchedulerConfig
from jmlora.engine.sequence import Sequence
from jmlora.generation import LoadedModel
from jmlora.lora.peft import AdapterError
from jmlora.lora.request import LoRARequest
from jmlora.lora.slots import SlotManager
from jmlora.outputs import CompletionOutput, Logprob, RequestOutput

logger = logging.getLogger(__name__)

_MAX_STAGED = 2   # adapters copied to the device ahead of their load (83.9 MB each for a Llama-3-8B rank 16)


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, bad adapter, too long, ...), naming the problem."""


@dataclasses.dataclass
class _SeqState:
    """Host-side output state of one sequence."""

    seq: Sequence
    index: int
    detokenizer: IncrementalDetokenizer
    text: str = ""
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    seqs: list[_SeqState]
    prompt_logprobs: list | None = None
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class LLMEngine:
    """The serving engine for one model (see the module docstring).

    Args:
      model: a Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
      engine_config: limits, cache and LoRA settings.
      dtype: "auto", "float32", "bfloat16" or "float16".
      max_model_len: longest prompt + output; defaults to the model's max_position_embeddings.
      load_format: "auto"/"safetensors" (read the weights) or "dummy" (random weights: benchmarks).
    """

    def __init__(self, model: str | Path, engine_config: EngineConfig | None = None, *, dtype: str = "auto",
                 max_model_len: int | None = None, load_format: str = "auto"):
        self.config = ecfg = engine_config or EngineConfig()
        self.model = LoadedModel.load(model, dtype=dtype, max_model_len=max_model_len, load_format=load_format)
        self.model_config = cfg = self.model.cfg
        self.tokenizer = self.model.tokenizer
        num_pages = ecfg.num_kv_pages or self._default_num_pages()
        self.slot_manager = SlotManager(ecfg.max_loras, ecfg.max_cpu_loras or 2 * ecfg.max_loras,
                                        loader=self._load_adapter)
        self.page_manager = PageManager(num_pages, ecfg.page_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=ecfg.max_num_seqs, max_num_batched_tokens=ecfg.max_num_batched_tokens,
                            max_prefill_chunk=ecfg.max_prefill_chunk, num_lookahead=ecfg.num_lookahead,
                            max_model_len=cfg.max_model_len),
            self.page_manager, self.slot_manager)
        eos = tuple(dict.fromkeys(self.tokenizer.eos_token_ids + cfg.eos_token_ids))
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(cfg, self.model.params, self.model.mesh, ecfg, num_pages, eos_token_ids=eos)
        self._requests: dict[str, _Request] = {}
        self._lora_paths: dict[str, str] = {}
        self._seed_rng = np.random.default_rng(ecfg.seed)
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_steps": 0, "decode_steps": 0, "preemptions": 0, "adapter_loads": 0,
                      "adapters_staged": 0, "adapter_loads_staged": 0, "chained_decode_steps": 0}
        self._staged: dict[tuple[str, str | None], tuple] = {}   # (name, path) -> device arrays being copied
        self._unstageable: set[tuple[str, str | None]] = set()    # adapters that failed to parse: not retried
        self._in_flight: tuple | None = None      # (plan, DecodeCall) of a dispatched decode call not yet read
        if ecfg.warmup:
            self.num_warmup_shapes = self.runner.warmup()

    # -- setup ---------------------------------------------------------------------------------------------

    def _default_num_pages(self) -> int:
        ecfg, cfg = self.config, self.model_config
        full = ecfg.max_num_seqs * -(-(cfg.max_model_len + ecfg.num_lookahead) // ecfg.page_size)
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit or jax.default_backend() == "cpu":
            return full
        page_bytes = (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * ecfg.page_size
                      * self.model.params.embed.dtype.itemsize)
        free = int(limit * ecfg.gpu_memory_utilization) - stats.get("bytes_in_use", 0)
        if ecfg.enable_lora:
            from jmlora.lora.bank import BankSpec
            itemsize = self.model.params.embed.dtype.itemsize
            slot_bytes = BankSpec(ecfg.max_loras, ecfg.max_lora_rank).slot_elements(cfg) * itemsize
            free -= (ecfg.max_loras + 1 + _MAX_STAGED) * slot_bytes      # the bank and the staged copies
        free -= 2 * (ecfg.max_num_seqs + 1) * cfg.vocab_size * 5        # penalty state
        pages = max(1, min(full, free // page_bytes))
        logger.info("KV cache: %d pages of %d tokens (%.1f GB)", pages, ecfg.page_size, pages * page_bytes / 1e9)
        return pages

    def _load_adapter(self, name: str, path: str):
        from jmlora.lora.peft import load_peft_adapter
        return load_peft_adapter(path, self.model_config, max_lora_rank=self.config.max_lora_rank, name=name)

    # -- requests ------------------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: str | list[int] | dict[str, Any]) -> tuple[str | None, list[int]]:
        """Accepts a string, a list of token ids, or ``{"prompt_token_ids": [...]}`` / ``{"prompt": str}``."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise RequestError("a prompt dict needs 'prompt_token_ids' or 'prompt'")
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise RequestError("the prompt is empty")
            return prompt, ids
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise RequestError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_ids(self, ids) -> list[int]:
        ids = list(ids)
        if not ids:
            raise RequestError("prompt_token_ids is empty")
        V = self.model_config.vocab_size
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < V:
                raise RequestError(f"prompt_token_ids must be integers in [0, {V}); got {t!r}")
        return [int(t) for t in ids]

    def register_lora(self, lora_request: LoRARequest) -> None:
        """Makes an adapter known (name -> path); parsing and validation happen on first use."""
        if not self.config.enable_lora:
            raise RequestError(f"LoRA adapter {lora_request.lora_name!r} requested but the engine was built "
                               "without enable_lora=True")
        known = self._lora_paths.get(lora_request.lora_name)
        if known is not None and known != lora_request.lora_path:
            raise RequestError(f"LoRA name {lora_request.lora_name!r} is already registered with path {known}")
        self.slot_manager.register(lora_request.lora_name, lora_request.lora_path)
        self._lora_paths[lora_request.lora_name] = lora_request.lora_path

    def validate_lora(self, lora_request: LoRARequest) -> None:
        """Registers and parses an adapter now (host only), so a bad one raises before any request uses it.

        Raises:
          AdapterError: the adapter cannot be served (the message names the file and the problem).
        """
        self.register_lora(lora_request)
        self.slot_manager.get_weights(lora_request.lora_name)

    def add_request(self, request_id: str | None, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> str:
        """Queues a request; returns its id. Raises RequestError / ValueError before queueing anything."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = self.tokenize_prompt(prompt)
        max_len = self.model_config.max_model_len
        if len(ids) >= max_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; max_model_len is {max_len} (prompt + at least one "
                               "generated token)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise RequestError(f"{name}={value} exceeds the engine's max_logprobs={self.config.max_logprobs}")
        if lora_request is not None:
            self.register_lora(lora_request)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, ids, params=params,
                           lora_name=lora_request.lora_name if lora_request else None)
            seq.sampling_seed = (params.seed + i if params.seed is not None
                                 else int(self._seed_rng.integers(0, 2**31 - 1)))
            seqs.append(_SeqState(seq, i, IncrementalDetokenizer(self.tokenizer.decode, params.skip_special_tokens),
                                  logprobs=[] if params.logprobs is not None else None))
        request = _Request(request_id, text, ids, params, lora_request, seqs,
                           prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self._requests[request_id] = request
        for s in seqs:
            self.scheduler.add(s.seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request wherever it is; its pages and adapter references are returned at once."""
        request = self._requests.pop(str(request_id), None)
        if request is None:
            return None
        for seq in self.scheduler.abort(str(request_id)):
            self.runner.release(seq.seq_id)
        self._drop_unwanted_staged()
        for s in request.seqs:
            if s.finish_reason is None:
                s.finish_reason = "abort"
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the step ------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns outputs of the requests that progressed (finished ones last time).

        A decode step is dispatched without waiting for it. With ``async_scheduling``, the next step reads its
        samples only after dispatching the decode step that follows it (``Scheduler.schedule_continuation``),
        so the device works while the host appends samples, checks stops and streams text."""
        touched: dict[str, _Request] = {}
        if self._in_flight is None:
            plan = self.scheduler.schedule()
            for seq, exc in plan.failed:
                self._fail(seq, exc, touched)
            if plan.failed:
                self._drop_unwanted_staged()
            for seq in plan.preempted:
                self.runner.release(seq.seq_id)
            self.stats["preemptions"] += len(plan.preempted)
            self._count(plan)
            result = None
            try:
                for name, slot in plan.adapter_loads:
                    staged = self._staged.pop((name, self._lora_paths.get(name)), None)
                    self.runner.load_adapter(slot, None if staged else self.slot_manager.get_weights(name), staged)
                    self.stats["adapter_loads_staged"] += staged is not None
                    self.stats["adapter_loads"] += 1
                if plan.kind == "prefill":
                    result = self.runner.prefill(plan.chunks, while_running=self._stage_waiting_adapters)
                    self._collect_prompt_logprobs(plan.chunks, result)
                elif plan.kind == "decode":
                    self._in_flight = (plan, self.runner.start_decode(plan.chunks, plan.num_lookahead))
            except Exception as exc:  # noqa: BLE001 - the step's requests fail with it; the engine keeps serving
                return self._fail_step(plan, exc, touched)
            if self._in_flight is None:
                if result is not None:
                    self._append_all(plan, result, touched)
                return self._outputs(touched)
        return self._finish_decode(touched)

    def _finish_decode(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        """Reads the decode call in flight, after dispatching its continuation when one can be planned."""
        plan, call = self._in_flight
        self._in_flight = None
        chained = None
        if self.config.async_scheduling and not self._may_finish_in(plan):
            next_plan = self.scheduler.schedule_continuation(plan)
            if next_plan is not None:
                self._count(next_plan)
                try:
                    chained = (next_plan, self.runner.start_decode(next_plan.chunks, next_plan.num_lookahead,
                                                                   after=call))
                    self.stats["chained_decode_steps"] += 1
                except Exception as exc:  # noqa: BLE001 - the same sequences as ``plan``: they fail together
                    return self._fail_step(next_plan, exc, touched)
        self._stage_waiting_adapters()
        try:
            result = self.runner.finish_decode(call)
        except Exception as exc:  # noqa: BLE001
            # a chained call took this call's KV cache as its input: it cannot have run either
            return self._fail_step(plan, exc, touched, cache_lost=chained is not None)
        self._in_flight = chained
        self._append_all(plan, result, touched)
        return self._outputs(touched)

    def _may_finish_in(self, plan) -> bool:
        """Whether a sequence of this decode step is sure to stop in it (length limits; the host knows them
        before the samples): its continuation would then waste a call on it, and ``schedule()`` could admit a
        waiting request in its place."""
        return any(plan.num_lookahead >= self._tokens_before_length_stop(chunk.seq) for chunk in plan.chunks)

    def _tokens_before_length_stop(self, seq: Sequence) -> int:
        """How many more tokens ``seq`` takes before ``max_tokens`` or ``max_model_len`` ends it (>= 1)."""
        max_len = self.model_config.max_model_len
        max_tokens = seq.params.max_tokens if seq.params.max_tokens is not None else max_len
        return max(1, min(max_tokens - seq.num_output_tokens, max_len - seq.num_tokens))

    def _count(self, plan) -> None:
        self.stats["steps"] += 1
        if plan.kind != "idle":
            self.stats[f"{plan.kind}_steps"] += 1

    def _append_all(self, plan, result: StepOutput, touched: dict[str, _Request]) -> None:
        token_rows = result.token_ids.tolist()          # one conversion for the whole batch
        for i, chunk in enumerate(plan.chunks):
            request = self._requests.get(chunk.seq.request_id)
            if request is None:
                continue
            touched[request.request_id] = request
            if chunk.samples:
                self._append(request, chunk.seq, result, i, token_rows[i])

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        """The step's outputs (FINAL_ONLY requests only once finished); finished requests are forgotten."""
        outputs = []
        for request in touched.values():
            if not request.finished and request.params.output_kind is RequestOutputKind.FINAL_ONLY:
                continue
            outputs.append(self._output(request))
            if request.finished:
                self._requests.pop(request.request_id, None)
        return outputs

    def _fail_step(self, plan, exc: Exception, touched: dict[str, _Request], *,
                   cache_lost: bool = False) -> list[RequestOutput]:
        """A step whose adapter writes or device call raised: every request with a sequence in it ends with
        ``error = exc`` (its pages, adapter references and state rows returned), and the adapters this step was
        loading are evicted, since their bank slots may hold anything. The other requests are untouched, unless
        the failed call had already consumed the donated KV cache (or ``cache_lost``: a call chained on it took
        its output cache): then every running request has lost its cached keys and values, so those fail too
        and the runner starts from a fresh cache (waiting requests hold nothing on the device and go on)."""
        lost = cache_lost or self.runner.device_state_lost()
        self._in_flight = None
        failing = [c.seq.request_id for c in plan.chunks]
        if lost:        # waiting requests hold nothing on the device (preempted ones recompute): they go on
            failing += [seq.request_id for seq in self.scheduler.running]
        logger.error("step failed (%d requests%s): %s", len(set(failing)),
                     "; the KV cache was consumed, every running request fails" if lost else "", exc)
        for request_id in dict.fromkeys(failing):
            request = self._requests.get(request_id)
            if request is None:
                continue
            for seq in self.scheduler.abort(request_id):
                self.runner.release(seq.seq_id)
            request.error = exc
            for s in request.seqs:
                if s.finish_reason is None:
                    s.finish_reason = "abort"
            touched[request_id] = request
        for name, _ in plan.adapter_loads:
            if self.slot_manager.refcount(name) == 0 and not self.slot_manager.is_pinned(name):
                self.slot_manager.evict(name)
        if lost:
            self.runner.reset_device_state()
        self._drop_unwanted_staged()
        return self._outputs(touched)

    def _stage_waiting_adapters(self) -> None:
        """While the device runs a step: start copying the adapters that the first waiting requests need and
        that are not on the device, so their later load into the bank is a device-to-device copy instead of a
        host-to-device one (at most ``_MAX_STAGED`` adapters are held)."""
        if self.runner.bank is None:
            return
        self._drop_unwanted_staged()
        for seq in self.scheduler.waiting[:self.config.max_num_seqs]:
            name = seq.lora_name
            key = (name, self._lora_paths.get(name))
            if name is None or key in self._staged or self.slot_manager.slot_of(name) is not None:
                continue
            if len(self._staged) >= _MAX_STAGED:
                break
            if key in self._unstageable:
                continue
            try:
                weights = self.slot_manager.get_weights(name)
                self._staged[key] = self.runner.stage_adapter(weights)
            except Exception:       # noqa: BLE001 - a bad adapter fails its request when scheduled, not here,
                self._unstageable.add(key)  # and a failed copy must not fail the step that is running
                continue
            self.stats["adapters_staged"] += 1

    def _drop_unwanted_staged(self) -> None:
        """Frees staged adapters that no waiting request needs any more (aborted or failed requests)."""
        wanted = {(s.lora_name, self._lora_paths.get(s.lora_name)) for s in self.scheduler.waiting}
        for key in [k for k in self._staged if k not in wanted]:
            del self._staged[key]

    def _fail(self, seq: Sequence, exc: Exception, touched: dict) -> None:
        request = self._requests.get(seq.request_id)
        self.runner.release(seq.seq_id)
        if request is None:
            return
        request.error = exc
        logger.warning("request %s failed: %s", seq.request_id, exc)
        for s in request.seqs:
            if s.seq is seq:
                s.finish_reason = "abort"
        touched[request.request_id] = request

    def _collect_prompt_logprobs(self, chunks, result: StepOutput) -> None:
        if result.prompt_logprobs is None:
            return
        for chunk, lp in zip(chunks, result.prompt_logprobs):
            request = self._requests.get(chunk.seq.request_id)
            if lp is None or request is None or chunk.seq is not request.seqs[0].seq:
                continue
            prompt = request.prompt_token_ids
            k = request.params.prompt_logprobs
            target_lp, ranks, top_ids, top_lp = lp
            for j in range(chunk.num_tokens):
                pos = chunk.start + j + 1                         # the prompt token this row predicts
                if pos >= len(prompt) or pos < len(request.prompt_logprobs):
                    continue
                entry = {prompt[pos]: Logprob(float(target_lp[j]), int(ranks[j]), self._decode_token(prompt[pos]))}
                for r in range(k):
                    tid = int(top_ids[j, r])
                    entry.setdefault(tid, Logprob(float(top_lp[j, r]), r + 1, self._decode_token(tid)))
                request.prompt_logprobs.append(entry)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _append(self, request: _Request, seq: Sequence, result: StepOutput, row: int, tokens: list[int]) -> None:
        """Appends row ``row``'s samples (``tokens``, the row of ``result.token_ids`` as a list) to ``seq``."""
        state = next(s for s in request.seqs if s.seq is seq)
        params = request.params
        # The text is needed per token only to find stop strings; otherwise once per step for streaming
        # outputs, and for FINAL_ONLY requests (LLM.generate) only at the end (``final``).
        text_per_token = bool(params.stop)
        if state.logprobs is None and not text_per_token:
            self._append_plain(state, tokens)
        else:
            self._append_each(state, result, row, tokens, text_per_token)
        if state.finish_reason is not None:
            self.scheduler.finish(seq)
            self.runner.release(seq.seq_id)
        elif not text_per_token and params.output_kind is not RequestOutputKind.FINAL_ONLY:
            state.text = state.detokenizer.update(seq.output_token_ids)

    def _append_each(self, state: _SeqState, result: StepOutput, row: int, tokens: list[int],
                     text_per_token: bool) -> None:
        """``_append`` one token at a time: logprob entries, and stop checks that may need the text."""
        seq, params = state.seq, state.seq.params
        token_lps = result.logprobs[row].tolist()
        for k, token in enumerate(tokens):
            if state.finish_reason is not None:
                break
            seq.append_token(token)
            state.cumulative_logprob += token_lps[k]
            if state.logprobs is not None:
                entry = {token: Logprob(token_lps[k], int(result.ranks[row, k]), self._decode_token(token))}
                for r in range(params.logprobs):
                    tid = int(result.top_ids[row, k, r])
                    entry.setdefault(tid, Logprob(float(result.top_logprobs[row, k, r]), r + 1,
                                                  self._decode_token(tid)))
                state.logprobs.append(entry)
            self._check_stop(state, token, text_per_token)

    def _append_plain(self, state: _SeqState, tokens: list[int]) -> None:
        """``_append`` for a sequence without logprobs or stop strings (the common case; a batch of 256 spends
        a few microseconds per token here instead of a ``_check_stop`` call per token): appends up to the
        first stop token or length limit, the same tokens and finish reasons as ``_check_stop`` gives."""
        seq, params = state.seq, state.seq.params
        n_out = seq.num_output_tokens
        room = self._tokens_before_length_stop(seq)
        end = min(len(tokens), room)
        reason, stop_reason = ("length" if end == room else None), None
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        for k in range(max(0, params.min_tokens - n_out - 1), end):          # stops count from min_tokens on
            token = tokens[k]
            if token in params.stop_token_ids:
                end, reason, stop_reason = k + 1, "stop", token
                break
            if token in eos:
                end, reason = k + 1, "stop"
                break
        seq.append_tokens(tokens[:end])
        if reason is not None:
            state.finish_reason, state.stop_reason = reason, stop_reason
            state.text = state.detokenizer.final(seq.output_token_ids)

    def _check_stop(self, state: _SeqState, token: int, update_text: bool = True) -> None:
        seq, params = state.seq, state.seq.params
        n_out = seq.num_output_tokens
        old_len = len(state.text)
        if update_text:
            state.text = state.detokenizer.update(seq.output_token_ids)
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                state.finish_reason, state.stop_reason = "stop", token
                state.text = state.detokenizer.final(seq.output_token_ids)
                return
            if not params.ignore_eos and token in self.eos_token_ids:
                state.finish_reason = "stop"
                state.text = state.detokenizer.final(seq.output_token_ids)
                return
            if update_text and self._stop_string(state, old_len):
                return
        max_tokens = params.max_tokens if params.max_tokens is not None else self.model_config.max_model_len
        if n_out >= max_tokens or seq.num_tokens >= self.model_config.max_model_len:
            state.finish_reason = "length"
            settled = len(state.text)
            state.text = state.detokenizer.final(seq.output_token_ids)
            # characters held back as incomplete are text now: they may complete a stop string
            if n_out >= params.min_tokens and len(state.text) > settled:
                self._stop_string(state, settled)

    @staticmethod
    def _stop_string(state: _SeqState, old_len: int) -> bool:
        """Ends the sequence at the first stop string that the text from ``old_len`` on could complete (as vLLM:
        an occurrence made before ``min_tokens`` was reached does not stop the sequence later)."""
        params = state.seq.params
        for stop in params.stop:
            idx = state.text.find(stop, max(0, old_len - len(stop) + 1))
            if idx >= 0:
                state.text = state.text[:idx + len(stop)] if params.include_stop_str_in_output else state.text[:idx]
                state.finish_reason, state.stop_reason = "stop", stop
                return True
        return False

    @staticmethod
    def _visible_text(state: _SeqState) -> str:
        """While streaming, hold back the characters that could still become a stop string (vLLM does too)."""
        hold = state.seq.params.output_text_buffer_length
        if state.finish_reason is not None or not hold:
            return state.text
        return state.text[:max(0, len(state.text) - hold)]

    def _output(self, request: _Request) -> RequestOutput:
        completions = [CompletionOutput(index=s.index, text=self._visible_text(s),
                                        token_ids=list(s.seq.output_token_ids),
                                        cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                        logprobs=list(s.logprobs) if s.logprobs is not None else None,
                                        finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                       for s in request.seqs]
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids,
                             prompt_logprobs=list(request.prompt_logprobs) if request.prompt_logprobs else None,
                             outputs=completions, finished=request.finished, lora_request=request.lora_request,
                             error=request.error)

    def check_invariants(self) -> None:
        """Pages, slot references and state rows match the live requests (for tests)."""
        self.scheduler.check_invariants()
        self.page_manager.check_invariants()
        self.slot_manager.check_invariants()
        live = {s.seq.seq_id for r in self._requests.values() for s in r.seqs if s.finish_reason is None}
        if self.runner.num_rows_in_use > len(live):
            raise AssertionError(f"{self.runner.num_rows_in_use} penalty-state rows in use for {len(live)} live "
                                 "sequences")

    def is_idle(self) -> bool:
        """No request in flight, every page free and no adapter referenced (a leak check)."""
        return (not self._requests and not self._staged and self.page_manager.num_free == self.page_manager.num_pages
                and all(self.slot_manager.refcount(n) == 0 for n in self.slot_manager.resident())
                and self.runner.num_rows_in_use == 0)


__all__ = ["AdapterError", "LLMEngine", "RequestError"]
