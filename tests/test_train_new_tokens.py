"""Teaching a base model a new chat format: new special tokens, resized embeddings saved with the adapter."""
import pytest
import trainkit
from safetensors.torch import load_file
from transformers import AutoTokenizer

from job.train.export import verify_adapter

pytestmark = pytest.mark.slow

TEMPLATE = ("{% for m in messages %}{{ '<|turn|>' + m['role'] + '\n' + m['content'] + '<|endturn|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|turn|>assistant\n' }}{% endif %}")


def test_added_special_tokens_resize_embeddings_and_ship_with_the_adapter(tmp_path):
    tpl = tmp_path / "turns.jinja"
    tpl.write_text(TEMPLATE)
    out = tmp_path / "out"
    r = trainkit.run("run", "--model", str(trainkit.tiny_model()), "--data", str(trainkit.chat_data()),
                     "--output", str(out), "--chat-template", str(tpl), "--max-steps", "3", "--max-length", "256",
                     "--add-special-tokens", "<|turn|>,<|endturn|>", "--modules-to-save", "embed_tokens,lm_head",
                     env={"SFTJOB_CACHE_DIR": str(tmp_path / "c")})
    assert r.returncode == 0, r.stderr[-3000:]
    base_tok = AutoTokenizer.from_pretrained(trainkit.tiny_model())
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(base_tok) + 2
    ids = tok.apply_chat_template([{"role": "user", "content": "hola"}], tokenize=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|turn|>") in ids and max(ids) >= len(base_tok)
    weights = load_file(str(out / "adapter_model.safetensors"))
    embed = next(v for k, v in weights.items() if "embed_tokens" in k)
    assert embed.shape[0] == len(tok)
    assert verify_adapter(out, str(trainkit.tiny_model()))["forward_checked"]
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
