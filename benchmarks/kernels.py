"""Benchmark of the LoRA kernels (issue 4): Pallas kernels vs the XLA reference, against the byte floor.

Run on the GPU machine (bf16):

    PYTHONPATH=. python3 benchmarks/kernels.py --out $OUT [--sweep] [--probe-mosaic]
        [--prefill-modes inplace,delta] [--prefill-order random|grouped] [--profile]
        [--prefill-ranks 16,64] [--configs "[{}, {'ex_o_blocks': 4}]"]
        [--decode-configs "[{}, {'ex_block_n': 1024}]"] [--decode-shapes 2,3] [--decode-sets 32] [--prefill-sets 16]

For every shape it checks the kernel against the reference (relative error of the LoRA delta, computed in
float32 from the same bf16 inputs), then times shrink+expand together: ``K`` independent input sets (K x's and
y's; at decode one adapter bank with K disjoint slot ranges, at prefill two ranges taken in turn) are applied
back to back inside one jitted function, with the y's donated and fed back, so the device stays busy, nothing
is copied, the K sets together are several times the 60 MB L2, and each call holds enough device work that
the host's dispatch of the next one hides behind it (K = 32 at decode and 16 at prefill by default: a jitted call
also costs 10-25 us of device-idle time of its own, which K spreads over its ops). Per-op time = wall time /
(calls * K); the median of several trials is reported. ``--profile`` adds each configuration's device time per kernel.

Unique bytes follow the issue's convention: x + A and B of the distinct adapters + y once (bf16). The HBM
ceiling (a large elementwise read+write and a large copy) and the bf16 matmul rate are measured in the same run.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import expand, grouping, lora, shrink  # noqa: E402

DECODE_SHAPES = [  # (T, H, O, r, distinct slots)
    (64, 4096, 4096, 16, 64),
    (256, 4096, 14336, 16, 256),
    (64, 4096, 4096, 64, 64),
    (64, 4096, 4096, 16, 8),
]
PREFILL_SHAPES = [(t, 4096, 4096, r, n) for t in (2048, 8192) for n in (4, 64) for r in (16, 64)]
XLA_ISSUE_US = {0: 61.3, 1: 56.7, 2: 154.5}
PEER_US = {0: 25.2, 1: 83.2, 2: 50.6, 3: 38.7}
TARGET_US = {0: 12.6, 1: 50.0, 2: 25.0, 3: 19.0}
DT = jnp.bfloat16


def _time_loop(step, ys, n_calls, trials, k):
    """Median seconds per op of ``ys = step(ys)`` (k ops per call), donated and chained."""
    ys = step(ys)
    jax.block_until_ready(ys)
    per_op = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(n_calls):
            ys = step(ys)
        jax.block_until_ready(ys)
        per_op.append((time.perf_counter() - t0) / (n_calls * k))
    return statistics.median(per_op), ys


def measure_ceilings(log):
    """HBM bandwidth (elementwise read+write, and a copy) and bf16 matmul rate, measured here."""
    n = 1 << 29  # 1 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), DT)
    f = jax.jit(lambda v: v * 0.5 + 1.0)
    t, _ = _time_loop(lambda v: f(v), x, 10, 5, 1)
    bw_elem = 2 * n * 2 / t
    cp = jax.jit(lambda v: jnp.concatenate([v[n // 2:], v[: n // 2]]))
    t2, _ = _time_loop(lambda v: cp(v), x, 10, 5, 1)
    bw_copy = 2 * n * 2 / t2
    del x
    m = 8192
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (m, m), DT)
    b = jax.random.normal(kb, (m, m), DT)
    mm = jax.jit(lambda u, v: (u, v, u @ v))
    t3, _ = _time_loop(lambda p: mm(p[0], p[1]), (a, b, a), 10, 5, 1)
    flops = 2 * m**3 / t3
    log(f"ceilings: elementwise {bw_elem / 1e12:.2f} TB/s, copy {bw_copy / 1e12:.2f} TB/s, "
        f"bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    return {"bw_elem": bw_elem, "bw_copy": bw_copy, "bw": max(bw_elem, bw_copy), "flops": flops}


def make_case(t, h, o, r, nd, k_sets, seed, prefill, grouped=False, n_ranges=None):
    """K input sets over one bank of 1 + n_ranges*nd slots (slot 0 = zero adapter, rank r elsewhere); set i
    uses the slot range i % n_ranges (default: one range per set).

    ``grouped``: each adapter's tokens contiguous (sorted by slot, as SGMV's callers hand them over and as
    one sequence's prompt arrives), instead of in random order."""
    rng = np.random.default_rng(seed)
    n_ranges = n_ranges or k_sets
    s_total = 1 + n_ranges * nd
    key = jax.random.key(seed)
    ka, kb, kx, ky = jax.random.split(key, 4)
    a = (jax.random.normal(ka, (s_total, h, r), jnp.float32) / math.sqrt(h)).astype(DT)
    b = jax.random.normal(kb, (s_total, r, o), jnp.float32).astype(DT)
    a = a.at[0].set(0)
    b = b.at[0].set(0)
    ranks = jnp.full((s_total,), r, jnp.int32).at[0].set(0)
    sets = []
    for i in range(k_sets):
        if nd >= t:
            local = rng.permutation(t) % nd
        else:
            local = rng.integers(0, nd, t)
        if grouped:
            local = np.sort(local)
        slots = jnp.asarray(1 + (i % n_ranges) * nd + local, jnp.int32)
        x = jax.random.normal(jax.random.fold_in(kx, i), (t, h), DT)
        y = jax.random.normal(jax.random.fold_in(ky, i), (t, o), DT)
        sets.append((x, y, slots))
    return a, b, ranks, sets


