"""The one-launch LoRA GEMM (``pallas_kernels.ws_lora``) against its reference in Mosaic GPU's interpreter
(one CTA, one shrink chunk, no semaphores: what the interpreter can run), and its GPU form (semaphores,
chunked shrink with TMA reductions) lowered for CUDA on the CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import make_hf_model
from jax import export
from lora_fixtures import load_peft_model, make_peft_adapter
from mgpu_decode import decode_step

from jmlora.config import EngineConfig, ModelConfig
from jmlora.engine import model_runner
from jmlora.engine.sampling_params import SamplingParams
from jmlora.entrypoints.llm import LLM
from jmlora.lora import routing
from jmlora.lora.bank import AdapterBank, BankSpec, init_adapter_bank
from jmlora.lora.request import LoRARequest
from jmlora.lora.routing import PACKED_IMPL, LoRABatch
from jmlora.model import load_params, make_mesh
from jmlora.tiny import build_tokenizer
from pallas_kernels import ws_lora as ws_lora_mod
from pallas_kernels.ws_gemm import WsGemmConfig
from pallas_kernels.ws_lora import (
    WS_LORA_TABLE,
    WsLoraConfig,
    lora_steps_that_fit,
    ref_ws_lora_gemm,
    ws_lora_config,
    ws_lora_gemm,
)

f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731


def _operands(key, m, k, n, targets, lora, rank, ints=True):
    """x, w, a, b and pos (about a third of the rows without an adapter). Entries in {-1, 0, 1} keep h and y
    exact in bf16, so any difference from the reference is a wrong tile, row or column."""
    keys = jax.random.split(key, 5)
    shapes = ((m, k), (k, n), (targets, k, lora), (lora, n))
    if ints:
        x, w, a, b = (jax.random.randint(kk, s, -1, 2).astype(jnp.bfloat16) for kk, s in zip(keys, shapes))
    else:
        x, w, a, b = (jax.random.normal(kk, s, jnp.float32).astype(jnp.bfloat16) for kk, s in zip(keys, shapes))
    pos = jax.random.randint(keys[4], (m,), -1, lora // rank).at[0].set(0)
    return x, w, a, b, pos


def _interleaved(group):
    """The fused q/k/v layout: per KV head, ``group`` q heads, then k, then v (one CTA tile per head)."""
    return lambda ni: jnp.maximum(ni % (group + 2) - (group - 1), 0)


@pytest.mark.parametrize("m, k, n, gemm, lora, targets", [
    (128, 256, 256, WsGemmConfig(64, 128, "m", split_k=1, steps=2), 128, 1),
    (128, 512, 512, WsGemmConfig(64, 128, "n", split_k=2, steps=3), 128, 1),    # a padded to the 256-wide tile
    (256, 256, 256, WsGemmConfig(64, 128, "m", split_k=1, steps=2), 64, 1),
    (128, 256, 512, WsGemmConfig(64, 64, "m", split_k=2, steps=2), 64, 3),      # q/k/v: 2 KV heads of 2 + 2
    (128, 256, 512, WsGemmConfig(64, 64, "n", split_k=1, steps=2), 128, 2),     # gate/up: two halves
])
def test_ws_lora_gemm_exact_on_integers(m, k, n, gemm, lora, targets):
    x, w, a, b, pos = _operands(jax.random.key(m + k + n + lora + targets), m, k, n, targets, lora, 16)
    cta_n = gemm.cta_tile[1]
    tile_target = {1: None, 2: lambda ni: ni * cta_n // (n // 2), 3: _interleaved(2)}[targets]
    got = ws_lora_gemm(x, w, a, b, pos, config=WsLoraConfig(gemm, chunks=2), rank=16, tile_target=tile_target,
                       interpret=True)
    want = ref_ws_lora_gemm(x, w, a, b, pos, rank=16, tile_target=tile_target, cta_n=cta_n)
    np.testing.assert_array_equal(f32(got), f32(want))
    # the LoRA terms are there, each target's in its own columns: without them the result differs
    assert np.abs(f32(want) - f32(x) @ f32(w)).max() >= 1
    if targets > 1:  # in each other target's columns, target 0's h would have given something else
        only_first = f32(ref_ws_lora_gemm(x, w, a, b, pos, rank=16, tile_target=lambda ni: 0 * ni, cta_n=cta_n))
        col_target = np.repeat([int(tile_target(jnp.int32(i))) for i in range(n // cta_n)], cta_n)
        for t in range(1, targets):
            assert np.abs(f32(want) - only_first)[:, col_target == t].max() >= 1


def test_ws_lora_gemm_matches_reference_on_normal_inputs():
    x, w, a, b, pos = _operands(jax.random.key(7), 128, 512, 256, 1, 128, 16, ints=False)
    gemm = WsGemmConfig(64, 128, "m", split_k=2, steps=3)
    got = ws_lora_gemm(x, w, a, b, pos, config=WsLoraConfig(gemm), rank=16, interpret=True)
    want = ref_ws_lora_gemm(x, w, a, b, pos, rank=16)
    np.testing.assert_allclose(f32(got), f32(want), rtol=2e-2, atol=0.25)  # bf16 outputs of magnitude ~30
    # A wider than the packed columns (zeros from L on, as ``routing.pack_adapters`` pads it): the same result
    wide = jnp.pad(a, ((0, 0), (0, 0), (0, 128)))
    np.testing.assert_array_equal(f32(ws_lora_gemm(x, w, wide, b, pos, config=WsLoraConfig(gemm), rank=16,
                                                   interpret=True)), f32(got))
    assert np.array_equal(f32(ref_ws_lora_gemm(x, w, wide, b, pos, rank=16)), f32(want))
    # a row's adapter position matters: the same call with every row on adapter 0 gives another result
    other = ws_lora_gemm(x, w, a, b, jnp.zeros_like(pos), config=WsLoraConfig(gemm), rank=16, interpret=True)
    assert np.abs(f32(other) - f32(got)).max() > 1


def test_ws_lora_gemm_rejects_bad_input():
    x, w, a, b, pos = _operands(jax.random.key(0), 128, 256, 256, 1, 128, 16)
    ok = WsLoraConfig(WsGemmConfig(64, 128, "m", steps=2), chunks=2)
    with pytest.raises(ValueError, match="a \\[T, K, >= L\\]"):
        ws_lora_gemm(x, w, a[0], b, pos, config=ok, rank=16, interpret=True)
    with pytest.raises(ValueError, match="a \\[T, K, >= L\\]"):                # A narrower than B's 128 rows
        ws_lora_gemm(x, w, a[:, :, :64], b, pos, config=ok, rank=16, interpret=True)
    with pytest.raises(ValueError, match="pos"):
        ws_lora_gemm(x, w, a, b, pos[:64], config=ok, rank=16, interpret=True)
    with pytest.raises(ValueError, match="multiple of the rank 48"):
        ws_lora_gemm(x, w, a, b, pos, config=ok, rank=48, interpret=True)
    with pytest.raises(ValueError, match="at most the CTA tile's 64 columns"):
        ws_lora_gemm(x, w, a, b, pos, config=WsLoraConfig(WsGemmConfig(64, 64, "m", steps=2)), rank=16,
                     interpret=True)
    with pytest.raises(ValueError, match="chunks \\(3\\) must divide"):
        ws_lora_gemm(x, w, a, b, pos, config=WsLoraConfig(ok.gemm, chunks=3), rank=16, interpret=True)
    with pytest.raises(ValueError, match="2 targets needs tile_target"):
        ws_lora_gemm(x, w, jnp.concatenate([a, a]), b, pos, config=ok, rank=16, interpret=True)
    with pytest.raises(ValueError, match="holds 5 pipeline steps, not 6"):
        ws_lora_gemm(x, w, a, b, pos, config=WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=2, steps=6), 2),
                     rank=16, interpret=True)


def test_ws_lora_table():
    assert ws_lora_config(256, 4096, 6144).gemm.cta_tile == (128, 128)  # fused q/k/v: one head per CTA tile
    assert ws_lora_config(64, 4096, 4096) is None
    for (m, k, n), c in WS_LORA_TABLE.items():  # every entry divides its shape, fits, and holds 8 rank-16 adapters
        cta_m, cta_n = c.gemm.cta_tile
        assert m % cta_m == 0 and n % cta_n == 0 and k % (c.gemm.tile_k * c.gemm.split_k) == 0
        assert (k // c.gemm.tile_k) % c.chunks == 0 and cta_n >= 128
        assert lora_steps_that_fit(c.gemm) == c.gemm.steps


@pytest.mark.parametrize("shape, targets", [((128, 4096, 6144), 3), ((256, 14336, 4096), 1)])
def test_ws_lora_gemm_gpu_form_lowers_for_cuda(shape, targets):
    """The semaphores, the chunked shrink and its TMA reductions, which the interpreter cannot run, lower for
    CUDA at table entries (Mosaic GPU's own checks, shared memory among them, run here)."""
    m, k, n = shape
    config = ws_lora_config(m, k, n)
    assert config.chunks > 1
    call = functools.partial(ws_lora_gemm, config=config, rank=16, num_sms=132,
                             tile_target=_interleaved(4) if targets == 3 else None)
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, k), (k, n), (targets, k, 128), (128, n))]
    exported = export.export(jax.jit(call), platforms=["cuda"])(*args, jax.ShapeDtypeStruct((m,), jnp.int32))
    assert "mosaic_gpu" in exported.mlir_module()


