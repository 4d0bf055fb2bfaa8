"""The engine and the LLM batch API on a tiny Llama with real PEFT adapters, against transformers + PEFT.

Every test ends with the engine idle: no request in flight, every KV page free, no adapter referenced, no
penalty-state row held (``engine.is_idle()``), and the scheduler/page/slot invariants hold.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
import torch
from hf_models import make_hf_model
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from lora_fixtures import load_peft_model, make_peft_adapter

from jmlora.engine.llm_engine import RequestError
from jmlora.engine.sampling_params import SamplingParams
from jmlora.engine.scheduler import ScheduledChunk
from jmlora.engine.sequence import Sequence
from jmlora.entrypoints.llm import LLM
from jmlora.lora import AdapterError
from jmlora.lora.request import LoRARequest
from jmlora.lora.routing import FEW_SEGMENT_IMPL, decode_impl
from jmlora.tiny import build_tokenizer

PROMPTS = [[1, 5, 9, 33, 100, 7, 250, 3], [1, 4, 3], [1, 400, 300, 200, 100, 50, 25, 12, 6, 3, 2, 1, 77, 9, 13, 17,
                                                        21, 30, 40, 41, 42, 43],
           [1, 7, 7, 7, 7], [1, 11, 22, 33, 44, 55, 66], [1, 99]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    model_dir, hf_model = make_hf_model(tmp / "base", "llama", num_hidden_layers=2)
    build_tokenizer().save(str(model_dir / "tokenizer.json"))
    specs = [dict(r=4, alpha=8, targets=["q_proj", "v_proj"]), dict(r=8, alpha=16, targets="all-linear"),
             dict(r=16, alpha=16, targets=["gate_proj", "up_proj", "down_proj"]),
             dict(r=8, alpha=32, targets="all-linear", use_rslora=True)]
    loras = [LoRARequest(f"a{i}", i + 1, str(make_peft_adapter(hf_model, tmp / f"a{i}", seed=i, **spec)))
             for i, spec in enumerate(specs)]
    return model_dir, hf_model, loras, tmp


def make_llm(model_dir, **kwargs) -> LLM:
    defaults = dict(dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16, max_num_seqs=4,
                    max_model_len=64, max_num_batched_tokens=32, max_prefill_chunk=16, num_lookahead=3, warmup=False)
    return LLM(str(model_dir), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def llm(world):
    return make_llm(world[0])


def assert_idle(llm: LLM):
    engine = llm.llm_engine
    engine.check_invariants()
    assert engine.is_idle(), "pages, adapter references or state rows leaked"


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that collects the name of the function of each XLA compilation made inside the block."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(kwargs.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


_peft_cache: dict = {}


def reference_greedy(world, prompt, lora: LoRARequest | None, max_tokens=8):
    _, hf_model, _, _ = world
    if lora is not None and lora.lora_name not in _peft_cache:
        _peft_cache[lora.lora_name] = load_peft_model(hf_model, lora.lora_path)
    model = hf_model if lora is None else _peft_cache[lora.lora_name]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_mixed_adapter_batch_matches_peft_and_requests_alone(world, llm):
    loras = world[2]
    mix = [None, loras[0], loras[1], loras[0], loras[2], loras[3]]      # 4 distinct adapters, 2 slots
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, lora_request=mix, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == PROMPTS                 # input order
    for prompt, lora, out in zip(PROMPTS, mix, outs):
        completion = out.outputs[0]
        assert completion.token_ids == reference_greedy(world, prompt, lora), f"adapter {lora}"
        assert completion.finish_reason == "length" and out.finished
        alone = llm.generate([{"prompt_token_ids": prompt}], GREEDY, lora_request=lora, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == completion.token_ids
    stats = llm.llm_engine.stats
    assert stats["adapter_loads"] >= 4
    # adapters of waiting requests were copied to the device while earlier steps ran, then loaded from there
    assert stats["adapter_loads_staged"] >= 1
    assert_idle(llm)


def test_preemption_under_tiny_kv_budget_gives_identical_outputs(world, llm):
    loras = world[2]
    mix = [loras[1], None, loras[0], loras[1], None, loras[3]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, lora_request=mix, use_tqdm=False)
    tight = make_llm(world[0], num_kv_pages=17, page_size=4)           # 68 token slots for 4 running sequences
    got = tight.generate([{"prompt_token_ids": p} for p in PROMPTS], params, lora_request=mix, use_tqdm=False)
    assert tight.llm_engine.stats["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    # prompt logprobs and repetition/frequency penalties survive preemption (recomputed outputs are outputs)
    special = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=1,
                             repetition_penalty=1.8, frequency_penalty=0.7)
    before = tight.llm_engine.stats["preemptions"]
    got = tight.generate([{"prompt_token_ids": p} for p in PROMPTS], special, lora_request=mix, use_tqdm=False)
    assert tight.llm_engine.stats["preemptions"] > before
    roomy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], special, lora_request=mix, use_tqdm=False)
    for a, b in zip(got, roomy):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [None if e is None else sorted(e) for e in a.prompt_logprobs] == \
            [None if e is None else sorted(e) for e in b.prompt_logprobs]
    assert_idle(tight)


def test_seeded_sampling_reproducible_whatever_the_batch(world, llm):
    loras = world[2]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate([{"prompt_token_ids": PROMPTS[0]}], seeded, lora_request=loras[1], use_tqdm=False)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)] * 3
    crowd = llm.generate([{"prompt_token_ids": p} for p in (PROMPTS[3], PROMPTS[1], PROMPTS[0], PROMPTS[2])],
                         [others[0], others[1], seeded, others[2]], lora_request=[None, loras[0], loras[1], None],
                         use_tqdm=False)
    assert crowd[2].outputs[0].token_ids == alone.outputs[0].token_ids
    two = llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=10,
                                                                          ignore_eos=True), use_tqdm=False)[0]
    assert len(two.outputs) == 2 and two.outputs[0].token_ids != two.outputs[1].token_ids
    assert_idle(llm)


def test_stop_strings_and_stop_tokens(world, llm):
    free = llm.generate(["Hello world"], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == free.text[:free.text.find(stop)]
    # a stop string produced before min_tokens does not end the sequence later (vLLM searches new text only)
    late = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop=[stop],
                                                        min_tokens=6), use_tqdm=False)[0].outputs[0]
    if free.text.count(stop) == 1 and len(llm.get_tokenizer().decode(free.token_ids[:5])) >= 4:
        assert late.finish_reason == "length" and late.token_ids == free.token_ids
    # streamed text never shows a prefix of a stop string that is taken back later
    engine = llm.llm_engine
    engine.add_request("stream", "Hello world", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                               stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])) and texts[-1] == cut.text
    stop_id = free.token_ids[3]
    by_id = llm.generate(["Hello world"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                         stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    assert by_id.stop_reason == stop_id
    assert_idle(llm)


def test_logprobs_and_prompt_logprobs_match_transformers(world, llm):
    _, hf_model, _, _ = world
    prompt = PROMPTS[2]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                                      logprobs=3, prompt_logprobs=2),
                       use_tqdm=False)[0]
    full = prompt + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([full])).logits[0].float(), -1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry and len(entry) >= 2
        assert abs(entry[prompt[pos]].logprob - ref[pos - 1, prompt[pos]]) < 1e-4
    for j, (token, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert abs(entry[token].logprob - row[token]) < 1e-4 and entry[token].rank == 1     # greedy: the top token
        top3 = row.argsort()[::-1][:3]
        assert set(top3) <= set(entry)
    assert_idle(llm)


def test_streaming_engine_abort_returns_resources(world, llm):
    engine = llm.llm_engine
    loras = world[2]
    ids = [engine.add_request(None, {"prompt_token_ids": p}, SamplingParams(temperature=0.0, max_tokens=30,
                                                                           ignore_eos=True), lora)
           for p, lora in zip(PROMPTS, [loras[0], None, loras[1], loras[2], None, loras[0]])]
    seen = {}
    for step in range(200):
        if step == 3:
            for rid in (ids[2], ids[5]):         # one running, one still waiting (4 sequences at most run)
                seen[rid] = engine.abort(rid)
                assert seen[rid].finished and seen[rid].outputs[0].finish_reason == "abort"
            assert engine.abort(ids[2]) is None  # a second abort is a no-op
        for out in engine.step():
            seen[out.request_id] = out
            assert len(out.outputs[0].token_ids) <= 30
        engine.check_invariants()
        if not engine.has_unfinished_requests():
            break
    assert all(seen[i].finished for i in ids)
    assert {i for i in ids if seen[i].outputs[0].finish_reason == "length"} == set(ids) - {ids[2], ids[5]}
    assert_idle(llm)


def test_bad_adapter_is_a_clear_error_and_nothing_else_breaks(world, llm):
    model_dir, hf_model, loras, tmp = world
    bad = LoRARequest("dora", 99, str(make_peft_adapter(hf_model, tmp / "dora", r=4, alpha=8, targets=["q_proj"],
                                                        use_dora=True)))
    with pytest.raises(AdapterError, match="prompt 1: .*DoRA"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[1]}], GREEDY,
                     lora_request=[loras[0], bad], use_tqdm=False)
    assert_idle(llm)
    # through the streaming engine (no pre-validation): the bad request fails alone, the others complete
    engine = llm.llm_engine
    good = engine.add_request(None, {"prompt_token_ids": PROMPTS[0]}, GREEDY, loras[0])
    failed = engine.add_request(None, {"prompt_token_ids": PROMPTS[1]}, GREEDY, bad)
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
    assert isinstance(results[failed].error, AdapterError) and results[failed].finished
    assert results[failed].outputs[0].finish_reason == "abort" and results[good].error is None
    assert results[good].outputs[0].token_ids == reference_greedy(world, PROMPTS[0], loras[0])
    assert llm.generate([{"prompt_token_ids": PROMPTS[3]}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        reference_greedy(world, PROMPTS[3], None)
    assert_idle(llm)


def _run_all(engine) -> dict:
    results = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id] = out
        engine.check_invariants()
    return results


def _fail_first_decode(engine, monkeypatch, *, consume_cache: bool) -> None:
    """The engine's next decode call raises (after deleting the donated KV cache, as a device failure after
    donation leaves it, with ``consume_cache``); later calls run normally."""
    real_start, calls = engine.runner.start_decode, []

    def start_decode(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            if consume_cache:
                for array in (*engine.runner.cache.k, *engine.runner.cache.v):
                    array.delete()
            raise RuntimeError("injected device failure")
        return real_start(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "start_decode", start_decode)


def test_a_failed_device_step_fails_its_requests_and_the_engine_keeps_serving(world, llm, monkeypatch):
    """Fault injection (nothing on CPU makes the real call fail on demand): the first decode call raises."""
    engine, loras = llm.llm_engine, world[2]
    mix = [loras[0], None, loras[1], None, loras[0], None]
    ids = [engine.add_request(None, {"prompt_token_ids": p}, GREEDY, lora) for p, lora in zip(PROMPTS, mix)]
    _fail_first_decode(engine, monkeypatch, consume_cache=False)
    results = _run_all(engine)
    failed = [i for i in ids if results[i].error is not None]
    assert 0 < len(failed) < len(ids)          # the batch of that step (at most 4 sequences), not the waiting ones
    for i, rid in enumerate(ids):
        out = results[rid]
        assert out.finished
        if rid in failed:
            assert isinstance(out.error, RuntimeError) and out.outputs[0].finish_reason == "abort"
        else:
            assert out.outputs[0].token_ids == reference_greedy(world, PROMPTS[i], mix[i])
    monkeypatch.undo()
    assert llm.generate([{"prompt_token_ids": PROMPTS[1]}], GREEDY, lora_request=loras[0], use_tqdm=False)[0] \
        .outputs[0].token_ids == reference_greedy(world, PROMPTS[1], loras[0])
    assert_idle(llm)


def test_a_failed_step_that_consumed_the_kv_cache_resets_it(world, llm, monkeypatch):
    """The failing call deletes the donated cache first (what a device failure after donation leaves): every
    running request fails, the waiting ones and later requests are served from a fresh cache."""
    engine, loras = llm.llm_engine, world[2]
    mix = [loras[0], None, loras[1], None, loras[0], None]
    ids = [engine.add_request(None, {"prompt_token_ids": p}, GREEDY, lora) for p, lora in zip(PROMPTS, mix)]
    _fail_first_decode(engine, monkeypatch, consume_cache=True)
    results = _run_all(engine)
    failed = {rid for rid in ids if results[rid].error is not None}
    assert 0 < len(failed) < len(ids) and not engine.runner.device_state_lost()
    for i, rid in enumerate(ids):
        if rid not in failed:
            assert results[rid].outputs[0].token_ids == reference_greedy(world, PROMPTS[i], mix[i])
    monkeypatch.undo()
    assert llm.generate([{"prompt_token_ids": PROMPTS[2]}], GREEDY, lora_request=loras[1], use_tqdm=False)[0] \
        .outputs[0].token_ids == reference_greedy(world, PROMPTS[2], loras[1])
    assert_idle(llm)


def test_a_failed_adapter_write_evicts_the_adapter(world, llm, monkeypatch):
    """The bank write of an adapter raises: its requests fail, and the slot is not trusted afterwards (the next
    request with that adapter loads it again and matches PEFT)."""
    engine, loras = llm.llm_engine, world[2]
    for name in list(engine.slot_manager.resident()):
        engine.slot_manager.evict(name)
    real_load = engine.runner.load_adapter

    def load_failing(*args, **kwargs):
        raise RuntimeError("injected bank write failure")

    monkeypatch.setattr(engine.runner, "load_adapter", load_failing)
    rid = engine.add_request(None, {"prompt_token_ids": PROMPTS[0]}, GREEDY, loras[3])
    results = _run_all(engine)
    assert isinstance(results[rid].error, RuntimeError) and results[rid].outputs[0].finish_reason == "abort"
    assert engine.slot_manager.slot_of(loras[3].lora_name) is None
    monkeypatch.setattr(engine.runner, "load_adapter", real_load)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, lora_request=loras[3], use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference_greedy(world, PROMPTS[0], loras[3])
    assert_idle(llm)


def test_request_validation(world, llm):
    with pytest.raises(RequestError, match="prompt 0: prompt_token_ids must be integers in"):
        llm.generate([{"prompt_token_ids": [1, 100000]}], use_tqdm=False)
    with pytest.raises(RequestError, match="prompt 1: .*max_model_len is 64"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [1] * 64}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests(), "a failed generate left requests queued"
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    no_lora = make_llm(world[0], enable_lora=False)
    with pytest.raises(RequestError, match="without enable_lora"):
        no_lora.generate(["a"], lora_request=world[2][0], use_tqdm=False)
    assert_idle(llm)


def test_page_table_rows_follow_page_growth_and_reallocation(world, llm):
    """The runner rewrites only the grown rows of the last call's page table for the same batch: each table must
    still equal one built from scratch, also after a sequence's pages were freed and allocated again (same
    count, other pages) between two calls."""
    runner = llm.llm_engine.runner
    seqs = [Sequence(f"pt{i}", [1, 2], seq_id=900_000 + i) for i in range(3)]
    chunks = [ScheduledChunk(s, 1, 1, True) for s in seqs]

    def check():
        want = np.full((4, runner.pages_per_seq), runner.scratch_page, np.int32)
        for i, seq in enumerate(seqs):
            want[i, :len(seq.pages)] = seq.pages
        np.testing.assert_array_equal(runner._page_table(chunks, 4), want)

    seqs[0].pages[:], seqs[1].pages[:] = [3], [4, 5]
    check()
    seqs[0].pages.append(7)                                  # grew by a page
    seqs[2].pages.append(1)
    check()
    seqs[1].pages.clear()                                    # preempted and admitted again: other pages
    seqs[1].pages_freed += 1
    seqs[1].pages.extend([9, 8])
    check()
    seqs[0].pages.clear()                                    # freed, not yet allocated again
    seqs[0].pages_freed += 1
    check()


def test_no_compilation_after_startup(world):
    _, _, loras, _ = world
    llm = make_llm(world[0], max_num_seqs=2, max_prefill_chunk=16, max_num_batched_tokens=32, warmup=True)
    with counting_compiles() as compiles:
        for mix in ([None, loras[0]], [loras[1], loras[2]], [loras[3]], [loras[0], loras[0]], [None]):
            prompts = [{"prompt_token_ids": p} for p in PROMPTS[:len(mix)]]
            # one long prompt among short ones: the step is split, never compiled at a larger padded shape
            llm.generate([{"prompt_token_ids": PROMPTS[2]}, {"prompt_token_ids": [1, 5]}], GREEDY,
                         lora_request=[mix[0], mix[-1]], use_tqdm=False)
            llm.generate(prompts, GREEDY, lora_request=mix, use_tqdm=False)
            llm.generate(prompts, SamplingParams(temperature=0.8, seed=3, max_tokens=5), lora_request=mix,
                         use_tqdm=False)
    assert llm.llm_engine.stats["adapter_loads"] >= 4
    assert not compiles, f"{len(compiles)} XLA compilations after start-up"
    assert_idle(llm)


def test_batches_without_adapters_run_the_base_executable(world):
    """With LoRA enabled, a decode batch in which no row has an adapter runs without the adapter inputs: the
    executable an engine without LoRA runs (same shapes), so it compiles no decode step of its own. A batch
    with an adapter still gets its adapter."""
    model_dir, _, loras, _ = world
    prompt = [{"prompt_token_ids": PROMPTS[0]}]
    shapes = dict(num_kv_pages=32, max_num_seqs=2)
    plain = make_llm(model_dir, enable_lora=False, **shapes).generate(prompt, GREEDY, use_tqdm=False)[0]
    llm = make_llm(model_dir, **shapes)
    with counting_compiles() as compiles:
        out = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids
    assert not [name for name in compiles if "decode_steps" in name], compiles
    with_adapter = llm.generate(prompt, GREEDY, lora_request=loras[1], use_tqdm=False)[0]
    assert with_adapter.outputs[0].token_ids == reference_greedy(world, PROMPTS[0], loras[1])
    assert_idle(llm)


def test_segment_kernels_in_multi_step_decode_calls_match_peft(world):
    """The segment kernels (Pallas interpreter on CPU) through the engine's multi-step decode calls, whose
    tiles are built once per call and shared by its steps: greedy outputs equal PEFT's."""
    loras = world[2]
    llm = make_llm(world[0], lora_impl="pallas_segment", max_loras=3)           # num_lookahead=3 steps a call
    mix = [loras[1], None, loras[3], loras[1]]
    prompts = PROMPTS[:4]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, lora_request=mix, use_tqdm=False)
    for prompt, lora, out in zip(prompts, mix, outs):
        assert out.outputs[0].token_ids == reference_greedy(world, prompt, lora), f"adapter {lora}"
    assert_idle(llm)


