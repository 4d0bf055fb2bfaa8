"""The engine's decode step under XLA's concurrent command-buffer schedule computes what the serial one does.

``model_runner.COMPILER_OPTIONS`` lets a CUDA graph run independent kernels at once (the LoRA kernels beside
the base matmuls), ordered only by XLA's buffer dependencies. A missed dependency would be a race: a kernel
reading a buffer before it is written, or one that shares memory with another live buffer. This check
compiles the decode step (Llama-3-8B layer shapes, fewer layers, every row its own adapter and 8 shared
adapters, several batch sizes) once per schedule and requires the sampled tokens and their logprobs over
``num_steps`` chained steps to be bitwise equal, and each executable to give the same bits on a second run.

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
from jmlora.engine.model_runner import ModelRunner, _decode_steps  # noqa: E402
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
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    K, B_max = args.steps, max(batches)
    cfg = bench_model_config(args.ctx + 2 * K, small=args.small, num_hidden_layers=args.layers)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    P = -(-(args.ctx + K) // 16)
    ecfg = EngineConfig(max_num_seqs=B_max, page_size=16, num_lookahead=K, enable_lora=True, max_loras=64,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=B_max * P)
    runner = ModelRunner(cfg, params, mesh, ecfg, B_max * P)
    runner.bank = random_bank(runner.bank, 16)
    runner.cache = jax.tree.map(lambda c: jax.random.normal(jax.random.key(3), c.shape, c.dtype), runner.cache)
    temp = SamplingParams(temperature=0.8, seed=11)            # seeded sampling: the draws are compared too
    failures = 0
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
            outs = {}
            for mode in MODES:
                exe = lowered.compile({"xla_gpu_command_buffer_scheduling_mode": mode, "xla_gpu_autotune_level": 0})
                runs = []
                for _ in range(2):
                    fresh = jax.tree.map(jnp.copy, call_args)       # the cache and penalty state are donated
                    res = exe(*fresh)[0]
                    runs.append((np.asarray(res.token_ids), np.asarray(res.logprobs)))
                if not all(np.array_equal(a, b) for a, b in zip(*runs)):
                    print(f"B={B} {name} {mode}: two runs of one executable differ")
                    failures += 1
                outs[mode] = runs[0]
            same = all(np.array_equal(a, b) for a, b in zip(outs[MODES[0]], outs[MODES[1]]))
            diff = float(np.max(np.abs(outs[MODES[0]][1] - outs[MODES[1]][1])))
            print(f"B={B:3d} {name:8s}: tokens and logprobs over {K} steps "
                  f"{'bitwise equal' if same else f'DIFFER (max logprob diff {diff:.3g})'} across {MODES}",
                  flush=True)
            failures += not same
    print("OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
