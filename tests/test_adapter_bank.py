"""The adapter bank: slot writes never recompile; rejected adapters leave the bank and the others intact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import make_hf_model
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from lora_fixtures import make_peft_adapter
from test_model import PAGE_SIZE, PAGES_PER_SEQ, shuffled_page_table

from jmlora.config import ModelConfig
from jmlora.lora import AdapterError, SlotManager, load_peft_adapter, peft_loader
from jmlora.lora.bank import BankSpec, init_adapter_bank, write_adapter
from jmlora.lora.routing import LoRABatch
from jmlora.model import forward_logits, init_kv_cache, load_params, make_mesh

PROMPTS = [[1, 5, 9, 33, 100], [4, 3, 8, 2, 1]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bank")
    model_dir, hf_model = make_hf_model(tmp / "base", "llama", num_hidden_layers=2)
    cfg = ModelConfig.from_pretrained(model_dir)
    params = load_params(model_dir, cfg, dtype="float32")
    adapters = {f"a{i}": make_peft_adapter(hf_model, tmp / f"a{i}", r=r, alpha=2 * r, targets=targets, seed=i)
                for i, (r, targets) in enumerate([(4, ["q_proj", "v_proj"]), (8, "all-linear"),
                                                  (16, ["gate_proj", "down_proj"])])}
    return cfg, params, hf_model, adapters, tmp


def _run(cfg, params, bank, slot_ids):
    B = len(PROMPTS)
    cache = init_kv_cache(cfg, B * PAGES_PER_SEQ, PAGE_SIZE, jnp.float32, make_mesh())
    logits, _ = forward_logits(params, cfg, jnp.asarray(PROMPTS, jnp.int32), jnp.zeros(B, jnp.int32),
                               jnp.full(B, 5, jnp.int32), jnp.asarray(shuffled_page_table(B)), cache,
                               LoRABatch(bank, jnp.asarray(slot_ids, jnp.int32)))
    return np.asarray(logits)


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_load_evict_reload_never_compiles(base):
    cfg, params, _, adapters, _ = base
    spec = BankSpec(max_loras=2, max_lora_rank=16)
    weights = {name: load_peft_adapter(path, cfg, max_lora_rank=16) for name, path in adapters.items()}
    bank = init_adapter_bank(cfg, spec, dtype=jnp.float32, mesh=make_mesh())
    bank = write_adapter(bank, 1, weights["a0"], cfg, spec)                     # warm-up: compiles the write
    first = _run(cfg, params, bank, [1, 0])                                       # and the forward
    with CompileCounter() as compiles:
        bank = write_adapter(bank, 2, weights["a1"], cfg, spec)
        mixed = _run(cfg, params, bank, [2, 1])
        bank = write_adapter(bank, 1, weights["a2"], cfg, spec)                   # evict a0 for a2
        _run(cfg, params, bank, [1, 2])
        bank = write_adapter(bank, 1, None, cfg, spec)                            # unload
        bank = write_adapter(bank, 2, weights["a0"], cfg, spec)                   # reload a0 elsewhere
        again = _run(cfg, params, bank, [2, 1])
    assert compiles.count == 0, f"{compiles.count} XLA compilations after warm-up"
    np.testing.assert_allclose(again[0], first[0], atol=1e-6)     # a0 in its new slot: same result
    assert np.abs(mixed[1] - first[0]).max() > 1e-3               # different adapters differ
    assert np.asarray(bank.ranks).tolist() == [0, 0, 4]


def test_bank_memory_matches_spec(base):
    cfg = base[0]
    spec = BankSpec(max_loras=3, max_lora_rank=8, targets=("q_proj", "down_proj"))
    bank = init_adapter_bank(cfg, spec, dtype=jnp.bfloat16, mesh=make_mesh())
    nbytes = sum(x.nbytes for x in jax.tree.leaves(bank)) - bank.ranks.nbytes
    assert nbytes == spec.num_slots * spec.slot_elements(cfg) * 2
    # q_proj: (64 in + 64 out) * 8, down_proj: (128 + 64) * 8, per layer, 2 layers
    assert spec.slot_elements(cfg) == 2 * ((64 + 64) * 8 + (128 + 64) * 8)


def _bad_adapters(hf_model, tmp):
    """One adapter directory per kind of rejection (the messages are checked in test_lora_peft.py)."""
    def plain(name, seed):
        return make_peft_adapter(hf_model, tmp / name, r=4, alpha=8, targets=["q_proj"], seed=seed)

    truncated = plain("truncated", 9)
    (truncated / "adapter_model.safetensors").write_bytes((truncated / "adapter_model.safetensors").read_bytes()[:-100])
    bad_json = plain("bad_json", 10)
    (bad_json / "adapter_config.json").write_text("{not json")
    non_finite = plain("non_finite", 11)
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(non_finite / "adapter_model.safetensors"))
    next(iter(tensors.values()))[0, 0] = np.inf
    save_file(tensors, str(non_finite / "adapter_model.safetensors"))
    return {
        "dora": make_peft_adapter(hf_model, tmp / "dora", r=4, alpha=8, targets=["q_proj"], use_dora=True),
        "rank_too_big": make_peft_adapter(hf_model, tmp / "big", r=32, alpha=8, targets=["q_proj"]),
        "modules_to_save": make_peft_adapter(hf_model, tmp / "mts", r=4, alpha=8, targets=["q_proj"],
                                             modules_to_save=["lm_head"]),
        "bias": make_peft_adapter(hf_model, tmp / "bias", r=4, alpha=8, targets=["q_proj"], bias="all"),
        "bin_only": make_peft_adapter(hf_model, tmp / "bin", r=4, alpha=8, targets=["q_proj"],
                                      safe_serialization=False),
        "truncated": truncated, "malformed_json": bad_json, "non_finite": non_finite,
    }


def test_rejected_adapters_leave_bank_and_others_unchanged(base):
    cfg, params, hf_model, adapters, tmp = base
    spec = BankSpec(max_loras=2, max_lora_rank=16)
    slots = SlotManager(2, 3, loader=peft_loader(cfg, max_lora_rank=16))
    bank = init_adapter_bank(cfg, spec, dtype=jnp.float32, mesh=make_mesh())
    slots.register("a1", str(adapters["a1"]))
    slot, needs_load = slots.acquire("a1")
    assert needs_load
    bank = write_adapter(bank, slot, slots.get_weights("a1"), cfg, spec)
    before = _run(cfg, params, bank, [slot, 0])
    snapshot = [np.asarray(x).copy() for x in jax.tree.leaves(bank)]
    for name, path in _bad_adapters(hf_model, tmp).items():
        slots.register(name, str(path))
        with pytest.raises(AdapterError):
            slots.acquire(name)
        slots.check_invariants()
        assert slots.resident() == {"a1": slot} and slots.refcount(name) == 0
    # an adapter for projections the bank does not hold is refused at write time, before the device
    narrow = BankSpec(max_loras=2, max_lora_rank=16, targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match="which this engine's adapter bank does not hold"):
        write_adapter(bank, 2, slots.get_weights("a1"), cfg, narrow)
    for old, new in zip(snapshot, jax.tree.leaves(bank)):
        np.testing.assert_array_equal(old, np.asarray(new))
    np.testing.assert_array_equal(_run(cfg, params, bank, [slot, 0]), before)
    with pytest.raises(ValueError, match="slot 0 is the zero adapter"):
        write_adapter(bank, 0, None, cfg, spec)
