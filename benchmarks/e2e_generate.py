"""End-to-end ``LLM.generate`` throughput: a Llama-3-8B-shaped model with real PEFT adapters on disk.

The peer comparison of issue 5 measured Hugging Face transformers + PEFT ``generate`` end to end on the H200:
batch 32, 8 rank-16 adapters on all 7 projections, prompt 128, 128 new tokens: 77 generated tokens/s (799
base-only). This script runs the same workload through our whole stack -- ``LLM.generate`` with its
scheduler, prefill, adapter loading, decode, detokenisation and stop checks -- and times it end to end:

* the model: ``configs/llama3_8b.json`` with ``load_format="dummy"`` (random bf16 weights made on the
  device, vLLM's benchmarking option), a 128256-token word-level tokenizer written here;
* the adapters: rank-16 PEFT adapters (all 7 projections) written as ``adapter_model.safetensors``;
* the workloads: (a) batch 32, 8 shared adapters, 128/128 (the peer's), (b) batch 32 base-only, and
  (c) batch 256 with a different adapter per sequence (64 adapters), for the host overhead at batch 256;
* each workload runs until a run compiles nothing (at most 3 warm-up runs: the engine's start-up warm-up of
  every bucket is off to save device time) and then ``--iters`` times; tokens/s = generated tokens / median
  wall time of generate. With and without async scheduling.

Beside each: the decode phase's wall time per token step (from the engine's own step loop), split into the
time the host waits for the device, XLA's dispatch of the jitted call and the rest (Python: scheduling, batch
assembly, appending samples, stop checks, detokenisation); and the device time per token step of the same
decode call measured alone (chained calls back to back, no host work in between).

    PYTHONPATH=. python benchmarks/e2e_generate.py --out e2e.json
    PYTHONPATH=. python benchmarks/e2e_generate.py --small     # CPU smoke test (tiny dims)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from jmlora import LLM, LoRARequest, SamplingParams
from jmlora.engine import model_runner
from jmlora.engine.scheduler import ScheduledChunk
from jmlora.engine.sequence import Sequence
from jmlora.lora.peft import LORA_TARGETS

PEER_TOK_S = {"shared8": 77.0, "base": 799.0}   # HF transformers 5.17 + PEFT 0.21 on this H200 (issue 5)
COMPILES = [0]      # XLA compilations so far (the timed runs must not compile)


def _count_compiles(event: str, duration: float, **kwargs) -> None:
    if event == BACKEND_COMPILE_EVENT:
        COMPILES[0] += 1


def write_model_dir(path: Path, config: dict) -> None:
    """config.json plus a word-level tokenizer covering the whole vocabulary (no weights: load_format=dummy)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    vocab = {f"w{i}": i for i in range(config["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def write_adapter(path: Path, config: dict, rank: int, seed: int) -> None:
    """A PEFT LoRA adapter (rank ``rank``, all 7 projections, float16 tensors) with small random weights
    (windows of one random pool at random offsets: distinct per tensor and adapter, cheap to make)."""
    path.mkdir(parents=True, exist_ok=True)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    dims = {"q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
            "o_proj": (q_out, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    rng = np.random.default_rng(seed)
    pool = (0.01 * rng.standard_normal(1 << 20)).astype(np.float16)      # drawing every value is slow on a host
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in LORA_TARGETS:
            fan_in, fan_out = dims[target]
            block = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{target}"
            for name, shape in ((f"{key}.lora_A.weight", (rank, fan_in)), (f"{key}.lora_B.weight", (fan_out, rank))):
                size = shape[0] * shape[1]
                start = int(rng.integers(0, pool.size))
                tensors[name] = np.resize(np.roll(pool, -start), size).reshape(shape)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
        lora_dropout=0.0, bias="none", base_model_name_or_path="llama3-8b-shape")))


class StepTimer:
    """Wraps ``engine.step`` to record the wall time of every decode step (prefill steps apart), and the
    runner's ``finish_decode`` to record how long the host waits for the device inside them."""

    def __init__(self, engine):
        self.engine, self.real_step = engine, engine.step
        self.decode_s, self.prefill_s, self.decode_calls, self.wait_s = 0.0, 0.0, 0, 0.0
        engine.step = self
        runner = engine.runner
        self.real_finish = runner.finish_decode

        def finish_decode(call):
            t = time.perf_counter()
            out = self.real_finish(call)
            self.wait_s += time.perf_counter() - t
            return out

        runner.finish_decode = finish_decode
        # the jitted call alone: XLA's dispatch (enqueueing the call's kernels), not Python or scheduling
        self.dispatch_s, self.real_jit = 0.0, model_runner._decode_call

        def decode_steps(*args, **kwargs):
            t = time.perf_counter()
            out = self.real_jit(*args, **kwargs)
            self.dispatch_s += time.perf_counter() - t
            return out

        model_runner._decode_call = decode_steps

    def __call__(self):
        stats = self.engine.stats
        before = stats["decode_steps"], stats["prefill_steps"]
        t = time.perf_counter()
        out = self.real_step()
        dt = time.perf_counter() - t
        if stats["prefill_steps"] > before[1]:
            self.prefill_s += dt
        else:
            self.decode_s += dt
            self.decode_calls += stats["decode_steps"] - before[0]
        return out

    def remove(self):
        self.engine.step = self.real_step
        self.engine.runner.finish_decode = self.real_finish
        model_runner._decode_call = self.real_jit


def device_step_time(llm: LLM, batch: int, ctx: int, slots: list[int], params: SamplingParams,
                     iters: int = 8) -> float:
    """Device seconds per token step of the engine's decode call at this batch: ``iters`` chained calls
    dispatched back to back (no host work between them, so the host's dispatch overlaps), one wait at the end.
    The sequences get real pages (KV writes of many rows to one scratch slot would serialise)."""
    engine = llm.llm_engine
    runner, pages = engine.runner, engine.page_manager
    K = engine.config.num_lookahead
    iters = max(1, min(iters, (engine.model_config.max_model_len - ctx) // K - 1))  # pages within max_model_len
    seqs = []
    for i in range(batch):
        seq = Sequence("timing", [5] * ctx, params=params)       # the workload's params: the same variant
        seq.sampling_seed, seq.lora_slot = 0, slots[i]
        pages.allocate(seq, ctx + (iters + 1) * K)
        seqs.append(seq)
    call = runner.start_decode([ScheduledChunk(s, ctx - 1, 1, True) for s in seqs], K)
    runner.finish_decode(call)
    t = time.perf_counter()
    for i in range(iters):
        call = runner.start_decode([ScheduledChunk(s, ctx - 1 + (i + 1) * K, 1, True) for s in seqs], K, after=call)
    runner.finish_decode(call)
    elapsed = time.perf_counter() - t
    for seq in seqs:
        runner.release(seq.seq_id)
        pages.free(seq)
    return elapsed / (iters * K)


def run_workload(llm: LLM, name: str, batch: int, prompt_len: int, new_tokens: int, loras: list, iters: int,
                 async_modes: list[bool], log) -> dict:
    engine = llm.llm_engine
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": rng.integers(10, vocab - 10, prompt_len).tolist()} for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    lora_requests = [loras[i % len(loras)] for i in range(batch)] if loras else None
    row = dict(workload=name, batch=batch, prompt=prompt_len, new=new_tokens, adapters=len(loras))
    t = time.perf_counter()
    for _ in range(3):      # compiles this workload's shapes (the schedule differs while adapters load: repeat)
        before = COMPILES[0]
        llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
        if COMPILES[0] == before:
            break
    row["warmup_s"] = time.perf_counter() - t
    for mode in async_modes:
        engine.config = dataclasses.replace(engine.config, async_scheduling=mode)
        walls, timers = [], []
        compiles_before = COMPILES[0]
        for _ in range(iters):
            timer = StepTimer(engine)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
            walls.append(time.perf_counter() - t)
            timer.remove()
            timers.append(timer)
            assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        mid = sorted(range(iters), key=walls.__getitem__)[iters // 2]        # the median run (upper median)
        wall, timer = walls[mid], timers[mid]
        K = engine.config.num_lookahead
        key = "async" if mode else "sync"
        row[key] = dict(wall_s=wall, walls=walls, compiles=COMPILES[0] - compiles_before,
                        tok_s=batch * new_tokens / wall, prefill_s=timer.prefill_s,
                        decode_s=timer.decode_s, decode_calls=timer.decode_calls, decode_wait_s=timer.wait_s,
                        decode_ms_per_token_step=1e3 * timer.decode_s / max(1, timer.decode_calls * K),
                        host_busy_ms_per_token_step=1e3 * (timer.decode_s - timer.wait_s)
                        / max(1, timer.decode_calls * K),
                        dispatch_ms_per_token_step=1e3 * timer.dispatch_s / max(1, timer.decode_calls * K),
                        python_ms_per_token_step=1e3 * (timer.decode_s - timer.wait_s - timer.dispatch_s)
                        / max(1, timer.decode_calls * K))
        log(f"{name} B={batch} {key}: {row[key]['tok_s']:.0f} tok/s (wall {wall:.2f}s, prefill {timer.prefill_s:.2f}s, "
            f"decode {timer.decode_s:.2f}s = {row[key]['decode_ms_per_token_step']:.2f} ms/token step; "
            f"{row[key]['compiles']} compilations in the timed runs)")
    slot_of = engine.slot_manager.slot_of
    slots = [slot_of(lora_requests[i].lora_name) if lora_requests else 0 for i in range(batch)]
    ctx = prompt_len + new_tokens // 2
    row["device_ms_per_token_step"] = 1e3 * device_step_time(llm, batch, ctx, slots, params)
    for key in ("async", "sync"):
        if key in row:
            device = row["device_ms_per_token_step"]
            row[key]["exposed_host_fraction"] = row[key]["decode_ms_per_token_step"] / device - 1
            row[key]["host_busy_fraction"] = row[key]["host_busy_ms_per_token_step"] / device
            row[key]["python_fraction"] = row[key]["python_ms_per_token_step"] / device
    peer = PEER_TOK_S.get(name)
    if peer:
        row["vs_peer"] = {k: row[k]["tok_s"] / peer for k in ("async", "sync") if k in row}
    log(f"{name} B={batch}: device {row['device_ms_per_token_step']:.2f} ms/token step; host busy / device: "
        + ", ".join(f"{k} {100 * row[k]['host_busy_fraction']:.1f}%" for k in ("async", "sync") if k in row)
        + " (Python and scheduling alone: "
        + ", ".join(f"{k} {100 * row[k]['python_fraction']:.1f}%" for k in ("async", "sync") if k in row) + ")"
        + "; decode wall / device - 1: "
        + ", ".join(f"{k} {100 * row[k]['exposed_host_fraction']:+.1f}%" for k in ("async", "sync") if k in row)
        + (f"; vs peer ({peer:.0f} tok/s): " + ", ".join(f"{k} {v:.1f}x" for k, v in row["vs_peer"].items())
           if peer else ""))
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/llama3_8b.json")
    parser.add_argument("--workloads", default="shared8,base,distinct256")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--modes", default="async,sync")
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    parser.add_argument("--num-lookahead", type=int, default=None,
                        help="decode steps per jitted call (default: the engine's, EngineConfig.num_lookahead)")
    parser.add_argument("--small", action="store_true", help="tiny model dims and short sequences (CPU smoke test)")
    args = parser.parse_args()
    jax.monitoring.register_event_duration_secs_listener(_count_compiles)
    t0 = time.perf_counter()
    config = json.load(open(args.config))
    prompt_len, new_tokens, batch, big_batch = 128, 128, 32, 256
    if args.small:
        config.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=512)
        prompt_len, new_tokens, batch, big_batch = 16, 8, 8, 16
    workloads = args.workloads.split(",")
    n_adapters = 64 if "distinct256" in workloads else 8
    tmp = Path(tempfile.mkdtemp(prefix="jmlora_e2e_"))
    write_model_dir(tmp / "model", config)
    loras = []
    for i in range(n_adapters):
        write_adapter(tmp / f"lora{i}", config, 16, seed=i)
        loras.append(LoRARequest(f"lora{i}", i + 1, str(tmp / f"lora{i}")))
    print(f"wrote the model dir and {n_adapters} adapters in {time.perf_counter() - t0:.0f}s", flush=True)
    llm = LLM(str(tmp / "model"), load_format="dummy", dtype="bfloat16", enable_lora=True, max_loras=n_adapters,
              max_lora_rank=16, max_num_seqs=big_batch if "distinct256" in workloads else batch,
              max_model_len=prompt_len + new_tokens + 16, warmup=False,
              num_kv_pages=64 * big_batch if args.small else None,     # (CPU: room for the device timing too)
              **({} if args.num_lookahead is None else {"num_lookahead": args.num_lookahead}))
    print(f"device {jax.devices()[0].device_kind}; engine up in {time.perf_counter() - t0:.0f}s "
          f"({llm.llm_engine.runner.num_pages} KV pages, num_lookahead {llm.llm_engine.config.num_lookahead})",
          flush=True)
    modes = [m == "async" for m in args.modes.split(",")]
    rows = []
    for name in workloads:
        if name == "shared8":
            rows.append(run_workload(llm, name, batch, prompt_len, new_tokens, loras[:8], args.iters, modes, print))
        elif name == "base":
            rows.append(run_workload(llm, name, batch, prompt_len, new_tokens, [], args.iters, modes, print))
        elif name == "distinct256":
            rows.append(run_workload(llm, name, big_batch, prompt_len, new_tokens, loras[:64], args.iters, modes,
                                     print))
        else:
            raise SystemExit(f"unknown workload {name!r}")
    print(f"total {time.perf_counter() - t0:.0f}s; engine stats {llm.llm_engine.stats}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, rows=rows, stats=llm.llm_engine.stats), f, indent=1)


if __name__ == "__main__":
    main()
