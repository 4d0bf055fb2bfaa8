"""The Python host cost of the engine's decode call, apart from the jitted call and the device.

    PYTHONPATH=. python benchmarks/host_profile.py [--batch 256] [--ctx 192] [--profile]

A ``ModelRunner`` on the tiny benchmark model (``throughput.bench_model_config(small=True)``: the host's work per
call depends on the batch and the page table, not on the model's size) decodes ``--lookahead`` steps for
``--batch`` sequences of ``--ctx`` tokens, each holding a full page-table row (as ``throughput.py``'s host
measurement sets them up) and its own adapter slot. Printed, median per call: the Python in ``start_decode``
(assembling and copying the inputs; the jitted call's own time taken out), ``finish_decode`` once the samples
are ready (copying them to the host), and the jitted call (XLA's runtime launching the executable).
``--profile`` adds cProfile's view of the same calls.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
from dataclasses import replace as dataclass_replace

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402

from jmlora.config import EngineConfig  # noqa: E402
from jmlora.engine.model_runner import ModelRunner  # noqa: E402
from jmlora.engine.sampling_params import SamplingParams  # noqa: E402
from jmlora.engine.scheduler import ScheduledChunk  # noqa: E402
from jmlora.engine.sequence import Sequence  # noqa: E402
from jmlora.model.params import init_params  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ctx", type=int, default=192)
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=1280)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also print cProfile's view of the timed calls")
    args = p.parse_args()
    B, K = args.batch, args.lookahead
    cfg = throughput.bench_model_config(args.max_model_len, small=True)
    mesh = throughput.make_mesh()
    ecfg = EngineConfig(max_num_seqs=B, page_size=16, num_lookahead=K, enable_lora=True, max_loras=64,
                        max_lora_rank=16, warmup=False, max_num_batched_tokens=2048, max_prefill_chunk=512,
                        num_kv_pages=1)
    P = 1 << (-(-(args.max_model_len + K) // 16) - 1).bit_length()      # the runner's page-table width
    runner = ModelRunner(cfg, init_params(cfg, mesh, dtype=jnp.bfloat16), mesh,
                         dataclass_replace(ecfg, num_kv_pages=B * P), B * P)
    runner.bank = throughput.random_bank(runner.bank, 16)
    greedy = SamplingParams(temperature=0.0)
    chunks = []
    for i in range(B):
        seq = Sequence(f"r{i}", [5] * args.ctx, params=greedy)
        seq.num_computed_tokens = args.ctx - 1
        seq.pages = list(range(i * P, (i + 1) * P))
        seq.lora_slot = 1 + i % 64
        chunks.append(ScheduledChunk(seq, args.ctx - 1, 1, True))
    runner.finish_decode(runner.start_decode(chunks, K))       # compiles

    res = throughput.host_busy_times(runner, chunks, K, args.iters)
    start, finish, call = (statistics.median(r[i] for r in res) * 1e3 for i in range(3))
    print(f"{jax.devices()[0].device_kind}, batch {B}, {P} pages per row: python in start_decode {start:.3f} "
          f"ms/call, finish_decode {finish:.3f}, jitted call {call:.3f}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        throughput.host_busy_times(runner, chunks, K, args.iters)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
