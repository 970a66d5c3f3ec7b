import json

import pytest

from multitoken.cli import main
from multitoken.generation import Llama
from multitoken.train.distill import self_distill


def test_self_distill_writes_the_models_own_completions(tiny_ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\nclass Stack:\nimport os\n")
    out = tmp_path / "d" / "distill.jsonl"
    main(["distill", "--ckpt-dir", str(tiny_ckpt), "--prompts-file", str(prompts), "--out", str(out),
          "--samples-per-prompt", "2", "--max-gen-len", "6", "--temperature", "0", "--batch-size", "4"])
    lines = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert len(lines) == 6 and [t.split("\n")[0][:5] for t in lines[::2]] == ["def a", "class", "impor"]
    assert "6 samples" in capsys.readouterr().out
    assert list(out.parent.iterdir()) == [out]  # no temporary file left behind
    # Greedy: each text is the prompt plus what plain greedy decoding gives.
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=64, max_batch_size=1)
    ids = llama.tokenizer.encode("import os", bos=True, eos=False)
    assert lines[4] == "import os" + llama.tokenizer.decode(llama.generate([ids], 6, temperature=0)[0][0])


def test_chat_template_wraps_each_prompt(tiny_ckpt, tmp_path):
    template = tmp_path / "chat_template.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=64, max_batch_size=2)
    out = tmp_path / "chat.jsonl"
    self_distill(llama, ["hi"], out, max_gen_len=3, chat_template=template, progress=False)
    assert json.loads(out.read_text())["text"].startswith("<user>hi<assistant>")


def test_bad_input_is_a_clear_error_and_leaves_nothing(tiny_ckpt, tmp_path):
    llama = Llama.build(tiny_ckpt, tiny_ckpt / "tokenizer.model", max_seq_len=64, max_batch_size=2)
    out = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="no prompts"):
        self_distill(llama, [], out, progress=False)
    with pytest.raises(FileNotFoundError, match="chat template"):
        self_distill(llama, ["a"], out, chat_template=tmp_path / "missing.jinja", progress=False)
    with pytest.raises(SystemExit, match="prompts file not found"):
        main(["distill", "--ckpt-dir", str(tiny_ckpt), "--prompts-file", str(tmp_path / "none.txt"), "--out", str(out)])
    assert not out.exists() and list(tmp_path.glob(".x.jsonl*")) == []
