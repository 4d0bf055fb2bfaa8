"""Dumps the optimized HLO of the decode step (Llama-3-8B widths, 2 layers) for reading fusion decisions.

    PYTHONPATH=. python benchmarks/dump_decode_hlo.py --batch 32 --variant distinct --out $OUT/decode.hlo
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from throughput import bench_model_config

from jmlora.config import EngineConfig
from jmlora.engine import model_runner
from jmlora.engine.sampler import SamplingTensors
from jmlora.engine.sampling_params import SamplingParams
from jmlora.lora.routing import LoRABatch
from jmlora.model import init_params, make_mesh


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variant", default="distinct")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lora-impl", default="auto")
    p.add_argument("--out", default="decode.hlo")
    args = p.parse_args()
    cfg = bench_model_config(1280, num_hidden_layers=args.layers)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    B, P = args.batch, 128
    ecfg = EngineConfig(max_num_seqs=B, page_size=16, num_lookahead=4, enable_lora=True, max_loras=64,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=B * P)
    runner = model_runner.ModelRunner(cfg, params, mesh, ecfg, B * P)
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * B, [0] * B, B)
    lora = None if args.variant == "base" else LoRABatch(runner.bank, jnp.asarray(1 + np.arange(B) % 64, jnp.int32))
    pos = jnp.full(B, 192, jnp.int32)
    lowered = model_runner._decode_steps.lower(
        params, cfg, runner.cache, lora, jnp.full(B, 5, jnp.int32), pos, jnp.ones(B, bool),
        jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P)), jnp.arange(B, dtype=jnp.int32), st,
        jnp.zeros(B, jnp.int32), runner.prompt_mask, runner.output_counts, jnp.zeros(B, bool), pos, num_steps=4,
        lora_impl=args.lora_impl, attention_impl="auto", needs_penalties=False, num_logprobs=0)
    text = lowered.compile().as_text()
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {len(text)} chars to {args.out}")


if __name__ == "__main__":
    main()
