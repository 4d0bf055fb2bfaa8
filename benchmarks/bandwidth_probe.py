"""How stable is the HBM bandwidth that the throughput roofline divides by? Several measures in one process.

``throughput.measure_bandwidth`` (the roofline's denominator: an elementwise read+write over 4 GiB, a new
output each call, median of 10) three times, then the same op in place (donated), best, median and worst of
30, and a copy into a new buffer, so that the spread between machines and runs can be told apart from the
spread of the method.

    PYTHONPATH=. python benchmarks/bandwidth_probe.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import measure_bandwidth  # noqa: E402


def timed(f, y, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        y = f(y)
        y.block_until_ready()
        times.append(time.perf_counter() - t)
    return y, times


def main() -> int:
    print(f"device {jax.devices()[0].device_kind}")
    for i in range(3):
        print(f"measure_bandwidth() run {i}: {measure_bandwidth() / 1e12:.2f} TB/s", flush=True)
    x = jnp.ones((1 << 30,), jnp.float32)
    nbytes = 2 * x.nbytes
    scale = jax.jit(lambda a: a * 1.0001, donate_argnums=0)
    x, times = timed(scale, x, 30)
    print(f"in place (donated) x*1.0001, 30 calls: best {nbytes / min(times) / 1e12:.2f}, median "
          f"{nbytes / statistics.median(times) / 1e12:.2f}, worst {nbytes / max(times) / 1e12:.2f} TB/s", flush=True)
    copy = jax.jit(jnp.copy)
    _, times = timed(lambda y: copy(x), x, 30)
    print(f"copy to a new buffer, 30 calls: best {nbytes / min(times) / 1e12:.2f}, median "
          f"{nbytes / statistics.median(times) / 1e12:.2f} TB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
