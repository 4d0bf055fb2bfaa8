"""A decode step of the decoder for the Mosaic GPU kernel tests (``test_ws_gemm``, ``test_ws_lora``): its
logprobs, and how many Mosaic GPU GEMM kernels its trace holds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jmlora.model import forward_logits, init_kv_cache, make_mesh


def decode_step(params, cfg, prompts: np.ndarray, page_table, lora=None, impl: str = "auto"
                ) -> tuple[np.ndarray, int]:
    """Prefills all but the last of each row's prompt tokens (LoRA by the "gather" form), then decodes the last
    with LoRA form ``impl``. Returns the decode step's logprobs ``[B, 1, V]`` and the number of wgmma kernels
    (``ws_gemm``, ``ws_lora_gemm``) in its trace. Caches are cleared first: module-level knobs the decoder reads
    while tracing (a monkeypatched table, ``DECODE_GEMM_IMPL``) must not meet a trace cached under others."""
    jax.clear_caches()
    B, P = prompts.shape
    cache = init_kv_cache(cfg, page_table.size, 4, jnp.float32, make_mesh())
    _, cache = forward_logits(params, cfg, jnp.asarray(prompts[:, :-1]), jnp.zeros(B, jnp.int32),
                              jnp.full(B, P - 1, jnp.int32), page_table, cache, lora, "gather")
    args = (params, cfg, jnp.asarray(prompts[:, -1:]), jnp.full(B, P - 1, jnp.int32), jnp.ones(B, jnp.int32),
            page_table, cache, lora, impl)
    jaxpr = str(jax.make_jaxpr(forward_logits, static_argnums=(1, 8))(*args))
    logits, _ = forward_logits(*args)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1)), jaxpr.count("wgmma_accumulator_deref")
