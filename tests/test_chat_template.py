"""The chat template saved with every instruction model: transformers' own tools build the training prompt.

One source (core/prompts.py) gives the training text, `chat`'s prompt, the tokenizer's Jinja template,
the GGUF's ``tokenizer.chat_template`` and the Ollama Modelfile's TEMPLATE. Checked here: the saved
tokenizer's ``apply_chat_template`` reproduces the training prompt byte for byte (both styles, with and
without an input, on the book's instruction data), system messages and multi-turn conversations map as
core/prompts.py documents (the Go template the same way), the GGUF and the Modelfile carry the same
template, and a pipeline in a process without this package answers exactly as `chat --prompt` does.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import TINY, convert_main
from go_template import ollama_execute, parse_modelfile

from gpt2_scratch.core.cli import main
from gpt2_scratch.core.errors import InputError
from gpt2_scratch.core.prompts import (chat_messages, chat_template, format_example, format_input,
                                       generation_prompt)

EOT = "<|endoftext|>"


def instruction_records(shared_dir) -> list[dict]:
    return json.loads((shared_dir / "data" / "instruction-data.json").read_text(encoding="utf-8"))


def tiny_model(seed: int = 0):
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(seed)
    return GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{style: model folder saved as an instruction model of that style} (random weights)."""
    from gpt2_scratch import save_model_dir

    root = tmp_path_factory.mktemp("chat-template")
    return {style: save_model_dir(tiny_model(), root / style, prompt_style=style) for style in ("alpaca", "phi3")}


def saved_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_apply_chat_template_is_the_training_prompt(folders, style, shared_dir):
    folder = folders[style]
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == chat_template(style)
    tokenizer = saved_tokenizer(folder)
    records = instruction_records(shared_dir)
    assert any(r.get("input") for r in records) and any(not r.get("input") for r in records)
    for record in records:
        prompt = generation_prompt(record, style)
        assert format_example(record, style) == prompt + record["output"]  # a training example up to its answer
        assert render(tokenizer, chat_messages(record), add_generation_prompt=True) == prompt, record
        # A conversation ending in the answer is the whole training text, end-of-text included.
        assert render(tokenizer, chat_messages(record, with_response=True)) == format_example(record, style) + EOT
    record = records[0]
    ids = tokenizer.apply_chat_template(chat_messages(record), add_generation_prompt=True, return_dict=True)
    assert list(ids["input_ids"]) == tokenizer.encode(generation_prompt(record, style))
    # The usual call, one user message and the generation prompt, against the book's literal header.
    x = "Rewrite the sentence in passive voice."
    assert render(tokenizer, [{"role": "user", "content": x}], add_generation_prompt=True) == \
        format_input({"instruction": x, "input": ""}, style) + ("\n\n### Response:\n" if style == "alpaca"
                                                                 else "\n<|assistant|>:\n")


def conversations(style: str) -> list[tuple[list[dict], dict, str, str | None]]:
    """(messages, apply_chat_template kwargs, what the Jinja template gives, what Ollama's template gives)."""
    first = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5."}
    second = {"instruction": "Name a color.", "input": "", "output": "Red."}
    u = [{"role": "user", "content": second["instruction"]}]
    gen = dict(add_generation_prompt=True)
    return [
        # Several system messages are one input, joined by a blank line (as Ollama joins them).
        ([{"role": "system", "content": "2, 3"}, {"role": "system", "content": "4"}, *u], gen,
         generation_prompt({**second, "input": "2, 3\n\n4"}, style), None),
        # Only the last user message is asked; the system message still gives the input.
        ([*chat_messages(first, with_response=True), *u], gen,
         generation_prompt({**second, "input": first["input"]}, style), None),
        # A conversation ending in an answer: the last exchange as a training example.
        ([*chat_messages(first, with_response=True), *chat_messages(second, with_response=True)], {},
         format_example({**second, "input": first["input"]}, style) + EOT,
         generation_prompt({**second, "input": first["input"]}, style) + second["output"]),
        # A prefilled answer is continued (transformers: continue_final_message; Ollama always does).
        ([*u, {"role": "assistant", "content": "The color"}], dict(continue_final_message=True),
         generation_prompt(second, style) + "The color", generation_prompt(second, style) + "The color"),
        # Without the generation prompt, the prompt alone (Ollama's template always ends with the header).
        (u, {}, format_input(second, style), None),
    ]


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_system_and_multi_turn_map_as_documented_in_every_template(folders, style):
    from gpt2_scratch.convert.gguf import ollama_template

    tokenizer, go = saved_tokenizer(folders[style]), ollama_template(style)
    for messages, kwargs, jinja_expected, ollama_expected in conversations(style):
        assert render(tokenizer, messages, **kwargs) == jinja_expected, messages
        if kwargs.get("add_generation_prompt"):
            assert ollama_execute(go, messages) == jinja_expected, messages
        elif ollama_expected is not None:
            assert ollama_execute(go, messages) == ollama_expected, messages


