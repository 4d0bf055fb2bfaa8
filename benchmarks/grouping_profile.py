"""Device time of the token-grouping kernel (``grouping.segment_tiles_triton``) under the profiler, over its
programs per slot (``parts``), against its XLA twin (``ref_segment_tiles``: sort + scatters).

    PYTHONPATH=. python benchmarks/grouping_profile.py

The profiler's per-kernel sums are device time; a wall-clock loop over a ~5 us op would time Python dispatch.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from device_profile import kernel_times  # noqa: E402

from pallas_kernels import grouping  # noqa: E402


def main():
    print(f"device {jax.devices()[0].device_kind}")
    for t, nd, bm in ((2048, 4, 64), (8192, 4, 64), (8192, 64, 64), (256, 64, 16)):
        rng = np.random.default_rng(t + nd)
        ranks = jnp.full((1 + nd,), 16, jnp.int32).at[0].set(0)
        slots = jnp.asarray(1 + rng.integers(0, nd, t), jnp.int32)
        want = jax.jit(grouping.ref_segment_tiles, static_argnums=2)(slots, ranks, bm)
        impls = [("xla", functools.partial(grouping.ref_segment_tiles, block_m=bm))]
        for parts in (1, 2, 4, 8, 16):  # at the default chunk and warps (swept in the seventh session)
            if parts == 1 or parts * 128 <= t:
                impls.append((f"kernel parts={parts}", functools.partial(
                    grouping.segment_tiles_triton, block_m=bm, parts=parts)))
        for name, f in impls:
            g = jax.jit(f)
            got = g(slots, ranks)
            same = all(bool(jnp.array_equal(a, b)) for a, b in zip(got, want))
            prof = kernel_times(lambda g=g, s=slots, r=ranks: jax.block_until_ready(g(s, r)), n_calls=10)
            print(f"T={t} adapters={nd} block_m={bm} {name}: {prof['total_us']:.1f} us device "
                  f"({len(prof['kernels'])} kernels), equal to the XLA twin: {same}", flush=True)


if __name__ == "__main__":
    main()