def unique_bytes(t, h, o, r, nd):
    return 2 * (t * h + nd * h * r + nd * r * o + t * o)


def check(fn, a, b, ranks, x, y, slots, delta=False):
    """Relative error of the LoRA delta vs an f32 reference on the same (bf16) inputs (``delta``: fn returns
    the delta alone, not y plus it)."""
    out = fn(y, x, a, b, slots, ranks).astype(jnp.float32)
    if delta:
        out = out + y.astype(jnp.float32)
    f32 = jnp.float32
    hr = shrink.ref_lora_shrink(x.astype(f32), a.astype(f32), slots, ranks)
    ref = expand.ref_lora_expand(y.astype(f32), hr, b.astype(f32), slots, ranks)
    delta = ref - y.astype(f32)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(delta))
    finite = bool(jnp.all(jnp.isfinite(out)))
    return err, finite


def profile_op(fn, a, b, ranks, sets, log, label):
    """Device time per op from the profiler: every kernel's time, their sum, and the time any ran (the span
    includes no host time, unlike the wall-clock median)."""
    from device_profile import kernel_times, print_kernels

    x, _, s = sets[0]
    step = jax.jit(lambda y_, x_, s_, a_, b_, r_: fn(y_, x_, a_, b_, s_, r_), donate_argnums=0)
    state = {"y": jnp.copy(sets[0][1])}

    def call():
        state["y"] = step(state["y"], x, s, a, b, ranks)
        jax.block_until_ready(state["y"])

    prof = kernel_times(call, n_calls=10)
    print_kernels(label, prof, top=8, log=log)
    return {"total_us": prof["total_us"], "span_us": prof["span_us"], "kernels": prof["kernels"][:8]}


def bench_fn(fn, a, b, ranks, sets, n_calls, trials):
    k = len(sets)
    xs = tuple(s[0] for s in sets)
    sl = tuple(s[2] for s in sets)

    def _step(ys, a, b, ranks, xs, sl):
        return tuple(fn(y, x, a, b, s, ranks) for y, x, s in zip(ys, xs, sl))

    step_d = jax.jit(_step, donate_argnums=0)
    ys = tuple(jnp.copy(s[1]) for s in sets)
    t, _ = _time_loop(lambda ys_: step_d(ys_, a, b, ranks, xs, sl), ys, n_calls, trials, k)
    return t


