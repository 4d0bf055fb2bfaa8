"""The decode projections' skinny Pallas GEMM (``pallas_kernels.gemm``) against its reference, in the Pallas
interpreter, and the decoder with it against the decoder with XLA's GEMM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import make_hf_model

from jmlora.config import ModelConfig
from jmlora.model import decoder, forward_logits, init_kv_cache, load_params, make_mesh
from pallas_kernels import gemm as gemm_mod
from pallas_kernels.gemm import GemmConfig, decode_gemm_config, gemm, ref_gemm


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("m, k, n, config", [
    (64, 256, 128, GemmConfig(64, 64, 64)),
    (64, 512, 256, GemmConfig(32, 128, 64, split_k=2)),
    (128, 256, 64, GemmConfig(64, 32, 32, split_k=4, num_stages=5)),
    (16, 128, 96, GemmConfig(16, 32, 64, split_k=2)),
])
def test_gemm_matches_reference(m, k, n, config, dtype):
    kx, kw = jax.random.split(jax.random.key(m + k + n))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    got = gemm(x, w, config, interpret=True)
    want = ref_gemm(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    exact = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exact), atol=tol, rtol=tol)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_gemm_rejects_bad_shapes():
    x, w = jnp.zeros((64, 256)), jnp.zeros((256, 128))
    with pytest.raises(ValueError, match="must divide"):
        gemm(x, w, GemmConfig(64, 96, 64), interpret=True)
    with pytest.raises(ValueError, match="must divide"):
        gemm(x, w, GemmConfig(64, 64, 64, split_k=8), interpret=True)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
        gemm(x, jnp.zeros((128, 128)), GemmConfig(64, 64, 64), interpret=True)


def test_decode_gemm_table_lookup():
    assert decode_gemm_config(64, 4096, 28672) == GemmConfig(64, 128, 64, split_k=1, num_stages=3)
    assert decode_gemm_config(256, 4096, 28672) is None  # XLA's GEMM was the faster there
    for (m, k, n), c in gemm_mod.DECODE_GEMM_TABLE.items():  # every entry runs: its tiles divide its shape
        assert m % c.block_m == 0 and n % c.block_n == 0 and k % (c.split_k * c.block_k) == 0


def test_decoder_with_pallas_gemm_equals_xla(tmp_path, monkeypatch):
    """Decode steps of a tiny Llama with every projection on the Pallas GEMM (interpreter) give XLA's logprobs."""
    model_dir, _ = make_hf_model(tmp_path, "llama")
    cfg = ModelConfig.from_pretrained(model_dir)
    params = load_params(model_dir, cfg, dtype="float32")
    B, E, M = 4, cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.num_kv_heads * (cfg.num_heads // cfg.num_kv_heads + 2) * cfg.head_dim
    table = {(B, E, qkv): GemmConfig(4, 32, 32, split_k=2), (B, cfg.num_heads * cfg.head_dim, E): GemmConfig(4, 32, 32),
             (B, E, 2 * M): GemmConfig(2, 64, 32), (B, M, E): GemmConfig(4, 16, 32, split_k=4)}
    monkeypatch.setattr(gemm_mod, "DECODE_GEMM_TABLE", table)
    rng = np.random.default_rng(0)
    page_table = jnp.asarray(rng.permutation(B * 4).astype(np.int32).reshape(B, 4))
    prompts = rng.integers(1, cfg.vocab_size, (B, 5)).astype(np.int32)

    def decode(impl):
        monkeypatch.setattr(decoder, "DECODE_GEMM_IMPL", impl)
        jax.clear_caches()  # read while tracing: a trace cached under the other setting would be reused
        cache = init_kv_cache(cfg, B * 4, 4, jnp.float32, make_mesh())
        _, cache = forward_logits(params, cfg, jnp.asarray(prompts), jnp.zeros(B, jnp.int32),
                                  jnp.full(B, 5, jnp.int32), page_table, cache)
        out = []
        for step in range(3):
            args = (params, cfg, jnp.asarray(prompts[:, step:step + 1]), jnp.full(B, 5 + step, jnp.int32),
                    jnp.ones(B, jnp.int32), page_table, cache)
            jaxpr = str(jax.make_jaxpr(forward_logits, static_argnums=1)(*args))
            logits, cache = forward_logits(*args)
            out.append(np.asarray(jax.nn.log_softmax(logits, axis=-1)))
        return np.stack(out), jaxpr.count("skinny_gemm")

    got, n_pallas = decode("pallas")
    want, n_xla = decode("xla")
    assert n_pallas == 4 * cfg.num_layers and n_xla == 0  # the four projections of every layer took the kernel
    assert want.std(axis=-1).mean() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    jax.clear_caches()  # no trace made with the test's table outlives it