def test_save_leaves_the_callers_tokenizer_alone_and_refuses_unknown_styles(tmp_path):
    from gpt2_scratch import get_tokenizer, save_model_dir

    tokenizer = get_tokenizer()
    save_model_dir(tiny_model(), tmp_path / "m", tokenizer=tokenizer, prompt_style="phi3")
    assert tokenizer.chat_template is None
    assert saved_tokenizer(tmp_path / "m").chat_template == chat_template("phi3")
    # A base model (no style) gets no template; pipelines then refuse chat messages instead of guessing.
    assert not (save_model_dir(tiny_model(), tmp_path / "base") / "chat_template.jinja").exists()
    with pytest.raises(InputError, match="unknown prompt style 'chatml'; choose one of alpaca, phi3"):
        save_model_dir(tiny_model(), tmp_path / "bad", prompt_style="chatml")


def test_gguf_and_modelfile_carry_the_saved_template(folders, tmp_path):
    from gguf import GGUFReader

    from gpt2_scratch.convert.gguf import export_gguf, ollama_template

    folder = folders["phi3"]
    gguf_path, modelfile = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    reader = GGUFReader(gguf_path)
    in_file = reader.fields["tokenizer.chat_template"].contents()
    assert in_file == saved_tokenizer(folder).chat_template == chat_template("phi3")
    assert ("template", ollama_template("phi3")) in parse_modelfile(modelfile.read_text(encoding="utf-8"))


def test_convert_book_records_the_prompt_style(folders, tmp_path):
    pth = tmp_path / "book.pth"
    assert convert_main(["export-book", "--model", folders["alpaca"], "--out", pth]) == 0
    assert convert_main(["book", "--pth", pth, "--out", tmp_path / "phi3", "--n-heads", "4",
                         "--prompt-style", "phi3"]) == 0
    assert json.loads((tmp_path / "phi3" / "config.json").read_text())["prompt_style"] == "phi3"
    assert saved_tokenizer(tmp_path / "phi3").chat_template == chat_template("phi3")
    assert convert_main(["book", "--pth", pth, "--out", tmp_path / "plain", "--n-heads", "4"]) == 0
    assert "prompt_style" not in json.loads((tmp_path / "plain" / "config.json").read_text())


# --- transformers' pipeline on a trained model, in a process without this package ----------------
TRAIN = [
    {"instruction": "What is an antonym of 'soft'?", "input": "", "output": "hard."},
    {"instruction": "Add the numbers.", "input": "2, 3", "output": "5."},
]
ASK = [*TRAIN, {"instruction": "Name a primary color.", "input": ""}]  # the last was never trained on
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny alpaca model trained on TRAIN (so it answers them and stops at <|endoftext|>)."""
    from gpt2_scratch import ENDOFTEXT_ID, get_tokenizer, save_model_dir

    tokenizer, model = get_tokenizer(), tiny_model(seed=1).train()
    examples = []
    for record in TRAIN:
        ids = torch.tensor(tokenizer.encode(format_example(record)) + [ENDOFTEXT_ID])
        labels = ids.clone()
        labels[:len(tokenizer.encode(generation_prompt(record)))] = -100  # the loss on the answer only
        examples.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(25):
        for ids, labels in examples:
            model(input_ids=ids[None], labels=labels[None]).loss.backward()  # labels shift inside
        optimizer.step()
        optimizer.zero_grad()
    return save_model_dir(model.eval(), tmp_path_factory.mktemp("trained") / "sft", prompt_style="alpaca")


PIPELINE = """
import importlib.util, json, sys
assert importlib.util.find_spec("gpt2_scratch") is None  # as in a venv without our package
from transformers import pipeline

