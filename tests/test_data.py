"""Prompt loading (jsonl, parquet), its errors, built-in tasks and rule rewards."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fusedrl.algorithms.rewards import arithmetic_reward, load_reward_fn
from fusedrl.data import DataError, PromptRecord, arithmetic_task, format_prompt, load_prompts

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(params=["jsonl", "parquet"])
def write(request, tmp_path):
    """Write rows in the parametrised format and return the path."""
    writer = write_jsonl if request.param == "jsonl" else write_parquet
    return lambda rows, name="data": writer(tmp_path / f"{name}.{request.param}", rows)


# ----------------------------------------------------------------------------- loading


def test_load_prompt_and_label(write):
    path = write(
        [{"prompt": "What is 1+2?", "label": "3", "extra": 1}, {"prompt": "Hello", "label": "x"}]
    )
    assert load_prompts(path) == [PromptRecord("What is 1+2?", "3"), PromptRecord("Hello", "x")]
    ints = write([{"prompt": "a", "label": 3}, {"prompt": "b", "label": -7}], name="ints")
    assert [r.label for r in load_prompts(ints)] == ["3", "-7"]  # labels become strings


def test_labels_optional(write):
    path = write([{"prompt": "a"}, {"prompt": "b"}])
    assert load_prompts(path) == [PromptRecord("a", None), PromptRecord("b", None)]
    assert load_prompts(path, label_key=None) == [PromptRecord("a"), PromptRecord("b")]


def test_nested_keys_verl_style(write):
    rows = [
        {"question": {"text": "q1"}, "reward_model": {"style": "rule", "ground_truth": "42"}},
        {"question": {"text": "q2"}, "reward_model": {"style": "rule", "ground_truth": "-1"}},
    ]
    path = write(rows)
    got = load_prompts(path, prompt_key="question.text", label_key="reward_model.ground_truth")
    assert got == [PromptRecord("q1", "42"), PromptRecord("q2", "-1")]


def test_chat_messages_kept(write):
    path = write([{"prompt": CHAT, "label": "x"}])
    (rec,) = load_prompts(path)
    assert rec.prompt == CHAT and rec.label == "x"


def test_custom_keys_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "one", "a": 1}\n\n   \n{"q": "two", "a": 2}\n')
    assert load_prompts(path, prompt_key="q", label_key="a") == [
        PromptRecord("one", "1"),
        PromptRecord("two", "2"),
    ]


# ----------------------------------------------------------------------------- errors


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        load_prompts(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in one_line(e)


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"unknown dataset extension '\.csv'") as e:
        load_prompts(path)
    assert str(path) in one_line(e)


def test_corrupt_jsonl_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n{"prompt": "ok"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON") as e:
        load_prompts(path)
    one_line(e)


def test_jsonl_non_object_and_bad_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: expected a JSON object, got list"):
        load_prompts(path)
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: line is not valid UTF-8"):
        load_prompts(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match="not a readable parquet file") as e:
        load_prompts(path)
    assert str(path) in one_line(e)


def test_missing_prompt_key(write):
    path = write([{"text": "a"}])
    with pytest.raises(DataError, match="missing prompt key 'prompt'") as e:
        load_prompts(path)
    assert str(path) in one_line(e)


def test_missing_nested_key_names_record(write):
    path = write([{"q": {"text": "a"}}, {"q": {"other": "b"}}])
    with pytest.raises(DataError, match=r"(:2|row 1): missing prompt key 'q\.text'"):
        load_prompts(path, prompt_key="q.text")


def test_label_in_some_records_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "label": "1"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing label key 'label'"):
        load_prompts(path)


def test_bad_prompt_values(tmp_path):
    cases = [
        ([{"prompt": 5}], "must be a non-empty string or list of chat messages, got int"),
        ([{"prompt": "  "}], "prompt 'prompt' is empty"),
        ([{"prompt": [{"role": "user"}]}], "message 0 is not a"),
    ]
    for rows, msg in cases:
        with pytest.raises(DataError, match=msg):
            load_prompts(write_jsonl(tmp_path / "d.jsonl", rows))


def test_empty_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty dataset"):
        load_prompts(path)
    empty = tmp_path / "e.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    with pytest.raises(DataError, match="empty dataset"):
        load_prompts(empty)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# ----------------------------------------------------------------------------- chat template


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_format_prompt():
    tok = FakeTokenizer()
    assert format_prompt("What is 1+1?") == "What is 1+1?"
    assert format_prompt("What is 1+1?", tok, chat_template=True) == "<user>What is 1+1?<assistant>"
    assert format_prompt(CHAT, tok) == "<system>Be brief.<user>Hi<assistant>"
    with pytest.raises(DataError, match="chat template"):
        format_prompt(CHAT, None)


# ----------------------------------------------------------------------------- tasks and rewards


def test_arithmetic_task_deterministic():
    a = arithmetic_task(50, seed=3)
    assert a == arithmetic_task(50, seed=3)
    assert a != arithmetic_task(50, seed=4)
    assert arithmetic_task(20, seed=3) == a[:20]
    for rec in a:
        x, y = rec.prompt.removeprefix("What is ").removesuffix("?").split("+")
        assert 0 <= int(x) <= 99 and 0 <= int(y) <= 99
        assert rec.label == str(int(x) + int(y))
    assert all(int(r.label) <= 10 for r in arithmetic_task(30, seed=0, max_operand=5))


def test_arithmetic_reward():
    assert arithmetic_reward("What is 37+58?", "37+58 = 95", "95") == 1.0
    assert arithmetic_reward("What is 37+58?", "The answer is 95.", " 95 ") == 1.0
    assert (
        arithmetic_reward("What is 37+58?", "95, no wait, 96", "95") == 0.0
    )  # last integer counts
    assert arithmetic_reward("What is 37+58?", "I don't know", "95") == 0.0
    assert arithmetic_reward("What is 1-3?", "1-3 = -2", "-2") == 1.0
    with pytest.raises(ValueError, match="needs a label"):
        arithmetic_reward("q", "1", None)
    # Every task record scores 1 with its own label and 0 with an off-by-one answer.
    for rec in arithmetic_task(10, seed=1):
        assert arithmetic_reward(rec.prompt, f"= {rec.label}", rec.label) == 1.0
        assert arithmetic_reward(rec.prompt, f"= {int(rec.label) + 1}", rec.label) == 0.0


def test_load_reward_fn(tmp_path):
    assert load_reward_fn("fusedrl.algorithms.rewards:arithmetic_reward") is arithmetic_reward
    assert load_reward_fn("arithmetic") is arithmetic_reward
    f = tmp_path / "my_reward.py"
    f.write_text("def length(prompt, response, label):\n    return float(len(response))\n")
    fn = load_reward_fn(f"{f}:length")
    assert fn("p", "abcd", None) == 4.0
    assert pickle.loads(pickle.dumps(arithmetic_reward)) is arithmetic_reward


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
        ("fusedrl.algorithms.rewards:nope", "has no attribute 'nope'"),
        ("fusedrl.algorithms.rewards:BUILTIN_REWARDS", "is a dict, not callable"),
        ("missing_file.py:fn", "file 'missing_file.py' does not exist"),
        ("not_a_builtin", "not 'module:function' nor a built-in"),
        ("fusedrl.algorithms.rewards:", "not of the form"),
    ],
)
def test_load_reward_fn_errors(spec, msg):
    with pytest.raises(ValueError, match=msg) as e:
        load_reward_fn(spec)
    assert repr(spec) in str(e.value)