def test_decode_variants_follow_the_adapter_count(world):
    """One decode executable per LoRA formulation a batch can need, each warmed up: with LoRA enabled a batch
    without adapters runs the base executable (0 adapters); on GPU a batch of 32 rows or more with at most 8
    adapters runs the grouped (segment) form over only the tiles it can fill, one with more "auto"; other
    buckets and platforms have one. Users cannot force the few-adapter form."""
    few = FEW_SEGMENT_IMPL
    assert [decode_impl("auto", 64, k, "gpu", 16) for k in (0, 1, 8, 9, 64)] == ["auto", few, few, "auto", "auto"]
    assert [decode_impl("auto", 256, k, "gpu", 16) for k in (1, 8, 9)] == [few, few, "auto"]
    assert decode_impl("auto", 32, 8, "gpu", 16) == few
    assert decode_impl("pallas_decode", 64, 1, "gpu", 16) == "pallas_decode"   # a forced formulation stays
    assert decode_impl("auto", 64, 1, "cpu", 16) == decode_impl("auto", 16, 1, "gpu", 16) == "auto"
    assert decode_impl("auto", 64, 1, "gpu", 8) == "auto"          # the segment kernels' dot needs R >= 16
    with pytest.raises(ValueError, match="lora_impl 'pallas_segment_few'"):
        make_llm(world[0], lora_impl=few)
    runner = make_llm(world[0], max_loras=16).llm_engine.runner
    assert runner.decode_variants(64, "gpu") == runner.decode_variants(128, "gpu") == [0, 1, 9]
    assert runner.decode_variants(32, "gpu") == [0, 1, 9]
    assert runner.decode_variants(16, "gpu") == [0, 1]
    assert runner.decode_variants(64, "cpu") == [0, 1]
    assert make_llm(world[0], max_loras=4).llm_engine.runner.decode_variants(64, "gpu") == [0, 1]  # <= 4 adapters
    assert make_llm(world[0], enable_lora=False).llm_engine.runner.decode_variants(64, "gpu") == [0]


