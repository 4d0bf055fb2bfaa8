"""Times the XLA formulations of per-sequence LoRA routing (``jmlora.lora.routing.lora_delta``).

For each shape and formulation: median device time of shrink+expand for one projection, unique bytes
(each distinct adapter's A and B read once, x read, y written) and the bandwidth that implies. Each timed
call rotates over ``ROTATE`` independent banks so that the 60 MB L2 of an H200 cannot hold the working set.

Also compares q/k/v as three separate shrinks against one shrink over a concatenated A (the "shared
input" question of the multi-LoRA issue).

    PYTHONPATH=. python benchmarks/lora_routing.py            # H200 shapes (hidden 4096)
    PYTHONPATH=. python benchmarks/lora_routing.py --small    # CPU-sized shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmlora.lora.bank import TargetBank
from jmlora.lora.routing import lora_delta

ROTATE = 4


def _bank(key, slots, n_in, n_out, rank, dtype):
    ka, kb = jax.random.split(key)
    return TargetBank(a=(0.02 * jax.random.normal(ka, (slots, n_in, rank))).astype(dtype),
                      b=(0.02 * jax.random.normal(kb, (slots, rank, n_out))).astype(dtype))


def time_fn(fn, *args, iters: int) -> float:
    """Median seconds of one call (after warm-up), each sample synchronised."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def bench_shape(batch, tokens, n_in, n_out, rank, distinct, impls, iters, dtype=jnp.bfloat16):
    slots = max(distinct, 1) + 1
    keys = jax.random.split(jax.random.key(0), ROTATE + 1)
    banks = [_bank(k, slots, n_in, n_out, rank, dtype) for k in keys[:ROTATE]]
    x = jax.random.normal(keys[-1], (batch, tokens, n_in)).astype(dtype)
    slot_ids = jnp.asarray(1 + np.arange(batch) % distinct, jnp.int32)
    ranks = jnp.full((slots,), rank, jnp.int32).at[0].set(0)
    itemsize = jnp.dtype(dtype).itemsize
    unique_bytes = (min(distinct, batch) * (n_in + n_out) * rank + batch * tokens * (n_in + n_out)) * itemsize
    rows = []
    for impl in impls:
        if impl == "onehot" and tokens > 1:
            continue                                    # decode-only formulation

        @jax.jit
        def run(x, banks, slot_ids, ranks, impl=impl):
            return sum(lora_delta(x, b, slot_ids, ranks, impl).astype(jnp.float32) for b in banks)

        try:
            seconds = time_fn(run, x, banks, slot_ids, ranks, iters=iters) / ROTATE
        except Exception as e:  # a formulation that does not lower on this backend is reported, not fatal
            rows.append(dict(impl=impl, error=f"{type(e).__name__}: {str(e)[:120]}"))
            continue
        rows.append(dict(impl=impl, us=seconds * 1e6, tb_s=unique_bytes / seconds / 1e12))
    return dict(batch=batch, tokens=tokens, n_in=n_in, n_out=n_out, rank=rank, distinct=distinct,
                unique_mb=unique_bytes / 1e6, results=rows)


def bench_shared_qkv(batch, n_in, q_out, kv_out, rank, distinct, iters, dtype=jnp.bfloat16):
    """Three separate q/k/v LoRA terms vs one shrink over concatenated A then three expands (gather form)."""
    slots = distinct + 1
    keys = jax.random.split(jax.random.key(1), 4)
    tq, tk, tv = (_bank(k, slots, n_in, o, rank, dtype) for k, o in zip(keys[:3], (q_out, kv_out, kv_out)))
    a_cat = jnp.concatenate([tq.a, tk.a, tv.a], axis=-1)                             # [S, in, 3R]
    x = jax.random.normal(keys[3], (batch, 1, n_in)).astype(dtype)
    slot_ids = jnp.asarray(1 + np.arange(batch) % distinct, jnp.int32)
    ranks = jnp.full((slots,), rank, jnp.int32)

    @jax.jit
    def separate(x, tq, tk, tv, slot_ids):
        return [lora_delta(x, t, slot_ids, ranks, "gather") for t in (tq, tk, tv)]

    @jax.jit
    def fused(x, a_cat, tq, tk, tv, slot_ids):
        h = jnp.einsum("bti,bir->btr", x, a_cat[slot_ids], preferred_element_type=jnp.float32).astype(x.dtype)
        hs = jnp.split(h, 3, axis=-1)
        return [jnp.einsum("btr,bro->bto", hi, t.b[slot_ids], preferred_element_type=jnp.float32).astype(x.dtype)
                for hi, t in zip(hs, (tq, tk, tv))]

    return dict(batch=batch, separate_us=time_fn(separate, x, tq, tk, tv, slot_ids, iters=iters) * 1e6,
                fused_us=time_fn(fused, x, a_cat, tq, tk, tv, slot_ids, iters=iters) * 1e6)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--impls", default="gather,onehot,ragged,pallas")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    impls = args.impls.split(",")
    H, MLP, KV = (512, 1792, 128) if args.small else (4096, 14336, 1024)
    iters = 5 if args.small else args.iters
    shapes = [  # (batch, tokens, in, out, rank, distinct adapters)
        (64, 1, H, H, 16, 64), (256, 1, H, MLP, 16, 64), (64, 1, H, H, 64, 64), (64, 1, H, H, 16, 8),
        (32, 1, H, H, 16, 8), (4, 512, H, H, 16, 4), (16, 128, H, H, 16, 16),
    ]
    print(f"device: {jax.devices()[0].device_kind}; hidden {H}")
    results = [bench_shape(*s, impls=impls, iters=iters) for s in shapes]
    shared = [bench_shared_qkv(b, H, H, KV, 16, min(b, 64), iters) for b in (32, 256)]
    print(f"{'B':>4} {'T':>4} {'in':>6} {'out':>6} {'r':>3} {'S':>3} {'MB':>6}  " +
          "  ".join(f"{i:>16}" for i in impls))
    for r in results:
        cells = []
        for impl in impls:
            row = next((x for x in r["results"] if x["impl"] == impl), None)
            cells.append(f"{'-':>16}" if row is None else f"{'error':>16}" if "error" in row else
                         f"{row['us']:8.1f}us {row['tb_s']:4.2f}TB/s")
        print(f"{r['batch']:>4} {r['tokens']:>4} {r['n_in']:>6} {r['n_out']:>6} {r['rank']:>3} {r['distinct']:>3} "
              f"{r['unique_mb']:6.1f}  " + "  ".join(cells))
    for s in shared:
        print(f"q/k/v at batch {s['batch']}: separate {s['separate_us']:.1f} us, fused shrink {s['fused_us']:.1f} us")
    errors = [(r["batch"], x) for r in results for x in r["results"] if "error" in x]
    for batch, e in errors:
        print("error:", batch, e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, results=results, shared=shared), f, indent=1)


if __name__ == "__main__":
    main()
