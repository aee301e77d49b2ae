"""Tasks: deterministic problem streams, a held-out split that never leaks, and rewards."""

from __future__ import annotations

import json
import re
import threading

import pytest
from pydantic import TypeAdapter, ValidationError

from parityrl.core.errors import UserError
from parityrl.tasks.arithmetic import ArithmeticConfig, ArithmeticTask
from parityrl.tasks.base import Problem
from parityrl.tasks.jsonl import JsonlConfig, JsonlTask
from parityrl.tasks.registry import TaskConfig, build_task, load_reward_fn

# --- arithmetic ---


def arith(**kw) -> ArithmeticTask:
    return ArithmeticTask(ArithmeticConfig(**kw))


def test_train_problem_is_a_pure_function_of_config_and_index():
    a, b = arith(ops=["+", "-", "*"]), arith(ops=["+", "-", "*"])
    order = [7, 3, 1000, 0, 3]
    # Same index → same problem, whatever was asked before (resume from any data position).
    backwards = [b.train_problem(i) for i in reversed(order)]
    assert [a.train_problem(i) for i in order] == backwards[::-1]
    assert a.train_problem(42).index == 42


def test_different_seeds_give_different_streams():
    s0 = [arith(seed=0).train_problem(i).prompt for i in range(50)]
    s1 = [arith(seed=1).train_problem(i).prompt for i in range(50)]
    assert s0 != s1
    assert len(set(s0)) > 40  # the stream is not stuck on a few problems


@pytest.mark.parametrize(
    "kw",
    [
        dict(digits=2, ops=["+", "-", "*"]),  # small space: enumerated
        dict(digits=4, ops=["+", "*"]),  # large space: sampled
    ],
)
def test_no_train_problem_is_held_out(kw):
    task = arith(**kw)
    eval_prompts = {p.prompt for p in task.eval_problems()}
    assert len(eval_prompts) == task.config.eval_size
    train_prompts = {task.train_problem(i).prompt for i in range(5000)}
    assert not train_prompts & eval_prompts


def test_train_never_produces_any_held_out_problem():
    # eval_size above the held-out count → eval_problems is the whole held-out set.
    task = arith(digits=2, eval_size=10_000)
    held = {p.prompt for p in task.eval_problems()}
    assert 0.05 * 10_000 < len(held) < 0.15 * 10_000  # about eval_fraction of the 100*100 problems
    train = {task.train_problem(i).prompt for i in range(5000)}
    assert len(train) > 3000 and not train & held


def test_eval_set_size_distinct_deterministic_and_indexed():
    task = arith(digits=3, eval_size=50)
    evals = task.eval_problems()
    assert len(evals) == 50
    assert len({p.prompt for p in evals}) == 50
    assert [p.index for p in evals] == list(range(50))
    assert evals == arith(digits=3, eval_size=50).eval_problems()
    assert evals != arith(digits=3, eval_size=50, seed=1).eval_problems()


def test_eval_set_smaller_than_eval_size_returns_all_held_out():
    task = arith(digits=1, eval_size=200)  # 100 problems, ~10 held out
    evals = task.eval_problems()
    assert 0 < len(evals) < 30
    assert len({p.prompt for p in evals}) == len(evals)


def test_prompt_format_and_answers():
    task = arith(digits=3, second_digits=1, ops=["+", "-", "*"], allow_negative=True)
    for i in range(500):
        p = task.train_problem(i)
        m = re.fullmatch(r"(\d{1,3})([+\-*])(\d)=", p.prompt)
        assert m, p.prompt
        a, op, b = int(m[1]), m[2], int(m[3])
        assert int(p.answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert p.prompt.isascii() and " " not in p.prompt


def test_subtraction_without_negatives_is_never_negative():
    task = arith(digits=2, ops=["-"])
    answers = [int(task.train_problem(i).answer) for i in range(2000)]
    answers += [int(p.answer) for p in task.eval_problems()]
    assert min(answers) >= 0


def test_subtraction_with_negatives_can_be_negative():
    task = arith(digits=2, ops=["-"], allow_negative=True)
    assert any(int(task.train_problem(i).answer) < 0 for i in range(200))


def test_multiplication():
    task = arith(digits=2, ops=["*"])
    p = task.train_problem(0)
    a, b = map(int, p.prompt[:-1].split("*"))
    assert p.answer == str(a * b)
    assert task.reward(p, str(a * b)) == 1.0


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("19", 1.0),
        ("  19", 1.0),  # leading whitespace
        ("19\n3+4=7", 1.0),  # trailing junk after the integer
        ("19abc", 1.0),
        ("019", 1.0),  # same integer
        ("18", 0.0),
        ("190", 0.0),
        ("-19", 0.0),
        ("", 0.0),
        ("   ", 0.0),
        ("abc19", 0.0),  # not a leading integer
        ("x", 0.0),
    ],
)
def test_arithmetic_reward_parsing(completion, expected):
    p = Problem(index=0, prompt="12+7=", answer="19")
    assert arith().reward(p, completion) == expected


