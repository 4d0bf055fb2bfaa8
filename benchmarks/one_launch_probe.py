"""Probe: the decode-form LoRA of one projection group as one launch (``one_launch``) against two.

The engine's decode step runs each projection group's LoRA as a shrink launch and a delta launch, which a
CUDA graph serialises: the delta kernel starts when the whole shrink kernel has finished. The one-launch
kernel runs both phases in one grid, each delta program waiting only for its own token's partial sums. This
probe times a chain of 32 dependent calls (like the 32 layers: each call's x takes the previous call's
delta) under the engine's compiler options, for the four projection groups of Llama-3-8B at several batch
sizes, every token its own rank-16 adapter. It checks the one-launch deltas against the two-launch ones.

    PYTHONPATH=. python benchmarks/one_launch_probe.py --out $OUT
    PYTHONPATH=. python benchmarks/one_launch_probe.py --small      # CPU: interpret mode, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmlora.engine.model_runner import COMPILER_OPTIONS  # noqa: E402
from pallas_kernels import expand, one_launch, shrink  # noqa: E402

GROUPS = {  # name: (H, output dims)
    "qkv": (4096, (4096, 1024, 1024)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
}


def two_launch(x, a_s, b_s, slots, ranks, interpret):
    hp = shrink.bgmv_shrink_partials_multi(x, a_s, slots, ranks, interpret=interpret)
    return expand.bgmv_delta_multi(x.dtype, hp, b_s, slots, ranks, interpret=interpret)


def one(x, a_s, b_s, slots, ranks, interpret):
    return one_launch.bgmv_one_launch_delta_multi(x.dtype, x, a_s, b_s, slots, ranks, interpret=interpret)[0]


def chain(fn, n_layers, interpret):
    def run(x, a_s, b_s, slots, ranks):
        h = x.shape[1]
        for _ in range(n_layers):  # each call's input depends on the previous call's delta (like layers)
            d = fn(x, a_s, b_s, slots, ranks, interpret)[0]
            w = min(h, d.shape[1])
            x = x.at[:, :w].add(d[:, :w] * 1e-3)
        return x
    return jax.jit(run, compiler_options=None if interpret else COMPILER_OPTIONS)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    interpret = args.small
    groups = {"qkv": (64, (64, 32, 32)), "down": (128, (64,))} if args.small else GROUPS
    layers = 2 if args.small else args.layers
    slots_n, r = (5, 16) if args.small else (64, 16)
    dt = jnp.float32 if args.small else jnp.bfloat16
    os.makedirs(args.out, exist_ok=True)
    rows = []
    print(f"device {jax.devices()[0].device_kind}; chain of {layers} calls; {slots_n} slots, rank {r}", flush=True)
    for gname, (h, outs) in groups.items():
        key = jax.random.key(0)
        ka, kb = jax.random.split(key)
        a_s = tuple(jax.random.normal(jax.random.fold_in(ka, i), (slots_n, h, r), dt) * 0.02 for i in range(len(outs)))
        b_s = tuple(jax.random.normal(jax.random.fold_in(kb, i), (slots_n, r, o), dt) * 0.02
                    for i, o in enumerate(outs))
        ranks = jnp.full((slots_n,), r, jnp.int32).at[0].set(0)
        for t in [int(b) for b in args.batches.split(",")]:
            slots = jnp.asarray(1 + np.arange(t) % (slots_n - 1), jnp.int32)
            x = jax.random.normal(jax.random.key(t), (t, h), dt)
            ref = two_launch(x, a_s, b_s, slots, ranks, interpret)
            got = one(x, a_s, b_s, slots, ranks, interpret)
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - e.astype(jnp.float32)))) for g, e in zip(got, ref))
            row = {"group": gname, "T": t, "max_abs_diff_vs_two_launch": err}
            for name, fn in (("two_launch", two_launch), ("one_launch", one)):
                f = chain(fn, layers, interpret)
                y = f(x, a_s, b_s, slots, ranks)
                jax.block_until_ready(y)
                per = []
                for _ in range(args.trials if not args.small else 1):
                    t0 = time.perf_counter()
                    for _ in range(args.calls if not args.small else 1):
                        y = f(x, a_s, b_s, slots, ranks)
                    jax.block_until_ready(y)
                    per.append((time.perf_counter() - t0) / ((args.calls if not args.small else 1) * layers))
                row[f"{name}_us"] = statistics.median(per) * 1e6
            rows.append(row)
            print(f"{gname:8s} T={t:3d}: two launches {row['two_launch_us']:7.2f} us/call, one launch "
                  f"{row['one_launch_us']:7.2f} us/call; max |diff| {err:.2e}", flush=True)
    with open(os.path.join(args.out, "one_launch_probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