def test_decoder_with_packed_lora_equals_gather(tmp_path, monkeypatch):
    """A decode step of a tiny Llama (128 rows over 7 adapters and base rows) with every projection and its LoRA
    terms in one ``ws_lora_gemm`` launch (``routing.PACKED_IMPL``, interpreter) gives the "gather" form's
    logprobs; the packing puts q/k/v's B in the fused weights' interleaved layout and gate/up's in halves."""
    model_dir, _ = make_hf_model(tmp_path, "llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    cfg = ModelConfig.from_pretrained(model_dir)
    params = load_params(model_dir, cfg, dtype="float32")
    B, E, M, R = 128, cfg.hidden_size, cfg.intermediate_size, 16
    assert params.layers[0].w_qkv is not None  # the fused layout the packing follows
    one_head = WsGemmConfig(64, 128, "m", steps=2)  # CTA tiles one 128-wide head across
    table = {(B, E, 1024): WsLoraConfig(one_head, 1), (B, 512, E): WsLoraConfig(one_head, 1),
             (B, E, 2 * M): WsLoraConfig(WsGemmConfig(64, 64, "n", steps=2), 1),
             (B, M, E): WsLoraConfig(WsGemmConfig(64, 128, "m", split_k=2, steps=2), 1)}
    monkeypatch.setattr(ws_lora_mod, "WS_LORA_TABLE", table)

    spec = BankSpec(max_loras=8, max_lora_rank=R)
    bank = init_adapter_bank(cfg, spec, dtype=jnp.float32, mesh=make_mesh())
    keys = iter(jax.random.split(jax.random.key(3), 64))
    noise = lambda arr: (0.1 * jax.random.normal(next(keys), arr.shape)).at[0].set(0)  # noqa: E731 - slot 0 stays 0
    bank = AdapterBank(layers=jax.tree.map(noise, bank.layers),
                       ranks=jnp.asarray([0] + [R] * (bank.num_slots - 1), jnp.int32))
    rng = np.random.default_rng(0)
    slot_ids = jnp.asarray(rng.integers(0, 8, B), jnp.int32)                 # 7 adapters and base rows
    page_table = jnp.asarray(rng.permutation(B * 2).astype(np.int32).reshape(B, 2))
    prompts = rng.integers(1, cfg.vocab_size, (B, 4)).astype(np.int32)

    def decode(impl):
        return decode_step(params, cfg, prompts, page_table, LoRABatch(bank, slot_ids), impl)

    got, n_packed = decode(PACKED_IMPL)
    want, n_gather = decode("gather")
    assert n_packed == 4 * cfg.num_layers and n_gather == 0  # every projection of every layer took the kernel
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    jax.clear_caches()  # no trace made with the test's table outlives it


def test_packed_impl_is_opt_in_and_only_for_few_rank_16_adapters(monkeypatch):
    """``routing.PACKED_LORA_GEMM`` (off by default) sends GPU decode batches over 1-8 rank-16 adapters to the
    one-launch form; more adapters, another rank, the CPU or a forced formulation keep theirs. Users cannot
    ask for it: it is only right for batches the runner has counted."""
    few = routing.FEW_SEGMENT_IMPL
    assert routing.decode_impl("auto", 256, 8, "gpu", 16) == few
    monkeypatch.setattr(routing, "PACKED_LORA_GEMM", True)
    assert [routing.decode_impl("auto", 256, k, "gpu", 16) for k in (0, 1, 8, 9)] == ["auto", PACKED_IMPL,
                                                                                      PACKED_IMPL, "auto"]
    assert routing.decode_impl("auto", 8, 3, "gpu", 16) == PACKED_IMPL           # at any batch size
    assert routing.decode_impl("auto", 256, 3, "gpu", 32) == few                 # 8 x 32 > 128 packed columns
    assert routing.decode_impl("auto", 256, 3, "cpu", 16) == "auto"
    assert routing.decode_impl("pallas_decode", 256, 3, "gpu", 16) == "pallas_decode"
    with pytest.raises(ValueError, match="lora_impl 'mgpu_packed'"):
        EngineConfig(lora_impl=PACKED_IMPL)


def test_engine_decode_calls_with_packed_lora_match_peft(tmp_path, monkeypatch):
    """The engine's multi-step decode calls with the packed one-launch form (forced on the CPU: the runner's
    choice is GPU-only; ``ws_lora_gemm`` in the interpreter), 40 requests in a 64-row bucket over three PEFT
    adapters (rank 16 on all projections, rank 8 on all, rank 16 on q/v only) and base rows: greedy outputs
    equal PEFT's request by request, and every decode step's projections took the kernel."""
    model_dir, hf_model = make_hf_model(tmp_path / "base", "llama", num_hidden_layers=2, hidden_size=128,
                                        intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=128)
    build_tokenizer().save(str(model_dir / "tokenizer.json"))
    specs = [dict(r=16, alpha=16, targets="all-linear"), dict(r=8, alpha=16, targets="all-linear"),
             dict(r=16, alpha=32, targets=["q_proj", "v_proj"])]
    loras = [LoRARequest(f"p{i}", i + 1, str(make_peft_adapter(hf_model, tmp_path / f"p{i}", seed=i, **spec)))
             for i, spec in enumerate(specs)]
    wide = WsGemmConfig(64, 64, "n", steps=2)  # 64 x 128 CTA tiles: one 128-wide head across
    table = {(64, 128, 1024): WsLoraConfig(wide, 1), (64, 512, 128): WsLoraConfig(wide, 1),
             (64, 128, 512): WsLoraConfig(wide, 1),
             (64, 256, 128): WsLoraConfig(WsGemmConfig(64, 64, "n", split_k=2, steps=2), 1)}
    monkeypatch.setattr(ws_lora_mod, "WS_LORA_TABLE", table)
    monkeypatch.setattr(model_runner, "decode_impl",
                        lambda impl, batch, k, platform, rank: PACKED_IMPL if 0 < k <= 8 else impl)
    launches = []

    def counted(*args, **kwargs):  # the real kernel, counted per trace
        launches.append(args[0].shape)
        return real_kernel(*args, **kwargs)
    real_kernel = ws_lora_mod.ws_lora_gemm
    monkeypatch.setattr(ws_lora_mod, "ws_lora_gemm", counted)

    llm = LLM(str(model_dir), dtype="float32", enable_lora=True, max_loras=4, max_lora_rank=16, max_num_seqs=64,
              max_model_len=32, max_num_batched_tokens=256, max_prefill_chunk=16, num_lookahead=2, warmup=False)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(2, 500, int(n)).tolist()] for n in rng.integers(2, 7, 40)]
    mix = [None if i % 4 == 3 else loras[i % 3] for i in range(40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, lora_request=mix, use_tqdm=False)
    peft = {lora.lora_name: load_peft_model(hf_model, lora.lora_path) for lora in loras}
    for prompt, lora, out in zip(prompts, mix, outs):
        model = hf_model if lora is None else peft[lora.lora_name]
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == want, f"adapter {lora}"
    assert launches and all(shape[0] == 64 for shape in launches)
    assert len(launches) % (4 * 2) == 0  # four projections of both layers in each traced step
    engine = llm.llm_engine
    engine.check_invariants()
    assert engine.is_idle()