def test_arithmetic_reward_negative_answer():
    p = Problem(index=0, prompt="3-10=", answer="-7")
    task = arith(ops=["-"], allow_negative=True)
    assert task.reward(p, "-7") == 1.0
    assert task.reward(p, " -7\n") == 1.0
    assert task.reward(p, "7") == 0.0
    assert task.reward(p, "-") == 0.0


def test_arithmetic_config_validation():
    with pytest.raises(ValidationError):
        ArithmeticConfig(digits=7)
    with pytest.raises(ValidationError):
        ArithmeticConfig(ops=["/"])
    with pytest.raises(ValidationError):
        ArithmeticConfig(nonsense=1)  # extra="forbid"


# --- held-out evaluation: pass@k ---


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 5, 3), (5, 2, 5),
                                     (8, 3, 1), (8, 3, 4), (10, 1, 9), (16, 7, 8), (200, 13, 50)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    import math

    from parityrl.rollouts.evaluate import pass_at_k

    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    if k == 1:
        assert pass_at_k(n, c, k) == pytest.approx(c / n)
    assert pass_at_k(n, 0, k) == 0.0 and pass_at_k(n, n, k) == 1.0
    assert all(pass_at_k(n, c, j) <= pass_at_k(n, c, j + 1) + 1e-12 for j in range(1, n))
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


# --- registry ---


def test_registry_builds_tasks_from_discriminated_config(tmp_path):
    adapter = TypeAdapter(TaskConfig)
    task = build_task(adapter.validate_python({"type": "arithmetic", "digits": 1}))
    assert isinstance(task, ArithmeticTask) and task.name == "arithmetic"

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    task = build_task(adapter.validate_python({"type": "jsonl", "path": str(path)}))
    assert isinstance(task, JsonlTask) and task.name == "jsonl"

    with pytest.raises(ValidationError):
        adapter.validate_python({"type": "nope"})


# --- jsonl ---


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def rows_file(tmp_path) -> str:
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(20)]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_jsonl_split_holds_out_the_tail(rows_file):
    task = JsonlTask(JsonlConfig(path=rows_file, eval_fraction=0.1))
    assert [p.prompt for p in task.eval_problems()] == ["q18", "q19"]
    assert [p.index for p in task.eval_problems()] == [0, 1]
    train = {task.train_problem(i).prompt for i in range(100)}
    assert train == {f"q{i}" for i in range(18)}


def test_jsonl_small_files_hold_out_at_least_one_row(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    two = write_jsonl(tmp_path / "two.jsonl", rows)
    task = JsonlTask(JsonlConfig(path=two, eval_fraction=0.1))
    assert [p.prompt for p in task.eval_problems()] == ["b"]
    assert {task.train_problem(i).prompt for i in range(5)} == {"a"}

    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "answer": "1"}])
    task = JsonlTask(JsonlConfig(path=one))
    assert task.eval_problems() == [] and task.train_problem(3).prompt == "a"


def test_jsonl_eval_path(rows_file, tmp_path):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "held", "answer": "0"}])
    task = JsonlTask(JsonlConfig(path=rows_file, eval_path=eval_file))
    assert [p.prompt for p in task.eval_problems()] == ["held"]
    assert {task.train_problem(i).prompt for i in range(20)} == {f"q{i}" for i in range(20)}


