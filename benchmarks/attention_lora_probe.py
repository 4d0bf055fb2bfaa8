"""Device time of the fused decode-attention kernel alone, with and without the LoRA steps inside it.

Llama-3-8B heads (8 KV heads x 4 query heads x 128), page size 16, context 192 and 1152, 65 slots of rank 16,
every sequence its own adapter. Variants: no LoRA; LoRA deltas as inputs (the earlier path: the q/k/v delta
kernel wrote them); the q/k/v LoRA expand in the kernel; the expand and the o_proj shrink in the kernel.
Cache pages are disjoint per sequence. Device time per call from the profiler (``device_profile``).

    PYTHONPATH=. python benchmarks/attention_lora_probe.py
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_profile import kernel_times  # noqa: E402

from jmlora.model.attention import rope_tables  # noqa: E402
from pallas_kernels.fused_attention import FusedLoRA, fused_decode_attention  # noqa: E402

K, G, D, PAGE, S, R = 8, 4, 128, 16, 65, 16


def main():
    print(f"device {jax.devices()[0].device_kind}")
    bf = lambda v: jnp.asarray(v, jnp.bfloat16)
    rng = np.random.default_rng(0)
    banks = [bf(rng.standard_normal(shape) * 0.1) for shape in ((S, R, K, G, D), (S, R, K, D), (S, R, K, D),
                                                                 (S, K, G, D, R))]
    for batch in (32, 64, 256):
        for ctx in (192, 1152):
            pages = 128
            num_pages = batch * pages
            table = jnp.asarray(np.arange(num_pages, dtype=np.int32).reshape(batch, pages))
            pos = jnp.full((batch,), ctx, jnp.int32)
            write = table[:, ctx // PAGE]
            qkv = bf(rng.standard_normal((batch, K, G + 2, D)))
            kc, vc = (bf(rng.standard_normal((K, num_pages, PAGE, D))) for _ in range(2))
            cos, sin = rope_tables(pos, (1.0 / (500000.0 ** (np.arange(0, D, 2) / D))).astype(np.float32))
            slots = jnp.asarray(1 + np.arange(batch) % 64, jnp.int32)
            h = jnp.asarray(rng.standard_normal((3, 8, batch, R)), jnp.float32)
            full = FusedLoRA(slots, jnp.full((batch,), R, jnp.int32), h, *banks)
            deltas = (bf(rng.standard_normal((batch, K, G, D))), bf(rng.standard_normal((batch, K, D))),
                      bf(rng.standard_normal((batch, K, D))))
            variants = {"none": dict(), "deltas": dict(deltas=deltas), "lora qkv": dict(lora=full._replace(a_o=None)),
                        "lora qkv+o": dict(lora=full)}
            line = []
            for name, kw in variants.items():
                f = jax.jit(functools.partial(fused_decode_attention, **kw))
                args = (qkv, kc, vc, table, pos, write, cos, sin)
                prof = kernel_times(lambda f=f, args=args: jax.block_until_ready(f(*args)), n_calls=10)
                attn = sum(us for fam, us, _ in prof["kernels"] if fam.startswith("fused_decode_attention"))
                line.append(f"{name} {attn:6.1f}")
            print(f"B={batch:3d} ctx={ctx:4d}: kernel us: " + " | ".join(line), flush=True)


if __name__ == "__main__":
    main()
