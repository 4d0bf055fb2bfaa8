"""Programmatic dependent launch (PDL) for the Pallas Triton kernels: the early trigger, through inline PTX.

On Hopper a kernel launched with CUDA's programmatic-serialization attribute may start while the kernel before
it in the stream is still running; ``griddepcontrol.wait`` then blocks until that kernel has finished and its
writes are visible. With ``xla_gpu_enable_pdl`` XLA launches every Triton kernel (its own fusions and Pallas's
custom calls alike) that way and inserts the wait at each kernel's entry, but it never lets a Pallas kernel
trigger its dependant early: the next kernel is released only as the last blocks exit. A kernel releases it
sooner with ``griddepcontrol.launch_dependents`` (once every block has executed it or exited): the dependant's
blocks then take the SMs the kernel's last wave leaves and wait there, so the launch latency between the two
overlaps the kernel's tail.

Pallas's Triton lowering has no PDL primitives (Mosaic GPU has), so the instructions go in as inline assembly.
``elementwise_inline_asm`` is pure, so each instruction is fused with a copy of an int32 value that the kernel
then uses as an index: that keeps it from being dropped and places it before the loads indexed by the result.

Rules the kernels here follow:
* a kernel triggers only after its own wait (explicit here, whatever XLA inserts), so whatever ran two
  launches back has finished when the dependant starts;
* only a kernel whose dependant is one of these Pallas kernels triggers early: XLA protects its own fusions
  against an early trigger only after its Triton GEMMs (no invariant loads of the producer's output).

Without the attribute (PDL off, older GPUs) both instructions are no-ops. The interpreter (CPU tests) has no
inline assembly: there both functions return their argument unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def _asm(instruction: str, index, enabled: bool):
    if not enabled:
        return index
    index = jnp.asarray(index, jnp.int32)
    scalar = index.ndim == 0  # the lowering takes no 0-d operand: a scalar goes through a [1] vector
    arg = jnp.broadcast_to(index, (1,)) if scalar else index
    [out] = plgpu.elementwise_inline_asm(
        f"{instruction}\n\tmov.b32 $0, $1;",
        args=[arg],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(arg.shape, jnp.int32)],
    )
    return jnp.sum(out) if scalar else out


def wait(index, enabled: bool):
    """``griddepcontrol.wait``, then ``index`` (int32) unchanged: loads indexed by the result come after it."""
    return _asm("griddepcontrol.wait;", index, enabled)


def launch_dependents(index, enabled: bool):
    """``griddepcontrol.launch_dependents``, then ``index`` unchanged (use the result early: the instruction
    runs where its result is first needed)."""
    return _asm("griddepcontrol.launch_dependents;", index, enabled)
