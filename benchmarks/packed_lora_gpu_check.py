"""The packed one-launch LoRA projections (``routing.PACKED_IMPL``: ``pallas_kernels.ws_lora`` with the batch's
adapters packed per decode call) on the GPU, against the "gather" form, in decode steps of a Llama-3-8B-shaped
model cut to 2 layers (random bf16 weights made on the device).

The CPU tests run the kernel in Mosaic GPU's interpreter, which has neither its global semaphores nor the
chunked shrink's TMA reductions; this runs them at ``WS_LORA_TABLE``'s shapes (128 and 256 rows), with q/k/v's
three targets interleaved per head, gate/up's two halves, and the fused attention kernel's path. Per batch: 8
rank-16 adapters on all seven projections among 15 slots, a quarter of the rows without one; two decode steps
with different adapter mixes (a stale h from the first would show in the second). Each step's logprobs must
differ from the gather form's by less than ``TOLERANCE`` times the LoRA terms' own effect (gather against no
adapters). Prints the numbers; exits non-zero on a failure.

    PYTHONPATH=. python benchmarks/packed_lora_gpu_check.py [--batches 128,256]
    PYTHONPATH=. python benchmarks/packed_lora_gpu_check.py --small --batches 128   # CPU smoke run (interpreter)
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jmlora.config import ModelConfig
from jmlora.lora.bank import AdapterBank, BankSpec, init_adapter_bank
from jmlora.lora.routing import PACKED_IMPL, LoRABatch
from jmlora.model import forward_logits, init_kv_cache, init_params, make_mesh
from pallas_kernels import ws_lora
from pallas_kernels.ws_gemm import WsGemmConfig

TOLERANCE = 0.05
PAGE_SIZE, PROMPT = 16, 4


def random_bank(cfg: ModelConfig, mesh, key) -> AdapterBank:
    """15 slots of rank-16 adapters on every projection (slot 0 zero); A ~ N(0, 1/in), B ~ N(0, 0.05^2), so
    each LoRA term is a sizeable fraction of its projection's output."""
    bank = init_adapter_bank(cfg, BankSpec(max_loras=15, max_lora_rank=16), dtype=jnp.bfloat16, mesh=mesh)
    keys = iter(jax.random.split(key, 1024))

    def fill(arr):
        scale = 1 / np.sqrt(arr.shape[1]) if arr.shape[2] == 16 else 0.05      # a [S, in, R]; b [S, R, out]
        return (scale * jax.random.normal(next(keys), arr.shape, jnp.float32)).at[0].set(0).astype(arr.dtype)
    return AdapterBank(layers=jax.tree.map(fill, bank.layers), ranks=jnp.asarray([0] + [16] * 15, jnp.int32))


def decode_logprobs(params, cfg, mesh, lora, impl, tokens, page_table):
    """Prefill PROMPT - 1 tokens per row (gather form), then one decode step with ``impl``; its logprobs."""
    B = tokens.shape[0]
    cache = init_kv_cache(cfg, B * 2, PAGE_SIZE, jnp.bfloat16, mesh)
    _, cache = forward_logits(params, cfg, tokens[:, :-1], jnp.zeros(B, jnp.int32),
                              jnp.full(B, PROMPT - 1, jnp.int32), page_table, cache, lora, "gather")
    logits, _ = forward_logits(params, cfg, tokens[:, -1:], jnp.full(B, PROMPT - 1, jnp.int32),
                               jnp.ones(B, jnp.int32), page_table, cache, lora, impl)
    return np.asarray(jax.nn.log_softmax(logits[:, 0], axis=-1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="128,256")
    p.add_argument("--config", default="configs/llama3_8b.json")
    p.add_argument("--small", action="store_true",
                   help="tiny dims and a table of small tilings for them, to smoke-test this script on the CPU")
    args = p.parse_args()
    raw = json.load(open(args.config))
    raw.update(num_hidden_layers=2)
    if args.small:  # one 128-wide head per CTA tile, as the real table's q/k/v tiling
        raw.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=128, vocab_size=512)
        one_head = ws_lora.WsLoraConfig(WsGemmConfig(64, 128, "m", steps=2), 1)
        ws_lora.WS_LORA_TABLE.clear()
        for b in (int(b) for b in args.batches.split(",")):
            ws_lora.WS_LORA_TABLE.update({(b, 128, 1024): one_head, (b, 512, 128): one_head, (b, 128, 512): one_head,
                                          (b, 256, 128): one_head})
    cfg = ModelConfig.from_dict(raw, max_model_len=2 * PAGE_SIZE)
    mesh = make_mesh()
    params = init_params(cfg, mesh, dtype=jnp.bfloat16)
    bank = random_bank(cfg, mesh, jax.random.key(1))
    traced = []  # the projections traced onto the kernel (each decode step's trace: 4 per layer, or fallbacks)
    kernel = ws_lora.ws_lora_gemm

    def counted(x, *rest, **kwargs):
        traced.append(x.shape)
        return kernel(x, *rest, **kwargs)
    ws_lora.ws_lora_gemm = counted
    print(f"device {jax.devices()[0].device_kind}", flush=True)
    failed = False
    for B in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(B)
        tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, PROMPT)), jnp.int32)
        page_table = jnp.asarray(rng.permutation(B * 2).astype(np.int32).reshape(B, 2))
        for mix in range(2):  # 8 of the 15 slots, each on an eighth of the rows; every fourth row none
            slots = rng.choice(np.arange(1, 16), 8, replace=False)
            slot_ids = np.where(np.arange(B) % 4 == 3, 0, slots[rng.integers(0, 8, B)]).astype(np.int32)
            lora = LoRABatch(bank, jnp.asarray(slot_ids))
            base = decode_logprobs(params, cfg, mesh, None, "gather", tokens, page_table)
            want = decode_logprobs(params, cfg, mesh, lora, "gather", tokens, page_table)
            traced.clear()
            got = decode_logprobs(params, cfg, mesh, lora, PACKED_IMPL, tokens, page_table)
            effect = float(np.abs(want - base).max())
            err = float(np.abs(got - want).max())
            # a retrace per mix is not guaranteed (jit caches on shapes): count only where one happened
            ok = (np.isfinite(got).all() and err < TOLERANCE * effect
                  and (mix > 0 or len(traced) == 4 * cfg.num_layers))
            failed |= not ok
            print(f"batch {B} mix {mix}: max |packed - gather| {err:.3e}, LoRA effect {effect:.3e} "
                  f"(ratio {err / effect:.3f}), projections traced onto ws_lora_gemm: {len(traced)} "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