folders, chats, n = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
replies = {}
for name, folder in folders.items():
    pipe = pipeline("text-generation", model=folder, trust_remote_code=True)
    alone = [pipe(chat, max_new_tokens=n, do_sample=False)[0]["generated_text"][-1]["content"] for chat in chats]
    pipe.tokenizer.padding_side = "left"  # batched generation pads on the left
    batch = pipe(chats, max_new_tokens=n, do_sample=False, batch_size=len(chats))
    replies[name] = {"alone": alone, "batch": [out[0]["generated_text"][-1]["content"] for out in batch]}
assert "gpt2_scratch" not in sys.modules
print(json.dumps(replies))
"""


def test_pipeline_with_chat_messages_answers_as_chat_does(trained, tmp_path, capsys):
    expected = []
    for record in ASK:
        flags = ["--input", record["input"]] if record["input"] else []
        assert main(["chat", "--model", str(trained), "--prompt", record["instruction"], *flags,
                     "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        expected.append(out[:-1])
    assert expected[:2] == ["hard.", "5."]  # trained: the answers stop at <|endoftext|>

    # `convert export-hf` (a plain GPT2LMHeadModel folder, what `transformers serve` loads) keeps the template.
    assert convert_main(["export-hf", "--model", trained, "--out", tmp_path / "hf"]) == 0
    folders = {"ours": str(trained), "export-hf": str(tmp_path / "hf")}
    chats = [chat_messages(record) for record in ASK]
    # -S skips the site-packages' .pth files, and with them the editable install of our package: the folder's
    # own code (trust_remote_code) is all the model has, as in a venv where only transformers is installed.
    site_packages = sysconfig.get_paths()["purelib"]
    result = subprocess.run([sys.executable, "-S", "-c", PIPELINE, json.dumps(folders), json.dumps(chats),
                             str(MAX_NEW_TOKENS)], cwd="/", env={**os.environ, "PYTHONPATH": site_packages},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    replies = json.loads(result.stdout.strip().splitlines()[-1])
    for name in folders:
        assert replies[name] == {"alone": expected, "batch": expected}, name


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_developer_tool_and_list_of_parts_messages_are_not_lost(folders, style):
    """OpenAI's newer messages used to be dropped (developer, tool) or raise TypeError (a list of parts)."""
    tokenizer = saved_tokenizer(folders[style])
    parts = [{"type": "text", "text": "Name a "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": "colour."}]
    got = render(tokenizer, [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts},
                             {"role": "assistant", "content": None, "tool_calls": []},
                             {"role": "tool", "content": [{"type": "text", "text": "sky: blue"}]}],
                 add_generation_prompt=True)
    assert got == generation_prompt({"instruction": "Name a colour.", "input": "Be brief.\n\nsky: blue"}, style)
    # developer is exactly system, as OpenAI defines it
    assert render(tokenizer, [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]) == \
        render(tokenizer, [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_the_prompt_style_survives_export_hf_and_back(folders, tmp_path, capsys):
    """export-hf used to drop prompt_style: chat and respond on the export prompted in Alpaca style."""
    from gpt2_scratch.convert.resolve import load_model

    exported, back = tmp_path / "hf", tmp_path / "back"
    assert convert_main(["export-hf", "--model", folders["phi3"], "--out", exported]) == 0
    assert json.loads((exported / "config.json").read_text())["prompt_style"] == "phi3"
    assert saved_tokenizer(exported).chat_template == chat_template("phi3")
    assert load_model(str(exported)).config.prompt_style == "phi3"  # what chat and respond read
    assert convert_main(["hf", "--from-dir", exported, "--out", back]) == 0
    assert json.loads((back / "config.json").read_text())["prompt_style"] == "phi3"
    assert (back / "chat_template.jinja").read_text(encoding="utf-8") == chat_template("phi3")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}]))
    capsys.readouterr()
    assert main(["respond", "--model", str(exported), "--data", str(data), "--out", str(tmp_path / "r.json"),
                 "--max-new-tokens", "2", "--quiet"]) == 0
    assert "phi3 prompts" in capsys.readouterr().out
