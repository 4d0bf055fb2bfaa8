"""Registers, shared memory and spills of the segment (prefill) LoRA kernels as Triton compiles them for the H200
(sm_90), on a machine without a GPU.

    pip install "triton~=3.8"   # the compiler alone; not a project dependency
    PYTHONPATH=. python benchmarks/kernel_registers.py --kernel delta --shape 8192,4096,4096,64,4 \\
        [--knobs "{'o_blocks': 1}"]

Pallas lowers the kernel to Triton IR as if an H200 were present (``jax.export`` for "cuda", H200 pretended); the
pip Triton package compiles that IR for sm_90, and the ``cuobjdump`` shipped with it reads the cubin's resource
usage. The inputs are ``kernels.py``'s prefill case (a bank of 1 + 2 x adapters slots, the library's tile rows,
blocks and H-slices), with ``--knobs`` passed to the kernel function.

XLA compiles the same IR with the Triton inside jaxlib, whose version differs, so read the numbers as a
comparison between forms, not as the device's: on the H200 (Nsight Compute, nineteenth session) the rank-64
delta at 8192 tokens over 4 adapters used 164 registers per thread where this tool reports 154 with Triton 3.8,
the rank-16 one 80 where it reports 91 (shared memory agrees to the byte: 40,960 and 17,408). What matters for
occupancy is the step: a program of 4 warps fits 4 times per SM at 128 registers or fewer, 3 times up to 168.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import export
from jax._src.pallas.triton import gpu_info, lowering, pallas_call_registration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels import _common, expand, lora, shrink  # noqa: E402

TRITON_CALL = "__gpu$xla.gpu.triton"


def _pretend_h200():
    """Pallas asks the local device for its compute capability; answer for an H200 (there is no GPU here)."""
    h200 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H200)
    pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: h200


def triton_modules(fn, *args) -> list[tuple[str, int, int]]:
    """(Triton IR text, num_warps, num_stages) of every Pallas kernel in ``fn(*args)``, in lowering order."""
    _pretend_h200()
    saved = []
    orig = lowering.lower_jaxpr_to_triton_module

    def keep(*a, **k):
        res = orig(*a, **k)
        saved.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        exp = export.export(jax.jit(fn), platforms=["cuda"],
                            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
    finally:
        pallas_call_registration.lowering.lower_jaxpr_to_triton_module = orig
    params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", exp.mlir_module())
    if len(params) != len(saved):
        raise RuntimeError(f"{len(saved)} Triton modules but {len(params)} launch parameter sets in the module")
    return [(ir, int(w), int(s)) for ir, (s, w) in zip(saved, params)]


def compile_sm90(ir: str, num_warps: int, num_stages: int) -> dict:
    """Compiles Triton IR for sm_90 with the pip Triton; returns its registers, spills and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir)
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default for now; silences its warning
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    per_thread = -(-regs // 8) * 8  # allocated in steps of 8 per thread
    return {"registers": regs, "spill_bytes": local, "shared_bytes": k.metadata.shared,
            "programs_per_sm_by_registers": 65536 // (per_thread * 32 * num_warps)}


def prefill_case(t: int, h: int, o: int, r: int, nd: int):
    """Abstract inputs of ``kernels.py``'s prefill case: the tiles, x, and the bank's A and B."""
    s = 1 + 2 * nd
    block_m = lora.segment_block_m(t, r)
    n = _common.max_segment_tiles(t, s, block_m)
    i32 = jnp.int32
    tiles = _common.SegmentTiles(tokens=jax.ShapeDtypeStruct((n, block_m), i32),
                                 length=jax.ShapeDtypeStruct((n,), i32), slot=jax.ShapeDtypeStruct((n,), i32),
                                 rank=jax.ShapeDtypeStruct((n,), i32))
    x = jax.ShapeDtypeStruct((t, h), jnp.bfloat16)
    a = jax.ShapeDtypeStruct((s, h, r), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((s, r, o), jnp.bfloat16)
    return tiles, x, a, b


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", default="delta", choices=("delta", "shrink"))
    p.add_argument("--shape", default="8192,4096,4096,64,4", help="T,H,O,r,adapters")
    p.add_argument("--knobs", default="{}", help="keyword arguments of the kernel function (a dict literal)")
    args = p.parse_args()
    t, h, o, r, nd = (int(v) for v in args.shape.split(","))
    knobs = ast.literal_eval(args.knobs)
    tiles, x, a, b = prefill_case(t, h, o, r, nd)
    if args.kernel == "delta":
        block_n, o_blocks = lora.segment_delta_blocks(t, r, [o])
        n_split = 1 if lora.segment_sums_partials(t, r) else shrink.seg_block_sizes(
            t, h, 1, tiles.tokens.shape[1], lora.segment_shrink_programs(t, r))[1]
        hp = jax.ShapeDtypeStruct((1, n_split, t, r), jnp.float32)
        kw = {"block_n": block_n, "o_blocks": o_blocks, **knobs}
        fn = lambda hp_, b_, tiles_: expand.seg_delta_multi(jnp.bfloat16, hp_, (b_,), tiles_, **kw)[0]  # noqa: E731
        mods = triton_modules(fn, hp, b, tiles)
    else:
        kw = {"programs": lora.segment_shrink_programs(t, r), **knobs}
        fn = lambda x_, a_, tiles_: shrink.seg_shrink_partials_multi(x_, (a_,), tiles_, **kw)  # noqa: E731
        mods = triton_modules(fn, x, a, tiles)
    for ir, warps, stages in mods:
        name = re.search(r"tt\.func public @(\w+)", ir).group(1)
        res = compile_sm90(ir, warps, stages)
        print(f"{name} {args.shape} {knobs}: {warps} warps, {stages} stages: {res}")


if __name__ == "__main__":
    main()
