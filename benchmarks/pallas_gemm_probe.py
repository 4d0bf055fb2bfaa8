"""A skinny Pallas GEMM against XLA's (cuBLAS) at the decode step's projection shapes, with and without the
LoRA expand as its epilogue.

The question (issue 5, twentieth session's note): the LoRA kernels of a decode step cost more than their
bytes because they run beside cuBLAS's GEMMs and take SMs from them. A GEMM of our own could add the LoRA
term to its output tile before the one store (``y = x W + h B[slot]``), so that no delta kernel runs and no
delta array is read back. That pays only if our GEMM is as fast as cuBLAS on the base term, at batch 64-256
(``M``) on the four projections of a Llama-3-8B layer:

  q/k/v   K 4096,  N 6144
  o       K 4096,  N 4096
  gate/up K 4096,  N 28672
  down    K 14336, N 4096

This probe times, per (M, projection), by the profiler's device time:

- ``xla``: ``jnp.dot`` (XLA picks cuBLAS);
- ``pallas``: ``gemm`` below over a grid of tile sizes and split-K (split-K writes f32 partials that XLA
  sums; the sum's kernel is counted);
- ``pallas+lora8`` / ``pallas+loraM``: the best ``pallas`` configuration with the expand of 8 shared / M
  distinct rank-16 adapters (of a 64-slot bank) as its epilogue: one ``[BM, R] x [R, BN]`` dot per adapter
  present in the batch, with rows of other adapters masked to zero.

Weights are rotated over copies (> 400 MB per shape) so that the 60 MB L2 does not flatter.

    PYTHONPATH=. python benchmarks/pallas_gemm_probe.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROJECTIONS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def _gemm_kernel(*refs, bm, bn, bk, kc, split, lora, lora_first):
    # x_ref [M, K] bf16; w_ref [K, N] bf16; o_ref [M, N] (split 1) or [split, M, N] f32 partials. Grid:
    # (M-tile, N-tile, K-split), M fastest, so that the M-tiles sharing a weight tile run together.
    # lora "loop": h_ref [M, R] f32, slot_ref [M] i32, d_ref [D] i32 (the batch's distinct slots), nd_ref [1]
    #   i32 (how many), b_ref [S, R, N] bf16: one [BM, R] x [R, BN] dot per distinct slot, rows of the other
    #   slots masked to zero.
    # lora "packed": hp_ref [M, P] bf16 (h masked per distinct slot and packed side by side: column j*R + r
    #   holds h[:, r] for the rows of the j-th distinct slot), rows_ref [P] i32 (row of b2 for each column:
    #   slot * R + r, or 0, a row of the zero adapter, for dead columns), b2_ref [S * R, N] bf16: extra K-steps
    #   of 128 over the packed columns with B's rows gathered.
    if lora == "loop":
        x_ref, w_ref, h_ref, slot_ref, d_ref, nd_ref, b_ref, o_ref = refs
    elif lora == "packed":
        x_ref, w_ref, hp_ref, rows_ref, b2_ref, o_ref = refs
    else:
        x_ref, w_ref, o_ref = refs
    m, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = pl.multiple_of(m * bm, bm)
    n0 = pl.multiple_of(n * bn, bn)
    first = (s == 0).astype(jnp.int32)  # split-K: only the first K-split adds the LoRA term

    def body(i, acc):
        k0 = pl.multiple_of(s * kc + i * bk, bk)
        xv = x_ref[pl.ds(m0, bm), pl.ds(k0, bk)]  # [BM, BK]
        wv = w_ref[pl.ds(k0, bk), pl.ds(n0, bn)]  # [BK, BN]
        return acc + jnp.dot(xv, wv, preferred_element_type=jnp.float32)

    def lora_term(acc):
        if lora == "loop":
            sv = slot_ref[pl.ds(m0, bm)]  # [BM]
            hv = h_ref[pl.ds(m0, bm), :]  # [BM, R]

            def lbody(j, acc):
                slot = d_ref[j]
                hm = jnp.where(sv[:, None] == slot, hv, 0.0).astype(b_ref.dtype)
                bv = b_ref[slot, :, pl.ds(n0, bn)]  # [R, BN]
                return acc + jnp.dot(hm, bv, preferred_element_type=jnp.float32)

            return lax.fori_loop(0, nd_ref[0] * first, lbody, acc)
        if lora == "packed":
            P = hp_ref.shape[1]
            pc = min(P, 128)

            def pbody(c, acc):
                p0 = pl.multiple_of(c * pc, pc)
                hv = hp_ref[pl.ds(m0, bm), pl.ds(p0, pc)]  # [BM, PC]
                bv = b2_ref[rows_ref[pl.ds(p0, pc)], pl.ds(n0, bn)]  # [PC, BN] rows gathered
                return acc + jnp.dot(hv, bv, preferred_element_type=jnp.float32)

            return lax.fori_loop(0, (P // pc) * first, pbody, acc)
        return acc

    acc = jnp.zeros((bm, bn), jnp.float32)
    if lora_first:
        acc = lora_term(acc)
    acc = lax.fori_loop(0, kc // bk, body, acc)
    if not lora_first:
        acc = lora_term(acc)
    if split == 1:
        o_ref[pl.ds(m0, bm), pl.ds(n0, bn)] = acc.astype(o_ref.dtype)
    else:
        o_ref[s, pl.ds(m0, bm), pl.ds(n0, bn)] = acc


def gemm(x, w, lora=None, *, bm, bn, bk, split=1, num_warps=4, num_stages=3, lora_first=False, interpret=False):
    """y = x @ w (+ a LoRA term) by a Pallas Triton GEMM.

    Args:
      x: [M, K] bf16; w: [K, N] bf16.
      lora: None; or ("loop", h [M, R] f32, slot_ids [M] int32, distinct [D] int32 (the slots present, the
        first n_distinct[0] live), n_distinct [1] int32, b [S, R, N] bf16); or ("packed", hp [M, P] bf16,
        rows [P] int32, b2 [S * R, N] bf16) (see ``_gemm_kernel``).
      bm, bn, bk: tile sizes; split: K-splits (f32 partials, summed by XLA); lora_first: the LoRA term
        before the main loop rather than after it.

    Returns:
      y: [M, N] bf16.
    """
    M, K = x.shape
    N = w.shape[1]
    if M % bm or N % bn or K % (split * bk):
        raise ValueError(f"tiles ({bm}, {bn}, {bk}) x split {split} do not divide ({M}, {N}, {K})")
    kc = K // split
    args = (x, w) + (tuple(lora[1:]) if lora is not None else ())
    out = jax.ShapeDtypeStruct((M, N), x.dtype) if split == 1 else jax.ShapeDtypeStruct((split, M, N), jnp.float32)
    y = pl.pallas_call(
        functools.partial(_gemm_kernel, bm=bm, bn=bn, bk=bk, kc=kc, split=split,
                          lora=None if lora is None else lora[0], lora_first=lora_first),
        out_shape=out,
        grid=(M // bm, N // bn, split),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="pgemm",
    )(*args)
    return y if split == 1 else jnp.sum(y, axis=0).astype(x.dtype)


def configs(M: int, K: int, N: int, wide: bool = False) -> list[dict]:
    """Candidate tiles: BM in {64, 128, 256} (<= M; M itself below 64), BN in {64, 128} (BM x BN <= 16384),
    BK in {64, 128}, K-split the smallest power of two that gives >= 128 programs (at least 4 K-steps each),
    3 or 5 stages. ``wide``: BN up to 256 and BM x BN up to 32768, 8 warps from 16384."""
    out = []
    for bm in (64, 128, 256) if M >= 64 else (M,):
        if bm > M:
            continue
        for bn in (64, 128, 256) if wide else (64, 128):
            if bm * bn > (32768 if wide else 16384):
                continue
            for bk in (64, 128):
                split = 1
                while (M // bm) * (N // bn) * split < 128 and K // (bk * split * 2) >= 4:
                    split *= 2
                warps = 4 if bm * bn <= 64 * 128 else 8
                if wide and bm * bn < 16384:  # the narrow tiles are the default set's
                    continue
                for stages in (3, 5):
                    out.append(dict(bm=bm, bn=bn, bk=bk, split=split, num_warps=warps, num_stages=stages))
    return out


def probe_case(M: int, proj: str, args, log, kernel_times) -> dict:
    """Times XLA, every Pallas configuration and the best one with the LoRA epilogues at one (M, projection)."""
    key = jax.random.key(0)
    K, N = PROJECTIONS[proj]
    wbytes = K * N * 2
    copies = max(2, math.ceil(args.rot_mb * 1e6 / wbytes))
    ks = jax.random.split(key, 6)
    ws = [(0.02 * jax.random.normal(k, (K, N), jnp.float32)).astype(jnp.bfloat16)
          for k in jax.random.split(ks[0], copies)]
    # one input per weight copy: with one shared x, XLA merges the dots into wider GEMMs and slices them apart
    xs = [jax.random.normal(k, (M, K), jnp.float32).astype(jnp.bfloat16) for k in jax.random.split(ks[1], copies)]
    x = xs[0]
    R, S = args.rank, args.slots
    b = (0.02 * jax.random.normal(ks[2], (S, R, N), jnp.float32)).astype(jnp.bfloat16).at[0].set(0)
    h = jax.random.normal(ks[3], (M, R), jnp.float32)
    forms = args.lora_forms.split(",")
    lora_sets, lora_refs = {}, {}
    b2 = b.reshape(S * R, N)
    for label, n_ad in (("lora8", 8), ("loraM", min(M, S - 1))):
        slot_ids = (1 + jnp.arange(M) % n_ad).astype(jnp.int32)
        distinct = jnp.zeros((S,), jnp.int32).at[:n_ad].set(jnp.arange(1, n_ad + 1, dtype=jnp.int32))
        lora_refs[label] = jnp.einsum("mr,mrn->mn", h.astype(jnp.bfloat16).astype(jnp.float32),
                                      b[slot_ids].astype(jnp.float32))
        if "loop" in forms:
            lora_sets[label] = ("loop", h, slot_ids, distinct, jnp.array([n_ad], jnp.int32), b)
        P = -(-n_ad * R // 128) * 128
        col = jnp.arange(P)
        j, r = col // R, col % R
        dj = jnp.where(j < n_ad, 1 + j, 0)  # slot of packed column block j (0: dead)
        hp = jnp.where(slot_ids[:, None] == dj[None, :], h[:, r], 0.0).astype(jnp.bfloat16)  # [M, P]
        rows = jnp.where(dj > 0, dj * R + r, 0).astype(jnp.int32)
        if "packed" in forms:
            lora_sets[label + "p"] = ("packed", hp, rows, b2)
            lora_sets[label + "pf"] = ("packed", hp, rows, b2)
        lora_refs[label + "p"] = lora_refs[label + "pf"] = lora_refs[label]
    want = jnp.dot(x, ws[0], preferred_element_type=jnp.float32)

    def build(fn, extra=()):
        f = jax.jit(lambda xs, ws, extra: [fn(x, w, *extra) for x, w in zip(xs, ws)])
        try:
            return f.lower(xs, ws, extra).compile(), extra
        except Exception as e:  # a configuration the compiler refuses: reported when timed
            return e

    def timed(f, label, cfg=None):
        if isinstance(f, Exception):
            log(f"  {label} {cfg}: FAILED {type(f).__name__}: {str(f)[:300]}")
            return None
        f, extra = f
        y0 = f(xs, ws, extra)[0]
        prof = kernel_times(lambda: jax.block_until_ready(f(xs, ws, extra)), n_calls=5)
        return prof["total_us"] / copies, y0, prof["kernels"][:3]

    def err(y0, ref):
        return float(jnp.max(jnp.abs(y0.astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-9))

    r = timed(build(lambda x, w: jnp.dot(x, w)), "xla")
    xla_us = r[0]
    log(f"M={M} {proj} K={K} N={N} copies={copies}: xla {xla_us:.2f} us "
        f"({wbytes / xla_us / 1e6:.2f} TB/s of weights) {r[2]}")
    rows = []
    cfgs = configs(M, K, N, wide=args.wide)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:  # the Triton compiles are the slow part
        compiled = list(pool.map(lambda c: build(lambda x, w: gemm(x, w, **c)), cfgs))
    log(f"  compiled {len(cfgs)} configurations in {time.perf_counter() - t0:.0f}s")
    for cfg, f in zip(cfgs, compiled):
        r = timed(f, "pallas", cfg)
        if r is None:
            continue
        us, y0, kern = r
        e = err(y0, want)
        rows.append((us, cfg))
        log(f"  pallas {cfg}: {us:.2f} us ({us / xla_us:.3f}x xla, {wbytes / us / 1e6:.2f} TB/s) "
            f"err {e:.1e}")
    rows.sort(key=lambda r: r[0])
    best_us, best = rows[0]
    entry = dict(M=M, proj=proj, K=K, N=N, xla_us=xla_us, pallas_us=best_us, pallas_cfg=best,
                 top3=[(u, c) for u, c in rows[:3]])
    for label, lora in lora_sets.items():
        first = label.endswith("pf")
        r = timed(build(lambda x, w, *arrs, kind=lora[0], first=first: gemm(x, w, (kind, *arrs), lora_first=first,
                                                                             **best), lora[1:]),
                  f"pallas+{label}", best)
        if r is None:
            continue
        us, y0, kern = r
        entry[f"{label}_us"] = us
        log(f"  pallas+{label} {best}: {us:.2f} us (+{us - best_us:.2f} over pallas; "
            f"{us / xla_us:.3f}x xla) err {err(y0, want + lora_refs[label]):.1e}")
    log(f"  BEST M={M} {proj}: xla {xla_us:.2f} pallas {best_us:.2f} ({best_us / xla_us:.3f}x) {best}")
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--projections", default=",".join(PROJECTIONS))
    ap.add_argument("--rot-mb", type=int, default=400, help="weight bytes per timed call (rotated copies)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--slots", type=int, default=64, help="bank slots (slot 0 the zero adapter)")
    ap.add_argument("--wide", action="store_true", help="only the wide tiles (BN 256, BM x BN 16384-32768)")
    ap.add_argument("--lora-forms", default="packed", help="epilogues to time: packed and/or loop (none: neither)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from device_profile import kernel_times

    out_dir = args.out or "."
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "pallas_gemm_log.txt")
    logf = open(log_path, "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"devices: {jax.devices()}  jax {jax.__version__}")
    x_big = jnp.ones((1 << 29,), jnp.bfloat16)
    cp = jax.jit(lambda a: a + 1)
    cp(x_big).block_until_ready()
    t = time.perf_counter()
    for _ in range(10):
        y = cp(x_big)
    y.block_until_ready()
    log(f"elementwise read+write: {2 * x_big.nbytes * 10 / (time.perf_counter() - t) / 1e12:.2f} TB/s")
    del x_big, y

    results = []
    for M in [int(b) for b in args.batches.split(",")]:
        for proj in args.projections.split(","):
            results.append(probe_case(M, proj, args, log, kernel_times))
    log("\nsummary (us per GEMM by device time; per-layer sum = qkv + o + gate_up + down)")
    for M in sorted({e["M"] for e in results}):
        es = [e for e in results if e["M"] == M]
        keys = ("xla_us", "pallas_us", "lora8_us", "lora8p_us", "lora8pf_us", "loraM_us", "loraMp_us", "loraMpf_us")
        tot = {k: sum(e.get(k, float("nan")) for e in es) for k in keys}
        log(f"M={M}: " + "  ".join(f"{e['proj']} xla {e['xla_us']:.1f} / pallas {e['pallas_us']:.1f}"
                                   for e in es)
            + "  | layer " + " ".join(f"{k[:-3]} {v:.1f}" for k, v in tot.items()))
    with open(os.path.join(out_dir, "pallas_gemm_results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
