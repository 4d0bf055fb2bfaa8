"""Host cost of dispatching the engine's decode call, against its device time (run once per XLA_FLAGS value).

For each batch: the engine's jitted decode call (``num_lookahead`` steps, LoRA bank with distinct adapters)
on the Llama-3-8B shape (``--layers`` of them), timed three ways:

* dispatch: until the jitted call returns (the host enqueues the call's kernels in it; nothing waits);
* sync: one call and a wait for its samples (what a step pays when the host waits every call);
* chained: ``--iters`` calls back to back, each feeding the last one's tokens, one wait at the end (device
  time when the host keeps ahead).

Both the device-loop form (``lax.scan`` over the steps) and the unrolled form are timed, so XLA_FLAGS that
change command buffers (CUDA graphs) can be compared:

    PYTHONPATH=. python benchmarks/host_dispatch.py --layers 8
    XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL \\
        PYTHONPATH=. python benchmarks/host_dispatch.py --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import bench_model_config, random_bank  # noqa: E402

from jmlora.config import EngineConfig  # noqa: E402
from jmlora.engine.model_runner import ModelRunner  # noqa: E402
from jmlora.engine.sampling_params import SamplingParams  # noqa: E402
from jmlora.engine.scheduler import ScheduledChunk  # noqa: E402
from jmlora.engine.sequence import Sequence  # noqa: E402
from jmlora.model import init_params, make_mesh  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ctx, K = 192, 4
    cfg = bench_model_config(ctx + 64, small=args.small, num_hidden_layers=args.layers)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    B_max = max(batches)
    rows = {}
    for unroll in (False, True):
        ecfg = EngineConfig(max_num_seqs=B_max, num_lookahead=K, enable_lora=True, max_loras=64, max_lora_rank=16,
                            warmup=False, decode_unroll=unroll)
        pages_per_seq = -(-(ctx + (args.iters + 3) * K) // 16)
        runner = ModelRunner(cfg, params, mesh, ecfg, B_max * pages_per_seq)
        runner.bank = random_bank(runner.bank, 16)
        greedy = SamplingParams(temperature=0.0, ignore_eos=True)
        for B in batches:
            seqs = []
            for i in range(B):
                seq = Sequence("probe", [5] * ctx, params=greedy)
                seq.sampling_seed, seq.lora_slot = 0, 1 + i % 64
                seq.pages = list(range(i * pages_per_seq, (i + 1) * pages_per_seq))
                seqs.append(seq)

            def chunks(i, seqs=seqs):
                return [ScheduledChunk(s, ctx - 1 + i * K, 1, True) for s in seqs]

            t = time.perf_counter()
            runner.finish_decode(runner.start_decode(chunks(0), K, after=runner.start_decode(chunks(0), K)))
            compile_s = time.perf_counter() - t
            dispatch, sync = [], []
            for _ in range(args.iters):
                t = time.perf_counter()
                call = runner.start_decode(chunks(0), K)
                dispatch.append(time.perf_counter() - t)
                runner.finish_decode(call)
                sync.append(time.perf_counter() - t)
            t = time.perf_counter()
            call = runner.start_decode(chunks(0), K)
            for i in range(1, args.iters + 1):
                call = runner.start_decode(chunks(i), K, after=call)
            runner.finish_decode(call)
            chained = (time.perf_counter() - t) / (args.iters + 1)
            row = dict(compile_s=compile_s, dispatch_ms=1e3 * statistics.median(dispatch),
                       sync_ms=1e3 * statistics.median(sync), chained_ms=1e3 * chained)
            rows[f"B{B}_{'unrolled' if unroll else 'loop'}"] = row
            print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} layers={args.layers} B={B} "
                  f"{'unrolled' if unroll else 'loop':>8}: dispatch {row['dispatch_ms']:.2f} ms, sync call "
                  f"{row['sync_ms']:.2f} ms, chained call {row['chained_ms']:.2f} ms (per call of {K} steps; "
                  f"compiled in {compile_s:.0f}s)", flush=True)
            for seq in seqs:
                runner.release(seq.seq_id)
        del runner
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(xla_flags=os.environ.get("XLA_FLAGS", ""), layers=args.layers, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
