"""Skinny GEMM for the decode step's projections: y = x @ w with few rows (tokens) and a large weight.

At decode a projection reads its whole weight for 64-128 rows of x: the GEMM is bound by the weight's bytes,
and what decides its speed is how many bytes are in flight. XLA's choices on the H200 (its Triton GEMM
fusions or cuBLAS, then a separate split-K reduction) leave bandwidth unused at these shapes; this kernel, a
plain tiled Triton GEMM with a deep ``num_stages`` pipeline and split-K partials that XLA sums inside their
consumer, was faster at 6 of the 8 (rows, projection) pairs measured (benchmarks/RESULTS.md, "Twenty-first
session"). ``DECODE_GEMM_TABLE`` holds the winners; ``decode_gemm_config`` returns None for every other shape,
where XLA's GEMM stays.

The kernel is written against the Pallas Triton lowering (GPU); ``ref_gemm`` is its jnp twin, and
``interpret=True`` runs the kernel in the Pallas interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles and pipeline of ``gemm``.

    Attributes:
      block_m, block_n, block_k: a program's rows and columns of y, and the K-step of its loop.
      split_k: programs per output tile along K; each writes a float32 partial and XLA sums them.
      num_warps, num_stages: Triton's warps per program and software-pipeline depth of the K loop.
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# (rows, K, N) -> the fastest configuration measured on the H200 where it beat XLA's GEMM; the Llama-3-8B
# projections (q/k/v fused: 4096 x 6144; o: 4096 x 4096; gate/up fused: 4096 x 28672; down: 14336 x 4096).
# Device time per GEMM, this kernel against XLA's (benchmarks/RESULTS.md, "Twenty-first session", runs 1-2,
# benchmarks/pallas_gemm_probe.py): 64 rows 18.1 / 21.1, 12.5 / 16.7, 56.6 / 57.5, 32.2 / 37.4 us; 128 rows
# q/k/v 21.0 / 21.8 and o 13.6 / 17.7 us. Not listed, XLA's was faster: gate/up and down at 128 rows (63.8 /
# 61.4, 37.3 / 36.8 us) and every projection at 256 rows (205.8 against 183.7 us per layer).
DECODE_GEMM_TABLE: dict[tuple[int, int, int], GemmConfig] = {
    (64, 4096, 6144): GemmConfig(64, 64, 64, split_k=2, num_stages=5),
    (64, 4096, 4096): GemmConfig(64, 64, 128, split_k=2, num_stages=5),
    (64, 4096, 28672): GemmConfig(64, 128, 64, split_k=1, num_stages=3),
    (64, 14336, 4096): GemmConfig(64, 64, 128, split_k=2, num_stages=5),
    (128, 4096, 6144): GemmConfig(64, 64, 64, split_k=1, num_stages=5),
    (128, 4096, 4096): GemmConfig(64, 64, 128, split_k=1, num_stages=5),
}


def decode_gemm_config(m: int, k: int, n: int) -> GemmConfig | None:
    """The table's configuration for ``x [m, k] @ w [k, n]``, or None where XLA's GEMM is the faster."""
    return DECODE_GEMM_TABLE.get((m, k, n))


def ref_gemm(x, w):
    """Reference: ``x @ w`` by XLA, float32 accumulation, in x's dtype. x: [M, K]; w: [K, N] -> [M, N]."""
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _gemm_kernel(x_ref, w_ref, o_ref, *, block_m, block_n, block_k, k_per_split, split_k):
    # x_ref [M, K]; w_ref [K, N]; o_ref [M, N] (split_k 1) or [split_k, M, N] float32 partials.
    # Grid (M-tile, N-tile, K-split), the M-tile fastest: the programs that share a weight tile run together,
    # so the weight is read from HBM once.
    m, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    m0 = pl.multiple_of(m * block_m, block_m)
    n0 = pl.multiple_of(n * block_n, block_n)

    def body(i, acc):
        k0 = pl.multiple_of(s * k_per_split + i * block_k, block_k)
        xv = x_ref[pl.ds(m0, block_m), pl.ds(k0, block_k)]  # [BM, BK]
        wv = w_ref[pl.ds(k0, block_k), pl.ds(n0, block_n)]  # [BK, BN]
        return acc + jnp.dot(xv, wv, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, k_per_split // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    if split_k == 1:
        o_ref[pl.ds(m0, block_m), pl.ds(n0, block_n)] = acc.astype(o_ref.dtype)
    else:
        o_ref[s, pl.ds(m0, block_m), pl.ds(n0, block_n)] = acc


def _check(x, w, config: GemmConfig) -> None:
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"gemm needs x [M, K] and w [K, N], got x {tuple(x.shape)} and w {tuple(w.shape)}")
    (m, k), n = x.shape, w.shape[1]
    c = config
    if m % c.block_m or n % c.block_n or k % (c.split_k * c.block_k):
        raise ValueError(f"gemm tiles (block_m {c.block_m}, block_n {c.block_n}, block_k {c.block_k} x split_k "
                         f"{c.split_k}) must divide (M, N, K) = ({m}, {n}, {k})")


def gemm(x, w, config: GemmConfig, *, interpret: bool = False):
    """``x @ w`` by the Pallas Triton skinny GEMM.

    Args:
      x: [M, K]; w: [K, N] (one float dtype).
      config: tiles and pipeline (``decode_gemm_config``); its tiles must divide the shapes.
      interpret: run in the Pallas interpreter (CPU).

    Returns:
      y: [M, N] in x's dtype, accumulated in float32 (split-K partials summed in float32 by XLA).
    """
    _check(x, w, config)
    (m, k), n = x.shape, w.shape[1]
    c = config
    if c.split_k == 1:
        out = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out = jax.ShapeDtypeStruct((c.split_k, m, n), jnp.float32)
    y = pl.pallas_call(
        functools.partial(_gemm_kernel, block_m=c.block_m, block_n=c.block_n, block_k=c.block_k,
                          k_per_split=k // c.split_k, split_k=c.split_k),
        out_shape=out,
        grid=(m // c.block_m, n // c.block_n, c.split_k),
        compiler_params=plgpu.CompilerParams(num_warps=c.num_warps, num_stages=c.num_stages),
        interpret=interpret,
        name="skinny_gemm",
    )(x, w)
    return y if c.split_k == 1 else jnp.sum(y, axis=0).astype(x.dtype)