def kernel_fn(default_form, **knobs):
    """shrink+expand through the Triton kernels with explicit knobs (for sweeps).

    Forms: "decode" (BGMV) and "segment" (the prefill form: the counting-sort grouping kernel, then the
    segment shrink and the in-place segment expand; ``block_m`` = rows per tile). The earlier prefill kernels
    (an XLA sort, then SGMV tiles that could mix slots) lost to it at every prefill shape in the seventh
    session's A/B (RESULTS.md) and were removed. "segment_delta" (the segment shrink, then the segment delta
    kernel, as ``lora_shrink_expand_multi(..., delta=True)`` runs them for the engine) returns the delta
    alone, into a fresh array: the add is left to the consumer, as the decoder does (x + y bytes instead of
    x + 2y). ``reduce_h``: the H-slices' partials summed by XLA before the delta kernel (default: as the
    library does: ``lora.segment_sums_partials``). A one-kernel form (shrink and delta in one
    program per tile) was slower at 7 of 8 shapes (thirteenth session; RESULTS.md) and was removed."""
    form = knobs.pop("form", default_form)
    block_m = knobs.pop("block_m", None)
    reduce_h = knobs.pop("reduce_h", None)
    # decode: the shrink hands each token's rank to the expand, as ``lora.lora_shrink_expand`` does
    token_ranks = knobs.pop("token_ranks", True)
    sk = {k[3:]: v for k, v in knobs.items() if k.startswith("sh_")}
    ek = {k[3:]: v for k, v in knobs.items() if k.startswith("ex_")}
    gk = {k[3:]: v for k, v in knobs.items() if k.startswith("gr_")}  # the grouping kernel's

    def fn(y, x, a, b, slots, ranks):
        if form == "decode":
            if token_ranks:
                hp, tr = shrink.bgmv_shrink_partials(x, a, slots, ranks, token_ranks=True, **sk)
                return expand.bgmv_expand(y, hp, b, slots, ranks, token_ranks=tr, **ek)
            hp = shrink.bgmv_shrink_partials(x, a, slots, ranks, **sk)
            return expand.bgmv_expand(y, hp, b, slots, ranks, **ek)
        tiles = grouping.segment_tiles_triton(slots, ranks, block_m or lora.segment_block_m(x.shape[0], a.shape[2]),
                                              **gk)
        sk.setdefault("programs", lora.segment_shrink_programs(x.shape[0], a.shape[2]))  # as the library does
        hp = shrink.seg_shrink_partials_multi(x, (a,), tiles, **sk)
        if form == "segment_delta":
            if reduce_h or (reduce_h is None and lora.segment_sums_partials(x.shape[0], a.shape[2])):
                hp = jnp.sum(hp, axis=1, keepdims=True)
            block_n, o_blocks = lora.segment_delta_blocks(x.shape[0], a.shape[2], [b.shape[2]])
            dk = {"block_n": block_n, "o_blocks": o_blocks, **ek}
            return expand.seg_delta_multi(y.dtype, hp, (b,), tiles, **dk)[0]
        return expand.seg_expand_multi((y,), hp, (b,), tiles, **ek)[0]

    return fn


PREFILL_SWEEP = [
    {},
    dict(block_m=32),
    dict(block_m=64),
    dict(block_m=128),
    dict(ex_block_n=128),
    dict(ex_block_n=512),
    dict(sh_n_split=1),
    dict(sh_n_split=8),
    dict(sh_block_k=256),
    dict(sh_num_warps=8, ex_num_warps=8),
    dict(sh_num_stages=3, ex_num_stages=3),
]


PREFILL_DELTA_SWEEP = [  # {}: the library's defaults (lora.segment_delta_blocks, shrink.seg_shrink_stages)
    {},
    dict(ex_block_n=256, ex_o_blocks=1),
    dict(ex_block_n=256, ex_o_blocks=2),
    dict(ex_block_n=256, ex_o_blocks=4),
    dict(ex_block_n=128, ex_o_blocks=4),
    dict(ex_num_warps=8),
    dict(block_m=32),
    dict(sh_num_stages=2),
    dict(sh_n_split=2),
]
PREFILL_MODE_FORMS = {"inplace": "segment", "delta": "segment_delta"}


def api_fn(backend):
    def fn(y, x, a, b, slots, ranks):
        return lora.lora_shrink_expand(y, x, a, b, slots, ranks, backend=backend)

    return fn