def test_chat_renders_the_template(tmp_path):
    from jmlora.tiny import create_tiny_checkpoint

    model_dir = create_tiny_checkpoint(tmp_path / "tiny")
    llm = LLM(str(model_dir), max_num_seqs=2, max_model_len=64, max_num_batched_tokens=32, max_prefill_chunk=32,
              warmup=False)
    out = llm.chat([{"role": "user", "content": "Hello world"}], SamplingParams(temperature=0, max_tokens=4),
                   use_tqdm=False)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "<|user|>\nHello world\n<|assistant|>\n"
    assert 1 <= len(out.outputs[0].token_ids) <= 4
    assert_idle(llm)


def test_interleaved_arrivals_with_mixed_adapters_lengths_and_params(world, llm):
    """Requests arrive while others run (continuous batching); greedy ones must equal PEFT, seeded sampled
    ones must equal the same request run alone, whatever joined or left around them."""
    import random

    loras = [None, *world[2]]
    rng = random.Random(0)
    engine = llm.llm_engine
    plan = []
    for i in range(14):
        prompt = [1] + [rng.randrange(2, 500) for _ in range(rng.randrange(1, 30))]
        lora = rng.choice(loras)
        if i % 3 == 0:
            params = SamplingParams(temperature=0.8, top_k=50, seed=100 + i, max_tokens=rng.randrange(3, 12),
                                    ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(3, 12), ignore_eos=True)
        plan.append((prompt, lora, params))
    finished, pending, step = {}, list(enumerate(plan)), 0
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 3)):           # 0-2 new requests join before each step
            if pending:
                i, (prompt, lora, params) = pending.pop(0)
                engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params, lora)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_invariants()
        step += 1
        assert step < 500
    assert len(finished) == len(plan)
    for i, (prompt, lora, params) in enumerate(plan):
        tokens = finished[f"r{i}"].outputs[0].token_ids
        assert len(tokens) == params.max_tokens
        if params.temperature == 0.0:
            assert tokens == reference_greedy(world, prompt, lora, params.max_tokens), f"request {i}"
        else:
            alone = llm.generate([{"prompt_token_ids": prompt}], params, lora_request=lora, use_tqdm=False)[0]
            assert tokens == alone.outputs[0].token_ids, f"request {i}"
    assert_idle(llm)


