"""The engine's jitted steps under XLA's concurrent command-buffer schedule compute what the serial ones do.

``model_runner.COMPILER_OPTIONS`` lets a CUDA graph run independent kernels at once (the LoRA kernels beside
the base matmuls), ordered only by XLA's buffer dependencies. A missed dependency would be a race: a kernel
reading a buffer before it is written, or one that shares memory with another live buffer. This check
compiles the engine's steps (Llama-3-8B layer shapes, fewer layers, every row its own adapter and 8 shared
adapters) once per schedule and requires bitwise-equal results, and each executable to give the same bits
on a second run:

- decode (several batch sizes): the sampled tokens and their logprobs over ``num_steps`` chained steps;
- prefill (chunks of ``--prefill-tokens`` tokens, the segment LoRA kernels' size): the sampled tokens,
  their logprobs, every position's prompt logprob, and the KV cache the step wrote.

Autotuning is off in both compiles (``xla_gpu_autotune_level=0``): separate compiles otherwise time GEMM
configurations independently and may pick different ones, whose bf16 roundings differ (seen at batch 1),
which would hide what the schedule alone does. Exits non-zero on a difference.

    PYTHONPATH=. python benchmarks/schedule_check.py
    PYTHONPATH=. python benchmarks/schedule_check.py --small     # CPU smoke test (the option is GPU-only)
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from throughput import bench_model_config, random_bank  # noqa: E402

from jmlora.config import EngineConfig  # noqa: E402
from jmlora.engine.model_runner import ModelRunner, _decode_steps, _prefill_step  # noqa: E402
from jmlora.engine.sampler import SamplingTensors  # noqa: E402
from jmlora.engine.sampling_params import SamplingParams  # noqa: E402
from jmlora.lora.routing import LoRABatch  # noqa: E402
from jmlora.model import init_params, make_mesh  # noqa: E402

MODES = ("SERIALIZE", "CONCURRENT")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=192)
    parser.add_argument("--prefill-rows", type=int, default=4)
    parser.add_argument("--prefill-tokens", type=int, default=256, help="tokens per prefill row")
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    K, B_max = args.steps, max(batches)
    cfg = bench_model_config(max(args.ctx + 2 * K, args.prefill_tokens), small=args.small,
                             num_hidden_layers=args.layers)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    P = -(-max(args.ctx + K, args.prefill_tokens) // 16)
    ecfg = EngineConfig(max_num_seqs=B_max, page_size=16, num_lookahead=K, enable_lora=True, max_loras=64,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=B_max * P)
    runner = ModelRunner(cfg, params, mesh, ecfg, B_max * P)
    runner.bank = random_bank(runner.bank, 16)
    runner.cache = jax.tree.map(lambda c: jax.random.normal(jax.random.key(3), c.shape, c.dtype), runner.cache)
    temp = SamplingParams(temperature=0.8, seed=11)            # seeded sampling: the draws are compared too
    failures = 0

    def compare(label, lowered, call_args, outputs):
        """Compiles ``lowered`` under each schedule; ``outputs(result)`` -> arrays to compare bitwise."""
        outs = {}
        bad = 0
        for mode in MODES:
            exe = lowered.compile({"xla_gpu_command_buffer_scheduling_mode": mode, "xla_gpu_autotune_level": 0})
            runs = []
            for _ in range(2):
                fresh = jax.tree.map(jnp.copy, call_args)       # the cache and penalty state are donated
                runs.append([np.asarray(a) for a in outputs(exe(*fresh))])
            if not all(np.array_equal(a, b) for a, b in zip(*runs)):
                print(f"{label} {mode}: two runs of one executable differ")
                bad += 1
            outs[mode] = runs[0]
        same = all(np.array_equal(a, b) for a, b in zip(outs[MODES[0]], outs[MODES[1]]))
        print(f"{label}: {'bitwise equal' if same else 'DIFFER'} across {MODES}", flush=True)
        return bad + (not same)

    # prefill: rows of prefill_tokens prompt tokens each, from position 0, prompt logprobs on
    B, T = args.prefill_rows, args.prefill_tokens
    st = SamplingTensors.from_params([temp] * B, [0] * B, B)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    table = jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P))
    for name, slots in (("distinct", 1 + np.arange(B) % 64), ("shared", 1 + np.arange(B) % 2)):
        lora = LoRABatch(runner.bank, jnp.asarray(slots, jnp.int32))
        call_args = (params, runner.cache, lora, tokens, jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32), table,
                     jnp.arange(B, dtype=jnp.int32), jnp.full(B, T, jnp.int32), jnp.ones(B, bool), st,
                     jnp.zeros(B, jnp.int32), runner.prompt_mask, runner.output_counts, targets)
        lowered = _prefill_step.lower(*call_args[:1], cfg, *call_args[1:], lora_impl="auto", attention_impl="auto",
                                      needs_penalties=False, num_logprobs=0, num_prompt_logprobs=2)
        failures += compare(f"prefill {B}x{T} {name:8s}: tokens, logprobs, prompt logprobs, KV cache", lowered,
                            call_args, lambda out: [out[0].token_ids, out[0].logprobs, *out[1],
                                                    *jax.tree.leaves(out[2])])

    for B in batches:
        st = SamplingTensors.from_params([temp] * B, [0] * B, B)
        table = jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P))
        pos = jnp.full(B, args.ctx, jnp.int32)
        tokens = jnp.asarray(np.random.default_rng(B).integers(0, cfg.vocab_size, B), jnp.int32)
        for name, slots in (("distinct", 1 + np.arange(B) % 64), ("shared8", 1 + np.arange(B) % 8)):
            lora = LoRABatch(runner.bank, jnp.asarray(slots, jnp.int32))
            call_args = (params, runner.cache, lora, tokens, pos, jnp.ones(B, bool), table,
                         jnp.arange(B, dtype=jnp.int32), st, jnp.zeros(B, jnp.int32), runner.prompt_mask,
                         runner.output_counts, jnp.zeros(B, bool), pos)
            lowered = _decode_steps.lower(*call_args[:1], cfg, *call_args[1:], num_steps=K, lora_impl="auto",
                                          attention_impl="auto", needs_penalties=False, num_logprobs=0)
            failures += compare(f"decode B={B:3d} {name:8s}: tokens and logprobs over {K} steps", lowered, call_args,
                                lambda out: [out[0].token_ids, out[0].logprobs])
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
