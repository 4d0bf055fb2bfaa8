"""Decode-step diagnostics on the Llama-3-8B shape: where does the time over the roofline go?

Times the base decode step (``num_lookahead`` steps per call) at the given batches (default 1 and 64) for the
given attention implementations (``--unroll``: the steps unrolled instead of a device loop), with the XLA flags
of the calling process; and the Pallas paged-attention kernel and the sampler alone (these two include dispatch
overhead).
Run it under different ``XLA_FLAGS`` to compare (e.g. command buffers).

    PYTHONPATH=. python benchmarks/decode_diag.py --label default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from throughput import bench_model_config  # benchmarks/ is on sys.path when run as a script

from jmlora.engine.model_runner import _decode_steps
from jmlora.engine.sampler import SamplingTensors, sample
from jmlora.engine.sampling_params import SamplingParams
from jmlora.model import init_kv_cache, init_params, make_mesh
from jmlora.model.attention import paged_attention
from jmlora.sharding import filled, logical_sharding


def median_time(fn, iters=7):
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="default")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--attention", default="auto", help="comma-separated attention impls to compare")
    parser.add_argument("--unroll", action="store_true")
    parser.add_argument("--ctx", type=int, default=192)
    parser.add_argument("--batches", default="1,64", help="batches of the step timings (components at the largest)")
    args = parser.parse_args()
    cfg = bench_model_config(2044, small=args.small)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    batches = [int(b) for b in args.batches.split(",")]
    K, P, ctx, Bmax = 4, 128, args.ctx, max(batches)
    cache = init_kv_cache(cfg, Bmax * P + 1, 16, jnp.bfloat16, mesh)
    V = cfg.vocab_size
    masks = [filled((Bmax + 1, V), jnp.bool_, logical_sharding(mesh, (None, None)))]
    counts = [filled((Bmax + 1, V), jnp.int32, logical_sharding(mesh, (None, None)))]
    state = {"cache": cache}
    greedy = SamplingParams(temperature=0.0)

    def args_for(B):
        st = SamplingTensors.from_params([greedy] * B, [0] * B, B)
        return (jnp.full(B, 5, jnp.int32), jnp.full(B, ctx, jnp.int32), jnp.ones(B, bool),
                jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P)), jnp.arange(B, dtype=jnp.int32), st,
                jnp.zeros(B, jnp.int32))

    configs = [(B, attn) for B in batches for attn in args.attention.split(",")]
    lowered = []
    for B, attn in configs:
        a = args_for(B)
        lowered.append(_decode_steps.lower(params, cfg, state["cache"], None, *a[:5], a[5], a[6], masks[0],
                                           counts[0],
                                           jnp.zeros(B, bool), a[1],
                                           num_steps=K, lora_impl="auto", attention_impl=attn,
                                           needs_penalties=False, num_logprobs=0, unroll=args.unroll))
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        compiled = list(pool.map(lambda lw: lw.compile(), lowered))
    print(f"[{args.label}] XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; compiled {len(compiled)} in "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params.embed.nbytes
    results = {}
    for (B, attn), exe in zip(configs, compiled):
        a = args_for(B)

        def call(exe=exe, a=a):
            res, _, state["cache"], masks[0], counts[0] = exe(params, state["cache"], None, *a[:5], a[5], a[6],
                                                              masks[0], counts[0], jnp.zeros(len(a[0]), bool), a[1])
            jax.block_until_ready(res)

        step = median_time(call) / K
        kv = B * (ctx + 1) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        results[f"B{B}_{attn}"] = step * 1e3
        print(f"[{args.label}] B={B:3d} attention {attn:>10}: {step * 1e3:.2f} ms/step "
              f"(weights+KV floor at 3.6 TB/s: {(weight_bytes + kv) / 3.6e12 * 1e3:.2f} ms)", flush=True)
    # components at the largest batch: attention of one layer, sampler
    B = Bmax
    q = jnp.ones((B, 1, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
    table = jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P))
    lens = jnp.full(B, ctx + 1, jnp.int32)
    attn = jax.jit(lambda q, k, v: paged_attention(q, k, v, table, lens[:, None] - 1, lens, impl="pallas_gpu")
                   if jax.default_backend() == "gpu" else q)
    kc, vc = state["cache"].k[0], state["cache"].v[0]
    t_attn = median_time(lambda: attn(q, kc, vc).block_until_ready())
    logits = jnp.ones((B, V), jnp.float32)
    st = SamplingTensors.from_params([greedy] * B, [0] * B, B)
    t_sample = median_time(lambda: jax.block_until_ready(sample(logits, st, jnp.zeros(B, jnp.int32),
                                                                needs_penalties=False, num_logprobs=0)))
    kv_layer = B * (ctx + 1) * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    print(f"[{args.label}] B={B} one layer's paged attention: {t_attn * 1e6:.0f} us (KV floor "
          f"{kv_layer / 3.6e12 * 1e6:.0f} us; x32 layers = {32 * t_attn * 1e3:.2f} ms); greedy sampler: "
          f"{t_sample * 1e6:.0f} us", flush=True)
    results.update(attn_us=t_attn * 1e6, sample_us=t_sample * 1e6)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(label=args.label, xla_flags=os.environ.get("XLA_FLAGS", ""), **results), f, indent=1)


if __name__ == "__main__":
    main()
