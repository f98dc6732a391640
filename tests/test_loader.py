"""job.loader is the one way in: prepare, train, eval, export, plan and the benchmark load the same
tokenizer (added special tokens included) and the same model (dtype, attention, QLoRA quantization,
grown embeddings). Real tiny model, real files; the one spy is on from_pretrained for QLoRA, which
needs a GPU and bitsandbytes to really load."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import trainkit
from transformers import AutoModelForCausalLM, AutoTokenizer

from job import evalkit, specload
from job.data.prepare import prepare
from job.demo_data import conversations
from job.train import export, sft
from job.train import plan as planmod

ROOT = Path(__file__).resolve().parents[1]
NEW = ["<|turn|>", "<|eot|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|turn|>' + m['role'] + '\n' + m['content'] + '<|eot|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|turn|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tpl") / "turns.jinja"
    p.write_text(TEMPLATE)
    return p


def make_spec(tmp_path, template, rows=None, **kw):
    over = {"model.path": str(trainkit.tiny_model()), "cache_dir": str(tmp_path / "cache"), "data.num_proc": 1,
            "model.chat_template": str(template), "model.add_special_tokens": NEW, "data.shuffle": False,
            "data.max_length": 2048}
    if rows is not None:
        data = tmp_path / "rows.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        over["data.path"] = str(data)
    over.update(kw)
    return specload.build(overrides=over)


def augmented_tokenizer():
    """The base tokenizer with the two markers added by hand, independently of job.loader."""
    tok = AutoTokenizer.from_pretrained(trainkit.tiny_model())
    tok.add_tokens(NEW, special_tokens=True)
    return tok


# ---- item 15: the added tokens reach the prepared data ------------------------------------------

def test_prepared_ids_are_the_augmented_tokenizers_and_previews(tmp_path, template, capsys):
    from job.data.commands import preview_command

    rows = conversations(6, seed=2)
    spec = make_spec(tmp_path, template, rows)
    base_vocab = len(AutoTokenizer.from_pretrained(trainkit.tiny_model()))
    tok = augmented_tokenizer()
    turn, eot = tok.convert_tokens_to_ids(NEW)
    assert (base_vocab, turn, eot) == (512, 512, 513)

    prepared = prepare(spec)
    ids = pq.read_table(prepared.train_path).to_pydict()["input_ids"]
    want = [tok.apply_chat_template(r["messages"], chat_template=TEMPLATE, tokenize=True)["input_ids"] for r in rows]
    assert ids == want
    for row, r in zip(ids, rows, strict=True):  # one id per marker, never BPE pieces of it
        assert row.count(turn) == row.count(eot) == len(r["messages"])

    assert preview_command(spec, limit=len(rows), as_json=True) == 0
    shown = [json.loads(line)["input_ids"] for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert shown == ids


def test_the_added_tokens_are_part_of_the_cache_key(tmp_path, template):
    rows = conversations(4, seed=3)
    with_tokens = prepare(make_spec(tmp_path, template, rows))
    without = prepare(make_spec(tmp_path, template, rows, **{"model.add_special_tokens": []}))
    one = prepare(make_spec(tmp_path, template, rows, **{"model.add_special_tokens": NEW[:1]}))
    assert len({with_tokens.dir, without.dir, one.dir}) == 3
    assert not without.cache_hit and not one.cache_hit
    assert max(max(r) for r in pq.read_table(without.train_path).to_pydict()["input_ids"]) < 512


# ---- item 16: every consumer loads through job.loader ---------------------------------------------

def _adapter_dir(tmp_path, spec) -> Path:
    """What training leaves for eval/export: the tokenizer with the added tokens and the template."""
    d = tmp_path / "adapter"
    tok = sft._load_tokenizer(spec, _train_plan(spec, tmp_path))
    tok.save_pretrained(d)
    return d


def _train_plan(spec, tmp_path, **kw) -> dict:
    from job.train.launch import _fast_path, topology

    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    topo = topology(spec, cuda_devices=0)
    return {"model_dir": str(trainkit.tiny_model()), "chat_template_path": str(tmp_path / "chat_template.jinja"),
            "mixed_precision": topo.mixed_precision, "attn_implementation": _fast_path(spec, False)["attention"]["implementation"], **kw}


def test_prepare_train_eval_export_and_plan_see_the_same_tokenizer(tmp_path, template):
    from job.data.prepare import Prepared
    from job.data.templates import load_tokenizer

    spec = make_spec(tmp_path, template)
    want = augmented_tokenizer().get_vocab()
    prepare_tok, _ = load_tokenizer(spec)  # what preview/validate and prepare use
    train_tok = sft._load_tokenizer(spec, _train_plan(spec, tmp_path))
    adapter = _adapter_dir(tmp_path, spec)
    prepared = Prepared.__new__(Prepared)
    prepared.chat_template = TEMPLATE
    eval_base_tok = evalkit.tokenizer(spec, prepared, str(trainkit.tiny_model()), str(tmp_path / "no-adapter"))
    eval_tok = evalkit.tokenizer(spec, prepared, str(trainkit.tiny_model()), str(adapter))
    for tok in (prepare_tok, train_tok, eval_base_tok, eval_tok):
        assert tok.get_vocab() == want
    assert export._vocab(adapter, False) == planmod._vocab(spec) == len(want) == 514


def test_train_eval_export_and_merge_load_the_same_base_with_the_same_new_rows(tmp_path, template):
    spec = make_spec(tmp_path, template)
    adapter = _adapter_dir(tmp_path, spec)
    trained = sft._load_model(spec, _train_plan(spec, tmp_path), 514)
    evaluated = evalkit.load_base(spec, str(trainkit.tiny_model()), 514)
    verified = export.load_base_for(adapter, str(trainkit.tiny_model()), "float32")
    merged = export.load_base_for(adapter, str(trainkit.tiny_model()), "bfloat16")
    base = AutoModelForCausalLM.from_pretrained(trainkit.tiny_model())
    for m in (trained, evaluated, verified, merged):
        assert m.config.vocab_size == 514
        for emb, was in ((m.get_input_embeddings(), base.get_input_embeddings()),
                         (m.get_output_embeddings(), base.get_output_embeddings())):
            w = emb.weight
            assert w.shape[0] == 514 and torch.equal(w[:512], was.weight.to(w.dtype))
            # the untrained new rows start from the mean of the old ones, exactly (no sampling)
            assert torch.equal(w[512:], w[:512].float().mean(0).to(w.dtype).expand(2, -1))
    for m in (evaluated, verified):
        assert torch.equal(m.get_input_embeddings().weight, trained.get_input_embeddings().weight)
        assert torch.equal(m.get_output_embeddings().weight, trained.get_output_embeddings().weight)
    assert trained.config._attn_implementation == evaluated.config._attn_implementation == "sdpa"
    assert trained.dtype == evaluated.dtype == verified.dtype == torch.float32 and merged.dtype == torch.bfloat16
    assert trained.config.use_cache is False  # packed rows stay per-example only without a KV cache


def test_qlora_trains_and_evaluates_on_the_same_quantized_base(tmp_path, template, monkeypatch):
    """On a GPU both load NF4 with double quantization and bf16 compute; here the kwargs handed to
    from_pretrained are recorded (bitsandbytes needs CUDA) and the model loads unquantized."""
    calls = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, **kw):
        calls.append(kw)
        kw = {k: v for k, v in kw.items() if k not in ("quantization_config", "device_map")}
        return real(cls, path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    spec = make_spec(tmp_path, template, **{"train.method": "qlora", "distributed.mixed_precision": "bf16"})
    sft._load_model(spec, _train_plan(spec, tmp_path), 514)
    evalkit.load_base(spec, str(trainkit.tiny_model()), 514)
    train_kw, eval_kw = calls
    tq, eq = train_kw.pop("quantization_config"), eval_kw.pop("quantization_config")
    assert tq.to_dict() == eq.to_dict()
    assert tq.bnb_4bit_use_double_quant and tq.bnb_4bit_quant_type == "nf4" and tq.bnb_4bit_compute_dtype == torch.bfloat16
    assert train_kw == eval_kw and train_kw["dtype"] == torch.bfloat16 and train_kw["device_map"] == {"": 0}


def test_the_plan_counts_the_model_training_loads(tmp_path, template):
    from peft import LoraConfig, get_peft_model

    spec = make_spec(tmp_path, template, **{"train.modules_to_save": ["embed_tokens", "lm_head"],
                                            "train.max_steps": 10})
    p = planmod.make_plan(spec)
    model = sft._load_model(spec, _train_plan(spec, tmp_path), 514)
    assert p["base_params"] == sum(x.numel() for x in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=spec.train.lora_r, target_modules=spec.train.target_modules,
                                            modules_to_save=spec.train.modules_to_save, task_type="CAUSAL_LM"))
    assert p["trainable_params"] == sum(x.numel() for x in peft.parameters() if x.requires_grad)


def test_the_benchmark_builds_its_model_by_the_jobs_rules(monkeypatch):
    from job import loader

    mod_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    for requested in ("auto", "sdpa", "eager", "flash_attention_2"):
        for cuda in (False, True):
            assert bench.pick_attention(requested, cuda) == loader.attn_implementation(requested, cuda, packed=True)
    prepared = []
    real = loader.for_training
    monkeypatch.setattr(loader, "for_training", lambda m: prepared.append(m) or real(m))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    model, *_ = bench.build_model(bench.TINY, torch.float32, torch.device("cpu"), "sdpa", False, lora)
    assert len(prepared) == 1 and model.config.use_cache is loader.USE_CACHE_IN_TRAINING is False


def test_a_generic_fast_tokenizer_loads_without_torch_and_exactly_as_autotokenizer(tmp_path):
    """The generic class (Llama 3's, our tiny one's) skips AutoTokenizer's config machinery, which imports
    torch (~1.5 s of every `sftjob prepare`); any other class goes through AutoTokenizer as before."""
    import subprocess
    import sys

    from job.loader import load_tokenizer

    tiny = trainkit.tiny_model()
    code = ("import sys, json; from job.loader import load_tokenizer\n"
            f"t = load_tokenizer({str(tiny)!r}, add_special_tokens=['<|x|>'])\n"
            "print(json.dumps(['torch' in sys.modules, type(t).__name__, t('hola <|x|> mundo')['input_ids']]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    torch_loaded, cls, ids = json.loads(r.stdout.strip().splitlines()[-1])
    auto = AutoTokenizer.from_pretrained(str(tiny))
    auto.add_tokens(["<|x|>"], special_tokens=True)
    assert not torch_loaded and cls == type(auto).__name__ and ids == auto("hola <|x|> mundo")["input_ids"]
    text = "¿Qué tal? <|im_start|>user\nDos + dos = 4 🙂<|im_end|>\n"
    assert load_tokenizer(tiny)(text)["input_ids"] == AutoTokenizer.from_pretrained(str(tiny))(text)["input_ids"]
    # a model-specific class (or remote code) is AutoTokenizer's to resolve
    other = tmp_path / "gpt2ish"
    AutoTokenizer.from_pretrained(str(tiny)).save_pretrained(other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    from job import loader

    assert loader._generic_fast(Path(tiny)) and not loader._generic_fast(other)
    assert load_tokenizer(other)(text)["input_ids"] == AutoTokenizer.from_pretrained(str(other))(text)["input_ids"]
    # a model type whose hub class AutoTokenizer overrides, remote code, a Mistral tekken.json: AutoTokenizer's
    from transformers.models.auto.tokenization_auto import MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS

    assert loader._hub_class_overridden() == frozenset(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
    for name, change in (("overridden", lambda d: (d / "config.json").write_text(json.dumps(
                             {**json.loads((d / "config.json").read_text()), "model_type": "internlm2"}))),
                         ("remote", lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
                             {**json.loads((d / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["x.T", None]}}))),
                         ("tekken", lambda d: (d / "tekken.json").write_text("{}"))):
        d = tmp_path / name
        import shutil

        shutil.copytree(tiny, d)
        assert loader._generic_fast(d)
        change(d)
        assert not loader._generic_fast(d), name
