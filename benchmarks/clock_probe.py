"""SM clock and board power while the fused decode-attention kernel runs alone, and while the whole decode
step runs (Llama-3-8B shape, base model), sampled by ``nvidia-smi`` every 50 ms.

The question it answers (RESULTS.md, "Eleventh session"): the attention kernel takes ~27% longer inside the
decode step than in its micro-benchmark at the same knobs and shapes (batch 128, 192 tokens). A latency-bound
kernel slows with the SM clock; if the step's matmuls drive the board to its power limit, the clock drops.

    PYTHONPATH=. python benchmarks/clock_probe.py --batch 128 --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import io
import json
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from throughput import bench_model_config

from jmlora.config import EngineConfig
from jmlora.engine import model_runner
from jmlora.engine.sampler import SamplingTensors
from jmlora.engine.sampling_params import SamplingParams
from jmlora.model import attention, init_params, make_mesh

FIELDS = ["timestamp", "clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active"]


def start_sampler(path: str) -> subprocess.Popen | None:
    """``nvidia-smi`` writing a CSV row every 50 ms to ``path`` (None where there is no nvidia-smi)."""
    fields = FIELDS
    try:
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True)
    except FileNotFoundError:
        return None
    if probe.returncode != 0:                      # an older driver: no throttle-reason field under that name
        fields = FIELDS[:-1]
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,nounits", "-lms", "50"],
                            stdout=open(path, "w"), stderr=subprocess.STDOUT)


def loop_for(fn, seconds: float) -> tuple[float, float, float, int]:
    """Calls ``fn`` (which returns a device array) back to back for ``seconds``; (start, end, s per call, n)."""
    jax.block_until_ready(fn())
    t0, n = time.time(), 0
    while time.time() - t0 < seconds:
        out = fn()
        n += 1
        if n % 20 == 0:
            jax.block_until_ready(out)
    jax.block_until_ready(out)
    t1 = time.time()
    return t0, t1, (t1 - t0) / n, n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ctx", type=int, default=192)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true", help="tiny dims (CPU smoke test of the script)")
    args = p.parse_args()
    B, ctx = args.batch, args.ctx
    smi_path = os.path.join(args.out, "clock_probe_smi.csv")
    sampler = start_sampler(smi_path)
    phases = {}
    time.sleep(1.0)
    phases["idle"] = (time.time() - 1.0, time.time(), None, 0)

    # 1. the fused attention kernel alone: 4 layers' caches in turn (as the step's layers; > the 60 MB L2)
    cfg = bench_model_config(1280, small=args.small)
    K, D, H, ps = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads, 16
    used, P = -(-(ctx + 1) // ps), 128
    table = np.full((B, P), B * used, np.int32)
    table[:, :used] = np.arange(B * used).reshape(B, used)
    table = jnp.asarray(table)
    inv_freq = attention.rope_inv_freq(cfg.rope, D)
    pos = jnp.full((B,), ctx, jnp.int32)
    page_idx = jnp.take_along_axis(table, (pos // ps)[:, None], axis=1)[:, 0]
    qkv = jax.random.normal(jax.random.key(0), (B, K, H // K + 2, D), jnp.bfloat16)
    keys = jax.random.split(jax.random.key(1), 8)
    caches = [(jax.random.normal(keys[2 * i], (K, B * used + 1, ps, D), jnp.bfloat16),
               jax.random.normal(keys[2 * i + 1], (K, B * used + 1, ps, D), jnp.bfloat16)) for i in range(4)]

    @functools.partial(jax.jit, donate_argnums=(1,))   # the caches are updated in place, as in the decoder
    def four_layers(qkv, caches):
        outs, new_caches = [], []
        for kc, vc in caches:
            out, kc, vc = attention.fused_paged_decode(qkv, None, kc, vc, table, pos, page_idx, inv_freq)
            outs.append(out)
            new_caches.append((kc, vc))
        return jnp.stack(outs), new_caches

    attn_state = {"caches": caches}
    del caches

    def attend():
        out, attn_state["caches"] = four_layers(qkv, attn_state["caches"])
        return out

    phases["attention"] = loop_for(attend, args.seconds)
    attn_us = phases["attention"][2] / 4 * 1e6
    attn_state.clear()

    # 2. the engine's decode step (4 steps per call, base model), as dump_decode_hlo.py builds it
    params = init_params(cfg, make_mesh(), dtype=jnp.bfloat16)
    ecfg = EngineConfig(max_num_seqs=B, page_size=16, num_lookahead=4, enable_lora=False, warmup=False,
                        max_num_batched_tokens=2048, max_prefill_chunk=512, num_kv_pages=B * P)
    runner = model_runner.ModelRunner(cfg, params, make_mesh(), ecfg, B * P)
    st = SamplingTensors.from_params([SamplingParams(temperature=0.0)] * B, [0] * B, B)
    page_table = jnp.asarray(np.arange(B * P, dtype=np.int32).reshape(B, P))
    exe = model_runner._decode_steps.lower(
        params, cfg, runner.cache, None, jnp.full(B, 5, jnp.int32), pos, jnp.ones(B, bool), page_table,
        jnp.arange(B, dtype=jnp.int32), st, jnp.zeros(B, jnp.int32), runner.prompt_mask, runner.output_counts,
        jnp.zeros(B, bool), pos, num_steps=4, lora_impl="auto", attention_impl="auto", needs_penalties=False,
        num_logprobs=0).compile(model_runner.COMPILER_OPTIONS)
    state = {"cache": runner.cache, "pm": runner.prompt_mask, "oc": runner.output_counts}

    def step():
        res, _, state["cache"], state["pm"], state["oc"] = exe(
            params, state["cache"], None, jnp.full(B, 5, jnp.int32), pos, jnp.ones(B, bool), page_table,
            jnp.arange(B, dtype=jnp.int32), st, jnp.zeros(B, jnp.int32), state["pm"], state["oc"],
            jnp.zeros(B, bool), pos)
        return res

    phases["step"] = loop_for(step, args.seconds)
    step_ms = phases["step"][2] / 4 * 1e3
    time.sleep(0.3)
    report = {"batch": B, "ctx": ctx, "attention_us_per_layer_wall": attn_us, "step_ms_per_token_step": step_ms,
              "phases": {}}
    if sampler is None:
        print(json.dumps(report, indent=1))
        return
    sampler.terminate()
    sampler.wait()

    rows = [r for r in csv.reader(io.StringIO(open(smi_path).read())) if r]
    header, samples = [h.strip() for h in rows[0]], rows[1:]

    def when(row):  # nvidia-smi's timestamp is the machine's local time, as datetime.timestamp() reads it
        return datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()

    report["fields"] = header
    for name, (t0, t1, _, n) in phases.items():
        picked = [r for r in samples if t0 + 0.2 <= when(r) <= t1 - 0.1]
        cols = {}
        for j, h in enumerate(header[1:], start=1):
            vals = [r[j].strip() for r in picked]
            try:
                nums = sorted(float(v) for v in vals)
                cols[h] = dict(median=statistics.median(nums), min=nums[0], max=nums[-1]) if nums else None
            except ValueError:
                cols[h] = sorted(set(vals))
        report["phases"][name] = dict(samples=len(picked), calls=n, **cols)
    print(json.dumps(report, indent=1))
    json.dump(report, open(os.path.join(args.out, "clock_probe.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
