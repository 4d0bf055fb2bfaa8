"""Where the decode step's device time goes, kernel by kernel, and a sweep of the paged-attention knobs.

Parts (all on the Llama-3-8B shape, bf16, random weights made on the device):

- ``attn``: one layer's paged attention (JAX's Pallas GPU kernel + its split combine, as the decoder calls
  it) for batch x context shapes over ``k_splits`` x ``pages_per_compute_block`` x ``num_warps``; the cache
  pages touched per timed call are rotated so they exceed the L2. Time per layer call, and the KV floor.
- ``fused``: the attention part of one layer from the q/k/v projection output on: XLA's RoPE and cache
  scatters + ``pallas_gpu``'s kernel against the fused RoPE + cache write + attention kernel over its knobs
  (``fused_grid``); the fastest knobs per batch fill ``attention.FUSED_ATTENTION_TABLE`` for the step part.
- ``step``: the engine's jitted decode step (``_decode_steps``) under the JAX profiler, per kernel family
  (``benchmarks/device_profile.py``) at the given batches: the ``--step-variants`` (base, every row its own
  adapter, 8 shared adapters) under each attention implementation in ``--step-attention`` and each LoRA
  implementation in ``--step-lora``.
- ``lora``: the LoRA kernels of issue 4 (prefill and decode shapes) under the profiler, per kernel.
- ``segment``: one layer's LoRA kernels at decode, the segment form over a few knob settings against the
  decode (BGMV) form (``time_segment``).

    PYTHONPATH=. python benchmarks/decode_profile.py --parts attn,fused,step,lora --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_profile import kernel_times, print_kernels, print_timeline  # noqa: E402
from throughput import (  # noqa: E402
    add_decode_gemm_flag,
    bench_model_config,
    compile_options,
    measure_bandwidth,
    random_bank,
    segment_knobs,
    set_decode_gemm,
    set_fused_table,
    split_knobs,
)

from jmlora.config import EngineConfig  # noqa: E402
from jmlora.engine import model_runner  # noqa: E402
from jmlora.engine.sampler import SamplingTensors  # noqa: E402
from jmlora.engine.sampling_params import SamplingParams  # noqa: E402
from jmlora.lora.routing import PACKED_IMPL, LoRABatch, count_adapters, decode_impl, prepare_lora  # noqa: E402
from jmlora.model import attention, init_params, make_mesh  # noqa: E402

P_WIDTH = 128          # the runner's page-table width for max_model_len 1280 (+ lookahead), page size 16


def median_per_call(fn, n_calls=10, trials=5):
    jax.block_until_ready(fn())
    out = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(n_calls):
            r = fn()
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t) / n_calls)
    return statistics.median(out)


def compile_all(lower_fns, log, label):
    """Compiles the cases in parallel (each of ``lower_fns`` returns a ``Lowered``); a case the compiler refuses
    comes back as its exception, for the caller to log and skip."""
    def one(lower):
        try:
            return lower().compile()
        except Exception as e:  # a configuration the compiler refuses: skip it, say why
            return e

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(one, lower_fns))
    log(f"{label}: compiled {len(lower_fns)} variants in {time.perf_counter() - t0:.0f}s")
    return compiled


def gqa_grid():
    """Candidate configurations of the GQA decode-attention kernel."""
    return [attention.DecodeAttentionConfig("gqa", bp, w) for bp in (1, 2, 4) for w in (2, 4, 8)]


def time_attention(cfg, log, batches, ctxs, configs_for, small=False):
    """One layer's decode attention (as the decoder calls it) for each batch x context x configuration.

    ``configs_for(B)`` lists the configurations to try at batch B (None = the code's current choice). The
    cache pages each timed call touches are rotated so they exceed the L2. Returns dicts with batch, ctx,
    config, us (per layer call), kv_bytes (the floor's bytes) and err (relative to the jnp reference);
    configurations that fail to compile are logged and skipped.
    """
    K, D, H, ps = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, 16
    page_bytes = 2 * K * ps * D * 2                                # K and V of one page, all KV heads
    num_pages = 20000 if not small else 512
    kc = jax.random.normal(jax.random.key(0), (K, num_pages, ps, D), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(1), (K, num_pages, ps, D), jnp.bfloat16)
    cases = []
    for B in batches:
        for ctx in ctxs:
            used = -(-(ctx + 1) // ps)
            rot = max(1, min(4, math.ceil(128e6 / (B * used * page_bytes)), num_pages // (B * used)))
            tables = np.zeros((rot, B, P_WIDTH), np.int32)
            for r in range(rot):
                tables[r, :, :used] = (r * B * used + np.arange(B * used)).reshape(B, used)
            tables = jnp.asarray(tables)
            lens = jnp.full((B,), ctx + 1, jnp.int32)
            q = jax.random.normal(jax.random.key(2), (B, 1, H, D), jnp.bfloat16)
            ref = jax.jit(lambda q, t, kc, vc, lens: attention.ref_paged_attention(
                q, kc, vc, t, (lens - 1)[:, None], lens))(q, tables[0], kc, vc, lens)
            for config in configs_for(B):
                def f(q, tables, kc, vc, lens, config=config):
                    return jnp.stack([attention.paged_attention(q, kc, vc, tables[r], (lens - 1)[:, None], lens,
                                                                impl="pallas_gpu", config=config)
                                      for r in range(tables.shape[0])])
                cases.append((B, ctx, lens, rot, config, jax.jit(f), q, tables, ref))

    compiled = compile_all([lambda c=c: c[5].lower(c[6], c[7], kc, vc, c[2]) for c in cases], log, "attn")
    results = []
    for (B, ctx, lens, rot, config, _, q, tables, ref), exe in zip(cases, compiled):
        if isinstance(exe, Exception):
            log(f"attn B={B:3d} ctx={ctx:4d} {config}: FAILED {type(exe).__name__}: {str(exe)[:300]}")
            continue
        out = exe(q, tables, kc, vc, lens)[0].astype(jnp.float32)
        ref = ref.astype(jnp.float32)
        err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        us = median_per_call(lambda exe=exe, a=(q, tables, kc, vc, lens): exe(*a)) / rot * 1e6
        kv_bytes = B * (ctx + 1) * page_bytes / ps
        results.append(dict(batch=B, ctx=ctx, config=config, us=us, err=err, kv_bytes=kv_bytes))
        log(f"attn B={B:3d} ctx={ctx:4d} {config}: {us:7.1f} us/layer err {err:.1e}")
    return results


def attn_sweep(cfg, bw, log, batches, ctxs, small):
    grid = [attention.DecodeAttentionConfig("split", ppcb, w, ks) for ks in (1, 2, 4, 8, 16)
            for ppcb, w in ((8, 8), (8, 4), (16, 4), (4, 4))]
    results = time_attention(cfg, log, batches, ctxs, lambda B: [None] + grid + gqa_grid(), small)
    best = {}
    for r in results:
        key = (r["batch"], r["ctx"])
        r["floor_us"] = r["kv_bytes"] / bw * 1e6
        if r["err"] < 2e-2 and (key not in best or r["us"] < best[key][0]):
            best[key] = (r["us"], r["config"])
    for (B, ctx), (us, config) in sorted(best.items()):
        default = next(r["us"] for r in results if r["batch"] == B and r["ctx"] == ctx and r["config"] is None)
        floor = next(r["floor_us"] for r in results if r["batch"] == B and r["ctx"] == ctx)
        log(f"attn best B={B:3d} ctx={ctx:4d}: {config} {us:.1f} us vs current choice {default:.1f} us "
            f"(KV floor {floor:.1f} us)")
    return results


def tune_attention(cfg, log, batches, ctxs):
    """Fills ``attention.DECODE_ATTENTION_TABLE`` with the fastest correct configuration per batch (summed over
    the contexts) among the current rule and the GQA kernel's grid; returns the table."""
    results = time_attention(cfg, log, batches, ctxs, lambda B: [None] + gqa_grid())
    table = {}
    for B in batches:
        totals = {}
        for r in results:
            if r["batch"] == B:
                key = r["config"] or attention.pallas_gpu_tuning(B, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                                 P_WIDTH)
                ok = r["err"] < 2e-2
                totals[key] = totals.get(key, 0.0) + (r["us"] if ok else float("inf"))
        if not totals:
            continue
        best = min(totals, key=totals.get)
        table[B] = best
        rule = attention.pallas_gpu_tuning(B, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, P_WIDTH)
        log(f"tuned B={B}: {best} ({totals[best]:.1f} us over contexts {ctxs}; rule {totals.get(rule, 0):.1f})")
    attention.DECODE_ATTENTION_TABLE.update(table)
    return table


def fused_grid():
    """Candidate knobs of the fused RoPE + cache write + attention kernel."""
    return [attention.FusedAttentionConfig(bp, w, st) for bp in (2, 4, 8) for w in (2, 4, 8) for st in (1, 2)]


def fused_prefetch_grid():
    """The fused kernel with and without page-id prefetch at the knobs the table uses (4 pages / 4 warps,
    2 pages / 2 warps) and their neighbours."""
    knobs = ((4, 4), (2, 2), (2, 4), (4, 8), (8, 4))
    return [attention.FusedAttentionConfig(bp, w, 1, p) for bp, w in knobs for p in (False, True)]


def time_fused(cfg, log, batches, ctxs, bw, grid_for, small=False, rot_bytes=128e6):
    """The attention part of one decode layer from the fused q/k/v projection output to the attention output,
    unfused (XLA's RoPE and cache scatters, then ``pallas_gpu``'s kernel with its rule, as ``decoder._attention``
    runs it) against the fused kernel over ``grid_for(B)``'s knobs. Each timed call runs ``rot`` layers, each
    with its own cache pair (as the decoder's layers), at least ``rot_bytes`` of KV together, so the KV bytes
    exceed the L2 (128 MB and 2 GB measured the same to 1%: eleventh session), and every cache is
    updated in place. Returns dicts with batch, ctx, config (None = unfused), us per layer (device time from
    the profiler), err (relative to the unfused output) and floor_us (the KV bytes read at ``bw``)."""
    K, D, H, ps = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, 16
    G = H // K
    inv_freq = attention.rope_inv_freq(cfg.rope, D)
    page_bytes = 2 * K * ps * D * 2

    def unfused(qkv, caches, table, pos):
        outs, new_caches = [], []
        positions = pos[:, None]
        q = qkv[:, :, :G].reshape(qkv.shape[0], 1, H, D)
        k, v = qkv[:, None, :, G], qkv[:, None, :, G + 1]
        qr, kr = attention.apply_rope(q, positions, inv_freq), attention.apply_rope(k, positions, inv_freq)
        page_idx = jnp.take_along_axis(table, positions // ps, axis=1)
        for kc, vc in caches:
            kc = attention.write_kv(kc, kr, page_idx, positions % ps)
            vc = attention.write_kv(vc, v, page_idx, positions % ps)
            outs.append(attention.paged_attention(qr, kc, vc, table, positions, pos + 1, impl="pallas_gpu"))
            new_caches.append((kc, vc))
        return jnp.stack(outs), tuple(new_caches)

    def fused(qkv, caches, table, pos, config):
        outs, new_caches = [], []
        page_idx = jnp.take_along_axis(table, (pos // ps)[:, None], axis=1)[:, 0]
        for kc, vc in caches:
            out, kc, vc = attention.fused_paged_decode(qkv, None, kc, vc, table, pos, page_idx, inv_freq, config)
            outs.append(out)
            new_caches.append((kc, vc))
        return jnp.stack(outs), tuple(new_caches)

    cases = []
    for B in batches:
        for ctx in ctxs:
            used = -(-(ctx + 1) // ps)
            # layers' caches in turn, together at least rot_bytes (one cache when it alone is larger)
            rot = max(1, min(32, math.ceil(rot_bytes / (B * used * page_bytes))))
            table = np.full((B, P_WIDTH), B * used, np.int32)                     # the last page: scratch
            table[:, :used] = np.arange(B * used).reshape(B, used)
            cache = jax.ShapeDtypeStruct((K, B * used + 1, ps, D), jnp.bfloat16)
            qkv = jax.random.normal(jax.random.key(B + ctx), (B, K, G + 2, D), jnp.bfloat16)
            pos = jnp.full((B,), ctx, jnp.int32)
            for config in [None] + grid_for(B):
                fn = unfused if config is None else functools.partial(fused, config=config)
                cases.append((B, ctx, rot, config, jax.jit(fn, donate_argnums=(1,)), qkv, jnp.asarray(table), pos,
                              ((cache, cache),) * rot))

    compiled = compile_all([lambda c=c: c[4].lower(c[5], c[8], c[6], c[7]) for c in cases], log, "fused")

    def runner(case, exe):
        """(call, state): one timed call of the case on freshly filled caches of its own."""
        _, ctx, rot, _, _, qkv, table, pos, shapes = case
        keys = iter(jax.random.split(jax.random.key(ctx), 2 * rot))
        state = {"caches": tuple((jax.random.normal(next(keys), kc.shape, kc.dtype),
                                  jax.random.normal(next(keys), vc.shape, vc.dtype)) for kc, vc in shapes)}

        def call():
            out, state["caches"] = exe(qkv, state["caches"], table, pos)
            return jax.block_until_ready(out)
        return call, state

    # Device time from the profiler: a timed call is only a few launches, so its wall time is mostly Python
    # dispatch at small batches. Per shape, one trace for the unfused path (all its kernels) and one for every
    # fused configuration (each configuration's kernel has its knobs in its name).
    results, n_calls = [], 5
    for B, ctx in dict.fromkeys((c[0], c[1]) for c in cases):
        group = [(c, exe) for c, exe in zip(cases, compiled) if c[0] == B and c[1] == ctx]
        for c, exe in group:
            if isinstance(exe, Exception):
                log(f"fused B={B:3d} ctx={ctx:4d} {c[3]}: FAILED {type(exe).__name__}: {str(exe)[:300]}")
        group = [(c, exe) for c, exe in group if not isinstance(exe, Exception)]
        if not group or group[0][0][3] is not None:
            continue
        (unf_case, unf_exe), fused_cases = group[0], group[1:]
        rot = unf_case[2]
        call, state = runner(unf_case, unf_exe)
        ref = call()[0].astype(jnp.float32)
        unf_us = kernel_times(call, n_calls)["total_us"] / rot
        state.clear()
        outs = {}

        def run_all(fused_cases=fused_cases, outs=outs):
            for c, exe in fused_cases:
                call, state = runner(c, exe)
                outs[c[3]] = call()[0].astype(jnp.float32)
                for _ in range(n_calls):
                    call()
                state.clear()

        prof = kernel_times(run_all, n_calls=1) if fused_cases else {"kernels": []}
        per_launch = {name: us / n for name, us, n in prof["kernels"]}
        floor = B * (ctx + 1) * page_bytes / ps / bw * 1e6
        results.append(dict(batch=B, ctx=ctx, config=None, us=unf_us, err=0.0, floor_us=floor))
        log(f"fused B={B:3d} ctx={ctx:4d} unfused (rope + scatters + pallas_gpu): {unf_us:7.1f} us/layer device "
            f"(KV floor {floor:.1f})")
        for c, _ in fused_cases:
            config = c[3]
            name = (f"fused_decode_attention_bp{config.block_pages}w{config.num_warps}s{config.num_stages}"
                    f"p{int(config.prefetch)}")
            us = per_launch.get(name, float("nan"))
            err = float(jnp.linalg.norm(outs[config] - ref) / jnp.linalg.norm(ref))
            results.append(dict(batch=B, ctx=ctx, config=config, us=us, err=err, floor_us=floor))
            log(f"fused B={B:3d} ctx={ctx:4d} {config}: {us:7.1f} us/layer device err {err:.1e}")
    # per batch, the configuration with the least device time summed over the contexts; it replaces the
    # default only when it saves at least 5% (below that, run-to-run spread decides)
    totals = {}
    for r in results:
        if r["config"] is not None:
            ok = r["err"] < 2e-2 and math.isfinite(r["us"])
            key = (r["batch"], r["config"])
            totals[key] = totals.get(key, 0.0) + (r["us"] if ok else float("inf"))
    table, default = {}, attention.FusedAttentionConfig()
    for B in batches:
        mine = {c: us for (b, c), us in totals.items() if b == B}
        if not mine:
            continue
        pick = min(mine, key=mine.get)
        unf = sum(r["us"] for r in results if r["batch"] == B and r["config"] is None)
        log(f"fused best B={B:3d}: {pick} {mine[pick]:.1f} us summed over contexts {ctxs}; default "
            f"{mine.get(default, float('nan')):.1f} us; unfused {unf:.1f} us")
        if pick != default and mine[pick] < 0.95 * mine.get(default, float("inf")):
            table[B] = pick
    attention.FUSED_ATTENTION_TABLE.update(table)
    return results


def step_profile(cfg, params, mesh, log, batches, ctx, K=4, attention_impls=("auto",), lora_impls=("auto",),
                 variants=("base", "distinct"), timeline=False, max_loras=64, prepack=False,
                 schedule_mode=None):
    ecfg = EngineConfig(max_num_seqs=max(batches), page_size=16, num_lookahead=K, enable_lora=True, max_loras=max_loras,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=max(batches) * P_WIDTH)
    runner = model_runner.ModelRunner(cfg, params, mesh, ecfg, max(batches) * P_WIDTH)
    runner.bank = random_bank(runner.bank, 16)
    greedy = SamplingParams(temperature=0.0)
    cases = []
    adapters = {"distinct": max_loras, "shared8": min(8, max_loras)}
    for B in batches:
        for variant in variants:
            for attn in attention_impls:
                for impl in lora_impls[:1] if variant == "base" else lora_impls:
                    st = SamplingTensors.from_params([greedy] * B, [0] * B, B)
                    table = jnp.asarray(np.arange(B * P_WIDTH, dtype=np.int32).reshape(B, P_WIDTH))
                    slots = np.zeros(B) if variant == "slot0" else 1 + np.arange(B) % adapters.get(variant, 1)
                    lora = None if variant == "base" else LoRABatch(runner.bank, jnp.asarray(slots, jnp.int32))
                    pos = jnp.full(B, ctx, jnp.int32)
                    args = (lora, jnp.full(B, 5, jnp.int32), pos, jnp.ones(B, bool), table,
                            jnp.arange(B, dtype=jnp.int32), st, jnp.zeros(B, jnp.int32))
                    # the formulation the engine's runner picks for this batch ("auto" may become the
                    # few-adapter segment form: routing.decode_impl), as throughput.py times it
                    name = split_knobs(impl)[0]
                    picked = name if lora is None else decode_impl(
                        name, B, count_adapters(slots), jax.default_backend(), ecfg.max_lora_rank)
                    if prepack and picked == PACKED_IMPL:  # packed once here: the call gets the pack as input
                        lora = jax.jit(functools.partial(prepare_lora, num_new_tokens=1, impl=PACKED_IMPL,
                                                         num_kv_heads=cfg.num_kv_heads))(lora)
                        args = (lora, *args[1:])
                    with segment_knobs(impl):        # an impl's "+knob" suffix (throughput.segment_knobs)
                        lowered = model_runner._decode_steps.lower(
                            params, cfg, runner.cache, *args, runner.prompt_mask, runner.output_counts,
                            jnp.zeros(B, bool), pos, num_steps=K, lora_impl=picked,
                            attention_impl=attn, needs_penalties=False, num_logprobs=0)
                    label = f"{variant} {attn}" + ("" if variant == "base" else f" {impl}") + (
                        f" ({picked})" if picked != name else "")
                    cases.append((B, label, args, lowered))
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(lambda c: c[3].compile(compile_options(schedule_mode)), cases))
    log(f"step: compiled {len(cases)} decode variants in {time.perf_counter() - t:.0f}s")
    out = {}
    for (B, variant, args, _), exe in zip(cases, compiled):
        def call(exe=exe, args=args, B=B):
            res, _, runner.cache, runner.prompt_mask, runner.output_counts = exe(
                params, runner.cache, *args, runner.prompt_mask, runner.output_counts, jnp.zeros(B, bool), args[2])
            return jax.block_until_ready(res)

        wall = median_per_call(call, n_calls=3, trials=5) / K
        prof = kernel_times(call, n_calls=3)
        print_kernels(f"step B={B} {variant} ctx={ctx} (wall {wall * 1e3:.2f} ms/step)", prof, per=K, log=log)
        if timeline:
            log(f"  timeline of one layer (between two attention kernels), B={B} {variant}:")
            print_timeline(prof, "fused_decode_attention", 40, log=log)
        kernels = [(n, us / K, c / K) for n, us, c in prof["kernels"][:60]]
        key = f"B{B}_{variant.replace(' ', '_')}"
        out[key] = dict(wall_ms=wall * 1e3, busy_us=prof["total_us"] / K, kernels=kernels)
    return out


SEGMENT_KNOBS = [  # (shrink block_k, n_split scale, delta block_n, num_warps); the first are the code's defaults
    (None, 1, None, 4), (256, 1, 512, 4), (128, 2, 1024, 4), (128, 0.5, 512, 8)]


def time_segment(cfg, log, batches, knobs=SEGMENT_KNOBS, copies=4):
    """The LoRA kernels of one decoder layer (q/k/v, o, gate/up, down: shrink + delta each) at decode, the
    segment form over ``knobs`` against the decode (BGMV) form, for 64 distinct and 8 shared adapters.

    Each timed call runs ``copies`` layers with their own banks (> the L2 together); device time from the
    profiler per kernel family, per layer. Returns dicts with batch, variant, form, knobs and us per family.
    """
    from pallas_kernels import expand, grouping, shrink

    E, M = cfg.hidden_size, cfg.intermediate_size
    qo, kvo = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    groups = [(E, (qo, kvo, kvo)), (qo, (E,)), (E, (M, M)), (M, (E,))]
    S, R = 65, 16
    key = jax.random.key(11)
    rnd = lambda shape: (0.01 * jax.random.normal(jax.random.fold_in(key, hash(shape) % 9973), shape)).astype(
        jnp.bfloat16)
    banks = [[(tuple(rnd((S, h, R)) for _ in outs), tuple(rnd((S, R, o)) for o in outs)) for h, outs in groups]
             for _ in range(copies)]
    ranks = jnp.full((S,), R, jnp.int32).at[0].set(0)

    def layer(xs, banks, slots, tiles, knob):
        out = []
        for layer_banks in banks:
            for x, (a_sl, b_sl) in zip(xs, layer_banks):
                if knob is None:   # the decode (BGMV) form
                    hp = shrink.bgmv_shrink_partials_multi(x, a_sl, slots, ranks)
                    out += expand.bgmv_delta_multi(x.dtype, hp, b_sl, slots, ranks)
                    continue
                bk, scale, bn, warps = knob
                dk, dn = shrink.seg_block_sizes(x.shape[0], x.shape[1], len(a_sl), 16)
                bk = bk or dk
                ns = max(1, min(int(dn * scale), x.shape[1] // bk))
                while ns > 1 and x.shape[1] % (bk * ns):
                    ns //= 2
                hp = shrink.seg_shrink_partials_multi(x, a_sl, tiles, block_k=bk, n_split=ns)
                out += expand.seg_delta_multi(x.dtype, hp, b_sl, tiles, block_n=bn, num_warps=warps)
        return out

    results = []
    for B in batches:
        xs = [rnd((B, h)) for h, _ in groups]
        for variant, n_adapters in (("distinct", 64), ("shared8", 8)):
            slots = jnp.asarray(1 + np.arange(B) % n_adapters, jnp.int32)
            tiles = jax.jit(grouping.segment_tiles_triton, static_argnums=2)(slots, ranks, 16)
            for knob in [None] + list(knobs):
                f = jax.jit(functools.partial(layer, knob=knob))
                try:
                    prof = kernel_times(functools.partial(lambda f, *a: jax.block_until_ready(f(*a)), f, xs, banks,
                                                          slots, tiles), n_calls=5)
                except Exception as e:  # a configuration the compiler refuses: skip it, say why
                    log(f"segment B={B} {variant} {knob}: failed: {str(e)[:200]}")
                    continue
                fams = {k: us / copies for k, us, _ in prof["kernels"]}
                total = prof["total_us"] / copies
                form = "decode" if knob is None else "segment"
                log(f"segment B={B:3d} {variant:8s} {form:7s} knobs={knob}: {total:6.1f} us/layer "
                    + " ".join(f"{k}={v:.1f}" for k, v in sorted(fams.items())))
                results.append(dict(batch=B, variant=variant, form=form, knobs=knob, us=total, families=fams))
    return results


def lora_profile(log):
    from kernels import make_case

    from pallas_kernels import lora

    out = {}
    for shape in [(8192, 4096, 4096, 16, 4), (2048, 4096, 4096, 16, 4), (8192, 4096, 4096, 64, 64),
                  (256, 4096, 14336, 16, 256), (64, 4096, 4096, 64, 64)]:
        t, h, o, r, nd = shape
        a, b, ranks, sets = make_case(t, h, o, r, nd, 1, seed=3, prefill=t > 256)
        x, y, slots = sets[0]
        f = jax.jit(lambda y, x, s, a, b, ranks: lora.lora_shrink_expand(y, x, a, b, s, ranks))
        prof = kernel_times(lambda f=f, args=(y, x, slots, a, b, ranks): jax.block_until_ready(f(*args)), n_calls=5)
        print_kernels(f"lora_shrink_expand {shape}", prof, top=12, log=log)
        out[str(shape)] = prof
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="attn,step,lora")
    p.add_argument("--batches", default="32,64,256")
    p.add_argument("--attn-batches", default="1,32,64,256")
    p.add_argument("--fused-batches", default="1,8,32,64,128,256")
    p.add_argument("--fused-rot-mb", type=float, default=128,
                   help="the fused part's timed call walks layers' caches of at least this many MB in turn, so that "
                        "the L2 (60 MB) holds little of a cache when it is read again")
    p.add_argument("--fused-grid", default="default", choices=("default", "full", "prefetch"),
                   help="the fused kernel's knobs to time: the default configuration, fused_grid() or "
                        "fused_prefetch_grid()")
    p.add_argument("--fused-table", default="",
                   help="FUSED_ATTENTION_TABLE entries for the step part (as throughput.py --fused-table)")
    p.add_argument("--step-attention", default="auto", help="comma-separated attention impls for the step part")
    p.add_argument("--step-lora", default="auto", help="comma-separated lora impls for the step part")
    p.add_argument("--step-variants", default="base,distinct",
                   help="of base, distinct (max_loras adapters), shared8, slot0 (LoRA on, no adapter in the batch)")
    p.add_argument("--timeline", action="store_true", help="step part: print one layer's kernels in start order")
    p.add_argument("--max-loras", type=int, default=64, help="step part: the bank's adapter slots")
    p.add_argument("--ctx", type=int, default=192)
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true", help="tiny dims (CPU smoke test of the script)")
    add_decode_gemm_flag(p)
    p.add_argument("--schedule-mode", default=None,
                   help="step part: compile with this throughput.py --schedule-modes entry (e.g. SERIALIZE)")
    p.add_argument("--prepack", action="store_true",
                   help="step part: batches on routing.PACKED_IMPL get their adapters packed before the call (as a "
                        "cache in the runner would), not inside it")
    args = p.parse_args()
    set_decode_gemm(args.decode_gemm)
    parts = set(args.parts.split(","))
    logf = open(os.path.join(args.out, "decode_profile_log.txt"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    cfg = bench_model_config(1280, small=args.small)
    bw = measure_bandwidth()
    log(f"device {jax.devices()[0].device_kind}; HBM {bw / 1e12:.2f} TB/s (elementwise)")
    results = {"hbm_tb_s": bw / 1e12}
    if "fused" in parts:       # first: its tuned knobs (FUSED_ATTENTION_TABLE) then serve the step part
        grid = {"full": fused_grid, "prefetch": fused_prefetch_grid}.get(
            args.fused_grid, lambda: [attention.FusedAttentionConfig()])()
        results["fused"] = time_fused(cfg, log, [int(b) for b in args.fused_batches.split(",")], (192, 1152), bw,
                                      lambda B: grid, args.small, rot_bytes=args.fused_rot_mb * 1e6)
    if "step" in parts:
        set_fused_table(args.fused_table)
        mesh = make_mesh()
        params = init_params(cfg, mesh, dtype=jnp.bfloat16)
        results["step"] = step_profile(cfg, params, mesh, log, [int(b) for b in args.batches.split(",")], args.ctx,
                                       attention_impls=tuple(args.step_attention.split(",")),
                                       lora_impls=tuple(args.step_lora.split(",")),
                                       variants=tuple(args.step_variants.split(",")), timeline=args.timeline,
                                       max_loras=args.max_loras, prepack=args.prepack,
                                       schedule_mode=args.schedule_mode)
        del params
    if "lora" in parts:
        results["lora"] = lora_profile(log)
    if "segment" in parts:
        results["segment"] = time_segment(cfg, log, [int(b) for b in args.batches.split(",")])
    if "attn" in parts:
        results["attn"] = attn_sweep(cfg, bw, log, [int(b) for b in args.attn_batches.split(",")], (192, 1152),
                                     args.small)
    with open(os.path.join(args.out, "decode_profile.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
