import pytest

from parityrl.core.errors import UserError
from parityrl.core.sampling import SamplingConfig, from_vllm, make_sampling


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -3}, "top_k must be 0"),
        ({"temperature": 0.0, "top_k": 5}, "greedy sampling"),
    ],
)
def test_bad_sampling_is_one_clear_error(kwargs, message):
    with pytest.raises(UserError, match=None) as info:
        make_sampling(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_vllm_processing_step_is_spelled_out(monkeypatch):
    # Values equal to vLLM's defaults prove nothing: check what is *passed*, by name.
    import vllm

    passed: dict = {}
    real = vllm.SamplingParams

    def spy(**kwargs):
        passed.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(vllm, "SamplingParams", spy)
    params = SamplingConfig(temperature=0.7, top_p=0.9, top_k=20, max_tokens=8).to_vllm(seed=1)
    every_step = {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "frequency_penalty", "presence_penalty", "min_tokens", "logit_bias",
                  "allowed_token_ids", "bad_words", "logprobs", "seed", "stop_token_ids"}
    assert every_step <= set(passed), every_step - set(passed)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.9, 20)
    assert params.logprobs == 0 and params.seed == 1


@pytest.mark.parametrize(
    "field, value",
    [("repetition_penalty", 1.1), ("presence_penalty", 0.5), ("frequency_penalty", 0.5),
     ("min_p", 0.05), ("min_tokens", 3), ("logit_bias", {5: 1.0})],
)
def test_unreproducible_vllm_params_are_refused(field, value):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.7, **{field: value})
    with pytest.raises(UserError, match=field):
        from_vllm(params)


def test_reproducible_vllm_params_convert():
    from vllm import SamplingParams

    cfg = from_vllm(SamplingParams(temperature=0.5, top_p=0.8, top_k=7, max_tokens=9))
    assert cfg == SamplingConfig(temperature=0.5, top_p=0.8, top_k=7, max_tokens=9)