def test_jsonl_epochs_are_permutations_and_deterministic(rows_file):
    cfg = JsonlConfig(path=rows_file, eval_path=rows_file, seed=3)
    task = JsonlTask(cfg)
    epoch0 = [task.train_problem(i).prompt for i in range(20)]
    epoch1 = [task.train_problem(i).prompt for i in range(20, 40)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"q{i}" for i in range(20))
    assert epoch0 != epoch1  # reshuffled each epoch
    # Pure function of index: a fresh task asked out of order agrees.
    fresh = JsonlTask(cfg)
    asked = [fresh.train_problem(i).prompt for i in (25, 3, 39)]
    assert asked == [epoch1[5], epoch0[3], epoch1[19]]
    other_seed = JsonlTask(cfg.model_copy(update={"seed": 4}))
    assert [other_seed.train_problem(i).prompt for i in range(20)] != epoch0


def test_jsonl_no_shuffle_keeps_file_order(rows_file):
    task = JsonlTask(JsonlConfig(path=rows_file, eval_path=rows_file, shuffle=False))
    expected = [f"q{i}" for i in range(20)] + ["q0", "q1"]
    assert [task.train_problem(i).prompt for i in range(22)] == expected


def test_jsonl_prompt_template_uses_row_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2", "answer": 4, "topic": "sums"}] * 2)
    task = JsonlTask(JsonlConfig(path=path, prompt_template="[{topic}] {prompt} ="))
    p = task.train_problem(0)
    assert p.prompt == "[sums] 2+2 =" and p.answer == "4"  # non-string answers become strings


@pytest.mark.parametrize(
    "answer, completion, expected",
    [
        ("42", "42", 1.0),
        ("42", "The answer is 42", 1.0),
        ("42", "41", 0.0),
        ("42", "", 0.0),
        ("42", "no idea", 0.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("\\frac{1}{2}", "so the result is $\\boxed{\\frac{1}{2}}$", 1.0),
        ("0.5", "1/2", 1.0),
        ("\\sqrt{2}", "$\\sqrt{2}$", 1.0),  # bare LaTeX gold only parses when wrapped in $...$
        ("\\sqrt{2}", "1.41", 0.0),
        ("yes", " yes ", 1.0),  # not math: exact match after strip
    ],
)
def test_math_verify_reward(rows_file, answer, completion, expected):
    task = JsonlTask(JsonlConfig(path=rows_file))
    assert task.reward(Problem(index=0, prompt="q", answer=answer), completion) == expected


def test_math_verify_reward_in_a_worker_thread(rows_file):
    # math-verify's default timeouts use SIGALRM, which raises outside the main thread.
    task = JsonlTask(JsonlConfig(path=rows_file))
    results: list[float] = []
    errors: list[BaseException] = []

    def work():
        try:
            problem = Problem(index=0, prompt="q", answer="\\frac{1}{2}")
            results.append(task.reward(problem, "The answer is 0.5"))
            results.append(task.reward(problem, "0.25"))
        except BaseException as e:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(e)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=60)
    assert not errors and results == [1.0, 0.0]


def test_math_verify_failure_gives_zero(rows_file, monkeypatch):
    import parityrl.tasks.jsonl as jsonl_mod

    def boom(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(jsonl_mod, "verify", boom)
    task = JsonlTask(JsonlConfig(path=rows_file))
    assert task.reward(Problem(index=0, prompt="q", answer="42"), "The answer is 42") == 0.0


def test_custom_reward_by_import_path(rows_file, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def exact(prompt, completion, answer):\n"
        "    return 1.0 if completion.strip() == answer and prompt.startswith('q') else 0.0\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = JsonlTask(JsonlConfig(path=rows_file, reward="my_rewards:exact"))
    p = task.train_problem(0)
    assert task.reward(p, p.answer + "\n") == 1.0
    assert task.reward(p, p.answer + "0") == 0.0
    assert load_reward_fn("my_rewards:exact")("q", "1", "1") == 1.0


# --- user errors: one line, naming the problem ---


def assert_user_error(match: str, fn, *args, **kwargs):
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(match, message), message


def test_jsonl_user_errors(tmp_path):
    def build(**kw):
        return JsonlTask(JsonlConfig(**kw))

    missing = str(tmp_path / "missing.jsonl")
    assert_user_error(r"missing\.jsonl: no such file", build, path=missing)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    assert_user_error(r"bad\.jsonl:2: invalid JSON", build, path=str(bad))

    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}]
    no_answer = write_jsonl(tmp_path / "no_answer.jsonl", rows)
    assert_user_error(r'no_answer\.jsonl:2: row has no "answer" key', build, path=no_answer)

    no_prompt = write_jsonl(tmp_path / "no_prompt.jsonl", [{"question": "a", "answer": "1"}])
    assert_user_error(r'no_prompt\.jsonl:1: row has no "prompt" key', build, path=no_prompt)

    not_object = write_jsonl(tmp_path / "list.jsonl", [["a", "1"]])
    assert_user_error(r"list\.jsonl:1: expected a JSON object", build, path=not_object)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    assert_user_error(r"empty\.jsonl: no rows", build, path=str(empty))

    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "1"}])
    bad_template = dict(path=ok, prompt_template="{topic}")
    assert_user_error(r"ok\.jsonl:1: prompt_template .*'topic'", build, **bad_template)
    no_eval = dict(path=ok, eval_path=str(tmp_path / "eval.jsonl"))
    assert_user_error(r"eval\.jsonl: no such file", build, **no_eval)


