"""The multi-slice LoRA kernels compiled for the GPU against their jnp reference (the CPU tests run them in
the Pallas interpreter, which cannot catch a Triton-lowering difference).

Cases at the decode step's shapes (Llama-3-8B: q/k/v 4096 -> 4096/1024/1024, gate/up 4096 -> 2 x 14336,
down 14336 -> 4096), bf16, 65 slots: ranks mixed in one bank (1 to 16; slot 0 and one empty slot at rank 0),
padding past each rank poisoned with NaN, tokens shuffled, batches of 1 token per adapter up to 64 per
adapter, and prefill-sized batches (1024 and 2048 tokens: 64-row tiles). Each form ("decode" as deltas,
"segment" as deltas and in place) must give every delta within 1e-2 relative error of the float32 reference,
finite outputs, and rank-0 rows exactly equal to the input. Exits non-zero on a failure.

    PYTHONPATH=. python benchmarks/lora_gpu_check.py
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import lora
from pallas_kernels.expand import ref_lora_expand
from pallas_kernels.shrink import ref_lora_shrink

GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336)), "down": (14336, (4096,))}
S, R = 65, 16


def case(seed, batch, n_adapters, hidden, outs):
    rng = np.random.default_rng(seed)
    ranks = rng.choice([1, 4, 8, 16, 16, 16], S).astype(np.int32)
    ranks[0] = 0
    ranks[S - 1] = 0                                      # an empty slot: its tokens get nothing
    slot_ids = rng.permutation(np.concatenate([1 + np.arange(batch) % n_adapters, [S - 1, 0]]))[:batch]
    x = rng.standard_normal((batch, hidden)).astype(np.float32)
    adapters, ys = [], []
    for o in outs:
        a = (rng.standard_normal((S, hidden, R)) / np.sqrt(hidden)).astype(np.float32)
        b = rng.standard_normal((S, R, o)).astype(np.float32)
        for s, r in enumerate(ranks):
            a[s, :, r:] = np.nan
            b[s, r:, :] = np.nan
        adapters.append((jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)))
        ys.append(jnp.asarray(rng.standard_normal((batch, o)), jnp.bfloat16))
    return tuple(ys), jnp.asarray(x, jnp.bfloat16), tuple(adapters), jnp.asarray(slot_ids, jnp.int32), \
        jnp.asarray(ranks)


def main():
    print(f"device {jax.devices()[0].device_kind}")
    failures = 0
    for batch, n_adapters in ((32, 32), (128, 64), (256, 64), (256, 8), (256, 2), (1024, 64), (2048, 4)):
        for name, (hidden, outs) in GROUPS.items():
            ys, x, adapters, slot_ids, ranks = case(batch * 7 + len(outs), batch, n_adapters, hidden, outs)
            base = np.asarray(ranks)[np.asarray(slot_ids)] == 0
            forms = [("segment", True), ("segment", False)] + ([("decode", True)] if batch <= 256 else [])
            for form, delta in forms:
                run = jax.jit(functools.partial(lora.lora_shrink_expand_multi, form=form, delta=delta))
                got = run(ys, x, adapters, slot_ids, ranks)
                errs = []
                for out, y, (a, b) in zip(got, ys, adapters):
                    f32 = lambda v: v.astype(jnp.float32)
                    want = ref_lora_expand(f32(y), ref_lora_shrink(x, a, slot_ids, ranks), f32(b), slot_ids, ranks)
                    d_got, d_want = f32(out) - f32(y), want - f32(y)
                    err = float(jnp.linalg.norm(d_got - d_want) / jnp.linalg.norm(d_want))
                    ok = (err < 1e-2 and bool(jnp.all(jnp.isfinite(out)))
                          and np.array_equal(np.asarray(out)[base], np.asarray(y)[base]))
                    failures += not ok
                    errs.append(f"{err:.1e}{'' if ok else ' FAIL'}")
                how = "delta" if delta else "in place"
                print(f"B={batch:4d} adapters={n_adapters:2d} {name:7s} {form:7s} {how:8s}: rel err {', '.join(errs)}",
                      flush=True)
    print("all passed" if not failures else f"{failures} FAILED")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
