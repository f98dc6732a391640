"""Preference data for DPO: TRL's formats, bad rows by FILE:LINE, masks equal to the chat template's tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
from trainkit import tiny_model

from job import specload
from job.cli import main
from job.data import preference
from job.data.masks import IGNORE
from job.data.templates import resolve_template
from job.demo_pairs import pairs
from job.loader import load_tokenizer

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def norm(obj, columns=None, **model):
    s = specload.build(overrides={f"model.{k}": v for k, v in model.items()})
    return preference.normalize("f:1", obj, columns or {}, {}, s.model)


def test_explicit_implicit_and_plain_string_pairs_normalise_to_the_same_prompt_and_completions():
    explicit = norm({"prompt": [U("q")], "chosen": [A("yes")], "rejected": [A("no")]})
    implicit = norm({"chosen": [U("q"), A("yes")], "rejected": [U("q"), A("no")]})
    plain = norm({"prompt": "q", "chosen": "yes", "rejected": "no"})
    renamed = norm({"question": "q", "good": "yes", "bad": "no"},
                   columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    for p in (explicit, implicit, plain, renamed):
        assert isinstance(p, preference.Pair), p
        assert [m["content"] for m in p.prompt] == ["q"]
        assert p.chosen == [{**A("yes"), "train": True}] and p.rejected == [{**A("no"), "train": True}]


def test_an_earlier_assistant_turn_of_the_prompt_is_context_not_trained():
    p = norm({"chosen": [U("a"), A("b"), U("c"), A("yes")], "rejected": [U("a"), A("b"), U("c"), A("no")]})
    assert p.prompt[1] == {**A("b"), "train": False} and p.chosen[0]["content"] == "yes"


@pytest.mark.parametrize("row,where", [
    ({"prompt": "q", "chosen": "yes"}, "rejected: missing"),
    # a null field was reported as missing while the row listed it ("missing (row has: prompt, chosen, rejected)")
    ({"prompt": "q", "chosen": "yes", "rejected": None}, "rejected: null"),
    ({"prompt": "q", "chosen": None, "rejected": "no"}, "chosen: null"),
    ({"prompt": None, "chosen": "yes", "rejected": "no"}, "prompt: null"),
    ({"prompt": [U("q")], "chosen": [U("yes")], "rejected": [A("no")]}, "chosen[0]: must be an assistant turn"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected: identical to chosen"),
    ({"chosen": [U("q"), A("yes")], "rejected": [U("other"), A("no")]}, "rejected: its prompt differs from chosen's at message 0"),
    ({"chosen": [U("q"), A("yes")], "rejected": [U("q"), U("no")]}, "rejected[1]: must be an assistant turn"),
    # an invalid weight was silently taken as 1.0 (and Infinity crashed prepare): the same rule as SFT rows
    ({"prompt": "q", "chosen": "yes", "rejected": "no", "weight": -1}, "weight: must be a number from 0 to 1000"),
    ({"prompt": "q", "chosen": "yes", "rejected": "no", "weight": "2"}, "weight: must be a number from 0 to 1000"),
    ({"prompt": "q", "chosen": "yes", "rejected": "no", "weight": float("inf")}, "weight: must be a number"),
])
def test_bad_pairs_name_the_field_and_the_problem(row, where):
    b = norm(row)
    assert isinstance(b, preference.BadRow) and str(b).startswith(f"f:1: {where}"), b


def test_validate_objective_dpo_exits_65_naming_the_row_without_rejected(tmp_path, capsys):
    rows = pairs(5)
    del rows[2]["rejected"]
    rows[4]["rejected"] = rows[4]["chosen"]
    f = write(tmp_path / "prefs.jsonl", rows)
    assert main(["validate", "--objective", "dpo", "--data", str(f), "--tokenizer", str(tiny_model())]) == 65
    out = capsys.readouterr().out
    assert f"{f}:3: rejected: missing" in out
    assert f"{f}:5: rejected: identical to chosen" in out
    assert "2 of 5 rows are bad" in out


def test_a_null_prompt_with_whole_conversations_is_an_implicit_prompt():
    """A parquet prompt column is null on rows that carry their prompt inside chosen and rejected."""
    p = norm({"prompt": None, "chosen": [U("q"), A("yes")], "rejected": [U("q"), A("no")]})
    assert isinstance(p, preference.Pair) and [m["content"] for m in p.prompt] == ["q"]


def test_validate_objective_dpo_names_a_null_answer_as_null_by_file_row_and_field(tmp_path, capsys):
    rows = pairs(3)
    rows[1]["rejected"] = None
    f = write(tmp_path / "prefs.jsonl", rows)
    assert main(["validate", "--objective", "dpo", "--data", str(f), "--tokenizer", str(tiny_model())]) == 65
    out = capsys.readouterr().out
    assert f"{f}:2: rejected: null" in out and "missing" not in out


def test_validate_objective_dpo_accepts_clean_pairs_and_refuses_sft_rows(tmp_path, capsys):
    f = write(tmp_path / "prefs.jsonl", pairs(8))
    assert main(["validate", "--objective", "dpo", "--data", str(f), "--tokenizer", str(tiny_model())]) == 0
    assert "validate: OK, 8 preference pairs" in capsys.readouterr().out
    g = write(tmp_path / "chat.jsonl", [{"messages": [U("q"), A("a")]}])
    assert main(["validate", "--objective", "dpo", "--data", str(g)]) == 65
    assert "not preference data" in capsys.readouterr().err


@pytest.mark.parametrize("train_on_eos", ["turn", "none"])
def test_pair_tokens_equal_the_chat_template_and_only_the_completion_is_trained(train_on_eos):
    tok = load_tokenizer(tiny_model())
    s = specload.build(overrides={"data.train_on_eos": train_on_eos})
    chat = resolve_template(s, tok)
    enc = preference.pair_encoder(tok, chat, train_on_eos)
    p = norm({"prompt": [{"role": "system", "content": "sé breve"}, U("¿Cuánto es 2 más 2?")],
              "chosen": [A("2 más 2 es 4.")], "rejected": [A("4. es 2 más 2")]})
    e = preference.encode_pairs(enc, [p], 2048, "truncate_right")
    for (ids, labels), comp in ((e.chosen[0], p.chosen), (e.rejected[0], p.rejected)):
        plain = [{"role": m["role"], "content": m["content"]} for m in p.prompt + comp]
        want = tok.apply_chat_template(plain, tokenize=True)
        want = want if isinstance(want, list) else want["input_ids"]
        assert ids.tolist() == list(want)
        trained = tok.decode(ids[labels != IGNORE])
        assert trained == comp[0]["content"] + ("<|im_end|>" if train_on_eos == "turn" else "")
        assert np.all(labels[: int(np.flatnonzero(labels != IGNORE)[0])] == IGNORE)


def test_truncation_keeps_the_prompts_end_and_the_completions_start():
    ids = np.arange(100)
    labels = np.where(ids >= 70, ids, IGNORE)
    i, la = preference.truncate(ids, labels, 40)
    assert len(i) == 40 and i[0] == 50 and i[-1] == 89  # 20 prompt tokens before the completion, 20 of it
    i, la = preference.truncate(ids, np.where(ids >= 95, ids, IGNORE), 40)
    assert i[0] == 60 and i[-1] == 99  # a short completion is kept whole


def test_prepare_caches_pairs_and_a_second_prepare_is_a_hit(tmp_path):
    from datasets import Dataset

    from job.data.preference import prepare  # DPO's preparation (job/objectives/dpo.py)

    f = write(tmp_path / "prefs.jsonl", pairs(20))
    s = specload.build(overrides={"train.objective": "dpo", "data.path": str(f), "model.path": str(tiny_model()),
                                 "data.eval_split": 0.2, "cache_dir": str(tmp_path / "cache")})
    p = prepare(s, tiny_model())
    assert not p.cache_hit and p.report["examples"] == {"train": 16, "eval": 4}
    ds = Dataset.from_parquet(str(p.train_path))
    assert set(ds.column_names) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert prepare(s, tiny_model()).cache_hit


@pytest.mark.parametrize("flags,problem", [
    (["--packing", "true"], "data.packing with objective dpo"),
    (["--loss-type", "exo_pair"], "exo_pair needs label_smoothing > 0"),
    (["--label-smoothing", "0.1"], "label_smoothing has no effect with loss_type sigmoid"),
    (["--num-prompts", "4", "--eval-split", "0.1"], "generation eval"),
    (["--min-reward-accuracy", "0.9"], "needs objective dpo and an eval split"),
    (["--loss-type", "nope"], "loss_type"),
])
def test_impossible_dpo_settings_exit_64_before_any_work(tmp_path, capsys, flags, problem):
    f = write(tmp_path / "prefs.jsonl", pairs(4))
    code = main(["run", "--objective", "dpo", "--model", str(tiny_model()), "--data", str(f),
                 "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), *flags])
    assert code == 64
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "c" / "prepared").exists()


def test_dpo_training_arguments_carry_the_dpo_knobs_and_the_sft_settings():
    from job.train.dpo import dpo_args

    s = specload.build(overrides={"train.objective": "dpo", "train.beta": 0.3, "train.loss_type": "robust",
                                 "train.label_smoothing": 0.1, "train.precompute_ref_log_probs": True,
                                 "train.warmup_ratio": 0.2, "train.learning_rate": 1e-5})
    plan = {"checkpoint_dir": "/tmp/x", "mixed_precision": "no"}
    a = dpo_args(s, plan)
    assert (a.beta, a.loss_type, a.label_smoothing, a.precompute_ref_log_probs) == (0.3, ["robust"], 0.1, True)
    assert a.warmup_steps == 0.2 and a.learning_rate == 1e-5 and a.max_length is None  # truncation done in prepare
    assert a.remove_unused_columns is False


def test_pairs_longer_than_max_length_are_truncated_or_dropped_and_counted(tmp_path):
    from job.data.preference import prepare

    rows = pairs(6)
    rows[0]["prompt"][0]["content"] = "palabra " * 200
    f = write(tmp_path / "prefs.jsonl", rows)
    base = {"train.objective": "dpo", "data.path": str(f), "model.path": str(tiny_model()), "data.max_length": 64,
            "cache_dir": str(tmp_path / "cache")}
    rep = prepare(specload.build(overrides=base), tiny_model()).report
    assert rep["truncation"]["truncated"] == 1 and rep["examples"]["train"] == 6 and rep["lengths"]["max"] <= 128
    rep = prepare(specload.build(overrides={**base, "data.truncation": "drop"}), tiny_model()).report
    assert rep["rows"]["dropped"] == {"too_long": 1} and rep["examples"]["train"] == 5


def test_a_preference_file_whose_first_rows_are_unreadable_names_the_first_problem(tmp_path, capsys):
    """It said 'not preference data: no chosen column (fields: none)' for a file of broken rows."""
    f = tmp_path / "prefs.jsonl"
    f.write_text('{"prompt": "q", "chosen": "a", "rejected": \n' + '{"prompt": ' + "[" * 3000 + "]" * 3000 + "}\n")
    assert main(["validate", "--objective", "dpo", "--data", str(f), "--tokenizer", str(tiny_model())]) == 65
    err = capsys.readouterr().err
    assert f"{f}:1: (row): invalid JSON" in err and "not preference data" not in err


SFT_DATA = [{"messages": [U("q"), A("a")]}] * 4


@pytest.mark.parametrize("flags,knob", [
    (["--beta", "0.3"], "train.beta"),
    (["--loss-type", "ipo"], "train.loss_type"),
    (["--label-smoothing", "0.1"], "train.label_smoothing"),
    (["--precompute-ref-log-probs"], "train.precompute_ref_log_probs"),
])
def test_dpo_knobs_on_an_sft_run_exit_64_naming_the_knob_before_any_work(tmp_path, capsys, flags, knob):
    """They were ignored silently: a run asked for --beta 0.3 and trained SFT."""
    f = write(tmp_path / "chat.jsonl", SFT_DATA)
    common = ["--data", str(f), "--cache-dir", str(tmp_path / "c"), *flags]
    code = main(["run", "--model", str(tiny_model()), "--output", str(tmp_path / "out"), *common])
    err = capsys.readouterr().err
    assert code == 64 and knob in err and f"fix: set --objective dpo, or drop {flags[0]}" in err, err
    assert not (tmp_path / "c" / "prepared").exists() and not (tmp_path / "out").exists()
    assert main(["validate", "--tokenizer", str(tiny_model()), *common]) == 64  # validate refuses it too
    assert knob in capsys.readouterr().err


def test_the_dpo_gate_on_an_sft_run_exits_64_and_validate_says_so_too(tmp_path, capsys):
    f = write(tmp_path / "chat.jsonl", SFT_DATA)
    common = ["--data", str(f), "--cache-dir", str(tmp_path / "c"), "--min-reward-accuracy", "0.7", "--eval-split", "0.5"]
    assert main(["run", "--model", str(tiny_model()), "--output", str(tmp_path / "out"), *common]) == 64
    assert "min_reward_accuracy" in capsys.readouterr().err
    assert main(["validate", "--tokenizer", str(tiny_model()), *common]) == 64
    err = capsys.readouterr().err
    assert "eval.min_reward_accuracy" in err and "fix: set --objective dpo, or drop --min-reward-accuracy" in err


def test_dpo_knobs_set_to_their_defaults_on_an_sft_run_are_accepted(tmp_path, capsys):
    f = write(tmp_path / "chat.jsonl", SFT_DATA)
    assert main(["validate", "--data", str(f), "--tokenizer", str(tiny_model()), "--cache-dir", str(tmp_path / "c"),
                 "--beta", "0.1", "--loss-type", "sigmoid", "--label-smoothing", "0",
                 "--no-precompute-ref-log-probs"]) == 0


def test_preference_pairs_given_to_an_sft_run_say_to_use_objective_dpo(tmp_path, capsys):
    """It said only 'cannot detect the row format' and asked for data.format."""
    f = write(tmp_path / "prefs.jsonl", pairs(4))
    assert main(["validate", "--data", str(f), "--tokenizer", str(tiny_model()), "--cache-dir", str(tmp_path / "c")]) == 65
    err = capsys.readouterr().err
    assert "these look like preference pairs: use --objective dpo" in err and "Traceback" not in err
