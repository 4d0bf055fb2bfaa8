"""SamplingParams: vLLM defaults, normalisation, and a ValueError naming the field for every bad value."""

import dataclasses
import math

import numpy as np
import pytest

from jmlora.engine.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams
from jmlora.outputs import CompletionOutput, Logprob, RequestOutput

VLLM_DEFAULTS = dict(
    n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, max_tokens=16, min_tokens=0, stop=(),
    stop_token_ids=(), ignore_eos=False, include_stop_str_in_output=False, logprobs=None, prompt_logprobs=None,
    presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, skip_special_tokens=True,
    output_kind=RequestOutputKind.CUMULATIVE,
)


def test_defaults_match_vllm():
    p = SamplingParams()
    assert {f.name: getattr(p, f.name) for f in dataclasses.fields(p)} == VLLM_DEFAULTS
    assert not p.greedy and not p.needs_penalties and p.output_text_buffer_length == 0


@pytest.mark.parametrize("field, value", [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.0), ("top_k", None),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.0), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.5),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 0.5),
    ("logprobs", -1), ("logprobs", MAX_LOGPROBS + 1), ("logprobs", 2.0),
    ("prompt_logprobs", -1), ("prompt_logprobs", MAX_LOGPROBS + 1),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", -3.0), ("frequency_penalty", math.inf),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("include_stop_str_in_output", "yes"), ("skip_special_tokens", None),
    ("output_kind", "delta"), ("output_kind", None),
])
def test_invalid_value_is_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} ") as err:
        SamplingParams(**{field: value})
    assert repr(value) in str(err.value) or field in ("stop", "stop_token_ids")


def test_greedy_with_n_above_one_is_refused_as_in_vllm():
    with pytest.raises(ValueError, match="^n "):
        SamplingParams(n=2, temperature=0.0)
    assert SamplingParams(n=2, temperature=0.5).n == 2


def test_edge_values_accepted():
    p = SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, max_tokens=None, min_tokens=5,
                       logprobs=MAX_LOGPROBS, prompt_logprobs=0, presence_penalty=-2, frequency_penalty=2,
                       repetition_penalty=1e-3, seed=-(2**70))
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float) and p.max_tokens is None
    np_p = SamplingParams(top_k=np.int64(3), temperature=np.float32(0.5), seed=np.int32(4))
    assert type(np_p.top_k) is int and type(np_p.seed) is int and type(np_p.temperature) is float


def test_normalisation_of_stop_and_stop_token_ids():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[5, 2, 5, 7]).stop_token_ids == (5, 2, 7)
    assert SamplingParams(stop=["a", "bcd"]).output_text_buffer_length == 2
    assert SamplingParams(stop=["a", "bcd"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_greedy_property_and_penalty_flag():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(temperature=0.9, top_k=1).greedy
    assert not SamplingParams(temperature=0.9, top_k=2).greedy
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=-0.5).needs_penalties


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5
    assert dataclasses.replace(SamplingParams(stop="x"), temperature=0.5).stop == ("x",)


def test_output_types_have_vllm_fields():
    lp = Logprob(-0.5, 1, "a")
    c = CompletionOutput(index=0, text="a", token_ids=[3], cumulative_logprob=-0.5, logprobs=[{3: lp}],
                         finish_reason="length", stop_reason=None)
    r = RequestOutput(request_id="0", prompt="p", prompt_token_ids=[1, 2], prompt_logprobs=[None, {2: lp}],
                      outputs=[c], finished=True)
    assert c.finished() and r.lora_request is None and r.outputs[0].logprobs[0][3].decoded_token == "a"
    assert not dataclasses.replace(c, finish_reason=None).finished()


def test_output_kind_accepts_the_enum_or_its_value():
    assert SamplingParams(output_kind="final_only").output_kind is RequestOutputKind.FINAL_ONLY
    assert SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY).output_kind is RequestOutputKind.FINAL_ONLY
