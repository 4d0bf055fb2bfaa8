"""Mixed-adapter batches through the decoder match PEFT request by request, for every family.

One forward serves base-only rows, one adapter on several rows and a different adapter per row; every
row's log-softmax must equal PEFT running that adapter alone (1e-4, float32). Adapters pass through the
real path: PEFT saves them, ``load_peft_adapter`` reads them, the SlotManager assigns slots, and
``write_adapter`` puts them in the bank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import FAMILIES, hf_logprobs, make_hf_model
from lora_fixtures import load_peft_model, make_peft_adapter
from test_model import PAGE_SIZE, PAGES_PER_SEQ, shuffled_page_table

from jmlora.config import ModelConfig
from jmlora.lora import SlotManager, peft_loader
from jmlora.lora.bank import BankSpec, init_adapter_bank, write_adapter
from jmlora.lora.routing import LORA_IMPLS, LoRABatch
from jmlora.model import decoder, forward_logits, init_kv_cache, load_params, make_mesh

MAX_RANK = 16
# name -> make_peft_adapter keyword arguments
ADAPTERS = {
    "qv_r4": dict(r=4, alpha=8, targets=["q_proj", "v_proj"]),
    "all_r8_rslora": dict(r=8, alpha=16, targets="all-linear", use_rslora=True),
    "mlp_r16_pattern": dict(r=16, alpha=32, targets=["gate_proj", "up_proj", "down_proj"],
                            rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 5}),
    "all_r16_layer1": dict(r=16, alpha=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"], layers_to_transform=[1]),
}
PROMPTS = [[1, 5, 9, 33, 100, 7, 250, 3], [4, 3, 8], [400, 300, 200, 100, 50, 25, 12, 6, 3, 2, 1],
           [7, 7, 7, 7, 7], [11, 22, 33, 44, 55, 66]]


class Setup:
    """A family's base model, its adapters on disk, and PEFT reference log-probs per (adapter, prompt)."""

    def __init__(self, family, tmp_path):
        self.family = family
        self.model_dir, self.hf_model = make_hf_model(tmp_path / "base", family, num_hidden_layers=2)
        self.cfg = ModelConfig.from_pretrained(self.model_dir)
        self.params = load_params(self.model_dir, self.cfg, dtype="float32")
        self.paths = {}
        for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
            self.paths[name] = make_peft_adapter(self.hf_model, tmp_path / name, seed=seed, **kwargs)
        self._ref, self._peft = {}, {}

    def reference(self, adapter: str | None, prompt: list[int]) -> np.ndarray:
        key = (adapter, tuple(prompt))
        if key not in self._ref:
            if adapter is not None and adapter not in self._peft:
                self._peft[adapter] = load_peft_model(self.hf_model, self.paths[adapter])
            model = self.hf_model if adapter is None else self._peft[adapter]
            self._ref[key] = hf_logprobs(model, prompt).numpy()
        return self._ref[key]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    return Setup(request.param, tmp_path_factory.mktemp(request.param))


