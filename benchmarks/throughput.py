"""Decode throughput of a Llama-3-8B-shaped model with random bf16 weights made on the device.

For each (prompt, new tokens) workload and batch size: the device time of one decode token step (the
engine's jitted multi-step decode, ``num_lookahead`` steps per call, greedy sampling on the device) for
(a) base only, (b) a different rank-16 adapter on all 7 projections for every sequence (up to 64 slots),
(c) 8 adapters shared; beside each, the roofline (bytes one step must move / HBM bandwidth measured in this
run). The step is timed at the workload's mid-generation context (prompt + new/2 tokens in the cache), two
ways: ``step_ms`` waits for each call before dispatching the next, so it also counts the device's idle time
while the host dispatches a call; ``pipelined_step_ms`` issues the calls back to back with one wait at the
end, as the engine's async scheduling runs them (they still run one after another: each takes the previous
one's KV cache). Host time per step (the runner's input assembly + the scheduler) is measured at the largest
batch, two ways: the runner's synchronous wall time minus the device step (plus ``schedule()``), and directly,
the host's busy time in ``start_decode`` and ``finish_decode`` without the wait for the device (plus
``schedule()``), with the jitted call's own share (XLA's runtime launching the executable) apart from the
Python.

    PYTHONPATH=. python benchmarks/throughput.py --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jmlora.config import EngineConfig, ModelConfig
from jmlora.engine import model_runner
from jmlora.engine.model_runner import ModelRunner, _decode_steps
from jmlora.engine.page_manager import PageManager
from jmlora.engine.sampler import SamplingTensors
from jmlora.engine.sampling_params import SamplingParams
from jmlora.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig
from jmlora.engine.sequence import Sequence
from jmlora.lora import routing
from jmlora.lora.bank import AdapterBank, TargetBank
from jmlora.lora.routing import LoRABatch, count_adapters, decode_impl
from jmlora.lora.slots import SlotManager
from jmlora.model import attention, decoder, init_params, make_mesh

WORKLOADS = [(128, 128), (1024, 256)]


def bench_model_config(max_model_len: int, *, small: bool = False, path: str = "configs/llama3_8b.json",
                       **overrides) -> ModelConfig:
    """The benchmarks' model: Llama-3-8B's shape (``small``: tiny dims, for CPU smoke tests of a script)."""
    raw = json.load(open(path))
    if small:
        raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512)
    raw.update(overrides)
    return ModelConfig.from_dict(raw, max_model_len=max_model_len)


def measure_bandwidth() -> float:
    """HBM bytes/s of an elementwise read+write over 4 GiB (JAX), median of 10."""
    x = jnp.ones((1 << 30,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    y = f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        y = f(y).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * x.nbytes / statistics.median(times)


def set_fused_table(spec: str):
    """Entries ``BATCH:block_pages,num_warps,num_stages,prefetch`` (space-separated) into FUSED_ATTENTION_TABLE."""
    for entry in spec.split():
        b, knobs = entry.split(":")
        bp, w, st, pf = (int(v) for v in knobs.split(","))
        attention.FUSED_ATTENTION_TABLE[int(b)] = attention.FusedAttentionConfig(bp, w, st, bool(pf))


def random_bank(bank: AdapterBank, rank: int) -> AdapterBank:
    """Every slot but 0 holds a random rank-``rank`` adapter (slot 0 stays the zero adapter)."""
    key = jax.random.key(7)

    @jax.jit
    def fill(a):
        noise = (0.01 * jax.random.normal(key, a.shape, jnp.float32)).astype(a.dtype)
        return noise.at[0].set(0)

    layers = tuple({t: TargetBank(a=fill(tb.a), b=fill(tb.b)) for t, tb in layer.items()} for layer in bank.layers)
    ranks = jnp.full(bank.ranks.shape, rank, jnp.int32).at[0].set(0)
    return AdapterBank(layers=layers, ranks=ranks)


def split_knobs(impl: str) -> tuple[str, str]:
    """``"auto+db512x2+sp128"`` -> ``("auto", "+db512x2+sp128")``: a lora impl and its segment-kernel knobs."""
    name, plus, knobs = impl.partition("+")
    return name, plus + knobs


@contextlib.contextmanager
def segment_knobs(impl: str):
    """While tracing: the decode-size segment kernels' knobs named in ``impl``'s suffix: ``+dbCxO`` sets
    ``pallas_kernels.lora.DECODE_DELTA_BLOCKS`` to (C columns at most per dot, O blocks per program), ``+spN``
    ``pallas_kernels.shrink.SEG_PROGRAMS`` (the programs the shrink's H-split aims at) to N, ``+fdN``
    ``jmlora.model.decoder.FUSED_DELTAS_MAX_BATCH`` to N (q/k/v deltas into the fused attention kernel up to N
    rows), ``+swN`` and ``+ssN`` the decode-size segment shrink's warps and pipeline stages
    (``pallas_kernels.lora.DECODE_SHRINK_LAUNCH``)."""
    from pallas_kernels import lora, shrink

    saved = lora.DECODE_DELTA_BLOCKS, shrink.SEG_PROGRAMS, decoder.FUSED_DELTAS_MAX_BATCH, lora.DECODE_SHRINK_LAUNCH
    jax.clear_caches()          # jit's trace cache would otherwise hand back a trace made with other knobs
    for knob in split_knobs(impl)[1].split("+")[1:]:
        if knob.startswith("fd"):
            decoder.FUSED_DELTAS_MAX_BATCH = int(knob[2:])
        elif knob.startswith("db"):
            lora.DECODE_DELTA_BLOCKS = tuple(int(v) for v in knob[2:].split("x"))
        elif knob.startswith("sp"):
            shrink.SEG_PROGRAMS = int(knob[2:])
        elif knob.startswith("sw"):
            lora.DECODE_SHRINK_LAUNCH = (int(knob[2:]), lora.DECODE_SHRINK_LAUNCH[1])
        elif knob.startswith("ss"):
            lora.DECODE_SHRINK_LAUNCH = (lora.DECODE_SHRINK_LAUNCH[0], int(knob[2:]))
        else:
            raise ValueError(f"unknown segment knob {knob!r} in {impl!r}")
    try:
        yield
    finally:
        (lora.DECODE_DELTA_BLOCKS, shrink.SEG_PROGRAMS, decoder.FUSED_DELTAS_MAX_BATCH,
         lora.DECODE_SHRINK_LAUNCH) = saved
        jax.clear_caches()


def compile_options(mode: str | None) -> dict | None:
    """A ``--schedule-modes`` entry as compiler options: a bare word is an
    ``xla_gpu_command_buffer_scheduling_mode``; ``KEY=VALUE[;KEY=VALUE]`` are XLA debug options added to the
    engine's (``model_runner.COMPILER_OPTIONS``)."""
    if mode is None:
        return None
    if "=" not in mode:
        return {"xla_gpu_command_buffer_scheduling_mode": mode}
    options = dict(model_runner.COMPILER_OPTIONS)
    for item in mode.split(";"):
        key, _, value = item.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def host_busy_times(runner, chunks, num_steps: int, iters: int) -> list[tuple[float, float, float]]:
    """The host's busy time in ``iters`` decode calls of ``runner`` over ``chunks``, waiting for the device
    between dispatch and read-back: per call (seconds), the Python of ``start_decode`` without the jitted call,
    ``finish_decode`` once the samples are ready, and the jitted call itself (XLA's runtime launching the
    executable)."""
    jitted, in_call = model_runner._decode_call, [0.0]

    def timed_call(*a, **k):
        t = time.perf_counter()
        try:
            return jitted(*a, **k)
        finally:
            in_call[0] += time.perf_counter() - t

    model_runner._decode_call = timed_call
    out = []
    try:
        for _ in range(iters):
            in_call[0] = 0.0
            t = time.perf_counter()
            call = runner.start_decode(chunks, num_steps)
            start = time.perf_counter() - t
            jax.block_until_ready(call.result)
            t = time.perf_counter()
            runner.finish_decode(call)
            out.append((start - in_call[0], time.perf_counter() - t, in_call[0]))
    finally:
        model_runner._decode_call = jitted
    return out


def add_decode_gemm_flag(parser):
    parser.add_argument("--decode-gemm", default="auto", choices=("auto", "xla", "mgpu", "mgpu-lora"),
                        help="jmlora.model.decoder.DECODE_GEMM_IMPL: the decode projections on the Pallas skinny GEMM "
                             "where its table has the shape (auto), all on XLA's GEMM (xla), or first on the Mosaic "
                             "GPU GEMM where pallas_kernels.ws_gemm's table has the shape (mgpu); mgpu-lora: mgpu, "
                             "and batches over at most 8 adapters run each projection with its LoRA terms in one "
                             "launch where pallas_kernels.ws_lora's table has the shape (routing.PACKED_LORA_GEMM)")


def set_decode_gemm(choice: str):
    """Applies ``--decode-gemm``'s choice to the decoder's and the router's switches (read at trace time)."""
    decoder.DECODE_GEMM_IMPL = "mgpu" if choice == "mgpu-lora" else choice
    routing.PACKED_LORA_GEMM = choice == "mgpu-lora"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--max-loras", type=int, default=64)
    parser.add_argument("--compile-threads", type=int, default=8,
                        help="threads compiling the decode variants; XLA autotunes each executable's GEMMs on the "
                             "device while it compiles, so with more than one the timings it picks by overlap "
                             "(the engine compiles one at a time)")
    parser.add_argument("--config", default="configs/llama3_8b.json")
    parser.add_argument("--out", default=None)
    parser.add_argument("--small", action="store_true", help="tiny model dims (CPU smoke test)")
    parser.add_argument("--attention-impl", default="auto", help="EngineConfig.attention_impl for the decode steps")
    parser.add_argument("--lora-impls", default="auto",
                        help="comma-separated EngineConfig.lora_impl values: the adapter variants are timed under "
                             "each (the first fills the table's columns; e.g. pallas_decode,pallas_segment to A/B "
                             "the kernel forms in one run; a suffix such as +db512x2+sp128 sets the decode segment "
                             "kernels' knobs: segment_knobs)")
    parser.add_argument("--schedule-modes", default="",
                        help="comma-separated xla_gpu_command_buffer_scheduling_mode values (e.g. SERIALIZE) "
                             "or KEY=VALUE[;KEY=VALUE] XLA options (compile_options): "
                             "every variant is also timed compiled under each (empty: the engine's options only, "
                             "model_runner.COMPILER_OPTIONS). benchmarks/schedule_check.py checks that the "
                             "modes compute the same")
    parser.add_argument("--kv-layouts", default="strided",
                        help="comma-separated page layouts of the KV cache (the first fills the table): strided = "
                             "row i owns pages i*P .. i*P+P-1 (P = the table's width, most of them unused); "
                             "packed = each row's used pages back to back from page 0, as the engine's page "
                             "manager hands them out to a fresh batch")
    parser.add_argument("--tune-fused", default="",
                        help="comma-separated batches: first time the fused decode-attention kernel's knobs there "
                             "and use the fastest (the table to copy into FUSED_ATTENTION_TABLE is printed)")
    parser.add_argument("--fused-table", default="",
                        help="space-separated BATCH:block_pages,num_warps,num_stages,prefetch entries that replace "
                             "FUSED_ATTENTION_TABLE's for those batches (A/B of the fused attention kernel's knobs)")
    parser.add_argument("--pipelined", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each variant with its calls issued back to back and one wait at the end, as "
                             "the engine's async scheduling runs them (step_ms waits for every call, so each call's "
                             "host dispatch, 2-4 ms on the H200, leaves the device idle and adds to it)")
    parser.add_argument("--slot0", action="store_true",
                        help="also time the LoRA executable on a batch whose rows all have no adapter (slot 0)")
    parser.add_argument("--host", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the host time per step at the largest batch (compiles one more executable)")
    add_decode_gemm_flag(parser)
    parser.add_argument("--tune-attention", action="store_true",
                        help="first time the decode-attention kernels per batch and use the fastest (the table "
                             "to copy into jmlora.model.attention.DECODE_ATTENTION_TABLE is printed)")
    args = parser.parse_args()
    set_decode_gemm(args.decode_gemm)
    batches = [int(b) for b in args.batches.split(",")]
    K = args.lookahead
    t0 = time.perf_counter()
    max_len = max(p + n for p, n in WORKLOADS)
    cfg = bench_model_config(max_len, small=args.small, path=args.config)
    tuned = {}
    if args.tune_attention:
        from decode_profile import tune_attention

        tuned = tune_attention(cfg, print, batches, [p + n // 2 for p, n in WORKLOADS])
        print(f"DECODE_ATTENTION_TABLE = {tuned}")
    bw = measure_bandwidth()
    if args.tune_fused:
        from decode_profile import fused_grid, time_fused

        time_fused(cfg, print, [int(b) for b in args.tune_fused.split(",")], [p + n // 2 for p, n in WORKLOADS], bw,
                   lambda B: fused_grid())
        print(f"FUSED_ATTENTION_TABLE = {attention.FUSED_ATTENTION_TABLE}")
    if args.fused_table:
        set_fused_table(args.fused_table)
        print(f"FUSED_ATTENTION_TABLE = {attention.FUSED_ATTENTION_TABLE}")
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    print(f"device {jax.devices()[0].device_kind}; HBM {bw / 1e12:.2f} TB/s; "
          f"params made in {time.perf_counter() - t0:.0f}s")

    B_max = max(batches)
    ecfg = EngineConfig(max_num_seqs=B_max, page_size=16, num_lookahead=K, enable_lora=True, max_loras=args.max_loras,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=1, attention_impl=args.attention_impl, lora_impl=args.lora_impls.split(",")[0])
    P = 1 << (-(-(max_len + K) // 16) - 1).bit_length()          # the runner's page-table width
    runner = ModelRunner(cfg, params, mesh, dataclass_replace(ecfg, num_kv_pages=B_max * P), B_max * P)
    runner.bank = random_bank(runner.bank, 16)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params.embed.nbytes
    slot_bytes = runner.bank_spec.slot_elements(cfg) * 2
    kv_token_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    print(f"weights {weight_bytes / 1e9:.2f} GB (without the embedding table); adapter {slot_bytes / 1e6:.1f} MB; "
          f"KV {kv_token_bytes / 1e3:.0f} KB/token; bank {runner.bank_spec.num_slots} slots")

    greedy = SamplingParams(temperature=0.0)

    def inputs(B, ctx, slots, layout="strided"):
        st = SamplingTensors.from_params([greedy] * B, [0] * B, B)
        if layout == "strided":
            table = np.arange(B * P, dtype=np.int32).reshape(B, P)
        elif layout == "packed":  # the pages the K steps touch (positions < ctx + K), rows back to back
            used = -(-(ctx + K) // 16)
            table = np.full((B, P), B * used, np.int32)            # never read: past every row's positions
            table[:, :used] = np.arange(B * used, dtype=np.int32).reshape(B, used)
        else:
            raise ValueError(f"unknown KV layout {layout!r}")
        lora = None if slots is None else LoRABatch(runner.bank, jnp.asarray(slots, jnp.int32))
        return (jnp.zeros(B, jnp.int32) + 5, jnp.full(B, ctx, jnp.int32), jnp.ones(B, bool), jnp.asarray(table),
                jnp.arange(B, dtype=jnp.int32), st, jnp.zeros(B, jnp.int32), lora)

    # "slot0": LoRA enabled but no row has an adapter (every row on the zero adapter, slot 0): the LoRA
    # executable on a base-only batch, which the runner sends to the base executable (``ModelRunner``)
    variants = {"base": lambda B: None, "distinct": lambda B: 1 + np.arange(B) % args.max_loras,
                "shared8": lambda B: 1 + np.arange(B) % 8, "slot0": lambda B: np.zeros(B, np.int64)}

    lora_impls = args.lora_impls.split(",")
    modes = [None] + [m for m in args.schedule_modes.split(",") if m]     # None: the engine's own options

    @functools.cache
    def engine_impl(impl, B, variant):
        """The formulation the engine's runner picks for this batch (``routing.decode_impl``: "auto" may
        become the grouped form for a batch with few adapters), with ``impl``'s kernel knobs (``split_knobs``)."""
        name, knobs = split_knobs(impl)
        picked = decode_impl(name, B, count_adapters(variants[variant](B)), jax.default_backend(), ecfg.max_lora_rank)
        return picked + knobs

    # compile every (batch, base|lora, impl, schedule mode) variant in parallel threads (XLA compiles outside
    # the GIL); the timed calls run these executables
    t = time.perf_counter()
    lowered = {}
    for B in batches:
        needed = [("base", lora_impls[0])] + sorted({("lora", engine_impl(impl, B, v)) for impl in lora_impls
                                                     for v in ("distinct", "shared8", "slot0")})
        for kind, impl in needed:
            tokens, pos, active, table, rows, st, steps, lora = inputs(B, 100, None if kind == "base" else
                                                                         variants["distinct"](B))
            with segment_knobs(impl):
                lw = _decode_steps.lower(params, cfg, runner.cache, lora, tokens, pos, active, table, rows, st,
                                         steps, runner.prompt_mask, runner.output_counts, jnp.zeros(B, bool), pos,
                                         num_steps=K, lora_impl=split_knobs(impl)[0],
                                         attention_impl=ecfg.attention_impl, needs_penalties=False, num_logprobs=0)
            for mode in modes:
                lowered[B, kind, impl, mode] = lw
    with ThreadPoolExecutor(args.compile_threads) as pool:
        keys = list(lowered)
        execs = dict(zip(keys, pool.map(
            lambda k: lowered[k].compile(compile_options(k[3])),
            keys)))
    print(f"compiled {len(execs)} decode variants in {time.perf_counter() - t:.0f}s")

    layouts = args.kv_layouts.split(",")

    def run(B, ctx, variant, prepared=None, lora_impl=lora_impls[0], mode=None):
        tokens, pos, active, table, rows, st, steps, lora = prepared or inputs(B, ctx, variants[variant](B))
        kind = "base" if variant == "base" else "lora"
        exe = execs[B, kind, lora_impl if kind == "base" else engine_impl(lora_impl, B, variant), mode]
        res, _, runner.cache, runner.prompt_mask, runner.output_counts = exe(
            params, runner.cache, lora, tokens, pos, active, table, rows, st, steps, runner.prompt_mask,
            runner.output_counts, jnp.zeros(B, bool), pos)
        return res

    rows_out = []
    for prompt, new in WORKLOADS:
        ctx = prompt + new // 2
        for B in batches:
            row = dict(prompt=prompt, new=new, ctx=ctx, batch=B)
            base_bytes = weight_bytes + B * (ctx + 1) * kv_token_bytes
            cases = [("base", lora_impls[0])] + [(v, impl) for impl in lora_impls for v in ("distinct", "shared8")]
            cases += [("slot0", lora_impls[0])] if args.slot0 else []
            for (variant, impl), mode, layout in itertools.product(cases, modes, layouts):
                prepared = jax.block_until_ready(inputs(B, ctx, variants[variant](B), layout))  # device time only
                jax.block_until_ready(run(B, ctx, variant, prepared, impl, mode))
                times = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    jax.block_until_ready(run(B, ctx, variant, prepared, impl, mode))
                    times.append((time.perf_counter() - t) / K)
                step = statistics.median(times)
                pipelined = None
                if args.pipelined:
                    # the same calls issued back to back, one wait at the end (as the engine's async loop runs
                    # them): the host's dispatch of a call hides behind the previous call's device time. The
                    # clock starts when a first call finishes with the next one already queued, so no dispatch
                    # is counted: iters + 1 calls run on the device between the two readings
                    first = run(B, ctx, variant, prepared, impl, mode)
                    out = run(B, ctx, variant, prepared, impl, mode)
                    jax.block_until_ready(first)
                    t = time.perf_counter()
                    for _ in range(args.iters):
                        out = run(B, ctx, variant, prepared, impl, mode)
                    jax.block_until_ready(out)
                    pipelined = (time.perf_counter() - t) / ((args.iters + 1) * K)
                distinct = {"base": 0, "slot0": 0, "distinct": min(B, args.max_loras), "shared8": min(B, 8)}[variant]
                nbytes = base_bytes + distinct * slot_bytes
                key = variant if impl == lora_impls[0] else f"{variant}@{impl}"
                key = key if mode is None else f"{key}@{mode}"
                key = key if layout == layouts[0] else f"{key}@{layout}"
                row[key] = dict(step_ms=step * 1e3, tok_s=B / step, roofline_ms=nbytes / bw * 1e3,
                                pipelined_step_ms=None if pipelined is None else pipelined * 1e3,
                                pipelined_pct_roofline=None if pipelined is None else 100 * nbytes / bw / pipelined,
                                pct_roofline=100 * nbytes / bw / step, adapter_bytes_ratio=distinct * slot_bytes /
                                base_bytes, lora_impl=impl if variant == "base" else engine_impl(impl, B, variant))
            rows_out.append(row)
            b, d, s = row["base"], row["distinct"], row["shared8"]
            print(f"p{prompt}/n{new} B={B:3d}: base {b['step_ms']:.2f} ms ({b['tok_s']:.0f} tok/s, "
                  f"{b['pct_roofline']:.0f}% roof) | distinct {d['step_ms']:.2f} ms ({d['tok_s']:.0f} tok/s, "
                  f"{d['pct_roofline']:.0f}%, +{100 * (d['step_ms'] / b['step_ms'] - 1):.0f}% vs bytes "
                  f"+{100 * d['adapter_bytes_ratio']:.0f}%) | shared8 {s['step_ms']:.2f} ms "
                  f"(+{100 * (s['step_ms'] / b['step_ms'] - 1):.0f}% vs bytes +{100 * s['adapter_bytes_ratio']:.0f}%)",
                  flush=True)
            if args.pipelined:
                pb, pd, ps = (r["pipelined_step_ms"] for r in (b, d, s))
                print(f"    pipelined: base {pb:.2f} ms ({b['pipelined_pct_roofline']:.0f}% roof) | distinct "
                      f"{pd:.2f} ms (+{100 * (pd / pb - 1):.0f}%) | shared8 {ps:.2f} ms (+{100 * (ps / pb - 1):.0f}%)",
                      flush=True)
            if args.slot0:
                z = row["slot0"]
                print(f"    slot0 (LoRA executable, no adapter in the batch): {z['step_ms']:.2f} ms "
                      f"(+{100 * (z['step_ms'] / b['step_ms'] - 1):.1f}%)" + (
                          "" if not args.pipelined else f"; back to back {z['pipelined_step_ms']:.2f} ms "
                          f"(+{100 * (z['pipelined_step_ms'] / b['pipelined_step_ms'] - 1):.1f}%)"), flush=True)
            for impl in lora_impls[1:]:
                d, s = row[f"distinct@{impl}"], row[f"shared8@{impl}"]
                print(f"    lora_impl={impl}: distinct {d['step_ms']:.2f} ms "
                      f"(+{100 * (d['step_ms'] / b['step_ms'] - 1):.0f}%) | shared8 {s['step_ms']:.2f} ms "
                      f"(+{100 * (s['step_ms'] / b['step_ms'] - 1):.0f}%)" + ("" if not args.pipelined else
                      f"; back to back distinct {d['pipelined_step_ms']:.2f} ms "
                      f"(+{100 * (d['pipelined_step_ms'] / b['pipelined_step_ms'] - 1):.1f}%) | shared8 "
                      f"{s['pipelined_step_ms']:.2f} ms "
                      f"(+{100 * (s['pipelined_step_ms'] / b['pipelined_step_ms'] - 1):.1f}%)"), flush=True)
            for mode in modes[1:]:
                b, d, s = (row[f"{v}@{mode}"] for v in ("base", "distinct", "shared8"))
                print(f"    schedule {mode}: base {b['step_ms']:.2f} ms | distinct "
                      f"{d['step_ms']:.2f} ms (+{100 * (d['step_ms'] / b['step_ms'] - 1):.0f}%) | shared8 "
                      f"{s['step_ms']:.2f} ms (+{100 * (s['step_ms'] / b['step_ms'] - 1):.0f}%)", flush=True)
            for layout in layouts[1:]:
                b, d, s = (row[f"{v}@{layout}"] for v in ("base", "distinct", "shared8"))
                print(f"    KV layout {layout}: base {b['step_ms']:.2f} ms ({b['pct_roofline']:.0f}% roof) | "
                      f"distinct {d['step_ms']:.2f} ms (+{100 * (d['step_ms'] / b['step_ms'] - 1):.0f}%) | "
                      f"shared8 {s['step_ms']:.2f} ms (+{100 * (s['step_ms'] / b['step_ms'] - 1):.0f}%)", flush=True)

    if not args.host:
        return write_results(args, tuned, bw, weight_bytes, lora_impls, slot_bytes, K, rows_out, None)
    # host time per decode step at the largest batch: the runner's input assembly + dispatch + result copy,
    # against device-only time, and the scheduler's schedule() for the same batch
    B, ctx = B_max, WORKLOADS[0][0] + WORKLOADS[0][1] // 2
    seqs = []
    for i in range(B):
        seq = Sequence(f"r{i}", [5] * ctx, params=greedy, lora_name=None)
        seq.num_computed_tokens = ctx - 1
        seq.pages = list(range(i * P, (i + 1) * P))
        seq.lora_slot = 1 + i % args.max_loras
        seqs.append(seq)
    chunks = [ScheduledChunk(s, ctx - 1, 1, True) for s in seqs]
    runner.decode(chunks, K)
    wall = []
    for _ in range(args.iters):
        t = time.perf_counter()
        runner.decode(chunks, K)
        wall.append(time.perf_counter() - t)
    wall_step = statistics.median(wall) / K
    # The host's own time, measured directly: assembling and dispatching the call (start_decode returns once
    # the call is enqueued) and reading its samples once they are ready, without the wait for the device
    # between the two. The difference above also counts the device's idle time while a synchronous call is
    # dispatched, which the engine's back-to-back calls hide, and the spread between two measured times.
    times = host_busy_times(runner, chunks, K, args.iters)
    busy = [python + finish + call for python, finish, call in times]
    calls = [call for _, _, call in times]
    busy_step = statistics.median(busy) / K
    call_step = statistics.median(calls) / K
    device_step = next(r for r in rows_out if r["batch"] == B and r["ctx"] == ctx)["distinct"]["step_ms"] / 1e3
    sched = Scheduler(SchedulerConfig(max_num_seqs=B, max_num_batched_tokens=2048, max_prefill_chunk=512,
                                      num_lookahead=K), PageManager(B * P + 8, 16), SlotManager(8, 8))
    for i in range(B):
        sched.add(Sequence(f"s{i}", [5] * ctx, params=greedy))
    while any(s.is_prefill for s in sched.running) or sched.num_waiting:
        plan = sched.schedule()
        for c in plan.chunks:
            if c.samples:
                c.seq.append_token(5)
    sched_times = []
    for _ in range(20):
        t = time.perf_counter()
        plan = sched.schedule()
        sched_times.append(time.perf_counter() - t)
        for c in plan.chunks:
            for _ in range(K):
                c.seq.append_token(5)
    sched_step = statistics.median(sched_times) / K
    host_step = wall_step - device_step + sched_step
    host = dict(batch=B, runner_wall_ms_per_token_step=wall_step * 1e3, device_ms_per_token_step=device_step * 1e3,
                schedule_ms_per_token_step=sched_step * 1e3, host_fraction=host_step / device_step,
                runner_busy_ms_per_token_step=busy_step * 1e3, jitted_call_ms_per_token_step=call_step * 1e3,
                host_busy_fraction=(busy_step + sched_step) / device_step,
                python_fraction=(busy_step - call_step + sched_step) / device_step)
    print(f"host at B={B}: runner.decode wall {wall_step * 1e3:.2f} ms/step vs device {device_step * 1e3:.2f} ms; "
          f"schedule() {sched_step * 1e3:.3f} ms/step; host time = {100 * host_step / device_step:.1f}% of device "
          f"(wall - device + schedule); measured directly: dispatch + result read {busy_step * 1e3:.3f} ms/step, "
          f"with schedule() {100 * (busy_step + sched_step) / device_step:.1f}% of device, of which the jitted call "
          f"(XLA's runtime) {call_step * 1e3:.3f} ms/step and the Python and schedule() "
          f"{100 * (busy_step - call_step + sched_step) / device_step:.1f}% of device")
    write_results(args, tuned, bw, weight_bytes, lora_impls, slot_bytes, K, rows_out, host)


def write_results(args, tuned, bw, weight_bytes, lora_impls, slot_bytes, K, rows_out, host):
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, hbm_tb_s=bw / 1e12, weight_bytes=weight_bytes,
                           attention_table={str(b): str(c) for b, c in tuned.items()},
                           fused_attention_table={str(b): str(c) for b, c in attention.FUSED_ATTENTION_TABLE.items()},
                           attention_impl=args.attention_impl, lora_impls=lora_impls,
                           slot_bytes=slot_bytes, lookahead=K, rows=rows_out, host=host), f, indent=1)


def dataclass_replace(obj, **changes):
    import dataclasses
    return dataclasses.replace(obj, **changes)


if __name__ == "__main__":
    main()