def test_penalty_state_covers_a_prompt_token_fed_by_decode(world):
    """A prefill chunk cut one token short leaves the last prompt token to the decode step; the repetition
    penalty must still see it. The prompt is searched so that its last token is the greedy choice unless that
    token is penalised, so a missing record shows as emitting it."""

    hf_model, R = world[1], 5.0
    rng = np.random.default_rng(7)
    for _ in range(60):
        q = [1] + rng.integers(3, 500, size=15).tolist()
        candidates = [x for x in range(3, 512) if x not in q]
        with torch.no_grad():
            logits = hf_model(torch.tensor([q + [x] for x in candidates])).logits[:, -1].double().numpy()
        seen = np.zeros(logits.shape[1], bool)
        seen[q] = True
        penalised = np.where(seen, np.where(logits > 0, logits / R, logits * R), logits)
        hits = [i for i, x in enumerate(candidates) if penalised[i].argmax() == x]
        if hits:
            break
    assert hits, "no suitable prompt found"
    i = hits[0]
    x = candidates[i]
    seen[x] = True                                         # the correct penalty: every prompt token is seen
    row = np.where(seen, np.where(logits[i] > 0, logits[i] / R, logits[i] * R), logits[i])
    expected_first = int(row.argmax())
    assert expected_first != x
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, repetition_penalty=R)
    for chunk in (16, 32):                                # 17 tokens: cut one short, and in one chunk
        llm16 = make_llm(world[0], enable_lora=False, max_prefill_chunk=chunk, num_lookahead=1)
        out = llm16.generate([{"prompt_token_ids": q + [x]}], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids[0] == expected_first, f"max_prefill_chunk={chunk}"


def test_penalty_state_matches_the_tokens_after_every_decode_step(world):
    """White box: after each decode step, every decoding sequence's device row holds exactly its prompt tokens
    (mask) and its output token counts, also across preemptions (where outputs are recomputed)."""

    # synchronous steps: with async scheduling the device state runs one call ahead of the host's tokens
    llm_tight = make_llm(world[0], enable_lora=False, num_lookahead=1, page_size=4, num_kv_pages=20,
                         max_num_batched_tokens=20, max_prefill_chunk=16, async_scheduling=False)
    engine = llm_tight.llm_engine
    rng = np.random.default_rng(100)
    for i in range(6):
        prompt = [1] + rng.integers(3, 500, size=int(rng.integers(3, 20))).tolist()
        engine.add_request(None, {"prompt_token_ids": prompt}, SamplingParams(
            temperature=0.7, seed=i, max_tokens=35, ignore_eos=True, frequency_penalty=0.5))
    checked = 0
    while engine.has_unfinished_requests():
        before = engine.stats["decode_steps"]
        engine.step()
        if engine.stats["decode_steps"] == before:
            continue
        mask, counts = np.asarray(engine.runner.prompt_mask), np.asarray(engine.runner.output_counts)
        for seq in engine.scheduler.running:
            if seq.is_prefill:
                continue
            row = engine.runner._rows[seq.seq_id]
            want = np.zeros(mask.shape[1], bool)
            want[seq.prompt_token_ids] = True
            np.testing.assert_array_equal(mask[row], want)
            np.testing.assert_array_equal(counts[row], np.bincount(seq.output_token_ids, minlength=mask.shape[1]))
            checked += 1
    assert engine.stats["preemptions"] > 0 and checked > 100
    assert_idle(llm_tight)


def _async_workload(world):
    """Mixed requests for the async-vs-sync comparison: greedy and seeded sampling, penalties, logprobs, stop
    strings and tokens, EOS, different lengths and adapters; more requests than max_num_seqs."""
    import random

    rng = random.Random(7)
    loras = [None, *world[2]]
    work = []
    for i in range(10):
        prompt = [1] + [rng.randrange(2, 500) for _ in range(rng.randrange(2, 25))]
        kind = i % 4
        if kind == 0:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 20), ignore_eos=True, logprobs=2)
        elif kind == 1:
            params = SamplingParams(temperature=0.9, seed=i, max_tokens=rng.randrange(4, 20), ignore_eos=True,
                                    frequency_penalty=0.4, presence_penalty=0.2)
        elif kind == 2:      # stops early on some token (a stop inside a call whose continuation is in flight)
            params = SamplingParams(temperature=0.7, seed=i, max_tokens=20, stop_token_ids=list(range(2, 200)))
        else:
            params = SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 20), stop=["a", "e"])
        work.append(({"prompt_token_ids": prompt}, params, loras[i % len(loras)]))
    return work