def test_reward_import_path_errors(tmp_path, monkeypatch):
    (tmp_path / "rewards_mod.py").write_text("NOT_CALLABLE = 3\n")
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    expected = r"expected \"math_verify\" or \"package\.module:function\""
    assert_user_error(expected, load_reward_fn, "exact_match")
    assert_user_error(r"cannot import 'no_such_module_xyz'", load_reward_fn, "no_such_module_xyz:f")
    broken = r"cannot import 'broken_mod'.*RuntimeError: oops"
    assert_user_error(broken, load_reward_fn, "broken_mod:f")
    assert_user_error(r"has no attribute 'missing'", load_reward_fn, "rewards_mod:missing")
    assert_user_error(r"'NOT_CALLABLE' is not callable", load_reward_fn, "rewards_mod:NOT_CALLABLE")

    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "1"}])
    with pytest.raises(UserError, match="no_such_module_xyz"):
        JsonlTask(JsonlConfig(path=ok, reward="no_such_module_xyz:f"))


# --- chat formats ---

def test_arithmetic_chat_variant_asks_in_words_and_reads_the_last_number():
    task = ArithmeticTask(ArithmeticConfig(chat_template=True, system="Be brief."))
    p = task.train_problem(0)
    a, op, b = p.meta["a"], p.meta["op"], p.meta["b"]
    assert p.messages == ({"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {a} {op} {b}? Reply with just the number."})
    assert task.reward(p, f"{a} {op} {b} = {p.answer}.") == 1.0
    assert task.reward(p, f"The answer is {int(p.answer) + 1}") == 0.0
    assert task.reward(p, "I do not know") == 0.0
    plain = ArithmeticTask(ArithmeticConfig()).train_problem(0)
    assert plain.messages is None and plain.prompt.endswith("=")


def test_jsonl_chat_rows_messages_prompt_system_and_gsm8k(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}],
         "answer": 1},
        {"prompt": "Q2", "system": "T", "answer": "2"},
        {"prompt": "Q3", "answer": "3"},
    ]
    task = JsonlTask(JsonlConfig(path=write_jsonl(tmp_path / "c.jsonl", rows), eval_fraction=0,
                                 chat_template=True, shuffle=False))
    p1, p2, p3 = (task.train_problem(i) for i in range(3))
    assert p1.prompt == "Q1" and p1.messages[0] == {"role": "system", "content": "S"}
    assert p2.messages == ({"role": "system", "content": "T"}, {"role": "user", "content": "Q2"})
    assert p3.messages == ({"role": "user", "content": "Q3"},)
    gsm = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"}]
    cfg = JsonlConfig(path=write_jsonl(tmp_path / "g.jsonl", gsm * 2), prompt_field="question",
                      answer_regex=r"####\s*(.+)$", chat_template=True, system="Think, then answer.")
    p = JsonlTask(cfg).train_problem(0)
    assert p.answer == "7" and p.prompt.startswith("Tom has")
    assert p.messages[0] == {"role": "system", "content": "Think, then answer."}


def test_jsonl_template_may_use_any_field_without_a_prompt_key(tmp_path):
    rows = [{"question": "2+2", "answer": "4", "topic": "sums"}] * 2
    task = JsonlTask(JsonlConfig(path=write_jsonl(tmp_path / "t.jsonl", rows),
                                 prompt_template="[{topic}] {question} ="))
    assert task.train_problem(0).prompt == "[sums] 2+2 ="


