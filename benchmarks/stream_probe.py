"""Does XLA run a ``compute_on("gpu_stream:1")`` computation concurrently with the main stream here?

The eighth session annotated the decode step's LoRA deltas for a second stream: the optimised HLO held
the annotated ``call-start``/``call-done`` pairs, yet the profile showed one compute stream and the step
did not get shorter (benchmarks/RESULTS.md, "Eighth session"). This probe isolates the mechanism on a
toy program, so the next attempt starts from a yes or no:

- a large matmul (the "base projection") and an independent chain of small elementwise kernels (the
  "LoRA kernels") that only meet in the final sum;
- each at top level and inside a ``lax.fori_loop`` body (the decode step runs its layers inside one);
- with and without the annotation.

For each it prints the device time per call, the profiler's stream lines and which line the small
kernels ran on. Concurrency shows as a second compute stream line and a wall time below the sum.
Needs ``XLA_FLAGS=--xla_gpu_experimental_stream_annotation=true`` (set here before JAX starts unless
XLA_FLAGS is already set).

    PYTHONPATH=. python benchmarks/stream_probe.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_gpu_experimental_stream_annotation=true")

import collections  # noqa: E402
import glob  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental.compute_on import compute_on  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

N_SMALL = 40      # small kernels per iteration (the decode step has 8 LoRA launches per layer)


def side(x, annotate):
    """N_SMALL dependent small kernels on x (optimisation barriers keep XLA from fusing them)."""
    def chain(v):
        for i in range(N_SMALL):
            v = lax.optimization_barrier(jnp.sin(v) * (1.0 + i * 1e-3))
        return v

    if annotate:
        chain = compute_on(compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)(chain)
    return chain(x)


def body(w, x, small, annotate):
    y = x @ w                                            # the "base projection": ~0.1 GB of weights
    return (y + jnp.sum(side(small, annotate)) * 1e-6).astype(y.dtype)


def make(annotate, in_loop, iters=8):
    def f(w, x, small):
        if not in_loop:
            return body(w, x, small, annotate)
        return lax.fori_loop(0, iters, lambda i, acc: acc + body(w, x, small, annotate), jnp.zeros_like(x @ w))
    return jax.jit(f)


def streams_of(fn, args):
    """Profiler stream lines and, per line, (small kernels: the sine fusions, other kernels) that ran there."""
    logdir = tempfile.mkdtemp()
    jax.block_until_ready(fn(*args))
    with jax.profiler.trace(logdir):
        jax.block_until_ready(fn(*args))
    data = ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    lines = collections.defaultdict(lambda: [0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):
                for ev in line.events:
                    lines[line.name][0 if "sin" in ev.name else 1] += 1
    return {name: tuple(n) for name, n in lines.items()}


def main():
    if jax.default_backend() != "gpu":
        print("needs a GPU (the annotation is a GPU stream assignment)")
        return 0
    print(f"device {jax.devices()[0].device_kind}; XLA_FLAGS={os.environ.get('XLA_FLAGS')}")
    k = jax.random.key(0)
    w = jax.random.normal(k, (8192, 6144), jnp.bfloat16)
    x = jax.random.normal(k, (32, 8192), jnp.bfloat16)
    small = jax.random.normal(k, (32, 4096), jnp.float32)
    for in_loop in (False, True):
        for annotate in (False, True):
            fn = make(annotate, in_loop)
            jax.block_until_ready(fn(w, x, small))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(10):
                    out = fn(w, x, small)
                jax.block_until_ready(out)
                times.append((time.perf_counter() - t) / 10)
            where = "in fori_loop" if in_loop else "top level"
            print(f"{where:12s} annotated={annotate!s:5s}: {statistics.median(times) * 1e6:8.1f} us per call; "
                  f"kernels per stream line {streams_of(fn, (w, x, small))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