@pytest.mark.parametrize("kv_pages", [None, 17])
def test_async_scheduling_gives_the_outputs_of_synchronous_steps(world, kv_pages):
    """Dispatching each decode call before reading the previous one's samples changes nothing a user sees,
    with a batch full of waiting requests behind it, stops inside chained calls and (17 pages) preemptions."""
    kwargs = dict(page_size=4, num_kv_pages=kv_pages) if kv_pages else {}
    work = _async_workload(world)
    results = {}
    for mode in (False, True):
        llm_mode = make_llm(world[0], async_scheduling=mode, **kwargs)
        outs = llm_mode.generate([w[0] for w in work], [w[1] for w in work], [w[2] for w in work], use_tqdm=False)
        results[mode] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason,
                          o.outputs[0].stop_reason, o.outputs[0].logprobs) for o in outs]
        stats = llm_mode.llm_engine.stats
        assert (stats["chained_decode_steps"] > 0) == mode, stats
        if kv_pages:
            assert stats["preemptions"] > 0
        assert_idle(llm_mode)
    assert results[True] == results[False]
    assert any(r[2] == "stop" for r in results[True]) and any(r[2] == "length" for r in results[True])


def test_abort_while_a_decode_call_is_in_flight(world, llm):
    """A request aborted while its decode call (and the chained one) are on the device: its samples are
    dropped, its pages and slot come back, and the others finish as PEFT says."""
    engine, loras = llm.llm_engine, world[2]
    mix = [loras[0], None, loras[1]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params, lora) for p, lora in zip(PROMPTS, mix)]
    while engine._in_flight is None:
        engine.step()
    aborted = engine.abort(ids[1])
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    results = _run_all(engine)
    assert engine.stats["chained_decode_steps"] > 0
    assert ids[1] not in results
    for i in (0, 2):
        assert results[ids[i]].outputs[0].token_ids == reference_greedy(world, PROMPTS[i], mix[i], 16)
    assert_idle(llm)