def test_jsonl_chat_errors(tmp_path):
    def build(**kw):
        return JsonlTask(JsonlConfig(**kw))

    msgs = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "q"}],
                                               "answer": "1"}])
    assert_user_error(r"m\.jsonl:1: .*needs task\.chat_template", build, path=msgs)
    bad = write_jsonl(tmp_path / "b.jsonl", [{"messages": "hi", "answer": "1"}])
    assert_user_error(r'b\.jsonl:1: "messages" must be', build, path=bad, chat_template=True)
    gsm = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    assert_user_error(r"g\.jsonl:1: answer_regex", build, path=gsm, prompt_field="question",
                      answer_regex=r"####\s*(.+)$")


def test_encode_problem_renders_the_chat_template_once():
    from parityrl.models.tiny import build_tokenizer
    from parityrl.tasks.prompts import encode_problem, render_text

    tok = build_tokenizer()
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}:{{ m['content'] }}<eos>"
                         "{% endfor %}{% if add_generation_prompt %}<bos>assistant:{% endif %}")
    p = ArithmeticTask(ArithmeticConfig(chat_template=True, chat_prompt="{a}{op}{b}?")).train_problem(0)
    text = render_text(tok, list(p.messages), True)
    assert text == f"<bos>user:{p.prompt}<eos><bos>assistant:"
    ids = encode_problem(tok, p)
    assert ids.count(tok.bos_token_id) == 2  # the template's own, none added on top
    assert tok.decode(ids) == text
    plain = ArithmeticTask(ArithmeticConfig()).train_problem(0)
    assert tok.decode(encode_problem(tok, plain)) == plain.prompt


# --- bad input: one line naming file:line, never a traceback ----------------------------------

@pytest.mark.parametrize("raw, fragment", [
    (b'{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \xff}\n', r"b\.jsonl:2: not UTF-8"),
    (b'{"prompt": 5, "answer": "1"}\n', r'b\.jsonl:1: "prompt" must be a string'),
    (b'{"prompt": "a", "answer": [1]}\n', r'b\.jsonl:1: "answer" must be a string or a number'),
    (b'{"prompt": "a", "answer": true}\n', r'b\.jsonl:1: "answer" must be a string or a number'),
    (b'{"prompt": "a", "answer": "1"\n', r"b\.jsonl:1: invalid JSON"),
    (b"\n\n   \n", r"b\.jsonl: no rows"),
    (b"", r"b\.jsonl: no rows"),
    (b'"just a string"\n', r"b\.jsonl:1: expected a JSON object, got str"),
])
def test_jsonl_bad_input_is_one_line_with_its_location(tmp_path, raw, fragment):
    path = tmp_path / "b.jsonl"
    path.write_bytes(raw)
    assert_user_error(fragment, lambda: JsonlTask(JsonlConfig(path=str(path))))


def test_jsonl_bom_crlf_and_very_long_lines_are_read(tmp_path):
    long_prompt = "x" * 2_000_000
    raw = ('\ufeff{"prompt": "a", "answer": "1"}\r\n'
           + json.dumps({"prompt": long_prompt, "answer": "2"}) + "\r\n").encode()
    path = tmp_path / "ok.jsonl"
    path.write_bytes(raw)
    task = JsonlTask(JsonlConfig(path=str(path), eval_fraction=0, shuffle=False))
    assert task.train_problem(0).prompt == "a" and task.train_problem(0).answer == "1"
    assert task.train_problem(1).prompt == long_prompt


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROW_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                       st.lists(st.integers(), max_size=2))
ROWS = st.dictionaries(st.sampled_from(["prompt", "answer", "messages", "system", "q"]),
                       ROW_VALUES, max_size=4)
LINES = st.one_of(ROWS.map(json.dumps), st.text(max_size=30),
                  st.binary(max_size=30).map(lambda b: b.decode("latin-1")))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, max_size=5), raw=st.binary(max_size=40), chat=st.booleans())
def test_any_jsonl_file_gives_problems_or_one_line_error(tmp_path, lines, raw, chat):
    path = tmp_path / "h.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass") + raw)
    try:
        task = JsonlTask(JsonlConfig(path=str(path), eval_fraction=0, chat_template=chat))
    except UserError as e:
        assert "\n" not in str(e) and str(e).startswith(str(path))
    else:
        assert all(isinstance(task.train_problem(i).prompt, str) for i in range(len(task.train)))


# --- hf_dataset: a local Hugging Face dataset and TRL-signature reward functions -------------

