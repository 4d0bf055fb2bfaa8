"""The warp-specialized Mosaic GPU GEMM (``pallas_kernels.ws_gemm``) against its reference, in Mosaic GPU's
interpreter (TMA, barriers and wgmma simulated on the CPU), and the decoder with it against the decoder with
XLA's GEMM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import make_hf_model
from mgpu_decode import decode_step

from jmlora.config import ModelConfig
from jmlora.model import decoder, load_params
from pallas_kernels import ws_gemm as ws_mod
from pallas_kernels.ws_gemm import WsGemmConfig, ref_ws_gemm, ws_gemm, ws_gemm_config, ws_steps_that_fit

f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


def _ints(key, shape):
    """Small integers in bf16: every product and partial sum is exact, so any difference is a wrong tile."""
    return jax.random.randint(key, shape, -2, 3).astype(jnp.bfloat16)


@pytest.mark.parametrize("m, k, n, config, lora", [
    (128, 256, 256, WsGemmConfig(64, 128, "n", split_k=1, steps=2), 0),
    (128, 512, 256, WsGemmConfig(64, 128, "m", split_k=2, steps=3), 128),
    (256, 256, 512, WsGemmConfig(128, 128, "n", split_k=1, steps=2), 64),
    (128, 512, 128, WsGemmConfig(64, 64, "n", split_k=4, steps=2), 64),
])
def test_ws_gemm_exact_on_integers(m, k, n, config, lora):
    """Several work items per CTA (3 CTAs), both warpgroup layouts, split-K, with and without the LoRA K-steps
    (whose h and B a later item must not reuse from an earlier one: each item's tiles differ)."""
    kx, kw, kh, kb = jax.random.split(jax.random.key(m + k + n + lora), 4)
    x, w = _ints(kx, (m, k)), _ints(kw, (k, n))
    hb = (_ints(kh, (m, lora)), _ints(kb, (lora, n))) if lora else ()
    got = ws_gemm(x, w, *hb, config=config, num_sms=3, interpret=True)
    want = f32(x) @ f32(w) + (f32(hb[0]) @ f32(hb[1]) if lora else 0)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(f32(got), want)


def test_ws_gemm_matches_reference_on_normal_inputs():
    kx, kw, kh, kb = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, (128, 512), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (512, 256), jnp.float32) / np.sqrt(512)).astype(jnp.bfloat16)
    h = jax.random.normal(kh, (128, 64), jnp.float32).astype(jnp.bfloat16)
    b = (0.1 * jax.random.normal(kb, (64, 256), jnp.float32)).astype(jnp.bfloat16)
    got = ws_gemm(x, w, h, b, config=WsGemmConfig(64, 128, "m", split_k=2, steps=2), num_sms=4, interpret=True)
    want = ref_ws_gemm(x, w, h, b)
    assert float(jnp.std(want.astype(jnp.float32))) > 0.5
    np.testing.assert_allclose(f32(got), f32(want), atol=3e-2, rtol=2e-2)  # bf16 rounding of the output


