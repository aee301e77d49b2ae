"""The doctor as a library: its options refused in the command line's words (no engine), and the
prompt files it reads."""

from __future__ import annotations

import json

import pytest

from parityrl.core.errors import UserError
from parityrl.doctor.config import DoctorConfig, parse_config
from parityrl.tasks.prompt_file import read_prompts


@pytest.mark.parametrize("options, message", [
    ({"compare_dtypes": True, "bitwise": True, "dtype": "float16"},
     "--compare-dtypes runs the last rung in each dtype; leave out --bitwise, --dtype"),
    ({"bitwise": True, "dtype": "bfloat16"}, "--bitwise is audited in float32 only, not bfloat16"),
    ({"lora": 4, "weight_transport": "gloo"}, "--lora pushes adapters as PEFT folders on this "
                                              "host: use --weight-transport shm_file"),
    ({"weight_transport": "nccl"}, "unknown --weight-transport 'nccl'; choose shm_file or gloo"),
    ({"tol": -1.0}, "--tol must be >= 0, got -1.0"),
    ({"withhold": ["nothing"]}, "cannot withhold nothing; choose from processed-logprobs"),
    ({"temperature": 0.0, "top_k": 5}, "greedy sampling (temperature 0) cannot be combined"),
    ({"dtype": "float8"}, "unknown dtype 'float8'; choose one of float32, bfloat16, float16"),
    ({"model": "/nonexistent/model"}, "model folder not found: /nonexistent/model"),
    ({"nope": 1}, "nope: Extra inputs are not permitted"),
])
def test_the_doctor_refuses_what_it_cannot_run_in_one_line(options, message):
    with pytest.raises(UserError) as refused:
        parse_config({"model": "builtin:tiny", **options})  # a built-in name: nothing is built
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_doctor_options_sample_as_they_say():
    config = DoctorConfig(model="builtin:tiny", temperature=0.5, top_p=0.9, max_tokens=8,
                          withhold=["weight-sync"])
    assert config.withhold == ("weight-sync",)
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k,
            config.sampling.max_tokens) == (0.5, 0.9, 0, 8)


def test_prompt_files_are_text_lines_or_jsonl_rows(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("\ufeffone\n\n  \ntwo\n", encoding="utf-8")
    assert read_prompts(text) == ["one", "two"]
    rows = tmp_path / "p.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [
        {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "a", "system": "s"},
        {"prompt": "b"}]))
    assert read_prompts(rows) == [[{"role": "user", "content": "hi"}],
                                  [{"role": "system", "content": "s"},
                                   {"role": "user", "content": "a"}], "b"]
    rows.write_text('{"prompt": "a"}\n{"messages": []}\n')
    with pytest.raises(UserError, match='p.jsonl:2: expected an object with "messages"'):
        read_prompts(rows)
