"""Nothing silent: the bad-input table for faults that used to end in exit 0, a hang, or a wrong story.

The same contract as ``tests/test_bad_input.py`` (read its docstring), plus a bound on the time: each case
runs the command line in this process (``core.cli.main``) and checks
  * the exit code: 2 for bad input, 1 for a failure of the work;
  * stderr is exactly one line, ``error: ...``, saying what the thing really is;
  * every file that existed before is byte for byte the same afterwards (and nothing new was written
    unless the case says so);
  * it ended within ``seconds`` (a judge server that sends an endless reply, a config that claims a
    30-million-token context: both used to hold a command for a long time, or for ever).
The classes of fault, each with its siblings:
  * a judge server that answers too much, too slowly, or elsewhere (an endless or enormous reply, an
    endless error page, a preflight answer that never ends, a redirect to a dead port, 5,000 digits);
  * a --host no request could use (a mistyped scheme, an empty port) and a --limit below 0;
  * a path that is neither file nor folder (/dev/null, a named pipe, a symbolic link loop, a broken link),
    wherever a command takes one (--data, --compare-file, --model, --pth, --from-dir, --out);
  * a model folder whose config.json holds nonsense, whose weights are integers, or whose weights and
    config disagree (found from the safetensors header, before any tensor is allocated);
  * convert gguf --dtype q8_0 on a width whose rows are not whole q8_0 blocks.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import REPO_ROOT, assert_refused, copy_with_weights, isolate_user_settings
from safetensors.torch import load_file, save_file

from gpt2_scratch.core.cli import main

BOOK_DATA = REPO_ROOT.parent / "shared" / "data" / "instruction-data.json"
CHAT_FLAGS = ["--timeout", "5", "--request-timeout", "10", "--retries", "0", "--quiet", "--workers", "4"]


# ---------------------------------------------------------------------------------------------------
# A judge server that misbehaves: one instance per preflight behaviour, the chat's fault by prompt marker
# ---------------------------------------------------------------------------------------------------


class HostileServer:
    """Ollama's and OpenAI's endpoints, answered badly on purpose.

    ``version``: "ok", "endless" (an /api/version body that never ends, at full speed), "trickle" (one
    byte every 0.2 s, for ever) or "slowheaders" (the same, in a header line). ``redirect_to``: every
    request is answered 307 to that port. The chat reply depends on the prompt: ENDLESS (a body of one
    line that never ends), HUGE (one whole reply of 64 MB), ERRORFLOOD (HTTP 500 with an endless body), SLOWHEADERS (headers that trickle
    for ever), DIGITS (a reply of 5,000 digits), otherwise a proper score of 42.
    """

    def __init__(self, version: str = "ok", redirect_to: int | None = None):
        self.version, self.redirect_to = version, redirect_to
        self.stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def _handler(srv: HostileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _endless(self, status: int, piece: bytes, pause: float = 0.0) -> None:
            self.send_response(status)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            end = time.monotonic() + 120
            try:
                while not srv.stopping.is_set() and time.monotonic() < end:
                    self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    if pause:
                        self.wfile.flush()
                        time.sleep(pause)
            except OSError:  # the client hung up: what it should do
                pass
            self.close_connection = True

        def _slow_headers(self) -> None:
            try:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                end = time.monotonic() + 120
                while not srv.stopping.is_set() and time.monotonic() < end:
                    self.wfile.write(b"a")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            self.close_connection = True

        def _redirected(self) -> bool:
            if srv.redirect_to is None:
                return False
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{srv.redirect_to}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def do_GET(self):
            if self._redirected():
                return
            if self.path == "/api/version":
                if srv.version == "endless":
                    return self._endless(200, b'{"version": "' + b"9" * 65536)
                if srv.version == "trickle":
                    return self._endless(200, b" ", pause=0.2)
                if srv.version == "slowheaders":
                    return self._slow_headers()
                return self._send(200, b'{"version": "0.12.0"}')
            if self.path == "/api/tags":
                return self._send(200, b'{"models": [{"name": "llama3:latest", "model": "llama3:latest"}]}')
            if self.path == "/v1/models":
                return self._send(200, b'{"object": "list", "data": [{"id": "llama3"}]}')
            self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            if self._redirected():
                return
            prompt = payload["messages"][-1]["content"]
            if "ENDLESS" in prompt:
                return self._endless(200, b"x" * 65536)
            if "ERRORFLOOD" in prompt:
                return self._endless(500, b"e" * 65536)
            if "SLOWHEADERS" in prompt:
                return self._slow_headers()
            if "HUGE" in prompt:  # a reply that does end, with a score in it: requests' iter_lines took minutes
                head, tail = b'{"message": {"role": "assistant", "content": "', b' 42"}, "done": true}\n'
                self.send_response(200)
                self.send_header("Content-Length", str(len(head) + 64 * 2**20 + len(tail)))
                self.end_headers()
                try:
                    self.wfile.write(head)
                    for _ in range(64):
                        self.wfile.write(b"x" * 2**20)
                    self.wfile.write(tail)
                except OSError:
                    pass
                return
            if "NOMESSAGE" in prompt and self.path == "/api/chat":  # a last chunk with no message at all
                return self._send(200, b'{"model": "llama3", "done": true}\n')
            content = "1" * 5000 if "DIGITS" in prompt else '{"score": 42}'
            if self.path == "/api/chat":
                body = {"model": "llama3", "message": {"role": "assistant", "content": content}, "done": True,
                        "done_reason": "stop"}
                return self._send(200, json.dumps(body).encode() + b"\n")
            self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content},
                                                     "finish_reason": "stop"}]}).encode())

    return Handler


def _free_port() -> int:
    """A port no server listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers():
    dead = _free_port()
    made = {"ok": HostileServer(), "bigversion": HostileServer(version="endless"),
            "slowversion": HostileServer(version="trickle"), "slowheaders": HostileServer(version="slowheaders"),
            "redirect": HostileServer(redirect_to=dead), "loop": HostileServer()}
    made["loop"].redirect_to = int(made["loop"].url.rsplit(":", 1)[1])  # to itself, for ever
    yield {**{name: s.url for name, s in made.items()}, "dead": str(dead)}
    for s in made.values():
        s.stop()


# ---------------------------------------------------------------------------------------------------
# The workspace every case starts from
# ---------------------------------------------------------------------------------------------------