def test_ws_gemm_rejects_bad_input():
    x, w = jnp.zeros((128, 256), jnp.bfloat16), jnp.zeros((256, 256), jnp.bfloat16)
    ok = WsGemmConfig(64, 128, "n", steps=2)
    with pytest.raises(ValueError, match="must divide"):
        ws_gemm(x[:96], w, config=ok, interpret=True)               # 96 rows: not a multiple of the CTA's 64
    with pytest.raises(ValueError, match="must divide"):
        ws_gemm(x, w, config=WsGemmConfig(64, 128, "n", split_k=8), interpret=True)  # 256 / 8 < one K-block
    with pytest.raises(ValueError, match="must divide"):
        ws_gemm(x, w, config=WsGemmConfig(32, 128, "n"), interpret=True)  # wgmma takes 64-row tiles
    with pytest.raises(ValueError, match="at least 2 K-blocks"):
        ws_gemm(x, w, config=WsGemmConfig(64, 128, "n", split_k=4, steps=2), interpret=True)
    with pytest.raises(ValueError, match=r"x \[M, K\] and w \[K, N\]"):
        ws_gemm(x, w[:128], config=ok, interpret=True)
    with pytest.raises(ValueError, match="h and b together"):
        ws_gemm(x, w, jnp.zeros((128, 64), jnp.bfloat16), config=ok, interpret=True)
    with pytest.raises(ValueError, match=r"h \[M, L\] and b \[L, N\]"):
        ws_gemm(x, w, jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((32, 256), jnp.bfloat16), config=ok,
                interpret=True)
    with pytest.raises(ValueError, match="wg_dim"):
        ws_gemm(x, w, config=WsGemmConfig(64, 128, "k"), interpret=True)
    with pytest.raises(ValueError, match="shared memory"):  # 8 steps of 128 x 256 blocks: 393 KB
        ws_gemm(x, w, config=WsGemmConfig(128, 128, "n", steps=8), interpret=True)


def test_ws_gemm_table():
    assert ws_gemm_config(256, 4096, 28672) == WsGemmConfig(128, 128, "n", split_k=1, steps=4)
    assert ws_gemm_config(64, 4096, 4096) is None
    for (m, k, n), c in ws_mod.WS_GEMM_TABLE.items():  # every entry divides its shape and fits shared memory
        cta_m, cta_n = c.cta_tile
        assert m % cta_m == 0 and n % cta_n == 0 and k % (c.tile_k * c.split_k) == 0 and c.tile_m % 64 == 0
        assert ws_steps_that_fit(c) == c.steps
    # the LoRA tiles (8 rank-16 adapters: 128 columns of h) take pipeline steps: 2 of a 128 x 256 CTA tile's 4
    assert ws_steps_that_fit(WsGemmConfig(128, 128, "n", steps=4), lora_k=128) == 2


def test_decoder_with_ws_gemm_equals_xla(tmp_path, monkeypatch):
    """A decode step of a tiny Llama (128 rows) with every projection on the Mosaic GPU GEMM (interpreter) gives
    XLA's logprobs."""
    model_dir, _ = make_hf_model(tmp_path, "llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                 head_dim=32)  # every K at least 2 blocks of 64
    cfg = ModelConfig.from_pretrained(model_dir)
    params = load_params(model_dir, cfg, dtype="float32")
    B, E, M = 128, cfg.hidden_size, cfg.intermediate_size
    qkv = cfg.num_kv_heads * (cfg.num_heads // cfg.num_kv_heads + 2) * cfg.head_dim
    table = {(B, E, qkv): WsGemmConfig(64, 64, "m", steps=2),
             (B, cfg.num_heads * cfg.head_dim, E): WsGemmConfig(64, 64, "m", steps=3),
             (B, E, 2 * M): WsGemmConfig(64, 128, "n", steps=2),
             (B, M, E): WsGemmConfig(64, 64, "m", split_k=2, steps=2)}
    monkeypatch.setattr(ws_mod, "WS_GEMM_TABLE", table)
    monkeypatch.setattr(ws_mod, "_num_sms", lambda: 3)
    rng = np.random.default_rng(0)
    page_table = jnp.asarray(rng.permutation(B * 2).astype(np.int32).reshape(B, 2))
    prompts = rng.integers(1, cfg.vocab_size, (B, 4)).astype(np.int32)

    def decode(impl):
        monkeypatch.setattr(decoder, "DECODE_GEMM_IMPL", impl)
        return decode_step(params, cfg, prompts, page_table)  # kernels: one per ws_gemm

    got, n_mgpu = decode("mgpu")
    want, n_xla = decode("xla")
    assert n_mgpu == 4 * cfg.num_layers and n_xla == 0  # the four projections of every layer took the kernel
    assert want.std(axis=-1).mean() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    jax.clear_caches()  # no trace made with the test's table outlives it
