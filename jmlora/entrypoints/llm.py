"""``LLM``: batch generation with vLLM's interface.

    llm = LLM("path/to/model", enable_lora=True, max_loras=4)
    outs = llm.generate(["Hello", "Bonjour"], SamplingParams(temperature=0, max_tokens=32),
                        lora_request=[None, LoRARequest("fr", 1, "path/to/adapter")])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from tqdm import tqdm

from jmlora.config import EngineConfig
from jmlora.engine.llm_engine import LLMEngine, RequestError
from jmlora.engine.sampling_params import RequestOutputKind, SamplingParams
from jmlora.lora.request import LoRARequest
from jmlora.outputs import RequestOutput


class LLM:
    """Generates for batches of prompts, each with its own adapter (or none).

    Args:
      model: a Hugging Face model directory.
      dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
      enable_lora: serve LoRA adapters.
      max_loras: adapters resident on the device at once (distinct adapters in one running batch).
      max_lora_rank: the largest adapter rank served.
      max_cpu_loras: parsed adapters kept in host memory (default 2 * max_loras).
      max_num_seqs: sequences running at once.
      max_model_len: longest prompt + output (default: the model's max_position_embeddings).
      gpu_memory_utilization: fraction of accelerator memory for weights, adapters and the KV cache.
      seed: engine seed.
      load_format: "auto" or "safetensors" (read the checkpoint's weights), or "dummy": random weights of the
        config's shapes made on the device (vLLM's option for benchmarking; needs only config.json and the
        tokenizer in ``model``).
      **engine_kwargs: further ``EngineConfig`` fields (page_size, num_kv_pages, max_num_batched_tokens,
        max_prefill_chunk, num_lookahead, warmup, ...).
    """

    def __init__(self, model: str | Path, *, dtype: str = "auto", enable_lora: bool = False, max_loras: int = 4,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None, max_num_seqs: int = 64,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9, seed: int = 0,
                 load_format: str = "auto", **engine_kwargs: Any):
        config = EngineConfig(enable_lora=enable_lora, max_loras=max_loras, max_lora_rank=max_lora_rank,
                              max_cpu_loras=max_cpu_loras, max_num_seqs=max_num_seqs,
                              gpu_memory_utilization=gpu_memory_utilization, seed=seed, **engine_kwargs)
        self.llm_engine = LLMEngine(model, config, dtype=dtype, max_model_len=max_model_len,
                                    load_format=load_format)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: str | dict | Sequence[str | dict | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates completions for every prompt; returns one ``RequestOutput`` per prompt, in input order.

        Args:
          prompts: a string, a ``{"prompt_token_ids": [...]}`` dict, or a list of those.
          sampling_params: one for all prompts or one per prompt (default ``SamplingParams()``).
          lora_request: one adapter for all prompts or one per prompt (None = the base model).
          use_tqdm: show a progress bar.

        Raises:
          ValueError (RequestError, AdapterError): a bad prompt, parameter or adapter, before anything runs.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        params = self._per_prompt(sampling_params, n, "sampling_params", SamplingParams) or [SamplingParams()] * n
        # only finished outputs are returned here: the engine then skips streaming text (vLLM does the same)
        final_only: dict[int, SamplingParams] = {}
        for p in params:
            if id(p) not in final_only:
                final_only[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
        params = [final_only[id(p)] for p in params]
        loras = self._per_prompt(lora_request, n, "lora_request", LoRARequest) or [None] * n
        engine = self.llm_engine
        # Validate everything first, so a bad prompt or adapter raises before any request is queued.
        for i, (prompt, lora) in enumerate(zip(prompts, loras)):
            try:
                engine.tokenize_prompt(prompt)
                if lora is not None:
                    engine.validate_lora(lora)
            except ValueError as e:
                raise type(e)(f"prompt {i}: {e}") from e
        ids: list[str] = []
        results: list[RequestOutput | None] = [None] * n
        try:
            for i, (p, sp, lr) in enumerate(zip(prompts, params, loras)):
                try:
                    ids.append(engine.add_request(None, p, sp, lr))
                except ValueError as e:
                    raise type(e)(f"prompt {i}: {e}") from e
            order = {rid: i for i, rid in enumerate(ids)}
            with tqdm(total=n, desc="Processed prompts", disable=not use_tqdm) as bar:
                prompt_tokens = output_tokens = 0
                remaining = n
                while remaining:
                    for out in engine.step():
                        if out.finished and out.request_id in order:
                            results[order[out.request_id]] = out
                            remaining -= 1
                            if use_tqdm:        # vLLM's estimate of the speed so far
                                prompt_tokens += len(out.prompt_token_ids)
                                output_tokens += sum(len(c.token_ids) for c in out.outputs)
                                elapsed = bar.format_dict["elapsed"] or 1e-9
                                bar.set_postfix_str(f"est. speed input: {prompt_tokens / elapsed:.2f} toks/s, "
                                                    f"output: {output_tokens / elapsed:.2f} toks/s", refresh=False)
                                bar.update(1)
        except BaseException:
            for rid in ids:
                engine.abort(rid)
            raise
        failed = [(i, r) for i, r in enumerate(results) if r.error is not None]
        if failed:
            i, r = failed[0]
            raise RequestError(f"prompt {i} failed: {r.error}") from r.error
        return results

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, lora_request=None,
             use_tqdm: bool = True, *, add_generation_prompt: bool = True, chat_template: str | None = None,
             ) -> list[RequestOutput]:
        """Renders each conversation with the tokenizer's chat template (jinja2) and generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = chat_template or self.llm_engine.tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat_template; pass chat_template=...")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        compiled = env.from_string(template)
        tok = self.llm_engine.tokenizer
        special = {"bos_token": tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None else "",
                   "eos_token": tok.id_to_token(tok.eos_token_ids[0]) if tok.eos_token_ids else ""}
        prompts = []
        for conversation in conversations:
            text = compiled.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                                   raise_exception=raise_exception, **special)
            # the template already holds any BOS it wants: do not add special tokens again
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    @staticmethod
    def _per_prompt(value, n: int, name: str, kind) -> list | None:
        if value is None:
            return None
        if isinstance(value, kind):
            return [value] * n
        values = list(value)
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} prompts")
        for v in values:
            if v is not None and not isinstance(v, kind):
                raise ValueError(f"{name} entries must be {kind.__name__} or None, got {type(v).__name__}")
        return values