class Workspace:
    """A model folder, instruction data, responses, and the odd paths: a pipe, a link loop, a broken link."""

    def __init__(self, root: Path, tiny_model_dir: Path, servers: dict):
        self.root, self.servers = root, servers
        self.model = root / "model"
        shutil.copytree(tiny_model_dir, self.model)
        self.data = root / "data.json"
        self.data.write_text(json.dumps(json.loads(BOOK_DATA.read_text())[:40]))
        self.responses = self.judged("responses.json", [r["output"] for r in json.loads(self.data.read_text())[:4]])
        self.pipe = root / "pipe"
        os.mkfifo(self.pipe)
        self.loop = root / "loop"  # loop -> loop2 -> loop
        os.symlink(root / "loop2", self.loop)
        os.symlink(self.loop, root / "loop2")
        self.broken = root / "broken"
        os.symlink(root / "gone", self.broken)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def judged(self, name: str, responses: list[str]) -> Path:
        """Records for the judge whose responses are ``responses`` (markers steer the hostile server)."""
        return self.file(name, json.dumps([{"instruction": f"Name colour {i}.", "input": "", "output": "Blue.",
                                            "model_response": r} for i, r in enumerate(responses)]))

    def config(self, name: str, **changes) -> Path:
        """A copy of the model folder whose config.json has ``changes`` (None removes a field)."""
        path = self.root / name
        shutil.copytree(self.model, path)
        config = json.loads((path / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (path / "config.json").write_text(json.dumps(config))
        return path

    def weights(self, name: str, change: Callable[[dict], None]) -> Path:
        return copy_with_weights(self.model, self.root / name, change)

    def held(self, out: Path) -> Path:
        """``out`` as another run that is writing it holds it (its lock, taken in this process on its own
        descriptor, as a second process would see it); released when the case ends."""
        from gpt2_scratch.core.files import FileLock

        self.locks.append(FileLock.beside(out))
        return out

    def foreign_tokenizer(self, name: str) -> Path:
        """A copy of the model folder with a 400-token byte-level BPE of its own as tokenizer.json."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        path = self.root / name
        shutil.copytree(self.model, path)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
        tokenizer.train_from_iterator([f"hello world {i} the quick brown fox" for i in range(200)],
                                      trainers.BpeTrainer(vocab_size=400, show_progress=False))
        tokenizer.save(str(path / "tokenizer.json"))
        return path

    def output_of(self, argv: list) -> None:
        """Run a command whose output a case then tries to replace (it must succeed)."""
        assert main([str(a) for a in argv]) == 0



@pytest.fixture()
def ws(tmp_path, tiny_model_dir, servers):
    workspace = Workspace(tmp_path, tiny_model_dir, servers)
    workspace.locks = []
    yield workspace
    for lock in workspace.locks:
        lock.release()


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory):
    """A model 36 wide: no row of any of its matrices (36 or 144 values) is whole q8_0 blocks of 32."""
    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

    torch.manual_seed(0)
    config = GPT2ScratchConfig.from_preset("gpt2-small", n_layers=2, emb_dim=36, n_heads=4, context_length=64)
    return save_model_dir(GPT2ScratchForCausalLM(config), tmp_path_factory.mktemp("narrow") / "w36")


# ---------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: Callable[[Workspace], list]  # builds the command line (and any bad file it needs)
    code: int  # 2: bad input, 1: the work failed
    needle: str  # what the one line must say; {root} is the workspace, {ok}/{dead}/... the servers
    new_files: bool = False  # the command may leave new files (never change old ones)
    env: dict | None = None
    seconds: float = 20.0  # the command must end within this
    cwd: bool = False  # run in the workspace (a relative, Hub-like --model)
    stdin: str | None = None  # what the command reads from standard input (bytes that are not UTF-8 as surrogates)
    closed_stdin: bool = False  # the process has no standard input (started with <&-): sys.stdin is None


def judge(ws: Workspace, data: Path, *extra) -> list:
    return ["judge", "--data", str(data), "--out", str(ws.root / "scores.json"), *map(str, extra)]


def generate(model: Path) -> list:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]


def push(model: Path) -> list:
    return ["push", "--model", str(model), "--repo-id", "alice/x"]


PUSH_ENV = {"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}


def tiny_sft(ws: Workspace) -> list:
    """A short sft run on the workspace's model and data (the cases add what is wrong with it)."""
    return ["sft", "--model", str(ws.model), "--data", str(ws.data), "--max-steps", "2", "--batch-size", "4",
            "--max-new-tokens", "2", "--sample-tokens", "2", "--out", str(ws.root / "out")]


def _as(dtype: torch.dtype, name: str | None = None) -> Callable[[dict], None]:
    """Weights with one tensor (or, without ``name``, every tensor) cast to ``dtype``."""
    def change(tensors: dict) -> None:
        for key in [name] if name else list(tensors):
            tensors[key] = tensors[key].to(dtype)
    return change


def _untied_head(tensors: dict) -> None:
    tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])


TINY_INIT = ["--n-layers", "2", "--emb-dim", "64", "--n-heads", "4", "--context-length", "128"]


def respond(ws: Workspace, *extra) -> list:
    return ["respond", "--model", ws.model, "--data", ws.data, "--limit", "2", "--max-new-tokens", "2", "--quiet",
            "--out", ws.root / "r.json", *extra]


def _with_file(ws: Workspace, name: str, file: str, text: str) -> Path:
    path = ws.root / name
    shutil.copytree(ws.model, path)
    (path / file).write_text(text)
    return path


def _without(ws: Workspace, name: str, file: str) -> Path:
    path = ws.root / name
    shutil.copytree(ws.model, path)
    (path / file).unlink()
    return path


def _swap_tokenizer(ws: Workspace, folder: Path) -> Path:
    shutil.copy(ws.foreign_tokenizer("bpe400") / "tokenizer.json", folder / "tokenizer.json")
    return folder