def _parquet(path, rows):
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def _hf_task(path, *funcs, **extra):
    from parityrl.tasks.hf_dataset import HFDatasetConfig, HFDatasetTask

    return HFDatasetTask(HFDatasetConfig(path=str(path), reward_funcs=list(funcs), **extra))


def test_trl_reward_functions_get_what_trl_passes_them(tmp_path, plugins_importable):
    """Plain-text and conversational prompts from parquet and from a saved dataset folder; each
    function called once per group with TRL's keyword arguments and every other column."""
    import trl_rewards
    from datasets import Dataset

    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1), "level": a % 3} for a in range(10)]
    task = _hf_task(_parquet(tmp_path / "plain.parquet", rows), "trl_rewards:seen_calls",
                    "trl_rewards:exact_answer", reward_weights=[1.0, 2.0], shuffle=False)
    assert len(task.train) == 9 and len(task.eval) == 1  # eval_fraction 0.1, from the end
    problem = task.train_problem(3)
    assert problem.prompt == "3+1=" and problem.messages is None
    trl_rewards.CALLS.clear()
    rewards = task.rewards(problem, ["4", "5"], [[9, 10], [11]])
    assert rewards == [2.0, 0.0]  # None from seen_calls is left out (TRL's nansum)
    (call,) = trl_rewards.CALLS
    assert call["prompts"] == ["3+1=", "3+1="] and call["completions"] == ["4", "5"]
    assert call["completion_ids"] == [[9, 10], [11]] and call["answer"] == ["4", "4"]
    assert call["columns"] == ["level"]  # every other column, as a list a completion

    chat = [{"prompt": [{"role": "system", "content": "Add."},
                        {"role": "user", "content": f"{a}+1="}], "answer": str(a + 1)}
            for a in range(4)]
    Dataset.from_list(chat).save_to_disk(str(tmp_path / "saved"))
    task = _hf_task(tmp_path / "saved", "trl_rewards:exact_answer", eval_fraction=0.0,
                    shuffle=False)
    problem = task.train_problem(1)
    assert problem.messages[0]["role"] == "system" and problem.prompt == "1+1="
    assert task.rewards(problem, ["2", "3"]) == [1.0, 0.0]  # completions as assistant messages


@pytest.mark.parametrize("funcs, fragment", [
    (["trl_rewards:not_trl"], "does not take TRL's arguments"),
    (["trl_rewards:needs_solution"], "needs column 'solution'"),
    (["trl_rewards:nowhere"], "has no attribute 'nowhere'"),
])
def test_a_wrong_reward_signature_or_a_missing_column_is_one_line(tmp_path, plugins_importable,
                                                                  funcs, fragment):
    from parityrl.core.errors import UserError

    path = _parquet(tmp_path / "d.parquet", [{"prompt": "1+1=", "answer": "2"}] * 3)
    with pytest.raises(UserError, match=fragment) as caught:
        _hf_task(path, *funcs)
    assert "\n" not in str(caught.value)


def test_a_dataset_that_is_not_there_or_has_no_prompt_is_one_line(tmp_path):
    from parityrl.core.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        _hf_task(tmp_path / "missing.parquet", "trl_rewards:digit_share")
    path = _parquet(tmp_path / "q.parquet", [{"question": "1+1=", "answer": "2"}] * 3)
    with pytest.raises(UserError, match="no 'prompt' column"):
        _hf_task(path, "trl_rewards:digit_share")


@pytest.mark.slow
def test_a_parquet_dataset_and_trl_reward_functions_drive_a_parityrl_run(tiny_model, tmp_path,
                                                                         plugins_importable):
    """A TRL user's inputs unchanged: parquet rows and two TRL-signature rewards, weighted."""
    from helpers import digit_share_config

    from parityrl.config import build_config
    from parityrl.pipeline import run_training
    from parityrl.runlog import read_metrics

    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10, 30) for b in range(3)]
    path = _parquet(tmp_path / "train.parquet", rows)
    cfg = digit_share_config(tiny_model, path, max_steps=2, mode="sync")
    cfg["task"] = {"type": "hf_dataset", "path": str(path),
                   "reward_funcs": ["trl_rewards:digit_share", "trl_rewards:exact_answer"],
                   "reward_weights": [1.0, 5.0]}
    run_training(build_config(cfg), tmp_path / "run", on_message=lambda m: None)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 < r["rl/reward_mean"] for r in rows)
    assert all(r["mismatch/max_abs_diff"] <= 1e-5 for r in rows)
