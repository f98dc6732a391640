"""Input formats and files → normalised messages, with FILE:LINE on every problem."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job import specload
from job.data import formats, readers
from job.data.formats import BadRow, Row
from job.errors import DataError, NotFoundError


def rows_of(path, **overrides):
    spec = specload.build(overrides={"data.path": str(path), **overrides})
    files = readers.expand(str(path), path.parent)
    return list(formats.read_rows(files, spec.data, spec.model))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sharegpt_rows_are_detected_and_mapped_to_chat_roles(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    [row] = rows_of(f)
    assert [(m["role"], m["content"]) for m in row.messages] == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_alpaca_rows_join_instruction_and_input_into_the_user_turn(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Traduce", "input": "cat", "output": "gato"},
                                           {"instruction": "Saluda", "input": "", "output": "hola"}])
    r1, r2 = rows_of(f)
    assert r1.messages == [{"role": "user", "content": "Traduce\n\ncat"}, {"role": "assistant", "content": "gato"}]
    assert r2.messages[0]["content"] == "Saluda"


def test_prompt_completion_plain_and_conversational_train_only_the_completion(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "completion": [{"role": "assistant", "content": "d"}]}])
    r1, r2 = rows_of(f)
    assert r1.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [m.get("train") for m in r2.messages] == [None, False, None, None]


def test_column_and_role_maps_read_custom_layouts(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"dialog": [{"role": "human", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    [row] = rows_of(f, **{"data.format": "messages", "data.columns": {"messages": "dialog"}, "data.roles": {"bot": "assistant"}})
    assert [m["role"] for m in row.messages] == ["user", "assistant"]


def test_per_message_train_flag_and_row_weight_are_kept(tmp_path):
    f = write_jsonl(tmp_path / "w.jsonl", [{"weight": 2.5, "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}])
    [row] = rows_of(f)
    assert row.weight == 2.5 and row.messages[1]["train"] is False


def test_sharegpt_and_axolotl_turn_flags_and_dataset_role_names(tmp_path):
    [r1] = rows_of(write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "q", "weight": 0}, {"from": "gpt", "value": "a", "weight": 0},
                           {"from": "human", "value": "q2", "weight": 1}, {"from": "chatgpt", "value": "a2", "weight": 1}]}]))
    [r2] = rows_of(write_jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "prompter", "content": "q"}, {"role": "model", "content": "a", "training": False},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "training": True}]}]))
    assert [(m["role"], m.get("train")) for m in r1.messages] == [
        ("user", False), ("assistant", False), ("user", None), ("assistant", True)]
    assert [(m["role"], m.get("train")) for m in r2.messages] == [
        ("user", None), ("assistant", False), ("user", None), ("assistant", True)]


@pytest.mark.parametrize("msg,problem", [
    ({"role": "assistant", "content": "a", "weight": 0.5}, "messages[1].weight: must be 0 or 1, got 0.5"),
    ({"role": "assistant", "content": "a", "training": "yes"}, "messages[1].training: must be true or false"),
    ({"role": "user", "content": "a", "train": True}, "messages[1].train: only assistant messages can be trained"),
])
def test_bad_turn_flags_name_the_field(tmp_path, msg, problem):
    f = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "q"}, msg,
                                                         {"role": "assistant", "content": "z"}]}])
    [row] = rows_of(f)
    assert isinstance(row, BadRow) and problem in f"{row.field}: {row.problem}", row


@pytest.mark.parametrize("mode,expected", [("default", ["DEF", "OWN"]), ("override", ["DEF", "DEF"]), ("none", [None, "OWN"])])
def test_system_prompt_modes(tmp_path, mode, expected):
    f = write_jsonl(tmp_path / "s.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "system", "content": "OWN"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    rows = rows_of(f, **{"model.system_prompt": "DEF", "model.system_prompt_mode": mode})
    got = [r.messages[0]["content"] if r.messages[0]["role"] == "system" else None for r in rows]
    assert got == expected


def test_jsonl_gz_json_array_parquet_and_directories_are_read_with_line_numbers(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    d = tmp_path / "dir"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps(ok) + "\n")
    (d / "b.json").write_text("[\n  " + json.dumps(ok) + ",\n  {\"messages\": []}\n]\n")
    pq.write_table(pa.Table.from_pylist([ok, ok]), d / "c.parquet")
    (d / "_SUCCESS").write_text("")
    rows = rows_of(d)
    assert [type(r) for r in rows] == [Row, Row, BadRow, Row, Row]
    assert rows[2].where.endswith("b.json:3") and rows[2].field == "messages"
    assert rows[4].where.endswith("c.parquet:2")


def test_bad_rows_name_the_line_the_field_and_the_problem(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [
        '{"messages": [',
        {"text": "no messages"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    rows = rows_of(f, **{"data.format": "messages"})
    bad = [str(r).split("bad.jsonl", 1)[1] for r in rows if isinstance(r, BadRow)]
    assert bad == [
        ":1: (row): invalid JSON: Expecting value",
        ":2: messages: missing (row has: text)",
        ":3: messages[1].role: unknown role 'robot' (expected system, user, assistant or tool; map others with data.roles)",
        ":4: messages[0].content: empty content",
        ":5: messages[0].content: content must be a string, got int",
        ":6: messages: no assistant turn",
    ]


def test_file_level_problems_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    for name, err, msg in [("empty.jsonl", DataError, "empty file"), ("x.csv", DataError, "unsupported file extension"),
                           ("broken.jsonl.gz", DataError, "unreadable file"), ("missing.jsonl", NotFoundError, "not found")]:
        with pytest.raises(err, match=msg):
            rows_of(tmp_path / name)


def test_undetectable_format_asks_for_data_format(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot detect the row format"):
        rows_of(f)


@pytest.mark.parametrize("row", [
    {"prompt": "q", "chosen": "a", "rejected": "b"},
    {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
], ids=["explicit", "implicit"])
def test_preference_rows_on_an_sft_run_say_they_look_like_pairs(tmp_path, row):
    f = write_jsonl(tmp_path / "p.jsonl", [row, row])
    with pytest.raises(DataError, match="these look like preference pairs: use --objective dpo") as e:
        rows_of(f)
    assert str(f) in str(e.value) and "fix:" in str(e.value)


def test_compact_json_array_rows_are_told_apart_and_a_mixed_format_row_says_so(tmp_path):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = tmp_path / "compact.json"
    f.write_text(json.dumps([ok, {"messages": 3}, ok]))  # one line, three rows
    rows = rows_of(f)
    assert [r.where for r in rows] == [f"{f}:1 (element {k})" for k in (1, 2, 3)]
    assert isinstance(rows[1], BadRow) and rows[1].field == "messages"
    g = write_jsonl(tmp_path / "mixed.jsonl", [ok, ok, {"conversations": [{"from": "human", "value": "q"},
                                                                         {"from": "gpt", "value": "a"}]}])
    bad = rows_of(g)[2]
    assert isinstance(bad, BadRow) and bad.where.endswith("mixed.jsonl:3")
    assert "looks like sharegpt" in bad.problem and "one file holds one format" in bad.problem


ROW = {"messages": [{"role": "user", "content": "¿Qué tal?"}, {"role": "assistant", "content": "Bien."}]}


@pytest.mark.parametrize("name,encoding", [
    ("bom.json", "utf-8-sig"), ("bom.jsonl", "utf-8-sig"), ("u16.jsonl", "utf-16"), ("u16.json", "utf-16"),
    ("u16be.jsonl", "utf-16-be"), ("u32.json", "utf-32"), ("u16.jsonl.gz", "utf-16"),
])
def test_a_byte_order_mark_is_read_as_its_encoding_with_no_phantom_row(tmp_path, name, encoding):
    rows = [ROW, {**ROW, "weight": 0.5}]
    text = json.dumps(rows, ensure_ascii=False, indent=1) if ".json" == name[-5:] else \
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    f = tmp_path / name
    f.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    out = rows_of(f)
    assert [type(r) for r in out] == [Row, Row], out
    assert out[0].messages[0]["content"] == "¿Qué tal?" and out[1].weight == 0.5


def test_utf16_without_a_byte_order_mark_is_one_file_error_saying_how_to_fix_it(tmp_path):
    f = tmp_path / "u16.jsonl"
    f.write_bytes((json.dumps(ROW) + "\n").encode("utf-16-le"))
    with pytest.raises(DataError) as e:
        rows_of(f)
    assert "UTF-16" in str(e.value) and "UTF-8" in e.value.hint


def test_a_gzip_file_named_jsonl_says_it_is_gzip_and_how_to_name_it(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes(gzip.compress((json.dumps(ROW) + "\n").encode()))
    with pytest.raises(DataError) as e:
        rows_of(f)
    assert "gzip" in str(e.value) and "train.jsonl.gz" in e.value.hint


def test_a_duplicate_key_in_a_message_is_a_bad_row_naming_the_message(tmp_path):
    dup = '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a", "role": "assistant"}]}'
    f = write_jsonl(tmp_path / "d.jsonl", [ROW, dup, '{"messages": [], "messages": ' + json.dumps(ROW["messages"]) + "}"])
    ok, bad, top = rows_of(f)
    assert isinstance(ok, Row)
    assert str(bad) == f"{f}:2: messages[1]: duplicate key 'role' (the last value would silently win)"
    assert isinstance(top, BadRow) and top.field == "(row)" and "'messages'" in top.problem
    arr = tmp_path / "d.json"
    arr.write_text("[\n" + json.dumps(ROW) + ",\n" + dup + ",\n" + json.dumps(ROW) + "\n]")
    a, b, c = rows_of(arr)
    assert isinstance(a, Row) and isinstance(c, Row)  # the rest of the array is still read
    assert str(b) == f"{arr}:3: messages[1]: duplicate key 'role' (the last value would silently win)"


def test_a_limit_of_zero_reads_no_rows(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [ROW, ROW])
    spec = specload.build(overrides={"data.path": str(f)})
    assert list(formats.iter_records(readers.expand(str(f), tmp_path), spec.data, limit=0)) == []


def test_a_lone_surrogate_or_a_row_nested_too_deeply_is_a_bad_row_naming_the_field(tmp_path):
    """Found by fuzzing `prepare`: JSON lets a lone `\\ud800` through (the tokenizer then raised a TypeError:
    exit 1, a traceback) and a row nested thousands of levels deep raised RecursionError. Both are bad rows."""
    pair = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "\\uD83D\\uDE00"}]}'
    lone = '{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "a\\udc00b"}]}'
    key = '{"messages": [{"role": "user", "content": "q", "n\\ud800": 1}, {"role": "assistant", "content": "a"}]}'
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    f = write_jsonl(tmp_path / "u.jsonl", [ROW, pair, lone, key, deep])
    ok, paired, bad_lone, bad_key, bad_deep = rows_of(f)
    assert isinstance(ok, Row) and isinstance(paired, Row)
    assert paired.messages[0]["content"] == paired.messages[1]["content"] == "\N{GRINNING FACE}"
    assert str(bad_lone) == (f"{f}:3: messages[1].content: invalid Unicode: a lone surrogate (\\udc00) at character 1; "
                             "the file was written with broken escapes")
    assert isinstance(bad_key, BadRow) and bad_key.field == "messages[0].n\ud800" and "lone surrogate" in bad_key.problem
    assert isinstance(bad_deep, BadRow) and bad_deep.field == "(row)" and "nested too deeply" in bad_deep.problem

    arr = tmp_path / "u.json"  # the same in a JSON array: the element, by line
    arr.write_text("[\n" + json.dumps(ROW) + ",\n" + lone + ",\n" + pair + "\n]")
    a, b, c = rows_of(arr)
    assert isinstance(a, Row) and isinstance(c, Row)
    assert isinstance(b, BadRow) and b.where == f"{arr}:3" and b.field == "messages[1].content"
    deep_arr = tmp_path / "deep.json"
    deep_arr.write_text("[" + json.dumps(ROW) + ", " + "[" * 5000 + "]" * 5000 + "]")
    a, b = rows_of(deep_arr)
    assert isinstance(a, Row) and isinstance(b, BadRow) and "nested too deeply" in b.problem


def test_a_file_whose_rows_are_all_unreadable_names_the_first_problem_not_the_format(tmp_path):
    """A one-row file with a broken row said 'cannot detect the row format (fields: none)'."""
    f = write_jsonl(tmp_path / "one.jsonl", ['{"messages": [{"role": "user", "content": "\\ud800"}]}'])
    with pytest.raises(DataError, match=r"one.jsonl:1: messages\[0\].content: invalid Unicode: a lone surrogate"):
        rows_of(f)
    g = write_jsonl(tmp_path / "two.jsonl", ['{"messages": [', '{bad'])
    with pytest.raises(DataError, match=r"two.jsonl:1: \(row\): invalid JSON"):
        rows_of(g)


def test_a_row_weight_is_a_finite_number_of_copies_up_to_1000(tmp_path):
    """A weight of 1e308 or Infinity crashed prepare (numpy: negative dimensions): it is a bad row."""
    rows = [{**ROW, "weight": w} for w in (0, 2.5, 1000)]
    rows += ['{"messages": ' + json.dumps(ROW["messages"]) + ', "weight": ' + w + "}"
             for w in ("1001", "1e308", "Infinity", "NaN", "-1", '"2"', "true")]
    out = rows_of(write_jsonl(tmp_path / "w.jsonl", rows))
    assert [r.weight for r in out[:3]] == [0, 2.5, 1000]
    bad = out[3:]
    assert all(isinstance(b, BadRow) and b.field == "weight" for b in bad), bad
    assert bad[0].problem == "must be a number from 0 to 1000 (copies of the row), got 1001"