CASES = [
    # --- a judge server that sends too much, too slowly, or elsewhere -----------------------------------
    Case("judge: a reply that never ends, at full speed (ollama)", lambda ws: [*judge(ws, ws.judged(
         "endless.json", [f"Blue {i}. ENDLESS" for i in range(4)]), "--host", ws.servers["ok"]), *CHAT_FLAGS], 1,
         "record 0: the reply from {ok}/api/chat is larger than 4 MiB", new_files=True, seconds=12),
    Case("judge: a reply that never ends, at full speed (openai)", lambda ws: [*judge(ws, ws.judged(
         "endless.json", [f"Blue {i}. ENDLESS" for i in range(4)]), "--host", ws.servers["ok"], "--api", "openai"),
         *CHAT_FLAGS], 1, "record 0: the reply from {ok}/v1/chat/completions is larger than 4 MiB", new_files=True,
         seconds=12),
    Case("judge: one whole reply of 64 MB", lambda ws: [*judge(ws, ws.judged("huge.json", ["Blue. HUGE"]), "--host",
         ws.servers["ok"]), *CHAT_FLAGS], 1, "record 0: the reply from {ok}/api/chat is larger than 4 MiB",
         new_files=True, seconds=8),
    Case("judge: an error page that never ends", lambda ws: [*judge(ws, ws.judged(
         "flood.json", ["Blue. ERRORFLOOD"]), "--host", ws.servers["ok"]), *CHAT_FLAGS], 1,
         "record 0: HTTP 500 from {ok}/api/chat: eeee", new_files=True, seconds=12),
    Case("judge: a reply of 5,000 digits", lambda ws: [*judge(ws, ws.judged("digits.json", ["Blue. DIGITS"]),
         "--host", ws.servers["ok"]), *CHAT_FLAGS], 1, "record 0: unparsable reply", new_files=True),
    Case("judge: a preflight answer that never ends", lambda ws: [*judge(ws, ws.responses, "--host",
         ws.servers["bigversion"]), *CHAT_FLAGS], 1, "{bigversion}/api/version answered with more than 4 MiB",
         seconds=12),
    Case("judge: a preflight answer that trickles for ever", lambda ws: [*judge(ws, ws.responses, "--host",
         ws.servers["slowversion"]), *CHAT_FLAGS, "--request-timeout", "2"], 1,
         "{slowversion}/api/version did not finish its answer within 2 s", seconds=8),
    Case("judge: preflight headers that trickle for ever", lambda ws: [*judge(ws, ws.responses, "--host",
         ws.servers["slowheaders"]), *CHAT_FLAGS, "--request-timeout", "2"], 1,
         "{slowheaders}/api/version did not finish its answer within 2 s", seconds=8),
    Case("judge: reply headers that trickle for ever", lambda ws: [*judge(ws, ws.judged(
         "slow.json", ["Blue. SLOWHEADERS"]), "--host", ws.servers["ok"]), *CHAT_FLAGS, "--request-timeout", "2"], 1,
         "record 0: no complete reply from {ok}/api/chat within 2 s", new_files=True, seconds=8),
    Case("judge: a server that redirects to itself", lambda ws: [*judge(ws, ws.responses, "--host",
         ws.servers["loop"]), *CHAT_FLAGS], 1, "{loop}/api/version redirects in a loop"),
    Case("judge: a server that redirects to a dead port", lambda ws: [*judge(ws, ws.responses, "--host",
         ws.servers["redirect"]), *CHAT_FLAGS], 1,
         "{redirect}/api/version redirects to http://127.0.0.1:{dead}/api/version, where no server answers"),
    Case("judge --api openai: a server that redirects to a dead port", lambda ws: [*judge(ws, ws.responses,
         "--host", ws.servers["redirect"], "--api", "openai"), *CHAT_FLAGS], 1,
         "redirects to http://127.0.0.1:{dead}/v1/models, where no server answers"),
    # --- a --host no request could use, a --limit below 0 -----------------------------------------------
    Case("judge --host htp:/…", lambda ws: judge(ws, ws.responses, "--host", "htp:/localhost:11434"), 2,
         "--host: invalid host URL 'htp:/localhost:11434': 'htp:/' is not a scheme followed by '://'"),
    Case("judge --host http:/…", lambda ws: judge(ws, ws.responses, "--host", "http:/localhost:11434"), 2,
         "'http:/' is not a scheme followed by '://'"),
    Case("judge --host http//…", lambda ws: judge(ws, ws.responses, "--host", "http//localhost:11434"), 2,
         "'http//' is not a scheme followed by '://'"),
    Case("judge --host with an empty port", lambda ws: judge(ws, ws.responses, "--host", "localhost:"), 2,
         "no port follows the ':' in 'localhost:'"),
    Case("$OLLAMA_HOST htp:/…", lambda ws: judge(ws, ws.responses), 2, "$OLLAMA_HOST: invalid host URL",
         env={"OLLAMA_HOST": "htp:/localhost:11434"}),
    Case("judge --limit -1", lambda ws: judge(ws, ws.responses, "--limit", "-1"), 2, "--limit must be at least 0, got -1"),
    Case("respond --limit -1", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data), "--out",
         str(ws.root / "r.json"), "--limit", "-1"], 2, "--limit must be at least 0, got -1"),
    # --- training that can learn nothing: refused before training (exit 2), nothing written --------------
    Case("sft --mask-prompt where every prompt fills the context", lambda ws: [
        "sft", "--model", str(ws.model), "--data", str(ws.file("long.json", json.dumps(
            [{"instruction": "word " * 200, "input": "", "output": "Yes."}] * 20))), "--mask-prompt",
        "--batch-size", "2", "--max-new-tokens", "4", "--sample-tokens", "4", "--out", str(ws.root / "out")], 2,
        "with --mask-prompt every training example's prompt fills its 128-token budget"),
    Case("sft where every output is whitespace", lambda ws: [
        *tiny_sft(ws), "--data", str(ws.file("blank.json", json.dumps(
            [{"instruction": f"Say {i}.", "input": "", "output": " \n\t"} for i in range(20)])))], 2,
        "{root}/blank.json: every training record's 'output' is empty or whitespace, so there is no answer to learn"),
    Case("dpo where every chosen answer equals the rejected one", lambda ws: [
        "dpo", "--model", str(ws.model), "--data", str(ws.file("same.json", json.dumps(
            [{"instruction": f"Say {i}.", "chosen": "Fine.", "rejected": "Fine."} for i in range(20)]))),
        "--batch-size", "2", "--max-new-tokens", "4", "--sample-tokens", "4", "--out", str(ws.root / "out")], 2,
        "every training pair has the same chosen and rejected answer"),
    Case("classify with one of its two classes absent", lambda ws: [
        "classify", "--model", str(ws.model), "--data", str(ws.file("ham.tsv", "".join(
            f"ham\tmessage number {i}\n" for i in range(40)))), "--no-balance", "--out", str(ws.root / "out")], 2,
        "the training split has no example of 'spam'"),

    # --- paths that are neither file nor folder ---------------------------------------------------------
    Case("judge --data /dev/null", lambda ws: judge(ws, Path("/dev/null")), 2,
         "--data /dev/null is a character device, not a file of records"),
    Case("sft --data: a named pipe", lambda ws: ["sft", "--model", "gpt2-small", "--random-init", "--n-layers", "1",
         "--emb-dim", "64", "--n-heads", "4", "--context-length", "64", "--data", str(ws.pipe), "--out",
         str(ws.root / "out")], 2, "--data {root}/pipe is a named pipe, not a file of records"),
    Case("sft --data: a Hub id whose host does not resolve names the flag", lambda ws: ["sft", "--model", "gpt2-small",
         "--random-init", "--n-layers", "1", "--emb-dim", "64", "--n-heads", "4", "--context-length", "64", "--data",
         "nobody/no-such-set", "--out", str(ws.root / "out")], 2,
         "--data nobody/no-such-set: cannot load the Hub data set"),
    Case("classify --data: a named pipe (it used to wait for ever)", lambda ws: ["classify", "--model",
         str(ws.model), "--data", str(ws.pipe), "--out", str(ws.root / "out")], 2,
         "{root}/pipe: is a named pipe, not a data file"),
    Case("respond --data: a symbolic link loop", lambda ws: ["respond", "--model", str(ws.model), "--data",
         str(ws.loop), "--out", str(ws.root / "r.json")], 2, "--data {root}/loop is a symbolic link loop"),
    Case("judge --data: a symbolic link loop", lambda ws: judge(ws, ws.loop), 2,
         "--data {root}/loop is a symbolic link loop"),
    Case("judge --compare-file: a broken link", lambda ws: judge(ws, ws.responses, "--compare-file", ws.broken), 2,
         "{root}/broken is a broken symbolic link (its target {root}/gone does not exist)"),
    Case("generate --model: a symbolic link loop", lambda ws: generate(ws.loop), 2,
         "--model {root}/loop is a symbolic link loop, not a model folder"),
    Case("generate --model: a relative link loop that looks like a Hub id", lambda ws: generate(Path("loop/x")), 2,
         "--model loop/x is a path through a symbolic link loop, not a model folder", cwd=True),
    Case("generate --model /dev/null", lambda ws: generate(Path("/dev/null")), 2,
         "--model /dev/null is a character device, not a model folder"),
    Case("push --model: a named pipe", lambda ws: push(ws.pipe), 2, "--model {root}/pipe is a named pipe",
         env=PUSH_ENV),
    Case("convert gguf --model: a symbolic link loop", lambda ws: ["convert", "gguf", "--model", str(ws.loop),
         "--out", str(ws.root / "m.gguf")], 2, "--model {root}/loop is a symbolic link loop"),
    Case("convert book --pth /dev/null", lambda ws: ["convert", "book", "--pth", "/dev/null", "--out",
         str(ws.root / "b")], 2, "/dev/null: is a character device, not a file"),
    Case("convert hf --from-dir: a named pipe", lambda ws: ["convert", "hf", "--from-dir", str(ws.pipe), "--out",
         str(ws.root / "h")], 2, "{root}/pipe is a named pipe"),
    Case("convert openai --from-dir: a symbolic link loop", lambda ws: ["convert", "openai", "--from-dir",
         str(ws.loop), "--out", str(ws.root / "o")], 2, "{root}/loop: is a symbolic link loop"),
    Case("sft --out inside a symbolic link loop", lambda ws: ["sft", "--model", "gpt2-small", "--random-init",
         "--data", str(ws.data), "--out", str(ws.loop / "run")], 2,
         "--out {root}/loop/run: {root}/loop/run is a path through a symbolic link loop"),
    # --- config.json holding nonsense: one line naming the file and the field ---------------------------
    *[Case(f"config.json: {field} {value!r}", lambda ws, f=field, v=value: generate(ws.config("bad", **{f: v})), 2,
           "{root}/bad/config.json: " + needle) for field, value, needle in [
        ("layer_norm_epsilon", -1.0, "layer_norm_epsilon must be a number in (0, 1)"),
        ("layer_norm_epsilon", 0, "layer_norm_epsilon must be a number in (0, 1)"),
        ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a number in (0, 1) (GPT-2: 1e-5), got '1e-5'"),
        ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon must be a number in (0, 1)"),
        ("emb_dim", 0, "emb_dim must be a positive integer, got 0"),
        ("emb_dim", "64", "emb_dim must be a positive integer, got '64'"),
        ("emb_dim", [64], "emb_dim must be a positive integer, got [64]"),
        ("n_layers", -1, "n_layers must be a positive integer, got -1"),
        ("n_heads", 3, "emb_dim 64 is not divisible by n_heads 3"),
        ("drop_rate", "0.1", "drop_rate must be in [0, 1), got '0.1'"),
        ("initializer_range", -0.02, "initializer_range must be a number >= 0"),
        ("qkv_bias", "no", "qkv_bias must be true or false, got 'no'"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
        ("architectures", "GPT2ScratchForCausalLM", "architectures must be a list of class names, not a string"),
        ("architectures", 5, "architectures must be a list of class names, not a number"),
        ("auto_map", ["x"], "auto_map must be an object, not a list"),
        ("id2label", ["ham", "spam"], "id2label must be an object, not a list"),
        ("task_specific_params", [1], "task_specific_params must be an object, not a list"),
        ("bos_token_id", "x", "bos_token_id must be a token id (an integer >= 0) or null, not a string"),
        ("eos_token_id", 99999, "eos_token_id 99999 is no token id: vocab_size is 50257"),
        ("dtype", "float99", "dtype must be one of float32, float16, bfloat16, float64"),
    ]],
    Case("config.json: n_embd (the standard name) not divisible by n_heads", lambda ws: generate(ws.config(
         "bad", emb_dim=None, n_embd=66)), 2, "emb_dim 66 is not divisible by n_heads 4"),
    Case("push: config.json with a negative layer_norm_epsilon", lambda ws: push(ws.config(
         "bad", layer_norm_epsilon=-1e-5)), 2, "{root}/bad/config.json: layer_norm_epsilon must be", env=PUSH_ENV),
    Case("respond: config.json with a string for qkv_bias", lambda ws: ["respond", "--model", str(ws.config(
         "bad", qkv_bias="yes")), "--data", str(ws.data), "--out", str(ws.root / "r.json")], 2,
         "qkv_bias must be true or false"),
    # --- weights and config that disagree: found in the safetensors header, before any allocation ------
    Case("config.json claims a 3-million-token context", lambda ws: generate(ws.config(
         "long", context_length=3_000_000)), 2, "{root}/long/model.safetensors: mismatched tensor "
         "'transformer.wpe.weight': shape [128, 64] in the file, [3000000, 64] by config.json", seconds=5),
    Case("config.json claims a larger vocabulary", lambda ws: generate(ws.config("wide", vocab_size=60000)), 2,
         "mismatched tensor 'transformer.wte.weight': shape [50257, 64] in the file, [60000, 64] by config.json"),
    Case("push: config.json claims a 3-million-token context", lambda ws: push(ws.config(
         "long", context_length=3_000_000)), 2, "mismatched tensor 'transformer.wpe.weight'", env=PUSH_ENV, seconds=5),
    Case("weights of int32", lambda ws: generate(ws.weights("ints", _as(torch.int32))), 2,
         "{root}/ints/model.safetensors: tensor 'transformer.h.0.attn.c_attn.bias' holds I32 values, not floating "
         "point"),
    Case("one tensor of int64", lambda ws: generate(ws.weights("int", _as(torch.int64, "transformer.ln_f.weight"))),
         2, "tensor 'transformer.ln_f.weight' holds I64 values"),
    Case("one tensor of booleans", lambda ws: generate(ws.weights("bool", _as(torch.bool, "transformer.ln_f.bias"))),
         2, "tensor 'transformer.ln_f.bias' holds BOOL values"),
    Case("push: weights of int8", lambda ws: push(ws.weights("ints", _as(torch.int8))), 2, "holds I8 values",
         env=PUSH_ENV),
    Case("an untied lm_head.weight under a tied config", lambda ws: generate(ws.weights("head", _untied_head)), 2,
         "{root}/head/model.safetensors: unexpected tensor 'lm_head.weight': a head of its own, but config.json ties "
         "the head to the token embedding (tie_word_embeddings true); set \"tie_word_embeddings\": false"),
    Case("push: an untied lm_head.weight under a tied config", lambda ws: push(ws.weights("head", _untied_head)), 2,
         "unexpected tensor 'lm_head.weight'", env=PUSH_ENV),
    Case("convert gguf: an untied lm_head.weight under a tied config", lambda ws: ["convert", "gguf", "--model",
         str(ws.weights("head", _untied_head)), "--out", str(ws.root / "m.gguf"), "--prompt-style", "alpaca"], 2,
         "unexpected tensor 'lm_head.weight'"),
    Case("an untied config without its head", lambda ws: generate(ws.config("nohead", tie_word_embeddings=False)), 2,
         "{root}/nohead/model.safetensors: missing tensor 'lm_head.weight'"),

    # --- the second hostile pass: outputs that are someone else's file, keys and counts that make no sense --
    Case("respond --out: an existing file that is not respond's output", lambda ws: [
        "respond", "--model", str(ws.model), "--data", str(ws.data), "--out", str(ws.file("notes.json", "[1, 2]")),
        "--limit", "2", "--max-new-tokens", "2"], 2,
        "--out {root}/notes.json already exists and holds a file this command did not write, not respond's output "
        "for these inputs; choose another file, or add --overwrite to replace it"),
    Case("judge --out: an existing file that is not judge's output", lambda ws: [
        "judge", "--data", str(ws.responses), "--out", str(ws.file("mine.txt", "my notes")), "--host",
        ws.servers["ok"], *CHAT_FLAGS], 2, "--out {root}/mine.txt already exists and holds a file this command did not write"),
    Case("respond --response-key output (the reference answer)", lambda ws: [
        "respond", "--model", str(ws.model), "--data", str(ws.data), "--out", str(ws.root / "r.json"),
        "--response-key", "output"], 2, "--response-key 'output': a field of the records themselves"),
    Case("respond --response-key ''", lambda ws: ["respond", "--model", str(ws.model), "--data", str(ws.data),
         "--out", str(ws.root / "r.json"), "--response-key", ""], 2, "--response-key '': an empty key"),
    Case("judge --retries -1", lambda ws: judge(ws, ws.responses, "--retries", "-1"), 2,
         "--retries must be at least 0, got -1"),
    Case("judge: an Ollama server whose chat reply has no message", lambda ws: [*judge(ws, ws.judged(
         "nomessage.json", ["Blue. NOMESSAGE"]), "--host", ws.servers["ok"]), *CHAT_FLAGS], 1,
         "{ok}/api/chat sent a stream line that is not an Ollama chat chunk", new_files=True),
    Case("classify --labels ham,ham", lambda ws: ["classify", "--model", str(ws.model), "--data", str(ws.file(
        "ham.tsv", "".join(f"ham\tmessage number {i}\n" for i in range(40)))), "--labels", "ham,ham", "--no-balance",
        "--out", str(ws.root / "out")], 2, "--labels 'ham,ham': 'ham' is named twice; give each class once"),

    # --- text that is not Unicode: a lone surrogate in a record, bytes that are not UTF-8 in argv or stdin --
    # (in this process argv and stdin hold such a byte as Python's surrogateescape does: b"\xe9" is "\udce9")
    Case("respond --data: a record holding a lone surrogate", lambda ws: ["respond", "--model", str(ws.model),
         "--data", str(ws.file("surrogate.json", '[{"instruction": "Say hi.", "output": "x\\ud800y"}]')),
         "--out", str(ws.root / "r.json")], 2, "{root}/surrogate.json: record 0 field 'output' holds text that is "
         "not valid Unicode (a lone surrogate \\ud800); fix the record"),
    Case("sft --data: a lone surrogate in a field no stage requires", lambda ws: ["sft", "--model", str(ws.model),
         "--data", str(ws.file("surrogate.jsonl", '{"instruction": "A.", "output": "B."}\n{"instruction": "C.", '
                                                  '"output": "D.", "note": ["\\udce9"]}\n')),
         "--out", str(ws.root / "out")], 2,
         "{root}/surrogate.jsonl: record 1 field 'note' holds text that is not valid Unicode (a lone surrogate "
         "\\udce9); fix the record"),
    Case("generate --prompt: a Latin-1 byte", lambda ws: ["generate", "--model", str(ws.model), "--prompt",
         "caf\udce9"], 2, "--prompt is not valid UTF-8 (byte 0xe9); use a UTF-8 terminal or locale"),
    Case("chat --input: a Latin-1 byte", lambda ws: ["chat", "--model", str(ws.model), "--prompt", "Say hi.",
         "--input", "caf\udce9"], 2, "--input is not valid UTF-8 (byte 0xe9)"),
    Case("predict --text: a Latin-1 byte", lambda ws: ["predict", "--model", str(ws.model), "--text", "ok",
         "--text", "caf\udce9"], 2, "--text 2 is not valid UTF-8 (byte 0xe9)"),
    Case("chat: standard input that is not UTF-8", lambda ws: ["chat", "--model", str(ws.model),
         "--max-new-tokens", "2"], 2, "standard input line 1 is not valid UTF-8 (byte 0xff)",
         stdin="\udcff\udcfe bad\n"),
    # --- a model folder's JSON files: config.json that is no object, a broken tokenizer_config.json -------
    Case("generate: config.json holding a list", lambda ws: generate(
         (lambda d: (d / "config.json").write_text("[1, 2]") and d)(ws.config("list"))), 2,
         "{root}/list/config.json: expected a JSON object of settings, got a list"),
    Case("convert export-hf: config.json holding a list", lambda ws: [
        "convert", "export-hf", "--model", str((lambda d: (d / "config.json").write_text("[1, 2]") and d)(
            ws.config("list"))), "--out", str(ws.root / "hf")], 2,
         "{root}/list/config.json: expected a JSON object of settings, got a list"),
    Case("generate: a broken tokenizer_config.json", lambda ws: generate(
         (lambda d: (d / "tokenizer_config.json").write_text("{bad") and d)(ws.config("tok"))), 2,
         "{root}/tok/tokenizer_config.json: cannot load the tokenizer: not valid JSON"),
    # --- the third hostile pass: splits with no validation part, Hub targets checked before training, push's
    # --- explicit --scores and --run-dir (train_state.json and --resume: tests/test_bad_input.py, test_loop.py)
    *[Case(f"{command} --split {spec}: no validation part", lambda ws, c=command, sp=spec: [
        *(tiny_sft(ws) if c == "sft" else ["dpo", "--model", str(ws.model), "--data", str(ws.file("pref.json", json.dumps(
            [{"instruction": f"Say {i}.", "chosen": "Yes.", "rejected": "No."} for i in range(20)]))), "--out",
            str(ws.root / "out")]), "--split", sp], 2,
           f"--split '{spec}': leaves nothing for validation (train + test = 1)") for command, spec in [
        ("sft", "1,0"), ("sft", "0.5,0.5"), ("sft", "0.9,0.1"), ("dpo", "1,0,0")]],
    Case("sft --push-to-hub: an invalid repo id, refused before training", lambda ws: [
        *tiny_sft(ws), "--push-to-hub", "alice/not a repo"], 2,
        "--push-to-hub 'alice/not a repo': not a valid Hub repo id (Repo id must use alphanumeric chars",
        env=PUSH_ENV, seconds=5),
    Case("sft --push-to-hub: no USER/ and no token, the id named first", lambda ws: [
        *tiny_sft(ws), "--push-to-hub", "not a repo"], 2, "--push-to-hub 'not a repo': expected USER/NAME", seconds=5),
    Case("sft --push-to-hub without a token, refused before training", lambda ws: [
        *tiny_sft(ws), "--push-to-hub", "alice/ok"], 2, "--push-to-hub alice/ok: no Hugging Face token", seconds=5),
    Case("push --repo-id with a space: refused before any request", lambda ws: [
        "push", "--model", str(ws.model), "--repo-id", "alice/my model"], 2,
        "--repo-id 'alice/my model': not a valid Hub repo id", env=PUSH_ENV),
    Case("push --repo-id ending in .git", lambda ws: ["push", "--model", str(ws.model), "--repo-id", "alice/m.git"],
         2, "--repo-id 'alice/m.git': not a valid Hub repo id (Repo_id cannot end by '.git')", env=PUSH_ENV),
    Case("push --scores: malformed JSON", lambda ws: [*push(ws.model), "--scores", str(ws.file(
        "bad-scores.json", '{"summary": {"average": 42,}}'))], 2,
        "--scores {root}/bad-scores.json: malformed JSON at line 1 column 28: Expecting property name", env=PUSH_ENV),
    Case("push --scores: no such file", lambda ws: [*push(ws.model), "--scores", str(ws.root / "gone.json")], 2,
         "--scores {root}/gone.json: no such file", env=PUSH_ENV),
    Case("push --run-dir: no such folder", lambda ws: [*push(ws.model), "--run-dir", str(ws.root / "nowhere")], 2,
         "--run-dir {root}/nowhere: no such folder", env=PUSH_ENV),
    Case("push --run-dir: a folder with no run in it", lambda ws: [*push(ws.model), "--run-dir", str(
        (lambda d: d.mkdir() or d)(ws.root / "empty"))], 2, "--run-dir {root}/empty: holds no training run",
        env=PUSH_ENV),
    # --- two commands on one output: the second is refused before any work, the first's file untouched -----
    Case("init --overwrite on a folder another init is writing", lambda ws: [
        "init", "--preset", "gpt2-small", *TINY_INIT, "--overwrite", "--out", ws.held(ws.model)], 2,
        "--out {root}/model is in use by another run (pid "),
    Case("convert export-hf --overwrite on a folder another export is writing", lambda ws: [
        "convert", "export-hf", "--model", ws.model, "--overwrite", "--out", ws.held(ws.config("hf"))], 2,
        "--out {root}/hf is in use by another run (pid "),
    Case("convert gguf --overwrite on a file another conversion is writing", lambda ws: [
        "convert", "gguf", "--model", ws.model, "--overwrite", "--out", ws.held(ws.file("m.gguf", b"GGUF other"))], 2,
        "--out {root}/m.gguf is in use by another run (pid "),
    Case("respond on an --out another respond is writing", lambda ws: [
        *respond(ws, "--overwrite"), "--out", ws.held(ws.file("r.json", "[]"))], 2,
        "--out {root}/r.json is in use by another run (pid "),
    Case("judge on an --out another judge is writing", lambda ws: ws.held(ws.file("scores.json", "{}")) and [
        *judge(ws, ws.responses, "--host", ws.servers["ok"], "--overwrite"), *CHAT_FLAGS], 2,
        "--out {root}/scores.json is in use by another run (pid "),
    # --- an output that is not this command's for these inputs: never replaced without --overwrite ----------
    Case("respond --out holds responses this command did not write", lambda ws: [*respond(ws), "--out", ws.file(
        "r.json", json.dumps([{"instruction": "x", "model_response": "mine"}]))], 2,
        "--out {root}/r.json already exists and holds a file this command did not write, not respond's output"),
    Case("respond --out holds another model's responses", lambda ws: [
        *respond(ws), "--out", ws.root / "r.json", "--model", ws.output_of([*respond(ws), "--out", ws.root / "r.json"])
        or ws.weights("other", _untied_head)], 2,
        "--out {root}/r.json already exists and holds the output of `respond --model {root}/model --data"),
    Case("respond --out: its own output, edited by hand since", lambda ws: [*respond(ws), "--out", (
        ws.output_of([*respond(ws)]) or ws.file("r.json", json.dumps([{"instruction": "mine"}])))], 2,
        "--out {root}/r.json already exists and holds a file this command did not write"),
    Case("judge --out holds the scores of other data", lambda ws: [
        *judge(ws, ws.output_of([*judge(ws, ws.judged("a.json", ["Blue."] * 2), "--host", ws.servers["ok"]),
                                 *CHAT_FLAGS]) or ws.judged("b.json", ["Red."] * 2), "--host", ws.servers["ok"]),
        *CHAT_FLAGS], 2, "--out {root}/scores.json already exists and holds the output of `judge --data {root}/a.json`"),
    # --- a model folder whose tokenizer is not GPT-2's: refused alike by every command that opens it -------
    *[Case(f"{name}: a tokenizer.json that is not GPT-2's", lambda ws, b=build: b(ws, ws.foreign_tokenizer("bpe400")),
           2, "--model {root}/bpe400: its tokenizer.json holds a vocabulary of") for name, build in [
        ("chat", lambda ws, m: ["chat", "--model", m, "--prompt", "hi", "--max-new-tokens", "2"]),
        ("generate", lambda ws, m: generate(m)),
        ("respond", lambda ws, m: [*respond(ws), "--model", m]),
        ("sft", lambda ws, m: [*tiny_sft(ws), "--model", m])]],
    Case("convert hf --from-dir: a tokenizer.json that is not GPT-2's", lambda ws: [
        "convert", "hf", "--from-dir", ws.output_of(["convert", "export-hf", "--model", ws.model, "--out",
                                                      ws.root / "hf"]) or _swap_tokenizer(ws, ws.root / "hf"),
        "--out", ws.root / "back"], 2, "--from-dir {root}/hf: its tokenizer.json holds a vocabulary of", new_files=True),
    Case("convert export-hf of a folder that is already an export", lambda ws: [
        "convert", "export-hf", "--model", ws.output_of(["convert", "export-hf", "--model", ws.model, "--out",
                                                         ws.root / "hf"]) or ws.root / "hf", "--out", ws.root / "hf2"],
        2, "{root}/hf: already a transformers GPT-2 folder (model_type gpt2), which is what export-hf writes"),
    # --- push: what every user of the Hub repo would fail on ------------------------------------------------
    Case("push: a chat_template.jinja that does not parse", lambda ws: [*push(ws.model), "--model", _with_file(
        ws, "badtemplate", "chat_template.jinja", "{% if %}")], 2, "--model {root}/badtemplate/chat_template.jinja: the "
        "chat template fails (TemplateSyntaxError", env=PUSH_ENV),
    Case("push: no tokenizer files", lambda ws: [*push(ws.model), "--model", _without(ws, "notok", "tokenizer.json")],
         2, "--model {root}/notok: no tokenizer.json, so AutoTokenizer.from_pretrained would fail", env=PUSH_ENV),
    # --- numbers, names and the environment at their limits -------------------------------------------------
    Case("sft --run-name that leaves OUT/trackers", lambda ws: [*tiny_sft(ws), "--run-name", "../../../../x",
                                                                 "--report-to", "tensorboard"], 2,
         "--run-name '../../../../x': must be a plain name"),
    Case("sft --seed 2**32: the bound shown exactly", lambda ws: [*tiny_sft(ws), "--seed", "4294967296"], 2,
         "--seed must be in [0, 4294967295], got 4294967296"),
    Case("generate: config.json's n_embd disagrees with its emb_dim", lambda ws: generate(ws.config(
        "alias", n_embd=128)), 2, "{root}/alias/config.json: emb_dim 64 and n_embd 128 disagree"),
    Case("chat --max-new-tokens typed beyond the context", lambda ws: [
        "chat", "--model", ws.model, "--prompt", "hi", "--max-new-tokens", "200"], 2,
        "--max-new-tokens 200 leaves no room for a prompt in the 128-token context"),
    Case("chat with standard input closed", lambda ws: ["chat", "--model", ws.model], 2,
         "standard input is closed, so there is nothing to read; give the message with --prompt", closed_stdin=True),
    Case("generate with standard input closed", lambda ws: ["generate", "--model", ws.model], 2,
         "standard input is closed, so there is nothing to read; give the text with --prompt", closed_stdin=True),
    # --- the fourth pass: odd names, the environment, the new mechanisms themselves, sampling at its limit ---
    Case("init --out whose name is not UTF-8", lambda ws: ["init", "--preset", "gpt2-small", *TINY_INIT, "--out",
                                                            str(ws.root / "m\udcff")], 2,
         "the path is not valid UTF-8 (byte 0xff), which safetensors cannot write to"),
    Case("generate --model whose name is not UTF-8", lambda ws: generate(shutil.copytree(ws.model, ws.root / "m\udcff")),
         2, "the path is not valid UTF-8 (byte 0xff), which safetensors cannot open; rename the folder"),
    Case("convert gguf --out with a newline in its name", lambda ws: [
        "convert", "gguf", "--model", ws.model, "--out", str(ws.root / "x\ny.gguf")], 2,
        "is a name with a control character (a newline?), which the Modelfile's FROM line cannot hold"),
    Case("respond --out - (standard output)", lambda ws: [*respond(ws), "--out", "-"], 2,
         "--out -: writing to standard output is not supported; give the path of a file"),
    Case("GPT2_SCRATCH_CACHE is a file", lambda ws: [*generate(ws.model), "--model", "gpt2-small"], 2,
         "the cache folder $GPT2_SCRATCH_CACHE=", env={"GPT2_SCRATCH_CACHE": "/etc/hostname"}),
    Case("an output's lock file is a symbolic link to another file", lambda ws: [*respond(ws), "--out", str(
        ws.root / "r.json")] if os.symlink(ws.file("precious.txt", "keep me"), ws.root / ".r.json.lock") is None
         else [], 2, "its lock file {root}/.r.json.lock is a symbolic link, which a lock never is"),
    Case("two spellings of one --out (a link) share its lock", lambda ws: [*respond(ws), "--out", str(
        ws.root / "link.json")] if ws.held(ws.file("r.json", "[]")) and os.symlink(ws.root / "r.json",
                                                                                    ws.root / "link.json") is None
         else [], 2, "--out {root}/r.json is in use by another run (pid "),
    Case("the owner stamp's path is a folder", lambda ws: [*respond(ws)] if (ws.root / ".r.json.owner.json").mkdir()
         is None else [], 2, "{root}/.r.json.owner.json, where the output's owner is recorded, is a folder"),
    Case("generate --temperature 1e-320", lambda ws: [*generate(ws.model), "--temperature", "1e-320"], 2,
         "is too close to 0 to sample with; use 0 (greedy) or at least 0.0001"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Workspace, capsys, monkeypatch):
    isolate_user_settings(monkeypatch, ws.root.parent, case.env)
    if case.cwd:
        monkeypatch.chdir(ws.root)
    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(case.stdin))
    if case.closed_stdin:
        monkeypatch.setattr("sys.stdin", None)
    assert_refused([str(a) for a in case.argv(ws)], ws.root, capsys, code=case.code,
                   needle=case.needle.format(root=ws.root, **ws.servers), new_files=case.new_files,
                   seconds=case.seconds)


