"""`python -m convert gguf`: our model folder → GGUF (llama.cpp's "gpt2") + an Ollama Modelfile.

Checked with real readers: transformers' GGUF loader (`GPT2LMHeadModel.from_pretrained(dir,
gguf_file=...)`), gguf's GGUFReader, and, in the slow tests, llama.cpp itself (llama-cpp-python).
The Modelfile's TEMPLATE is rendered by tests/go_template.py (Go text/template subset + Ollama's
way of calling it) and the file's Jinja chat template by jinja2 as transformers and llama-cpp-python
configure it; both must give exactly the training prompt.

Tolerances: max |logit difference| against our model (the tests print what they measure with -s).
Measured on the tiny fixture (logit std 0.4) / the random gpt2-small shape (logit std 0.55):

    file dtype   transformers' reader          llama.cpp (its KV cache is f16)   allowed (transformers / llama.cpp)
    f32          8e-7 / 2e-6                   1.0e-3 / 1.5e-3                   1e-4 / 3e-3
    f16          1.1e-3 / 1.9e-3               1.9e-3 / 2.7e-3                   5e-3 / 5e-3
    bf16         9e-3 / -                      1.1e-2 / -                        3e-2 / 3e-2
    q8_0         3.2e-2 / 4.7e-2               4.4e-2 / 6.8e-2                   1e-1 / 1e-1

Errors grow with the logits' scale: a trained model's logits are several times larger than these
random ones, so these bounds are for these fixtures, not promises for every checkpoint. Greedy
continuations are required to be identical for f32 (transformers, llama.cpp) and f16 (llama.cpp);
bf16/q8_0 may flip near-ties of random weights.

transformers' GGUF reader ignores gpt2.context_length (FACTS.md), so the models here have context 1024.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import convert_main
from gpt2_scratch.convert.errors import ConvertError
from gpt2_scratch.convert.gguf import GGUF_RULES, chat_template, export_gguf, ollama_template

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import TINY, run_cli  # noqa: E402
from go_template import ollama_execute, parse_modelfile, render  # noqa: E402

TINY_1024 = {**TINY, "context_length": 1024}
PROMPT = torch.tensor([[464, 3290, 373, 1043, 287, 257, 2214, 1474, 13, 50256, 11, 0]])
# Max |logit difference| allowed per dtype (see the module docstring).
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1}


def make_model(seed: int = 0, **overrides):
    """A random model whose every tensor matters (GPT-2's init leaves biases zero and norms one)."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    torch.manual_seed(seed)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **{**TINY_1024, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save(model, folder: Path, prompt_style: str | None = None) -> Path:
    from gpt2_scratch import save_model_dir

    if prompt_style is not None:
        model.config.prompt_style = prompt_style  # what SFT runs record in config.json
    return save_model_dir(model, folder, overwrite=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, folder) of a tiny alpaca-finetuned-looking model."""
    model = make_model()
    return model, save(model, tmp_path_factory.mktemp("gguf") / "tiny", prompt_style="alpaca")


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """{dtype: GGUF path} of the tiny model, one export per dtype."""
    _, folder = tiny
    out = tmp_path_factory.mktemp("exports")
    return {dtype: export_gguf(folder, out / f"tiny-{dtype}.gguf", dtype=dtype)[0] for dtype in TOLERANCE}


@pytest.fixture(scope="module")
def reader(exports):
    from gguf import GGUFReader

    return GGUFReader(exports["q8_0"])


def field(reader, key):
    return reader.fields[key].contents()


def load_with_transformers(gguf_path: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def greedy(model, ids=PROMPT, n: int = 20) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=50256)
    return out[0, ids.shape[1]:].tolist()


# --- through transformers' GGUF reader -------------------------------------------------------
def test_f32_round_trip_through_transformers(tiny, exports):
    ours, _ = tiny
    theirs = load_with_transformers(exports["f32"])
    assert theirs.config.tie_word_embeddings and theirs.config.n_layer == TINY["n_layers"]
    diff = (logits(theirs) - logits(ours)).abs().max().item()
    print(f"f32 max |logit diff| {diff:.2e}")
    assert diff <= TOLERANCE["f32"]
    assert greedy(theirs) == greedy(ours)


# Each transformers GGUF load parses the file's 100k tokenizer strings twice in Python (seconds), so the
# default run reads only the quantized file; f16 and bf16 run with the slow tests (and through llama.cpp).
@pytest.mark.parametrize("dtype", [pytest.param("f16", marks=pytest.mark.slow),
                                   pytest.param("bf16", marks=pytest.mark.slow), "q8_0"])
def test_reduced_precision_round_trip(tiny, exports, dtype):
    ours, _ = tiny
    diff = (logits(load_with_transformers(exports[dtype])) - logits(ours)).abs().max().item()
    print(f"{dtype} max |logit diff| {diff:.2e}")
    assert diff <= TOLERANCE[dtype]
    assert diff > 0  # the weights really were rounded: a test that cannot fail is no test
    assert exports[dtype].stat().st_size < exports["f32"].stat().st_size


def test_tensor_layout_types_and_metadata(reader, exports):
    """The file llama.cpp's gpt2 loader expects: names, [out, in] shapes, types, keys, tokenizer."""
    from gguf import GGMLQuantizationType as Q, TokenType

    from gpt2_scratch.tokenizer import vocab_files

    E, V, L = TINY["emb_dim"], 50257, TINY["n_layers"]
    # GGUFReader reports ggml's dimension order (fastest first): {in, out} for a torch [out, in] matrix.
    expected = {"token_embd.weight": (E, V), "position_embd.weight": (E, 1024),
                "output_norm.weight": (E,), "output_norm.bias": (E,)}
    for i in range(L):
        expected.update({
            f"blk.{i}.attn_norm.weight": (E,), f"blk.{i}.attn_norm.bias": (E,),
            f"blk.{i}.attn_qkv.weight": (E, 3 * E), f"blk.{i}.attn_qkv.bias": (3 * E,),
            f"blk.{i}.attn_output.weight": (E, E), f"blk.{i}.attn_output.bias": (E,),
            f"blk.{i}.ffn_norm.weight": (E,), f"blk.{i}.ffn_norm.bias": (E,),
            f"blk.{i}.ffn_up.weight": (E, 4 * E), f"blk.{i}.ffn_up.bias": (4 * E,),
            f"blk.{i}.ffn_down.weight": (4 * E, E), f"blk.{i}.ffn_down.bias": (E,),
        })
    tensors = {t.name: t for t in reader.tensors}
    assert {n: tuple(int(x) for x in t.shape) for n, t in tensors.items()} == expected  # no output.weight: tied
    for name, t in tensors.items():
        assert t.tensor_type == (Q.F32 if len(t.shape) == 1 else Q.Q8_0), name

    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.file_type") == 7  # MOSTLY_Q8_0
    assert field(reader, "gpt2.context_length") == 1024
    assert field(reader, "gpt2.embedding_length") == E
    assert field(reader, "gpt2.feed_forward_length") == 4 * E
    assert field(reader, "gpt2.block_count") == L
    assert field(reader, "gpt2.attention.head_count") == TINY["n_heads"]
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        assert field(reader, f"tokenizer.ggml.{key}") == 50256, key
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "gpt2_scratch.prompt_style") == "alpaca"
    assert field(reader, "tokenizer.chat_template") == chat_template("alpaca")

    encoder_json, vocab_bpe = vocab_files()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == V and all(encoder[tok] == i for i, tok in enumerate(tokens))
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[50256] == TokenType.CONTROL and set(types[:50256]) == {TokenType.NORMAL}
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges[0] == "Ġ t" and len(merges) == 50000
    assert merges == vocab_bpe.read_text(encoding="utf-8").splitlines()[1:][:50000]