def test_dummy_load_format_needs_no_weights(world, tmp_path):
    """load_format="dummy" (vLLM's benchmarking option): config and tokenizer only, random weights."""
    import shutil

    for name in ("config.json", "tokenizer.json"):
        shutil.copy(world[0] / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        make_llm(tmp_path)
    with pytest.raises(ValueError, match="load_format"):
        make_llm(tmp_path, load_format="pt")
    llm_dummy = make_llm(tmp_path, load_format="dummy", enable_lora=False)
    out = llm_dummy.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == GREEDY.max_tokens and out.finish_reason == "length"
    assert_idle(llm_dummy)


def test_a_failed_read_with_a_chained_call_in_flight_fails_the_running_requests(world, llm, monkeypatch):
    """Reading a decode call's samples raises while the call chained on it is queued: that call took the
    failed call's KV cache, so every running request fails, the cache is rebuilt, and the engine goes on."""
    engine, loras = llm.llm_engine, world[2]
    real_start, real_finish, chained, failed_once = engine.runner.start_decode, engine.runner.finish_decode, [], []

    def start_decode(chunks, num_steps, *, after=None):
        chained.append(after is not None)
        return real_start(chunks, num_steps, after=after)

    def finish_decode(call):
        if not failed_once and chained[-1]:         # the call just dispatched is chained on this one
            failed_once.append(1)
            raise RuntimeError("injected failure reading a decode call")
        return real_finish(call)

    monkeypatch.setattr(engine.runner, "start_decode", start_decode)
    monkeypatch.setattr(engine.runner, "finish_decode", finish_decode)
    mix = [loras[0], None, loras[1]]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ids = [engine.add_request(None, {"prompt_token_ids": p}, params, lora) for p, lora in zip(PROMPTS, mix)]
    results = _run_all(engine)
    assert failed_once and all(isinstance(results[i].error, RuntimeError) for i in ids)
    assert all(results[i].outputs[0].finish_reason == "abort" for i in ids)
    monkeypatch.undo()
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, lora_request=loras[0], use_tqdm=False)[0]
    assert out.outputs[0].token_ids == reference_greedy(world, PROMPTS[0], loras[0], 16)
    assert_idle(llm)