def probe_mosaic(log, ceil):
    """Mosaic GPU: JAX's grouped matmul (ragged_dot_mgpu) as a grouped shrink on pre-sorted rows."""
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd

        t, h, r, g = 8192, 4096, 16, 4
        x = jax.random.normal(jax.random.key(3), (t, h), DT)
        a = (jax.random.normal(jax.random.key(4), (g, h, r), jnp.float32) / 64).astype(DT)
        sizes = jnp.full((g,), t // g, jnp.int32)
        f = jax.jit(lambda x_, a_: rd.ragged_dot(x_, a_, group_sizes=sizes, block_m=64, block_n=16,
                                                  block_k=64, max_concurrent_steps=4, grid_block_n=1))
        out = f(x, a)
        ref = jax.lax.ragged_dot(x, a, sizes, preferred_element_type=jnp.float32)
        err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
        tt, _ = _time_loop(lambda p: (p[0], p[1], f(p[0], p[1])), (x, a, out), 20, 5, 1)
        by = 2 * (t * h + g * h * r + t * r)
        log(f"mosaic ragged_dot shrink T={t} g={g} r={r}: {tt * 1e6:.1f} us, err {err:.1e}, "
            f"{by / tt / 1e12:.2f} TB/s")
        return {"mosaic_shrink_us": tt * 1e6, "err": err}
    except Exception as e:  # a probe: record what failed
        log(f"mosaic probe failed: {type(e).__name__}: {str(e)[:400]}")
        return {"mosaic_error": f"{type(e).__name__}: {str(e)[:400]}"}


def shard_map_check(log):
    """The kernels compiled inside jax.shard_map (check_vma=True) on a mesh of the local devices."""
    try:
        n = len(jax.devices())
        a, b, ranks, sets = make_case(8 * n, 4096, 4096, 16, 4, 1, seed=7, prefill=False)
        x, y, slots = sets[0]
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        tok, rep = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
        for form in ("decode", "prefill"):
            f = jax.jit(jax.shard_map(
                lambda y_, x_, a_, b_, s_, r_, form=form: lora.lora_shrink_expand(
                    y_, x_, a_, b_, s_, r_, backend="triton", form=form),
                mesh=mesh, in_specs=(tok, tok, rep, rep, tok, rep), out_specs=tok, check_vma=True))
            err, finite = check(f, a, b, ranks, x, y, slots)
            log(f"shard_map ({n} device(s), check_vma=True) {form}: err {err:.1e} finite {finite}")
    except Exception as e:
        log(f"shard_map check FAILED {type(e).__name__}: {str(e)[:300]}")


DECODE_SWEEP = [
    {},
    dict(sh_block_k=512, sh_n_split=8, ex_block_n=512),
    dict(sh_block_k=256, sh_n_split=8, ex_block_n=512, sh_num_warps=2, ex_num_warps=2),
    dict(sh_block_k=512, sh_n_split=8, ex_block_n=1024, ex_num_warps=8),
    dict(sh_block_k=512, sh_n_split=4, ex_block_n=2048, ex_num_warps=8),
    dict(sh_block_k=128, sh_n_split=16, ex_block_n=128),
    dict(sh_block_k=64, sh_n_split=32, ex_block_n=256, ex_num_warps=8),
    dict(sh_block_k=128, sh_n_split=32, ex_block_n=64, ex_num_warps=2),
    dict(form="prefill"),
]


def _too_big(cfg, r):
    return cfg.get("sh_block_k", 0) * r > 16384 or cfg.get("ex_block_n", 0) * r > 32768


def bench_parts(cfg, a, b, ranks, sets, trials):
    """Shrink-only and expand-only times (us) of the decode kernels with ``cfg``."""
    sk = {k[3:]: v for k, v in cfg.items() if k.startswith("sh_")}
    ek = {k[3:]: v for k, v in cfg.items() if k.startswith("ex_")}
    xs = tuple(s[0] for s in sets)
    sl = tuple(s[2] for s in sets)
    k = len(sets)
    sh = jax.jit(lambda xs_, a_: tuple(shrink.bgmv_shrink_partials(x, a_, s, ranks, **sk) for x, s in zip(xs_, sl)))
    hps = sh(xs, a)
    t_sh, _ = _time_loop(lambda st: (st[0], sh(st[0], a)), (xs, hps), 20, trials, k)

    def _ex(ys, hps_):
        return tuple(expand.bgmv_expand(y, hp, b, s, ranks, **ek) for y, hp, s in zip(ys, hps_, sl))

    ex = jax.jit(_ex, donate_argnums=0)
    ys = tuple(jnp.copy(s[1]) for s in sets)
    t_ex, _ = _time_loop(lambda ys_: ex(ys_, hps), ys, 20, trials, k)
    return t_sh * 1e6, t_ex * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--probe-mosaic", action="store_true")
    p.add_argument("--only", default="", help="comma list: decode,prefill")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--prefill-modes", default="inplace",
                   help="comma list: inplace (segment shrink + in-place expand), delta (segment shrink + delta "
                        "kernel, returning the delta alone, as the engine runs them)")
    p.add_argument("--profile", action="store_true",
                   help="also profile every configuration timed: device time per kernel (JAX profiler)")
    p.add_argument("--configs", default="",
                   help="a Python list of knob dicts to time instead of the default or --sweep list (prefill)")
    p.add_argument("--decode-configs", default="",
                   help="a Python list of knob dicts to time at every decode shape instead of the default / sweep")
    # 32: each jitted call costs 10-25 us of device-idle time on top of its kernels (eighteenth session: 8 -> 32
    # sets per call took the 256-token and rank-64 shapes from 51.4-51.5 to 50.2-50.4 us and from 26.1-26.3 to
    # 24.9-25.1 us per op, in one device session); with 2 sets (the floor before the sixteenth session) the
    # 256-token shape's wall time per op came out ~4 us above the same code's with 8. More sets also rotate more
    # inputs past the L2.
    p.add_argument("--decode-sets", type=int, default=32,
                   help="at least this many input sets per timed call at the decode shapes")
    p.add_argument("--decode-shapes", default="", help="comma list: only these decode shapes (1-based, as in "
                   "the issue's list)")
    # 16 (eighteenth session; before it 4 at 8192 tokens and 4-12 at 2048, enough that the host's dispatch of a
    # call hid behind its device work): a call's own 10-25 us then adds 0.6-1.6 us per op instead of up to 6 (r = 64,
    # same device session: 4 -> 16 sets took 1.8-4.7 us off each op)
    p.add_argument("--prefill-sets", type=int, default=16, help="input sets per timed call at the prefill shapes")
    p.add_argument("--prefill-ranks", default="", help="comma list: only the prefill shapes of these ranks")
    p.add_argument("--prefill-adapters", default="", help="comma list: only the prefill shapes over these adapters")
    p.add_argument("--prefill-order", default="random", choices=("random", "grouped"),
                   help="tokens in random order over the adapters, or each adapter's tokens contiguous")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "kernels_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"# {datetime.datetime.now().isoformat()} {jax.devices()[0].device_kind} jax {jax.__version__}")
    ceil = measure_ceilings(log)
    results = {"ceilings": ceil, "decode": [], "prefill": []}
    shard_map_check(log)
    if args.probe_mosaic:
        results["mosaic"] = probe_mosaic(log, ceil)
    only = set(args.only.split(",")) if args.only else {"decode", "prefill"}

    if "decode" in only:
        for i, (t, h, o, r, nd) in enumerate(DECODE_SHAPES):
            if args.decode_shapes and str(i + 1) not in args.decode_shapes.split(","):
                continue
            ub = unique_bytes(t, h, o, r, nd)
            k_sets = max(args.decode_sets, min(16, math.ceil(4 * 60e6 / ub)))
            a, b, ranks, sets = make_case(t, h, o, r, nd, k_sets, seed=i, prefill=False)
            row = {"shape": (t, h, o, r, nd), "index": i, "bytes": ub, "k_sets": k_sets}
            x0, y0, s0 = sets[0]
            row["xla_us"] = bench_fn(api_fn("reference"), a, b, ranks, sets, 20, args.trials) * 1e6
            if args.decode_configs:
                configs = ast.literal_eval(args.decode_configs)
            else:
                configs = DECODE_SWEEP if args.sweep else [{}]
            best = None
            for cfg in configs:
                if _too_big(cfg, r):
                    continue
                fn = kernel_fn("decode", **dict(cfg))
                try:
                    err, finite = check(fn, a, b, ranks, x0, y0, s0)
                    us = bench_fn(fn, a, b, ranks, sets, 20, args.trials) * 1e6
                except Exception as e:
                    log(f"decode {row['shape']} cfg {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
                log(f"decode {row['shape']} cfg {cfg}: {us:.1f} us err {err:.1e} finite {finite}")
                dev = None
                if args.profile:
                    prof = profile_op(fn, a, b, ranks, sets, log, f"decode {row['shape']} {cfg}")
                    row.setdefault("profiles", []).append((cfg, prof))
                    dev = prof["total_us"]
                if finite and err < 2e-2 and (best is None or us < best[0]):
                    best = (us, cfg, err, dev)
            if best:
                row.update(kernel_us=best[0], cfg=best[1], err=best[2], device_us=best[3])
                if "form" not in best[1]:
                    row["shrink_us"], row["expand_us"] = bench_parts(best[1], a, b, ranks, sets, args.trials)
                    log(f"  parts of best {best[1]}: shrink {row['shrink_us']:.1f} us, "
                        f"expand {row['expand_us']:.1f} us")
            results["decode"].append(row)

    if "prefill" in only:
        modes = args.prefill_modes.split(",")
        for i, (t, h, o, r, nd) in enumerate(PREFILL_SHAPES):
            if args.prefill_ranks and str(r) not in args.prefill_ranks.split(","):
                continue
            if args.prefill_adapters and str(nd) not in args.prefill_adapters.split(","):
                continue
            ub = unique_bytes(t, h, o, r, nd)
            k_sets = args.prefill_sets
            # two slot ranges, as before (a bank of 1 + 2 nd slots): the bank's size sets the tile grid
            a, b, ranks, sets = make_case(t, h, o, r, nd, k_sets, seed=100 + i, prefill=True,
                                          grouped=args.prefill_order == "grouped", n_ranges=2)
            x0, y0, s0 = sets[0]
            # the reference over 4 sets: its gathered B ([T, R, O] per op, GBs at 8192 tokens) times 16 could
            # outgrow the device
            xla_us = bench_fn(api_fn("reference"), a, b, ranks, sets[:4], 5, args.trials) * 1e6
            for mode in modes:
                form = PREFILL_MODE_FORMS[mode]
                row = {"shape": (t, h, o, r, nd), "bytes": ub, "k_sets": k_sets, "flops": 2 * t * r * (h + o),
                       "mode": mode, "order": args.prefill_order, "xla_us": xla_us}
                if args.configs:
                    configs = ast.literal_eval(args.configs)
                elif mode == "delta":
                    configs = PREFILL_DELTA_SWEEP if args.sweep else [{}]
                else:
                    configs = PREFILL_SWEEP if args.sweep else [{}]
                best = None
                for cfg in configs:
                    fn = kernel_fn(form, **dict(cfg))
                    try:
                        err, finite = check(fn, a, b, ranks, x0, y0, s0, delta=mode != "inplace")
                        us = bench_fn(fn, a, b, ranks, sets, 20, args.trials) * 1e6
                    except Exception as e:
                        log(f"prefill {mode} {row['shape']} cfg {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
                        continue
                    log(f"prefill {mode} {args.prefill_order} {row['shape']} cfg {cfg}: {us:.1f} us err {err:.1e} "
                        f"finite {finite}")
                    if args.profile:
                        prof = profile_op(fn, a, b, ranks, sets, log,
                                          f"prefill {mode} {args.prefill_order} {row['shape']} {cfg}")
                        row.setdefault("profiles", []).append((cfg, prof))
                    if finite and err < 2e-2 and (best is None or us < best[0]):
                        best = (us, cfg, err)
                if best:
                    row.update(kernel_us=best[0], cfg=best[1], err=best[2])
                results["prefill"].append(row)

    with open(os.path.join(args.out, "kernels_results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)

    bw, fl = ceil["bw"], ceil["flops"]
    lines = [f"HBM {bw / 1e12:.2f} TB/s (elementwise {ceil['bw_elem'] / 1e12:.2f}, copy "
             f"{ceil['bw_copy'] / 1e12:.2f}), bf16 matmul {fl / 1e12:.0f} TFLOP/s",
             "| form | T,H,O,r,slots | MB | XLA us | kernel us | TB/s | %BW | target us | peer us | status | "
             "device us (profiler) | status by device time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["decode"]:
        i = row["index"]
        ku = row.get("kernel_us", float("nan"))
        tbs = row["bytes"] / (ku * 1e-6) / 1e12
        tgt = TARGET_US[i]
        ok = ku < tgt and ku < row["xla_us"]
        dev = row.get("device_us")
        dev_cols = "- | - |" if dev is None else f"{dev:.1f} | {'hit' if dev < tgt else 'MISSED'} |"
        lines.append(f"| decode | {row['shape']} | {row['bytes'] / 1e6:.1f} | {row['xla_us']:.1f} | {ku:.1f} | "
                     f"{tbs:.2f} | {100 * row['bytes'] / (ku * 1e-6) / bw:.0f}% | {tgt} | {PEER_US[i]} | "
                     f"{'hit' if ok else 'MISSED'} | {dev_cols}")
    for row in results["prefill"]:
        ku = row.get("kernel_us", float("nan"))
        roof = max(row["bytes"] / bw, row["flops"] / fl) * 1e6
        frac = roof / ku
        ok = frac >= 0.6 and ku < row["xla_us"]
        lines.append(f"| prefill {row['mode']} {row['order']} | {row['shape']} | {row['bytes'] / 1e6:.1f} | "
                     f"{row['xla_us']:.1f} | {ku:.1f} | "
                     f"{row['bytes'] / (ku * 1e-6) / 1e12:.2f} | {100 * frac:.0f}% roof | {roof / 0.6:.1f} | - | "
                     f"{'hit' if ok else 'MISSED'} |")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