def untied_model_without_qkv_bias():
    """The book's GPTModel shape when finetuned: its own head (not tied), and qkv_bias=False."""
    model = make_model(seed=1, tie_word_embeddings=False, qkv_bias=False)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        model.lm_head.weight.add_(0.1 * torch.randn_like(model.lm_head.weight))  # really different from wte
    return model


def test_untied_head_and_no_qkv_bias(tmp_path):
    """An untied head is written as output.weight; a missing qkv bias as zeros (llama.cpp requires one)."""
    model = untied_model_without_qkv_bias()
    gguf_path, _ = export_gguf(save(model, tmp_path / "untied"), tmp_path / "untied.gguf", dtype="f32")
    theirs = load_with_transformers(gguf_path)
    assert theirs.config.tie_word_embeddings is False  # transformers unties exactly when output.weight exists
    assert not any(block.attn.c_attn.bias.any() for block in theirs.transformer.h)
    assert torch.equal(theirs.lm_head.weight, model.lm_head.weight)
    assert (logits(theirs) - logits(model)).abs().max().item() <= TOLERANCE["f32"]
    assert greedy(theirs) == greedy(model)


# --- the Modelfile and the chat templates ----------------------------------------------------
def instruction_records(shared_dir) -> list[dict]:
    return json.loads((shared_dir / "data" / "instruction-data.json").read_text(encoding="utf-8"))


