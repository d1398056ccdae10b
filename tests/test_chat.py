"""`gpt2-scratch chat`: messages wrapped in the trained prompt style, answers streamed, a clear way out.

The answers are checked against the model's own greedy continuation of the training prompt; the
interactive form runs in a real pseudo-terminal, the piped and one-shot forms in this process.
"""

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT

from gpt2_scratch.core.cli import main
from gpt2_scratch.core.prompts import format_input, response_header
from gpt2_scratch.commands import chat_prompt

TINY_1024 = dict(n_layers=2, emb_dim=64, n_heads=4, context_length=256)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model recorded as trained with phi3 prompts (so the style must come from its config)."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

    torch.manual_seed(7)
    model = GPT2ScratchForCausalLM(GPT2ScratchConfig.from_preset("gpt2-small", **TINY_1024))
    return save_model_dir(model, tmp_path_factory.mktemp("chat") / "model", prompt_style="phi3")


def expected_answer(model_dir, message: str, style: str, max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM

    from gpt2_scratch import ENDOFTEXT_ID, get_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = get_tokenizer()
    ids = tokenizer.encode(chat_prompt(message, style))
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_the_prompt_is_the_training_prompt_up_to_the_answer():
    record = {"instruction": "Name a primary color.", "input": ""}
    assert chat_prompt("Name a primary color.", "alpaca") == format_input(record, "alpaca") + "\n\n### Response:\n"
    assert chat_prompt("Add.", "phi3", "2, 3") == format_input({"instruction": "Add.", "input": "2, 3"}, "phi3") + \
        response_header("phi3")


def test_piped_messages_are_answered_in_the_model_s_style_until_quit(chat_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\n\nSay hi.\n/quit\nNever answered.\n"))
    assert main(["chat", "--model", str(chat_model), "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    answers = [expected_answer(chat_model, m, "phi3", 12) for m in ("Name a color.", "Say hi.")]
    assert out == "".join(a + "\n" for a in answers)  # the empty line is skipped, /quit ends the chat


def test_piped_crlf_lines_are_the_same_messages(chat_model, monkeypatch, capsys):
    """A file saved on Windows: the \\r of each line ending is no part of the message."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a color.\r\n/quit\r\n"))
    assert main(["chat", "--model", str(chat_model), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected_answer(chat_model, "Name a color.", "phi3", 6) + "\n"


def test_piped_text_that_is_not_utf8_is_one_line_naming_the_line(chat_model, monkeypatch, capsys):
    """A byte that is not UTF-8 reaches Python as a surrogate (surrogateescape), "caf\\xe9" as "caf\\udce9"."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say hi.\ncaf\udce9\n"))
    assert main(["generate", "--model", str(chat_model), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: standard input line 2 is not valid UTF-8 (byte 0xe9); use a "
                                                   "UTF-8 terminal or locale")


def test_one_shot_prints_one_answer_and_style_can_be_overridden(chat_model, capsys):
    assert main(["chat", "--model", str(chat_model), "--prompt", "Name a color.", "--max-new-tokens", "9",
                 "--style", "alpaca"]) == 0
    assert capsys.readouterr().out == expected_answer(chat_model, "Name a color.", "alpaca", 9) + "\n"


def test_the_answer_streams_token_by_token(chat_model, monkeypatch):
    """The streamer writes pieces while generating, not the whole answer at the end."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            if text:
                writes.append((time.perf_counter(), text))
            return super().write(text)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["chat", "--model", str(chat_model), "--prompt", "Tell a story.", "--max-new-tokens", "24"]) == 0
    pieces = [text for _, text in writes if text.strip()]
    assert len(pieces) >= 5, writes
    assert "".join(text for _, text in writes) == expected_answer(chat_model, "Tell a story.", "phi3", 24) + "\n"


def test_interactive_chat_in_a_terminal(chat_model):
    """A real pseudo-terminal: the greeting, the prompts, an answer, and Ctrl-D (end of input) to leave."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command as a user types it
        os.chdir(REPO_ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "gpt2_scratch", "chat", "--model", str(chat_model),
                                  "--max-new-tokens", "6"])
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        """Read until ``marker`` appears after what was already seen."""
        nonlocal seen
        start = len(seen)
        deadline = time.monotonic() + timeout
        while marker not in seen[start:]:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child exited
                    break

    read_until(b"you> ")
    assert b"Type /quit or press Ctrl-D to leave" in seen
    os.write(fd, b"Name a color.\n")
    read_until(b"model> ")
    read_until(b"you> ", timeout=120)
    answered = seen.split(b"model> ", 1)[1].split(b"you> ")[0].decode().replace("\r\n", "\n")
    assert answered.strip() == expected_answer(chat_model, "Name a color.", "phi3", 6).strip()
    os.write(fd, b"\x04")  # Ctrl-D
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    os.close(fd)


def test_bad_options_are_one_line(chat_model, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt2_scratch", "chat", "--model", str(chat_model), "--top-p", "0",
                             "--prompt", "x"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == "error: --top-p must be in (0, 1], got 0.0"