def test_plain_append_path_matches_the_per_token_stop_checks(world, llm):
    """Sequences without logprobs or stop strings take ``_append_plain`` (whole steps at once); with
    ``logprobs=0`` the same requests take the per-token ``_check_stop`` path. Greedy tokens are identical, so
    tokens, finish reasons, stop reasons and text must be too: length limits, stop tokens before and after
    min_tokens, EOS (here a token the model emits), ignore_eos, and both async modes."""
    engine, loras = llm.llm_engine, world[2]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    greedy = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], free,
                                                           lora_request=loras[1], use_tqdm=False)]
    variants = []
    for g in greedy:
        variants += [dict(max_tokens=7, ignore_eos=True),
                     dict(max_tokens=12, stop_token_ids=[g[2]], ignore_eos=True),
                     dict(max_tokens=12, stop_token_ids=[g[0], g[5]], min_tokens=4, ignore_eos=True),
                     dict(max_tokens=12, stop_token_ids=[g[0]], min_tokens=1, ignore_eos=True),
                     dict(max_tokens=12),                                  # EOS = g[3] (patched below)
                     dict(max_tokens=12, min_tokens=6),
                     dict(max_tokens=3, stop_token_ids=[g[2]], ignore_eos=True)]     # stop token at the length limit
    prompts = [{"prompt_token_ids": PROMPTS[i // 7]} for i in range(len(variants))]
    real_eos = engine.eos_token_ids
    engine.eos_token_ids = frozenset(real_eos | {g[3] for g in greedy})
    try:
        results = {}
        for logprobs in (None, 0):
            params = [SamplingParams(temperature=0.0, logprobs=logprobs, **v) for v in variants]
            outs = llm.generate(prompts, params, lora_request=loras[1], use_tqdm=False)
            results[logprobs] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
                                  o.outputs[0].text) for o in outs]
    finally:
        engine.eos_token_ids = real_eos
    assert results[None] == results[0]
    reasons = {r[1:3] for r in results[None]}
    assert ("length", None) in reasons and ("stop", None) in reasons and any(r[0] == "stop" and r[1] for r in reasons)
    assert_idle(llm)


def test_final_only_requests_report_once_and_cumulative_ones_stream(world, llm):
    """RequestOutputKind.FINAL_ONLY (what LLM.generate uses): ``step`` reports the request only when it is
    finished, with the full text; CUMULATIVE requests report after every step with the text so far."""
    from jmlora.engine.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    streamed = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    final = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind="final_only")
    a = engine.add_request(None, {"prompt_token_ids": PROMPTS[0]}, streamed)
    b = engine.add_request(None, {"prompt_token_ids": PROMPTS[0]}, final)
    seen = {a: [], b: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen[b]) == 1 and seen[b][0].finished and len(seen[a]) > 2
    assert final.output_kind is RequestOutputKind.FINAL_ONLY
    texts = [o.outputs[0].text for o in seen[a]]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))     # streamed, never retracted
    assert seen[a][-1].outputs[0].text == seen[b][0].outputs[0].text == engine.tokenizer.decode(
        seen[b][0].outputs[0].token_ids, skip_special_tokens=True)
    assert_idle(llm)


def test_progress_bar_reports_the_speed_like_vllm(world, llm, capsys):
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], GREEDY, use_tqdm=True)
    assert all(o.finished for o in outs)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "est. speed input:" in err and "output:" in err
    assert_idle(llm)


def test_a_chained_decode_call_reuses_the_executable_of_the_first(world):
    """The chained call's tokens come from the device; its inputs have the shardings of a host-fed call, so it
    runs the same executable (warm-up and start-up compile each decode bucket once)."""
    from jmlora.engine.scheduler import ScheduledChunk
    from jmlora.engine.sequence import Sequence

    runner = make_llm(world[0], warmup=False).llm_engine.runner
    seqs = [Sequence("probe", [1, 2, 3], params=GREEDY) for _ in range(3)]
    for seq in seqs:
        seq.sampling_seed = 0
    first = runner.start_decode([ScheduledChunk(s, 2, 1, True) for s in seqs], 3)     # compiles
    with counting_compiles() as compiles:
        chained = runner.start_decode([ScheduledChunk(s, 5, 1, True) for s in seqs], 3, after=first)
        runner.finish_decode(first)
        runner.finish_decode(chained)
    assert not compiles