def chat_messages(record: dict) -> list[dict]:
    """Our convention (core/prompts.py): the input (if any) as the system message, the instruction as the user's."""
    from gpt2_scratch.core.prompts import chat_messages as messages_of

    return messages_of(record)


@functools.cache
def compiled_jinja(template: str):
    """Compiled the way transformers and llama-cpp-python compile chat templates."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def jinja_render(template: str, messages: list[dict]) -> str:
    return compiled_jinja(template).render(messages=messages, add_generation_prompt=True,
                                           bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_templates_render_the_training_prompt(style, shared_dir):
    from gpt2_scratch.core.prompts import format_input, response_header

    records = instruction_records(shared_dir)
    assert any(r.get("input") for r in records) and any(not r.get("input") for r in records)
    go, jinja = ollama_template(style), chat_template(style)
    for record in records:
        expected = format_input(record, style) + response_header(style)
        assert ollama_execute(go, chat_messages(record)) == expected, record
        assert jinja_render(jinja, chat_messages(record)) == expected, record

    # Only the last instruction reaches the model: earlier turns are dropped, as in training.
    first, second = records[0], records[1]
    turns = [*chat_messages(first), {"role": "assistant", "content": first["output"]},
             {"role": "user", "content": second["instruction"]}]
    expected = format_input({"instruction": second["instruction"], "input": first.get("input")}, style)
    assert ollama_execute(go, turns) == expected + response_header(style)
    assert jinja_render(jinja, turns) == expected + response_header(style)


def test_go_template_renderer_follows_go_semantics():
    """The test renderer itself: assignment in range reaches the outer variable, trims, else, eq."""
    t = '{{ $x := "a" }}{{ range .L }}{{ if eq .R "u" }}{{ $x = .C }}{{ end }}{{ end }}[{{ $x }}]'
    assert render(t, {"L": [{"R": "u", "C": "1"}, {"R": "v", "C": "2"}, {"R": "u", "C": "3"}]}) == "[3]"
    assert render("a  {{- .S -}}  b{{ if .E }}x{{ else }}y{{ end }}", {"S": "!", "E": ""}) == "a!by"
    with pytest.raises(ValueError):
        render("{{ .S | printf }}", {"S": ""})


def test_modelfile(tiny, exports, tmp_path):
    _, folder = tiny
    modelfile = exports["f16"].with_suffix(".Modelfile")
    text = modelfile.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines[0] == "FROM ./tiny-f16.gguf"
    assert f'TEMPLATE """{ollama_template("alpaca")}"""' in text
    for line in ('PARAMETER stop "<|endoftext|>"', "PARAMETER num_ctx 1024", "PARAMETER temperature 0",
                 "PARAMETER repeat_penalty 1", "PARAMETER num_predict 256"):
        assert line in lines
    # What Ollama's Modelfile parser reads back: the template exactly, the stop string unquoted.
    assert parse_modelfile(text) == [("from", "./tiny-f16.gguf"), ("template", ollama_template("alpaca")),
                                     ("stop", "<|endoftext|>"), ("num_ctx", "1024"), ("temperature", "0"),
                                     ("repeat_penalty", "1"), ("num_predict", "256")]

    # --modelfile elsewhere: FROM is relative to the Modelfile's folder, as Ollama resolves it.
    elsewhere = tmp_path / "ollama" / "gpt2.Modelfile"
    gguf_path, written = export_gguf(folder, tmp_path / "files" / "m.gguf", modelfile=elsewhere)
    assert written == elsewhere
    from_line = next(ln for ln in elsewhere.read_text().splitlines() if ln.startswith("FROM "))
    assert from_line == "FROM ../files/m.gguf"
    assert (elsewhere.parent / from_line[5:]).resolve() == gguf_path.resolve()


@pytest.mark.slow  # several fresh interpreters (~10 s each here): the slow suite
def test_prompt_style_sources(tmp_path):
    """config.json's prompt_style is used; --prompt-style overrides; absent = plain completion + a note."""
    model = make_model(seed=3)
    phi3 = save(model, tmp_path / "phi3", prompt_style="phi3")
    _, modelfile = export_gguf(phi3, tmp_path / "a.gguf")
    assert ollama_template("phi3") in modelfile.read_text()
    _, modelfile = export_gguf(phi3, tmp_path / "b.gguf", prompt_style="alpaca")
    assert ollama_template("alpaca") in modelfile.read_text()

    plain = save(make_model(seed=3), tmp_path / "plain")
    assert "prompt_style" not in json.loads((plain / "config.json").read_text())
    # As a user runs it (in-process, pytest's log capture would swallow the logging line).
    proc = run_cli("-m", "convert", "gguf", "--model", str(plain), "--out", str(tmp_path / "c.gguf"), "--dtype", "f32")
    assert proc.returncode == 0, proc.stderr
    err_lines = proc.stderr.strip().splitlines()
    assert len(err_lines) == 1 and "prompt style unknown" in err_lines[0] and "--prompt-style" in err_lines[0]
    text = (tmp_path / "c.Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text
    assert ollama_execute(ollama_template(None), [{"role": "user", "content": "Once upon"}]) == "Once upon"
    from gguf import GGUFReader

    keys = GGUFReader(tmp_path / "c.gguf").fields
    assert "tokenizer.chat_template" not in keys and "gpt2_scratch.prompt_style" not in keys

    # An SFT run's folder from before config.json recorded the style: args.json beside the model.
    (plain / "args.json").write_text(json.dumps({"prompt_style": "phi3", "epochs": 2}))
    _, modelfile = export_gguf(plain, tmp_path / "d.gguf")
    assert ollama_template("phi3") in modelfile.read_text()

    bad = save(make_model(seed=3), tmp_path / "bad", prompt_style="chatml")
    with pytest.raises(ConvertError, match=r"prompt style 'chatml' is unknown.*--prompt-style"):
        export_gguf(bad, tmp_path / "e.gguf")


# The same check with Go's own text/template, called the way ollama/template.Execute calls a template
# that uses .Messages (written here from its documented behaviour, no Ollama code): consecutive messages
# of one role merged with a blank line, .System = all system messages joined by blank lines.
GO_RENDERER = """
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type job struct {
	Template string      `json:"template"`
	Chats    [][]message `json:"chats"`
}

func main() {
	var j job
	if err := json.NewDecoder(os.Stdin).Decode(&j); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Parse(j.Template))
	var out []string
	for _, chat := range j.Chats {
		var system []string
		var merged []*message
		for i := range chat {
			m := chat[i]
			if m.Role == "system" {
				system = append(system, m.Content)
			}
			if n := len(merged); n > 0 && merged[n-1].Role == m.Role {
				merged[n-1].Content += "\\n\\n" + m.Content
			} else {
				merged = append(merged, &m)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\\n\\n"), "Messages": merged, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.mark.slow
@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_templates_render_the_training_prompt_in_go(style, shared_dir, tmp_path):
    import shutil
    import subprocess

    from gpt2_scratch.core.prompts import format_input, response_header

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to run text/template itself")
    (tmp_path / "render.go").write_text(GO_RENDERER)
    records = instruction_records(shared_dir)
    chats = [chat_messages(r) for r in records]
    chats.append([*chat_messages(records[1]), {"role": "assistant", "content": "x"},
                  {"role": "user", "content": records[0]["instruction"]}])
    proc = subprocess.run([go, "run", str(tmp_path / "render.go")], input=json.dumps(
        {"template": ollama_template(style), "chats": chats}), capture_output=True, text=True, timeout=600,
        env={**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath")})
    assert proc.returncode == 0, proc.stderr
    rendered = json.loads(proc.stdout)
    expected = [format_input(r, style) + response_header(style) for r in records]
    expected.append(format_input({"instruction": records[0]["instruction"], "input": records[1].get("input")},
                                 style) + response_header(style))
    assert rendered == expected


# --- the command line: errors and atomic writes ----------------------------------------------
def cli_error(capsys, *args: str) -> str:
    capsys.readouterr()  # drop what earlier steps printed (progress bars of save_model_dir)
    assert convert_main(["gguf", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    _, folder = tiny
    out = str(tmp_path / "x.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in cli_error(capsys, "--model", str(empty), "--out", out)
    assert "no such folder" in cli_error(capsys, "--model", str(tmp_path / "nope"), "--out", out)
    hf_like = tmp_path / "hf"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "not a gpt2-scratch model" in cli_error(capsys, "--model", str(hf_like), "--out", out)
    assert "--dtype: invalid choice: 'q4_k'" in cli_error(capsys, "--model", str(folder), "--out", out, "--dtype", "q4_k")
    assert "must end in .gguf" in cli_error(capsys, "--model", str(folder), "--out", str(tmp_path / "x.bin"))
    assert not list(tmp_path.glob("x*"))

    assert convert_main(["gguf", "--model", str(folder), "--out", out, "--dtype", "f32"]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    before = Path(out).read_bytes()
    line = cli_error(capsys, "--model", str(folder), "--out", out)
    assert out in line and "--overwrite" in line
    Path(out).unlink()  # the Modelfile alone also counts as an existing output
    assert "x.Modelfile: already exists" in cli_error(capsys, "--model", str(folder), "--out", out)
    assert convert_main(["gguf", "--model", str(folder), "--out", out, "--overwrite"]) == 0
    assert Path(out).read_bytes() != before  # f16 now


def test_classifier_folder_is_refused(tmp_path, capsys):
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForSequenceClassification, save_model_dir

    clf = GPT2ScratchForSequenceClassification(GPT2ScratchConfig.from_preset("gpt2-small", **TINY, num_labels=2))
    save_model_dir(clf, tmp_path / "clf")
    line = cli_error(capsys, "--model", str(tmp_path / "clf"), "--out", str(tmp_path / "c.gguf"))
    assert "GPT2ScratchForSequenceClassification" in line and "causal LM" in line


def test_failed_write_leaves_old_file_and_no_temp(tiny, tmp_path, monkeypatch):
    import gpt2_scratch.convert.gguf as gguf_mod

    _, folder = tiny
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"GGUF partial")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_mod, "_write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(folder, out, overwrite=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_table_covers_every_parameter(tiny):
    """Every parameter of the model has a rule (the tied head aside), no rule is left over."""
    model, _ = tiny
    ours = {r.source.format(i=0) for r in GGUF_RULES}
    params = {n for n in model.state_dict() if ".h." not in n or ".h.0." in n} - {"lm_head.weight"}
    assert ours == params


# --- gpt2-small shape ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, {dtype: GGUF path}, prompt ids) at gpt2-small's shape (124M, random weights)."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM

    tmp = tmp_path_factory.mktemp("small")
    torch.manual_seed(0)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small")).eval()
    folder = save(model, tmp / "small", prompt_style="alpaca")
    files = {dtype: export_gguf(folder, tmp / f"small-{dtype}.gguf", dtype=dtype)[0] for dtype in ("f32", "f16", "q8_0")}
    return model, files, torch.randint(0, 50257, (1, 32))


@pytest.mark.slow
def test_gpt2_small_shape_round_trip(small):
    model, files, ids = small
    ours = logits(model, ids)
    print(f"gpt2-small logits: std {ours.std():.2f}, max |logit| {ours.abs().max():.2f}")
    for dtype, gguf_path in files.items():
        theirs = load_with_transformers(gguf_path)
        diff = (logits(theirs, ids) - ours).abs().max().item()
        print(f"gpt2-small {dtype}: max |logit diff| {diff:.2e}, {gguf_path.stat().st_size / 1e6:.0f} MB")
        assert diff <= TOLERANCE[dtype], dtype
        if dtype == "f32":
            assert greedy(theirs, ids) == greedy(model, ids)
        del theirs


# --- llama.cpp itself ------------------------------------------------------------------------
def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama_cpp is not importable ({e}); install it with `pip install -e .[llama]`")
    return llama_cpp


# llama.cpp keeps its KV cache in f16 by default, so even an f32 file is not bit-exact there.
LLAMA_TOLERANCE = {"f32": 3e-3, "f16": 5e-3, "bf16": 3e-2, "q8_0": 1e-1}


@contextlib.contextmanager
def llama_load(path: Path, **kwargs):
    llm = llama_cpp().Llama(model_path=str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                            **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def llama_logits_and_greedy(llm, ids: list[int], n: int = 20) -> tuple[np.ndarray, list[int]]:
    """Logits of every prompt position, then n greedy tokens (argmax, no sampler state at all)."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)])
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return prompt_logits, out


PROMPTS = ["Below is an instruction that describes a task.", "The capital of France is", "def fib(n):\n   "]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_llama_cpp_runs_the_export(tiny, exports, dtype):
    from gpt2_scratch import get_encoding

    ours, _ = tiny
    worst, same = 0.0, []
    with llama_load(exports[dtype]) as llm:
        assert llm.n_ctx() == 1024 and llm.token_bos() == 50256 and llm.token_eos() == 50256
        for text in PROMPTS:
            ids = get_encoding().encode(text)
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids  # add_bos_token false: no BOS
            their_logits, their_tokens = llama_logits_and_greedy(llm, ids)
            worst = max(worst, float(np.abs(their_logits - logits(ours, torch.tensor([ids]))[0].numpy()).max()))
            same.append(their_tokens == greedy(ours, torch.tensor([ids])))
    print(f"llama.cpp {dtype}: max |logit diff| {worst:.2e}, greedy continuations equal: {same}")
    assert worst <= LLAMA_TOLERANCE[dtype]
    if dtype in ("f32", "f16"):
        assert all(same)


@pytest.mark.slow
def test_llama_cpp_untied_head_and_no_qkv_bias(tmp_path):
    model = untied_model_without_qkv_bias()
    gguf_path, _ = export_gguf(save(model, tmp_path / "untied"), tmp_path / "untied.gguf", dtype="f32")
    ids = [464, 3290, 373, 1043, 287, 257]
    with llama_load(gguf_path) as llm:
        their_logits, their_tokens = llama_logits_and_greedy(llm, ids)
    assert np.abs(their_logits - logits(model, torch.tensor([ids]))[0].numpy()).max() <= LLAMA_TOLERANCE["f32"]
    assert their_tokens == greedy(model, torch.tensor([ids]))


@pytest.mark.slow
def test_llama_cpp_gpt2_small_shape(small):
    model, files, _ = small
    ids = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 13, 50256, 11, 0]
    ours = logits(model, torch.tensor([ids]))[0].numpy()
    for dtype, gguf_path in files.items():
        with llama_load(gguf_path) as llm:
            their_logits, their_tokens = llama_logits_and_greedy(llm, ids)
        diff = float(np.abs(their_logits - ours).max())
        same = their_tokens == greedy(model, torch.tensor([ids]))
        print(f"llama.cpp gpt2-small {dtype}: max |logit diff| {diff:.2e}, greedy equal: {same}")
        assert diff <= LLAMA_TOLERANCE[dtype], dtype
        if dtype in ("f32", "f16"):
            assert same, dtype


