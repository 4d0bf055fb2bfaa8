"""Device time of the decode step's segment LoRA kernels on their own, per projection group, over their knobs.

At batch 256 the base matmuls hold every SM, so each LoRA kernel of the decode step costs about its own
standalone latency wherever XLA places it (RESULTS.md, "Twenty-fifth session"). This times the kernels the
engine runs there, the few-adapter segment form (``routing.FEW_SEGMENT_IMPL``: tiles of 16 tokens of one
adapter, compacted to T / 16 + 9): ``shrink.seg_shrink_partials_multi`` and ``expand.seg_delta_multi`` for the
Llama-3-8B projection groups (q/k/v, o, gate/up, down) at rank 16, under the profiler (device time per launch),
at the library's defaults and at other knob sets. ``SETS`` independent input sets per call (each its own bank)
keep the adapters' bytes out of the L2, as in the step where each layer reads other adapters.

    PYTHONPATH=. python benchmarks/decode_lora_probe.py [--tokens 256] [--adapters 8] [--small]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_profile import kernel_times  # noqa: E402

from pallas_kernels import _common, expand, grouping, lora, shrink  # noqa: E402

R = 16
SETS = 16
# group -> (input width, output widths of its slices)
GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}
SHRINK_KNOBS = [{}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 1}, {"num_stages": 3}, {"block_k": 256},
                {"split": 0.5}, {"split": 2}]
DELTA_KNOBS = [{}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 1}, {"block_n": 512}, {"o_blocks": 2}]


def make_sets(t, width, outs, num_slots, adapters, seed):
    rng = np.random.default_rng(seed)
    sets = []
    for k in range(SETS):
        key = jax.random.key(seed * 100 + k)
        ka, kb, kx = jax.random.split(key, 3)
        a = tuple((0.01 * jax.random.normal(jax.random.fold_in(ka, i), (num_slots, width, R))).astype(jnp.bfloat16)
                  for i in range(len(outs)))
        b = tuple((0.01 * jax.random.normal(jax.random.fold_in(kb, i), (num_slots, R, o))).astype(jnp.bfloat16)
                  for i, o in enumerate(outs))
        x = jax.random.normal(kx, (t, width)).astype(jnp.bfloat16)
        slots = jnp.asarray(1 + rng.permutation(num_slots - 1)[:adapters][rng.integers(0, adapters, t)], jnp.int32)
        sets.append((x, a, b, slots))
    return sets


def tiles_for(slots, ranks, adapters, interpret):
    tiles = grouping.segment_tiles_triton(slots, ranks, lora.SEGMENT_BLOCK_M, interpret=interpret)
    return _common.compact_segment_tiles(tiles, slots.shape[0] // lora.SEGMENT_BLOCK_M + adapters + 1)


def shrink_fn(knobs, t, width, n_slices, interpret):
    knobs = dict(knobs)
    block_k, n_split = shrink.seg_block_sizes(t, width, n_slices, lora.SEGMENT_BLOCK_M)
    block_k = knobs.pop("block_k", block_k)
    n_split = max(1, int(n_split * knobs.pop("split", 1)))
    if width % (block_k * n_split):
        return None
    return functools.partial(shrink.seg_shrink_partials_multi, block_k=block_k, n_split=n_split,
                             interpret=interpret, **knobs)


def _blocking(fn, *args):
    return jax.block_until_ready(fn(*args))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--slots", type=int, default=65, help="the bank's slots (slot 0 is the zero adapter)")
    p.add_argument("--groups", default=",".join(GROUPS))
    p.add_argument("--small", action="store_true", help="tiny widths in the Pallas interpreter (CPU smoke test)")
    args = p.parse_args()
    interpret = args.small
    print(f"device {jax.devices()[0].device_kind}; T={args.tokens}, {args.adapters} adapters, rank {R}, "
          f"{SETS} sets per call", flush=True)
    ranks = jnp.full((args.slots,), R, jnp.int32).at[0].set(0)
    for gi, group in enumerate(args.groups.split(",")):
        width, outs = GROUPS[group]
        if args.small:
            width, outs = 128, tuple(max(64, o // 64) for o in outs)
        sets = make_sets(args.tokens, width, outs, args.slots, args.adapters, seed=gi)
        tiles = [tiles_for(s[3], ranks, args.adapters, interpret) for s in sets]
        base = shrink_fn({}, args.tokens, width, len(outs), interpret)
        partials = [base(x, a, tl) for (x, a, _, _), tl in zip(sets, tiles)]
        for knobs in SHRINK_KNOBS:
            f = shrink_fn(knobs, args.tokens, width, len(outs), interpret)
            if f is None:
                continue
            call = jax.jit(lambda ss, ts, f=f: [f(x, a, tl) for (x, a, _, _), tl in zip(ss, ts)])
            got = call(sets, tiles)
            err = max(float(jnp.max(jnp.abs(g.sum(1) - w.sum(1)))) for g, w in zip(got, partials))
            prof = kernel_times(functools.partial(_blocking, call, sets, tiles), n_calls=5)
            us = sum(t for name, t, _ in prof["kernels"] if "shrink" in name) / SETS
            print(f"{group} shrink {knobs}: {us:.2f} us per launch (max |diff| {err:.1e})", flush=True)
        block_n, o_blocks = lora.DECODE_DELTA_BLOCKS
        block_n = min(_common.largest_pow2_divisor(o, block_n) for o in outs)
        want = None
        for knobs in DELTA_KNOBS:
            dk = {"block_n": block_n, "o_blocks": o_blocks, **knobs}
            if any((o // dk["block_n"]) % dk["o_blocks"] or o % dk["block_n"] for o in outs):
                continue
            call = jax.jit(lambda hs, ss, ts, dk=dk: [
                expand.seg_delta_multi(jnp.bfloat16, h, b, tl, interpret=interpret, **dk)
                for h, (_, _, b, _), tl in zip(hs, ss, ts)])
            got = call(partials, sets, tiles)
            want = want or got
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                      for gs, ws in zip(got, want) for g, w in zip(gs, ws))
            prof = kernel_times(functools.partial(_blocking, call, partials, sets, tiles), n_calls=5)
            us = sum(t for name, t, _ in prof["kernels"] if "delta" in name) / SETS
            print(f"{group} delta {dk}: {us:.2f} us per launch (max |diff| {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