def test_q8_0_with_no_whole_block_is_refused(narrow_model, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code = main(["convert", "gguf", "--model", str(narrow_model), "--out", str(out), "--dtype", "q8_0",
                 "--prompt-style", "alpaca"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == (f"error: --dtype q8_0: none of the 10 matrices of {narrow_model} can be stored as q8_0 (their "
                        "rows of 36, 144 values are not whole q8_0 blocks of 32); export with --dtype f16 or bf16")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# Beyond the table: what is reported when the command succeeds, and why it is true
# ---------------------------------------------------------------------------------------------------


def test_q8_0_reports_what_it_stored(tmp_path, capsys, caplog):
    """A width of 40: only ffn_down's rows (160 values) are whole blocks. The warning counts the fallbacks, and
    the final line counts the file's tensors by type (read back from the file, not from --dtype)."""
    from gguf import GGUFReader

    from gpt2_scratch import GPT2ScratchConfig, GPT2ScratchForCausalLM, save_model_dir

    config = GPT2ScratchConfig.from_preset("gpt2-small", n_layers=2, emb_dim=40, n_heads=4, context_length=64)
    model_dir = save_model_dir(GPT2ScratchForCausalLM(config), tmp_path / "w40")
    out = tmp_path / "w40.gguf"
    capsys.readouterr()
    assert main(["convert", "gguf", "--model", str(model_dir), "--out", str(out), "--dtype", "q8_0",
                 "--prompt-style", "alpaca"]) == 0
    stdout = capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("--dtype q8_0: 8 of 10 matrices are stored as f16 instead (their rows of 40 values are "
                            "not whole q8_0 blocks of 32)") for w in warnings), warnings
    types = [t.tensor_type.name for t in GGUFReader(out).tensors]
    assert (types.count("Q8_0"), types.count("F16"), types.count("F32")) == (2, 8, 18)
    assert f"wrote {out} (--dtype q8_0: tensors 18 f32, 8 f16, 2 q8_0;" in stdout, stdout


def test_an_enormous_reply_costs_one_record_not_the_run():
    """Four workers, two questions: the endless reply fails its own record in about a second (the 4 MiB cap,
    well before --request-timeout), the other is scored; the run goes on."""
    from gpt2_scratch.eval.judge import score_records
    from gpt2_scratch.eval.judge_client import RetryPolicy, make_judge

    server = HostileServer()
    try:
        for api in ("ollama", "openai"):
            judge = make_judge(api, server.url, "llama3", timeout=5, request_timeout=10,
                               retry=RetryPolicy(attempts=3, backoff=0.01))
            records = [{"instruction": "Name a colour.", "output": "Blue.", "model_response": r}
                       for r in ("Blue. ENDLESS", "Blue.")]
            started = time.monotonic()
            out = score_records(records, judge, workers=4, progress=False)
            assert time.monotonic() - started < 5
            assert out[0]["status"] == "failed" and "larger than 4 MiB" in out[0]["reason"], out[0]
            assert out[1]["status"] == "ok" and out[1]["score"] == 42
    finally:
        server.stop()


def test_reply_lines_are_split_in_linear_time():
    """requests' iter_lines re-joins the pending line with every piece: quadratic on one long line."""
    from gpt2_scratch.eval.judge_client import _lines

    pieces = [b"x" * 65536] * 64 + [b"\n{}\n\n", b"a", b"b\nc"]  # one 4 MiB line, then short ones
    started = time.monotonic()
    lines = list(_lines(iter(pieces)))
    assert time.monotonic() - started < 1.0
    assert [len(line) for line in lines] == [4 * 2**20, 2, 0, 2, 1]
    assert lines[1:] == [b"{}", b"", b"ab", b"c"]


def test_a_config_that_disagrees_with_its_weights_allocates_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """The shapes are compared from the safetensors header: from_pretrained (which would allocate the
    config's 30-million-token position table, ~8 GB, before finding the mismatch) is never called."""
    from gpt2_scratch import GPT2ScratchForCausalLM
    from gpt2_scratch.model_dir import ModelDirError, load_model_dir

    folder = tmp_path / "long"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "context_length": 30_000_000}))

    def never(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(GPT2ScratchForCausalLM, "from_pretrained", never)
    with pytest.raises(ModelDirError, match=r"mismatched tensor 'transformer.wpe.weight': shape \[128, 64\] in the "
                                            r"file, \[30000000, 64\] by config.json"):
        load_model_dir(folder)


def test_an_untied_head_loads_when_the_config_says_untied(tiny_model_dir, tmp_path):
    """The remedy the refusal names works: with tie_word_embeddings false, the file's head is the model's."""
    from gpt2_scratch.model_dir import load_model_dir

    folder = tmp_path / "untied"
    shutil.copytree(tiny_model_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    _untied_head(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    model = load_model_dir(folder)
    torch.testing.assert_close(model.lm_head.weight, tensors["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