@pytest.mark.slow
def test_llama_cpp_tokenizer_matches_ours_on_the_instruction_data(exports, shared_dir):
    from gpt2_scratch import get_encoding
    from gpt2_scratch.core.prompts import format_example, format_input

    enc = get_encoding()
    records = instruction_records(shared_dir)
    assert len(records) == 1100
    with llama_load(exports["q8_0"], vocab_only=True) as llm:
        for style in ("alpaca", "phi3"):
            for record in records:
                for text in (format_input(record, style), format_example(record, style)):
                    ids = enc.encode(text)
                    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
                    assert llm.detokenize(ids).decode() == text


@pytest.mark.slow
def test_llama_cpp_chat_uses_the_training_prompt(tiny, exports, shared_dir):
    """llama-cpp-python's chat path (the GGUF's chat template) answers like our model on the training prompt."""
    from llama_cpp import llama_chat_format

    from gpt2_scratch import get_encoding
    from gpt2_scratch.core.prompts import format_input, response_header

    ours, _ = tiny
    enc = get_encoding()
    records = instruction_records(shared_dir)
    with llama_load(exports["f32"]) as llm:
        assert llm.chat_format == "chat_template.default"  # the file's template, not a guessed format
        formatter = llama_chat_format.Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                                                          eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        for record in [next(r for r in records if r.get("input")), next(r for r in records if not r.get("input"))]:
            prompt = format_input(record, "alpaca") + response_header("alpaca")
            assert formatter(messages=chat_messages(record)).prompt == prompt
            reply = llm.create_chat_completion(messages=chat_messages(record), max_tokens=12, temperature=0.0,
                                               repeat_penalty=1.0, top_k=1)
            tokens = greedy(ours, torch.tensor([enc.encode(prompt)]), n=12)
            tokens = tokens[: tokens.index(50256)] if 50256 in tokens else tokens
            assert reply["choices"][0]["message"]["content"] == enc.decode(tokens, errors="ignore")
