"""One LoRA prefill (or, with ``--mode decode``, decode-form) op, run a few times, for a hardware-counter
profiler to read its kernels.

    ncu --clock-control none --kernel-name regex:lora_ --section SpeedOfLight --section Occupancy \\
        --section MemoryWorkloadAnalysis --section WarpStateStats \\
        python benchmarks/kernel_counters.py --shape 8192,4096,4096,16,4 --mode delta

(``ncu`` reads the counters on the Firecracker H200 machines: ../.library/device/KINDS.md.) The op is the one
``kernels.py`` times (``kernel_fn``), with its default knobs or ``--knobs`` (a Python dict literal).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import PREFILL_MODE_FORMS, kernel_fn, make_case  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192,4096,4096,16,4", help="T,H,O,r,adapters")
    p.add_argument("--mode", default="delta", choices=sorted(PREFILL_MODE_FORMS) + ["decode"])
    p.add_argument("--knobs", default="{}")
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    t, h, o, r, nd = (int(v) for v in args.shape.split(","))
    decode = args.mode == "decode"
    a, b, ranks, sets = make_case(t, h, o, r, nd, 1, seed=5, prefill=not decode)
    x, y, slots = sets[0]
    fn = kernel_fn("decode" if decode else PREFILL_MODE_FORMS[args.mode], **ast.literal_eval(args.knobs))
    step = jax.jit(lambda y_, x_, s_, a_, b_, r_: fn(y_, x_, a_, b_, s_, r_))
    for _ in range(args.calls):
        out = step(y, x, slots, a, b, ranks)
    jax.block_until_ready(out)
    print(f"ran {args.calls} x {args.mode} {args.shape} {args.knobs}")


if __name__ == "__main__":
    main()
