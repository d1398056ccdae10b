"""The stand-in Ollama server is faithful: the official ``ollama`` client parses every reply.

Everything the judge tests prove rests on the stand-in speaking Ollama's protocol; here the
official client (httpx underneath, strict about chunked NDJSON and status codes) talks to it.
"""

import json
import socket

import ollama
import pytest
import requests
from ollama_standin import OllamaStandin, standin_score

from gpt2_scratch.eval.judge_prompts import SCORE_SCHEMA, score_prompt

RECORD = {"instruction": "Name the capital of France.", "input": "", "output": "Paris."}


@pytest.fixture()
def server():
    with OllamaStandin(models=["llama3", "phi3:mini"]) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return ollama.Client(host=server.url, timeout=10)


def test_tags_and_version(server, client):
    listed = client.list()
    assert [m.model for m in listed.models] == ["llama3:latest", "phi3:mini"]
    assert listed.models[0].details.family == "llama" and listed.models[0].size > 0
    version = requests.get(server.url + "/api/version", timeout=5).json()
    assert isinstance(version["version"], str) and version["version"].count(".") == 2


def test_chat_not_streamed(server, client):
    prompt = score_prompt(RECORD, "The capital is Paris.")
    reply = client.chat(model="llama3", messages=[{"role": "user", "content": prompt}], stream=False,
                        options={"seed": 123, "temperature": 0, "num_ctx": 2048})
    assert reply.done and reply.done_reason == "stop" and reply.message.role == "assistant"
    assert reply.message.content == str(standin_score("The capital is Paris."))
    assert reply.eval_count == 3 and reply.total_duration > 0
    assert server.chat_requests[-1]["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_chat_streamed_with_schema(server, client):
    prompt = score_prompt(RECORD, "Lyon")
    chunks = list(client.chat(model="llama3", messages=[{"role": "user", "content": prompt}],
                              stream=True, format=SCORE_SCHEMA))
    assert len(chunks) > 2, "the reply should arrive in several NDJSON chunks"
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    text = "".join(c.message.content for c in chunks)
    assert json.loads(text) == {"score": standin_score("Lyon")}
    assert server.chat_requests[-1]["format"] == SCORE_SCHEMA


def test_model_not_found_is_404(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.error == "model 'mistral' not found"


def test_error_line_mid_stream(server, client):
    stream = client.chat(model="llama3", messages=[{"role": "user", "content": "MIDERR:1 hello"}], stream=True)
    with pytest.raises(ollama.ResponseError) as e:
        for _ in stream:
            pass
    assert "error was encountered" in e.value.error
    # the fault is counted per prompt: the second request is answered normally
    again = client.chat(model="llama3", messages=[{"role": "user", "content": "MIDERR:1 hello"}], stream=False)
    assert again.done and server.count("MIDERR") == 2


def test_server_error_is_500(client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="llama3", messages=[{"role": "user", "content": "FAIL500:1 hi"}], stream=False)
    assert e.value.status_code == 500 and "llama runner" in e.value.error


def test_nothing_listening_is_connection_error():
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError):
        ollama.Client(host=f"http://127.0.0.1:{port}", timeout=5).list()


def test_openai_compatible_endpoints(server):
    models = requests.get(server.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["llama3:latest", "phi3:mini"]
    r = requests.post(server.url + "/v1/chat/completions", timeout=5, json={
        "model": "llama3", "messages": [{"role": "user", "content": score_prompt(RECORD, "Nice")}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCORE_SCHEMA}}})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert json.loads(body["choices"][0]["message"]["content"]) == {"score": standin_score("Nice")}
    r = requests.post(server.url + "/v1/chat/completions", timeout=5,
                      json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]


def test_raw_generate_streams_like_ollama(server, client):
    """`data generate` relies on /api/generate with raw=True; the official client reads the stand-in's stream."""
    start = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"
    chunks = list(client.generate(model="llama3", prompt=start, raw=True, stream=True, options={"seed": 126}))
    assert chunks[-1].done and chunks[-1].done_reason == "stop" and not any(c.done for c in chunks[:-1])
    assert "".join(c.response for c in chunks).split("\n")[0] == "What is the capital of France?"
    whole = client.generate(model="llama3", prompt=start, raw=True, options={"seed": 127})
    assert whole.response.startswith("Write a haiku about autumn leaves.\n")
