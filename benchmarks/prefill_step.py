"""The engine's prefill step with adapters: each LoRA formulation against the base step, Llama-3-8B shapes.

Issue 4 built the prefill (segment) kernels for many tokens grouped by adapter; the engine's prefill step routes
its LoRA terms through ``jmlora.lora.routing.default_impl``, which picked XLA's per-sequence gather for T > 1 from
the first session's isolated timings (benchmarks/RESULTS.md, "LoRA routing formulations"). This times the whole
jitted prefill step (``model_runner._prefill_step``, as ``ModelRunner.prefill`` calls it) per (rows, tokens per
row) bucket, for:

- ``base``: no adapter inputs (the runner's base executable);
- ``distinct``: every row its own rank-16 adapter on all 7 projections;
- ``shared2``: the rows over 2 adapters;

each under the LoRA formulations given (``--lora-impls``), beside the step's matmul floor (2 x weights x tokens
over the bf16 matmul rate measured in the same process), and checks that the formulations agree on the greedy
token's logprob. Median wall time of synchronous calls: a 2048-token step takes tens of ms, so its dispatch
(~1 ms) is noise here, and the same for every variant.

    PYTHONPATH=. python benchmarks/prefill_step.py --out prefill.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace as dataclass_replace

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernels import measure_ceilings  # noqa: E402
from throughput import bench_model_config, random_bank  # noqa: E402

from jmlora.config import EngineConfig  # noqa: E402
from jmlora.engine.model_runner import ModelRunner, _prefill_step  # noqa: E402
from jmlora.engine.sampler import SamplingTensors  # noqa: E402
from jmlora.engine.sampling_params import SamplingParams  # noqa: E402
from jmlora.lora.routing import LoRABatch  # noqa: E402
from jmlora.model import init_params, make_mesh  # noqa: E402
from jmlora.model.attention import prefill_attention_impl  # noqa: E402

PAGE = 16


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x512,16x128", help="comma-separated ROWSxTOKENS prefill buckets")
    p.add_argument("--lora-impls", default="gather,pallas")
    p.add_argument("--variants", default="distinct,shared2")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--config", default="configs/llama3_8b.json")
    p.add_argument("--small", action="store_true", help="tiny model dims (CPU smoke test)")
    p.add_argument("--profile", action="store_true",
                   help="also print each case's kernels by device time (device_profile.kernel_times)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    impls = args.lora_impls.split(",")
    t0 = time.perf_counter()
    max_tokens = max(T for _, T in shapes)
    cfg = bench_model_config(max_tokens + PAGE, small=args.small, path=args.config)
    rate = measure_ceilings(print)["flops"]         # the kernel benchmark's bf16 matmul rate (8192^3)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    pages = max(B * T for B, T in shapes) // PAGE + 1
    ecfg = EngineConfig(max_num_seqs=max(B for B, _ in shapes), page_size=PAGE, enable_lora=True,
                        max_loras=args.max_loras, max_lora_rank=16, warmup=False, num_kv_pages=1)
    runner = ModelRunner(cfg, params, mesh, dataclass_replace(ecfg, num_kv_pages=pages), pages)
    runner.bank = random_bank(runner.bank, 16)
    matmul_params = sum(x.size for x in jax.tree.leaves(params.layers))
    matmul_params += params.embed.size if params.lm_head is None else params.lm_head.size
    print(f"device {jax.devices()[0].device_kind}; bf16 matmul {rate / 1e12:.0f} TFLOP/s; params made in "
          f"{time.perf_counter() - t0:.0f}s; bank {runner.bank.ranks.shape[0]} slots", flush=True)

    greedy = SamplingParams(temperature=0.0)
    slots_of = {"base": None, "distinct": lambda B: 1 + np.arange(B) % args.max_loras,
                "shared2": lambda B: 1 + np.arange(B) % 2}
    variants = args.variants.split(",")
    cases = [(B, T, v, impl) for B, T in shapes for v, impl in [("base", impls[0])] + [
        (v, impl) for v in variants for impl in impls]]
    inputs = {}
    for B, T in shapes:
        rng = np.random.default_rng(0)
        inputs[B, T] = (jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32),
                        jnp.asarray(np.arange(B * (T // PAGE), dtype=np.int32).reshape(B, T // PAGE)),
                        SamplingTensors.from_params([greedy] * B, [0] * B, B))

    def call_args(B, T, variant):
        tokens, table, st = inputs[B, T]
        slots = slots_of[variant]
        lora = None if slots is None else LoRABatch(runner.bank, jnp.asarray(slots(B), jnp.int32))
        return (params, cfg, runner.cache, lora, tokens, jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32),
                table, jnp.arange(B, dtype=jnp.int32), jnp.full(B, T, jnp.int32), jnp.ones(B, bool), st,
                jnp.zeros(B, jnp.int32), runner.prompt_mask, runner.output_counts, None)

    def compile_case(case):
        B, T, variant, impl = case
        kw = dict(lora_impl=impl, attention_impl=prefill_attention_impl(ecfg.attention_impl),
                  needs_penalties=False, num_logprobs=1, num_prompt_logprobs=None)
        return _prefill_step.lower(*call_args(B, T, variant), **kw).compile()

    t = time.perf_counter()
    first_exe = [compile_case(cases[0])]         # one compile first: JAX's caches warm, then the rest in threads
    with ThreadPoolExecutor(8) as pool:
        execs = dict(zip(cases, first_exe + list(pool.map(compile_case, cases[1:]))))
    print(f"compiled {len(cases)} prefill steps in {time.perf_counter() - t:.0f}s", flush=True)

    rows = []
    for B, T in shapes:
        floor = 2 * matmul_params * B * T / rate
        row = dict(rows=B, tokens_per_row=T, matmul_floor_ms=floor * 1e3)
        for _, _, variant, impl in [c for c in cases if c[:2] == (B, T)]:
            exe = execs[B, T, variant, impl]

            def run(B=B, T=T, variant=variant, exe=exe):
                a = call_args(B, T, variant)
                result, _, runner.cache, runner.prompt_mask, runner.output_counts = exe(a[0], *a[2:])  # cfg: static
                return result

            first = jax.block_until_ready(run())
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                jax.block_until_ready(run())
                times.append(time.perf_counter() - t)
            ms = statistics.median(times) * 1e3
            key = variant if variant == "base" else f"{variant}@{impl}"
            row[key] = dict(ms=ms, tok_s=B * T / ms * 1e3, token_ids=np.asarray(first.token_ids).tolist(),
                            logprobs=np.asarray(first.logprobs).ravel().tolist())
            if args.profile:
                from device_profile import kernel_times, print_kernels

                print_kernels(f"B={B} x T={T} {key}", kernel_times(run, n_calls=2), top=30)
            base_ms = row["base"]["ms"]
            extra = "" if variant == "base" else f" ({100 * (ms / base_ms - 1):+.1f}% vs base)"
            print(f"B={B:3d} x T={T:4d} {key:18s}: {ms:7.2f} ms, {B * T / ms * 1e3:8.0f} tok/s{extra}; "
                  f"matmul floor {floor * 1e3:.2f} ms ({100 * floor * 1e3 / ms:.0f}%)", flush=True)
        # the formulations compute the same thing (up to where h is rounded to bf16): the greedy token's logprob
        # (the largest, a smooth function of the logits) should agree closely. With random weights the logits
        # are near-uniform over the vocabulary, so which token is the greedy one flips on rounding alone.
        for v in variants:
            ref = row[f"{v}@{impls[0]}"]
            for impl in impls[1:]:
                other = row[f"{v}@{impl}"]
                same = np.mean(np.asarray(ref["token_ids"]) == np.asarray(other["token_ids"]))
                dlp = np.max(np.abs(np.asarray(ref["logprobs"]) - np.asarray(other["logprobs"])))
                print(f"    {v}: {impl} against {impls[0]}: greedy logprob max |diff| {dlp:.3f} "
                      f"({100 * same:.0f}% same greedy tokens)", flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, matmul_tflops=rate / 1e12, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
