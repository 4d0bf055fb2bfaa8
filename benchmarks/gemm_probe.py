"""The decode step's matmuls alone: XLA's GEMM backends and fused q/k/v and gate/up weights.

The second session's profile put the layer matmuls of a batch-32 base step at 3.47 TB/s of weight bytes,
while the LM head's one large matmul in the same step ran at ~4.3 TB/s. This probe times a skeleton of the
decoder's 32 layers with nothing but the matmuls and the glue that joins them (norm-free: the residual adds
and SiLU x up), for

- ``separate``: the seven projections as the decoder holds them (``wq [E, H, D]``, ``wk``, ``wv``, ``wo``,
  ``w_gate``, ``w_up``, ``w_down``);
- ``fused``: q/k/v as one ``[E, K, G + 2, D]`` weight (each KV head's G query heads, then its k and v head) and
  gate/up as one ``[E, 2, M]`` weight: four matmuls per layer instead of seven.

It reports ms per skeleton call, the weight bytes' TB/s, and the kernels the profiler saw, with the XLA flags
of the calling process; run it under different ``XLA_FLAGS`` (``benchmarks/gemm_probe.sh`` does) to compare
Triton GEMM fusions, cuBLAS and the autotuner's settings.

    PYTHONPATH=. python benchmarks/gemm_probe.py --label default --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decode_profile import median_per_call  # noqa: E402
from device_profile import kernel_times, print_kernels  # noqa: E402
from throughput import bench_model_config, measure_bandwidth  # noqa: E402


def make_weights(cfg, layout: str, key):
    E, H, K, D, M = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    if layout == "separate":
        shapes = dict(wq=(E, H, D), wk=(E, K, D), wv=(E, K, D), wo=(H, D, E), w_gate=(E, M), w_up=(E, M),
                      w_down=(M, E))
    else:
        shapes = dict(w_qkv=(E, K, H // K + 2, D), wo=(H, D, E), w_gate_up=(E, 2, M), w_down=(M, E))

    @jax.jit
    def one(k):
        ks = jax.random.split(k, len(shapes))
        return {n: (0.02 * jax.random.normal(kk, s, jnp.float32)).astype(jnp.bfloat16)
                for kk, (n, s) in zip(ks, shapes.items())}

    return [one(k) for k in jax.random.split(key, cfg.num_layers)]


def skeleton(cfg, layout: str):
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // K

    @jax.jit
    def run(weights, x):
        B = x.shape[0]
        for w in weights:
            if layout == "separate":
                q = jnp.einsum("be,ehd->bhd", x, w["wq"])
                k = jnp.einsum("be,ekd->bkd", x, w["wk"])
                v = jnp.einsum("be,ekd->bkd", x, w["wv"])
            else:
                qkv = jnp.einsum("be,ekgd->bkgd", x, w["w_qkv"])
                q = qkv[:, :, :G].reshape(B, H, D)
                k, v = qkv[:, :, G], qkv[:, :, G + 1]
            # stands in for attention: every head's output depends on q, k and v
            attn = q + jnp.repeat(k * v, G, axis=1)
            x = x + jnp.einsum("bhd,hde->be", attn, w["wo"])
            if layout == "separate":
                gate = jnp.einsum("be,em->bm", x, w["w_gate"])
                up = jnp.einsum("be,em->bm", x, w["w_up"])
            else:
                gu = jnp.einsum("be,egm->bgm", x, w["w_gate_up"])
                gate, up = gu[:, 0], gu[:, 1]
            x = x + jnp.einsum("bm,me->be", jax.nn.silu(gate) * up, w["w_down"])
        return x

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="default")
    p.add_argument("--batches", default="32,64,128,256")
    p.add_argument("--layouts", default="separate,fused")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true", help="tiny dims (CPU smoke test of the script)")
    args = p.parse_args()
    cfg = bench_model_config(1280, small=args.small)
    bw = measure_bandwidth()
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"[{args.label}] XLA_FLAGS={flags!r}; HBM {bw / 1e12:.2f} TB/s (elementwise)", flush=True)
    results = dict(label=args.label, xla_flags=flags, hbm_tb_s=bw / 1e12, rows=[])
    for layout in args.layouts.split(","):
        weights = make_weights(cfg, layout, jax.random.key(0))
        wbytes = sum(a.nbytes for w in weights for a in w.values())
        run = skeleton(cfg, layout)
        for B in [int(b) for b in args.batches.split(",")]:
            x = jnp.full((B, cfg.hidden_size), 0.01, jnp.bfloat16)
            t = time.perf_counter()
            run.lower(weights, x).compile()
            compile_s = time.perf_counter() - t
            ms = median_per_call(lambda run=run, w=weights, x=x: run(w, x)) * 1e3
            row = dict(layout=layout, batch=B, ms=ms, weight_gb=wbytes / 1e9, tb_s=wbytes / ms / 1e9,
                       pct_of_elementwise=100 * wbytes / ms / 1e-3 / bw, compile_s=compile_s)
            results["rows"].append(row)
            print(f"[{args.label}] {layout:8s} B={B:3d}: {ms:.3f} ms for {wbytes / 1e9:.2f} GB of weights = "
                  f"{row['tb_s']:.2f} TB/s ({row['pct_of_elementwise']:.0f}% of elementwise; compile "
                  f"{compile_s:.0f}s)", flush=True)
            if B == args.profile_batch:
                prof = kernel_times(lambda run=run, w=weights, x=x: jax.block_until_ready(run(w, x)), n_calls=3)
                print_kernels(f"[{args.label}] {layout} B={B}", prof, top=12)
                row["kernels"] = prof["kernels"][:20]
        weights = None  # free this layout's weights before the next one's are made
    with open(os.path.join(args.out, f"gemm_probe_{args.label}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