class Server:
    """Slot manager + bank: the host/device pair an engine would keep."""

    def __init__(self, setup: Setup, max_loras: int):
        self.setup = setup
        self.spec = BankSpec(max_loras=max_loras, max_lora_rank=MAX_RANK)
        self.bank = init_adapter_bank(setup.cfg, self.spec, dtype=jnp.float32, mesh=make_mesh())
        self.slots = SlotManager(max_loras, max_cpu_loras=max_loras + 1,
                                 loader=peft_loader(setup.cfg, max_lora_rank=MAX_RANK))
        for name, path in setup.paths.items():
            self.slots.register(name, str(path))

    def acquire(self, adapters: list[str | None]) -> list[int]:
        slot_ids = []
        for name in adapters:
            if name is None:
                slot_ids.append(0)
                continue
            slot, needs_load = self.slots.acquire(name)
            if needs_load:
                self.bank = write_adapter(self.bank, slot, self.slots.get_weights(name), self.setup.cfg, self.spec)
            slot_ids.append(slot)
        return slot_ids

    def release(self, adapters: list[str | None]) -> None:
        for name in adapters:
            if name is not None:
                self.slots.release(name)
        self.slots.check_invariants()

    def run(self, adapters: list[str | None], prompts: list[list[int]], impl: str = "auto") -> np.ndarray:
        slot_ids = self.acquire(adapters)
        cfg = self.setup.cfg
        B = len(prompts)
        tokens = np.zeros((B, 16), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
        cache = init_kv_cache(cfg, B * PAGES_PER_SEQ, PAGE_SIZE, jnp.float32, make_mesh())
        logits, _ = forward_logits(self.setup.params, cfg, jnp.asarray(tokens), jnp.zeros(B, jnp.int32),
                                   jnp.asarray([len(p) for p in prompts], jnp.int32),
                                   jnp.asarray(shuffled_page_table(B)), cache,
                                   LoRABatch(self.bank, jnp.asarray(slot_ids, jnp.int32)), lora_impl=impl)
        self.release(adapters)
        return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def assert_matches_peft(setup: Setup, adapters, prompts, logprobs, atol=1e-4):
    for i, (adapter, prompt) in enumerate(zip(adapters, prompts)):
        np.testing.assert_allclose(logprobs[i, :len(prompt)], setup.reference(adapter, prompt), atol=atol, rtol=0,
                                   err_msg=f"{setup.family}: row {i} (adapter {adapter})")


def test_mixed_batch_matches_peft_per_request(setup):
    server = Server(setup, max_loras=3)
    adapters = [None, "qv_r4", "qv_r4", "all_r8_rslora", "mlp_r16_pattern"]
    logprobs = server.run(adapters, PROMPTS)
    assert_matches_peft(setup, adapters, PROMPTS, logprobs)
    # the adapters really change the output (so the comparison above is not vacuous)
    base = setup.reference(None, PROMPTS[3])
    assert np.abs(setup.reference("all_r8_rslora", PROMPTS[3]) - base).max() > 1e-2


def test_more_adapters_than_slots_over_successive_batches(setup):
    server = Server(setup, max_loras=2)
    batches = [
        ["qv_r4", "all_r8_rslora", None, "qv_r4", "all_r8_rslora"],
        ["mlp_r16_pattern", "all_r16_layer1", "mlp_r16_pattern", None, "all_r16_layer1"],   # evicts both
        ["all_r8_rslora", None, "qv_r4", "qv_r4", "all_r8_rslora"],                          # and back again
        ["all_r16_layer1", "all_r16_layer1", "all_r16_layer1", "all_r16_layer1", "all_r16_layer1"],
    ]
    for adapters in batches:
        assert_matches_peft(setup, adapters, PROMPTS, server.run(adapters, PROMPTS))
    assert server.slots.stats.evictions >= 4


def test_routing_formulations_agree(setup):
    if setup.family not in ("llama", "qwen3"):
        pytest.skip("formulation agreement is family-independent; two families suffice")
    server = Server(setup, max_loras=3)
    adapters = [None, "qv_r4", "all_r8_rslora", "qv_r4", "mlp_r16_pattern"]
    # "pallas" goes through pallas_kernels' dispatcher (its jnp reference on CPU; the kernels themselves are
    # tested in interpret mode in test_kernels.py)
    results = {impl: server.run(adapters, PROMPTS, impl=impl) for impl in LORA_IMPLS}
    for impl, lp in results.items():
        assert_matches_peft(setup, adapters, PROMPTS, lp), impl


# "pallas_gpu_fused" takes the LoRA terms of q/k/v as deltas into its kernel (small batches) or adds them to
# the projection first ("pallas_gpu_fused_xla_add": the larger batches' path, forced here at batch 3);
# "pallas_decode" and "pallas_segment" run the GPU LoRA kernels of that form (all in the Pallas interpreter on
# CPU); "pallas_segment_few", the runner's form for a batch of few adapters, over compacted tiles
@pytest.mark.parametrize("decode_attention,lora_impl", [("auto", "auto"), ("pallas_gpu_fused", "auto"),
                                                        ("pallas_gpu_fused_xla_add", "auto"),
                                                        ("auto", "pallas_decode"),
                                                        ("pallas_gpu_fused", "pallas_segment"),
                                                        ("auto", "pallas_segment_few")])
def test_decode_with_adapters_equals_full_forward(setup, decode_attention, lora_impl, monkeypatch, request):
    if setup.family not in ("llama", "gemma"):
        pytest.skip("decode routing is family-independent; two families suffice")
    if decode_attention == "pallas_gpu_fused_xla_add":
        monkeypatch.setattr(decoder, "FUSED_DELTAS_MAX_BATCH", 0)
        # the jitted forward's cache does not key on the constant: no trace of either path may be reused
        jax.clear_caches()
        request.addfinalizer(jax.clear_caches)
        decode_attention = "pallas_gpu_fused"
    server = Server(setup, max_loras=3)
    cfg = setup.cfg
    adapters = ["all_r8_rslora", None, "qv_r4"]
    sequences = [PROMPTS[0], PROMPTS[2], PROMPTS[2][::-1]]                  # each >= 8 tokens
    prompts, steps = [p[:4] for p in sequences], [p[4:8] for p in sequences]
    slot_ids = jnp.asarray(server.acquire(adapters), jnp.int32)
    lora = LoRABatch(server.bank, slot_ids)
    B, table = len(prompts), jnp.asarray(shuffled_page_table(3))
    cache = init_kv_cache(cfg, B * PAGES_PER_SEQ, PAGE_SIZE, jnp.float32, make_mesh())
    _, cache = forward_logits(setup.params, cfg, jnp.asarray(prompts, jnp.int32), jnp.zeros(B, jnp.int32),
                              jnp.full(B, 4, jnp.int32), table, cache, lora)
    decoded = []
    for t in range(4):
        logits, cache = forward_logits(setup.params, cfg, jnp.asarray([[s[t]] for s in steps], jnp.int32),
                                       jnp.full(B, 4 + t, jnp.int32), jnp.ones(B, jnp.int32), table, cache, lora,
                                       lora_impl=lora_impl, attention_impl=decode_attention)
        decoded.append(np.asarray(jax.nn.log_softmax(logits[:, 0], axis=-1)))
    server.release(adapters)
    for i, adapter in enumerate(adapters):
        ref = setup.reference(adapter, prompts[i] + steps[i])
        np.testing.assert_allclose(np.stack([d[i] for d in decoded]), ref[4:8], atol=1e-4, rtol=0)
