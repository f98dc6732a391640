"""prepare(): cached parquet the trainer loads as is — masks, truncation, packing, splits, mixture, cache hits."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from job import specload
from job.data.prepare import Prepared, prepare
from job.demo_data import conversations
from job.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from job import tiny

    d = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer().save_pretrained(d)
    return d


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def make_spec(tmp_path, tok_dir, data, **kw):
    over = {"model.path": str(tok_dir), "cache_dir": str(tmp_path / "cache"), "data.num_proc": 1}
    if isinstance(data, list):
        over["data.sources"] = data
    else:
        over["data.path"] = str(data)
    over.update(kw)
    return specload.build(overrides=over)


def read(path):
    return pq.read_table(path).to_pydict()


def test_prepare_writes_int32_parquet_with_labels_and_positions_plus_report(tmp_path, tok_dir):
    data = write_rows(tmp_path / "t.jsonl", conversations(60, seed=3))
    p = prepare(make_spec(tmp_path, tok_dir, data, **{"data.eval_split": 0.1, "data.num_proc": 2}))
    assert not p.cache_hit and p.dir.parent == tmp_path / "cache" / "prepared"
    for name in ("train.parquet", "eval.parquet", "data_report.json", "token_lengths.png", "chat_template.jinja", "meta.json"):
        assert (p.dir / name).stat().st_size > 0, name
    schema = pq.read_schema(p.train_path)
    assert all(schema.field(c).type == pa.list_(pa.int32()) for c in ("input_ids", "labels", "position_ids"))
    t = read(p.train_path)
    assert len(t["input_ids"]) == 54 and len(read(p.eval_path)["input_ids"]) == 6
    for ids, labels, pos in zip(t["input_ids"], t["labels"], t["position_ids"], strict=False):
        assert pos == list(range(len(ids)))
        assert all(lab in (-100, i) for lab, i in zip(labels, ids, strict=False)) and any(lab != -100 for lab in labels)
    r = p.report
    assert r["rows"] == {"read": 60, "kept": 60, "dropped": {}}
    assert r["tokens"]["total"] == sum(map(len, t["input_ids"]))
    assert r["tokens"]["trained"] == sum(lab != -100 for labels in t["labels"] for lab in labels)
    assert set(r["lengths"]) >= {"p50", "p90", "p95", "p99", "max"}
    assert p.eos_tokens == ["<|im_end|>"] and len(p.template_sha256) == 64
    assert not [x for x in p.dir.parent.iterdir() if x.name.startswith(".tmp")]


def test_second_prepare_with_identical_inputs_is_a_cache_hit(tmp_path, tok_dir, capsys, monkeypatch):
    from job.data.commands import prepare_command

    data = write_rows(tmp_path / "t.jsonl", conversations(40))
    spec = make_spec(tmp_path, tok_dir, data)
    first = prepare(spec)

    def no_tokenizer(*a, **k):
        raise AssertionError("a cache hit must not load the tokenizer or tokenize")
    monkeypatch.setattr("job.data.prepare.load_tokenizer", no_tokenizer)
    assert prepare_command(spec) == 0
    monkeypatch.undo()
    assert capsys.readouterr().out.startswith(f"cache hit (inputs unchanged, nothing re-tokenized): {first.dir}")
    assert Prepared.load(first.dir).report == first.report
    write_rows(data, conversations(41))  # new content → new key
    assert prepare(spec).dir != first.dir
    assert prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 512})).cache_hit is False


def test_packing_resets_position_ids_per_example_and_reports_efficiency(tmp_path, tok_dir):
    data = write_rows(tmp_path / "t.jsonl", conversations(80, seed=5))
    plain = prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 256, "data.shuffle": False}))
    packed = prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 256, "data.packing": True, "data.shuffle": False}))
    t, u = read(packed.train_path), read(plain.train_path)
    assert len(t["input_ids"]) < len(u["input_ids"])
    assert sum(map(len, t["input_ids"])) == sum(map(len, u["input_ids"]))
    assert sorted(x for ids in t["input_ids"] for x in ids) == sorted(x for ids in u["input_ids"] for x in ids)
    examples = 0
    for ids, labels, pos in zip(t["input_ids"], t["labels"], t["position_ids"], strict=False):
        assert len(ids) <= 256
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(pos)], strict=False):
            assert pos[a:b] == list(range(b - a))  # attention/positions never continue across examples
            assert labels[a] == -100  # no example is asked to predict the next one's first token
        examples += len(starts)
    assert examples == len(u["input_ids"])
    assert packed.report["packed_bins"] == packed.report["packing"]["bins"] == len(t["input_ids"])
    eff = packed.report["packing"]["efficiency"]
    assert eff == pytest.approx(sum(map(len, t["input_ids"])) / (len(t["input_ids"]) * 256), abs=1e-3)
    assert 0.8 < eff <= 1.0


def test_truncation_drop_and_truncate_are_counted_and_all_masked_rows_are_dropped(tmp_path, tok_dir):
    long = {"messages": [{"role": "user", "content": "hola " * 400}, {"role": "assistant", "content": "sí"}]}
    masked = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}
    data = write_rows(tmp_path / "t.jsonl", conversations(10) + [long, masked])
    dropped = prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 180, "data.truncation": "drop"}))
    assert dropped.report["rows"]["dropped"] == {"no_trained_tokens": 1, "too_long": 1}
    right = prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 180, "data.truncation": "truncate_right"}))
    assert right.report["rows"]["dropped"] == {"no_trained_tokens": 2}  # the long row lost its only answer
    left = prepare(make_spec(tmp_path, tok_dir, data, **{"data.max_length": 180, "data.truncation": "truncate_left"}))
    assert left.report["truncation"]["truncated"] == 1 and left.report["rows"]["dropped"] == {"no_trained_tokens": 1}
    assert max(map(len, read(left.train_path)["input_ids"])) == 180


def test_mixture_weights_repeat_or_subsample_sources(tmp_path, tok_dir):
    a = write_rows(tmp_path / "a.jsonl", conversations(30, seed=1))
    b = write_rows(tmp_path / "b.jsonl", conversations(40, seed=2))
    p = prepare(make_spec(tmp_path, tok_dir, [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}]))
    src = {s["path"]: s for s in p.report["sources"]}
    assert src[str(a)]["train"] == 60
    assert 8 <= src[str(b)]["train"] <= 32
    assert p.report["examples"]["train"] == len(read(p.train_path)["input_ids"])


def test_bad_rows_fail_prepare_with_file_and_line(tmp_path, tok_dir):
    data = write_rows(tmp_path / "t.jsonl", conversations(3) + [{"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match=r"t\.jsonl:4: messages: no assistant turn"):
        prepare(make_spec(tmp_path, tok_dir, data))


def test_token_lengths_are_identical_to_apply_chat_template(tmp_path, tok_dir):
    from transformers import AutoTokenizer

    rows = conversations(20, seed=9)
    data = write_rows(tmp_path / "t.jsonl", rows)
    p = prepare(make_spec(tmp_path, tok_dir, data, **{"data.shuffle": False}))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    got = read(p.train_path)["input_ids"]
    assert got == [list(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]


def test_bench_runs_whole_processes_in_tiny_mode_and_reports_the_ratio():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "prep.py"), "--rows", "200", "--skip-trl-default"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] == result["trl"]["tokens"] > 0  # the same masked tokens out of both
    assert result["ratio_vs_trl"] > 0 and result["ours"]["tokens_per_s"] > 0
    assert 0 < result["startup"]["seconds"] and 0 < result["ours_cached"]["seconds"] < result["ours"]["seconds"]
    assert set(result["ours_stages_s"]) >= {"tokenizer_and_template", "encode", "parquet"}


def test_packing_bins_never_exceed_capacity_and_fill_well():
    from job.data.packing import best_fit_decreasing

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 300, size=500)
    bins = best_fit_decreasing(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert lengths.sum() / (len(bins) * 512) > 0.95


def test_tokenizer_location_prefers_model_tokenizer_then_the_fetched_model_dir(tmp_path, tok_dir):
    from job.data.templates import locate_tokenizer
    from job.errors import NotFoundError

    other = tmp_path / "model"
    other.mkdir()
    spec = specload.build(overrides={"model.path": str(tmp_path / "remote-model"), "model.tokenizer": str(tok_dir)})
    assert locate_tokenizer(spec, other) == tok_dir
    assert locate_tokenizer(specload.build(overrides={"model.path": "s3://b/m"}), other) == other
    assert locate_tokenizer(specload.build()) is None
    with pytest.raises(NotFoundError, match="tokenizer not found"):
        locate_tokenizer(specload.build(overrides={"model.path": str(tmp_path / "absent")}))


@pytest.mark.parametrize("num_proc", [2, 4])
def test_parallel_preparation_gives_the_same_examples_as_one_process(tmp_path, tok_dir, num_proc):
    data = write_rows(tmp_path / "t.jsonl", conversations(1200, seed=4))  # > 2 chunks
    one = prepare(make_spec(tmp_path / "a", tok_dir, data, **{"data.num_proc": 1}))
    many = prepare(make_spec(tmp_path / "b", tok_dir, data, **{"data.num_proc": num_proc}))
    assert read(one.train_path) == read(many.train_path)
    assert one.report["tokens"] == many.report["tokens"]
