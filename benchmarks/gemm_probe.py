"""The decode step's matmuls alone: XLA's GEMM backends and fused q/k/v and gate/up weights.

The second session's profile put the layer matmuls of a batch-32 base step at 3.47 TB/s of weight bytes,
while the LM head's one large matmul in the same step ran at ~4.3 TB/s. This probe times a skeleton of the
decoder's 32 layers with nothing but the matmuls and the glue that joins them (norm-free: the residual adds
and SiLU x up), for

- ``separate``: the seven projections as the decoder holds them (``wq [E, H, D]``, ``wk``, ``wv``, ``wo``,
  ``w_gate``, ``w_up``, ``w_down``);
- ``fused``: q/k/v as one ``[E, K, G + 2, D]`` weight (each KV head's G query heads, then its k and v head) and
  gate/up as one ``[E, 2, M]`` weight: four matmuls per layer instead of seven.

- ``packed`` (with ``packed_base`` and ``packed_slice``, which use its weights): the fused layout with the LoRA
  work of ``--packed-adapters`` rank-``--packed-rank`` adapters inside the GEMMs, as a packed path would run a
  batch with few adapters: each projection's input times the adapters' A side by side (``[in, n x P]``, P =
  adapters x rank, one small GEMM per input), masked to each row's adapter, then appended to the input so that
  the base GEMM, whose weight has the adapters' B as ``n x P`` extra rows, adds the LoRA term itself. No
  separate expand and no delta array. ``packed_base`` runs the same extended GEMMs with zeros appended (the
  base step's cost on such weights); ``packed_slice`` runs the base GEMMs on the weights' first rows only
  (whether XLA hands a row prefix to the GEMM without copying it).

It reports ms per skeleton call, the weight bytes' TB/s, and the kernels the profiler saw, with the XLA flags
of the calling process; run it under different ``XLA_FLAGS`` (``benchmarks/gemm_probe.sh`` does) to compare
Triton GEMM fusions, cuBLAS and the autotuner's settings.

    PYTHONPATH=. python benchmarks/gemm_probe.py --label default --out $OUT
"""

from __future__ import annotations

import argparse
import functools
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


def make_weights(cfg, layout: str, key, P: int = 0):
    E, H, K, D, M = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    if layout == "separate":
        shapes = dict(wq=(E, H, D), wk=(E, K, D), wv=(E, K, D), wo=(H, D, E), w_gate=(E, M), w_up=(E, M),
                      w_down=(M, E))
    elif layout.startswith("packed"):   # base weights with n x P extra rows (the B's); the A's beside them
        shapes = dict(w_qkv=(E + 3 * P, K, H // K + 2, D), wo=(H * D + P, E), w_gate_up=(E + 2 * P, 2, M),
                      w_down=(M + P, E), a_qkv=(E, 3 * P), a_o=(H * D, P), a_gate_up=(E, 2 * P), a_down=(M, P))
    else:
        shapes = dict(w_qkv=(E, K, H // K + 2, D), wo=(H, D, E), w_gate_up=(E, 2, M), w_down=(M, E))

    @jax.jit
    def one(k):
        ks = jax.random.split(k, len(shapes))
        return {n: (0.02 * jax.random.normal(kk, s, jnp.float32)).astype(jnp.bfloat16)
                for kk, (n, s) in zip(ks, shapes.items())}

    return [one(k) for k in jax.random.split(key, cfg.num_layers)]


def packed_skeleton(cfg, layout: str, P: int, rank: int, compiler_options=None):
    """The fused skeleton with the LoRA terms inside the GEMMs (``layout`` "packed", "packed_base",
    "packed_slice"; see the module docstring). Row b uses adapter b % (P / rank)."""
    E, H, K, D, M = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    G = H // K

    def masks(B, n):  # [B, n x P]: row b keeps its adapter's rank columns in each of the n blocks
        col = jnp.arange(n * P) % P // rank
        return (col[None, :] == (jnp.arange(B) % (P // rank))[:, None]).astype(jnp.bfloat16)

    def extend(x, a, n):
        """x with its masked shrink (or zeros) appended: the extended GEMMs' input."""
        if layout == "packed_slice":
            return x
        if layout == "packed_base":
            h = jnp.zeros((x.shape[0], n * P), x.dtype)
        else:
            h = jnp.einsum("bi,ip->bp", x, a) * masks(x.shape[0], n)
        return jnp.concatenate([x, h], axis=-1)

    def rows(w, n_in):  # packed_slice: the base GEMM on the weight's first n_in rows
        return w[:n_in] if layout == "packed_slice" else w

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def run(weights, x):
        B = x.shape[0]
        for w in weights:
            qkv = jnp.einsum("be,ekgd->bkgd", extend(x, w["a_qkv"], 3), rows(w["w_qkv"], E))
            q = qkv[:, :, :G].reshape(B, H, D)
            k, v = qkv[:, :, G], qkv[:, :, G + 1]
            attn = (q + jnp.repeat(k * v, G, axis=1)).reshape(B, H * D)
            x = x + extend(attn, w["a_o"], 1) @ rows(w["wo"], H * D)
            gu = jnp.einsum("be,egm->bgm", extend(x, w["a_gate_up"], 2), rows(w["w_gate_up"], E))
            m = jax.nn.silu(gu[:, 0]) * gu[:, 1]
            x = x + extend(m, w["a_down"], 1) @ rows(w["w_down"], M)
        return x

    return run


def skeleton(cfg, layout: str, compiler_options=None):
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // K

    @functools.partial(jax.jit, compiler_options=compiler_options)
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
    p.add_argument("--packed-adapters", type=int, default=8, help="packed layouts: adapters in the batch")
    p.add_argument("--packed-rank", type=int, default=16, help="packed layouts: their rank")
    p.add_argument("--engine-options", action="store_true",
                   help="compile with the engine's XLA options (model_runner.COMPILER_OPTIONS: concurrent graphs)")
    p.add_argument("--small", action="store_true", help="tiny dims (CPU smoke test of the script)")
    args = p.parse_args()
    cfg = bench_model_config(1280, small=args.small)
    bw = measure_bandwidth()
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"[{args.label}] XLA_FLAGS={flags!r}; HBM {bw / 1e12:.2f} TB/s (elementwise)", flush=True)
    results = dict(label=args.label, xla_flags=flags, hbm_tb_s=bw / 1e12, rows=[])
    options = None
    if args.engine_options:
        from jmlora.engine.model_runner import COMPILER_OPTIONS as options
    P = args.packed_adapters * args.packed_rank
    weights, made = None, None
    for layout in args.layouts.split(","):
        kind = "packed" if layout.startswith("packed") else layout
        if made != kind:    # the packed layouts share one set of weights
            weights = None  # free the last layout's weights before these are made
            weights, made = make_weights(cfg, kind, jax.random.key(0), P), kind
        wbytes = sum(a.nbytes for w in weights for a in w.values())
        run = (packed_skeleton(cfg, layout, P, args.packed_rank, options) if kind == "packed"
               else skeleton(cfg, layout, options))
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
    with open(os.path.join(args.out, f"gemm_probe_{args.label}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
