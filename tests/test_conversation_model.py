"""A model trained on conversations, checked with plain transformers in an interpreter without this package:
the saved chat template renders the training text and marks exactly the supervised tokens, the run's initial
validation loss is the mean next-token NLL over that mask, and ``pipeline`` continues a history as ``chat``
does. And the book's 1100 records still give byte for byte the book's training text in both book styles."""

import json
from pathlib import Path

import pytest

from conftest import ENV, SHARED_DIR, run_cli, run_python
from gpt2_scratch import get_tokenizer
from gpt2_scratch.core.conversations import load_conversations
from gpt2_scratch.core.prompts import conversation_segments
from gpt2_scratch.train.conversation_data import tokenize_conversations
from gpt2_scratch.train.data import IGNORE_INDEX, InstructionCollator, prepare_instruction_data

FIXTURE = Path(__file__).parent / "fixtures" / "conversations.jsonl"
VALIDATION = [  # ShareGPT, so --val-data is read in another format than --data
    [("system", "Be brief."), ("human", "What is 3 + 4?"), ("gpt", "7."), ("human", "And 3 + 5?"), ("gpt", "8.")],
    [("human", "Name a fruit."), ("gpt", "A pear is a fruit.")],
    [("human", "Say yes."), ("gpt", "Yes."), ("human", "Say no."), ("gpt", "No."), ("human", "Again?"),
     ("gpt", "No, again.")],
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One SFT step on the fixture in the chat style from a tiny model saved before training; validation from
    its own file, all of it in the one evaluation batch."""
    root = tmp_path_factory.mktemp("conversations")
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps({"conversations": [{"from": f, "value": v} for f, v in conv]}) + "\n"
                           for conv in VALIDATION))
    test = root / "test.json"  # prompt/completion, a third format
    test.write_text(json.dumps([{"prompt": "Name a color.", "completion": "Green."},
                                {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Hello!"}]))
    out = root / "run"
    result = run_cli("train/sft.py", "--model", tiny_model_dir, "--data", FIXTURE, "--val-data", val,
                     "--test-data", test, "--prompt-style", "chat", "--out", out, "--max-steps", "1", "--batch-size", "4", "--eval-iter",
                     "1", "--mixed-precision", "no", "--max-new-tokens", "8", "--sample-tokens", "8", env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    # The whole fixture trains (its validation and test shares too): the held-out records are the files'.
    assert "20 train / 3 validation / 2 test" in result.stdout, result.stdout
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert [r["instruction"] for r in responses] == ["Name a color.", "Hi"]
    return out, val, tiny_model_dir


def training_view(val: Path):
    """(full ids with the closing <|endoftext|>, supervised-target flags, text) of each validation conversation,
    as training makes them."""
    records = load_conversations(str(val))
    ds = tokenize_conversations(records, get_tokenizer())
    views = []
    for record, example in zip(records, ds):
        batch = InstructionCollator(mask_prompt=True)([example])
        labels = batch["labels"][0].tolist()
        text = "".join(piece for piece, _ in conversation_segments(record["messages"]))
        views.append((example["input_ids"] + [50256], [label != IGNORE_INDEX for label in labels], text,
                      record["messages"]))
    return views


def test_saved_template_renders_the_training_text_and_marks_the_supervised_tokens(trained):
    out, val, _ = trained
    assert json.loads((out / "config.json").read_text())["prompt_style"] == "chat"
    views = training_view(val)
    got = run_python(f"""
        import json
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        rows = []
        for messages in {json.dumps([v[3] for v in views])}:
            enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            rows.append([tokenizer.apply_chat_template(messages, tokenize=False), list(enc["input_ids"]),
                         list(enc["assistant_masks"])])
        print(json.dumps(rows))
    """, cwd=out, block_project=True, env=ENV)
    rows = json.loads(got.stdout.strip().splitlines()[-1])
    for (ids, supervised, text, _), (their_text, their_ids, their_mask) in zip(views, rows):
        assert their_text == text
        assert their_ids == ids
        # Target j is token j+1: supervised exactly where transformers marks token j+1 as the assistant's.
        assert supervised == [bool(m) for m in their_mask[1:]]
        assert any(supervised) and not all(supervised)


def test_initial_validation_loss_is_the_mean_nll_over_the_assistant_mask(trained):
    out, val, initial_model = trained
    initial = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    got = run_python(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained({str(initial_model)!r}, trust_remote_code=True).eval()
        total, count = 0.0, 0
        for messages in {json.dumps([v[3] for v in training_view(val)])}:
            enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
            ids = torch.tensor([enc["input_ids"]])
            mask = torch.tensor(enc["assistant_masks"][1:], dtype=torch.bool)
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
            nll = -logprobs.gather(1, ids[0, 1:, None])[:, 0]
            total += nll[mask].sum().item()
            count += int(mask.sum())
        print(total / count)
    """, cwd=out, block_project=True, env=ENV)
    assert float(got.stdout.strip().splitlines()[-1]) == pytest.approx(initial["val_loss"], rel=1e-5)


def test_pipeline_continues_a_history_as_chat_does(trained):
    out, _, _ = trained
    users = ["What is 2 + 2?", "And times 3?", "Thanks!"]
    got = run_python(f"""
        import json
        from transformers import pipeline
        generate = pipeline("text-generation", model={str(out)!r}, trust_remote_code=True)
        messages, answers = [], []
        for user in {json.dumps(users)}:
            messages.append({{"role": "user", "content": user}})
            reply = generate(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
            assert reply["role"] == "assistant"
            messages.append(reply)
            answers.append(reply["content"])
        print(json.dumps(answers))
    """, cwd=out, block_project=True, env=ENV)
    answers = json.loads(got.stdout.strip().splitlines()[-1])
    assert all(answer.strip() for answer in answers)  # something to compare: a tiny random model rambles
    chat = run_cli("-m", "gpt2_scratch", "chat", "--model", out, "--max-new-tokens", "6", input="\n".join(users) + "\n",
                   env=ENV)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "".join(answer + "\n" for answer in answers)


def test_a_long_history_drops_its_oldest_exchanges_with_a_notice(trained):
    out, _, _ = trained
    chat = run_cli("-m", "gpt2_scratch", "chat", "--model", out, "--max-new-tokens", "60",
                   input="".join(f"Tell me about the number {n} in some words please.\n" for n in range(4)), env=ENV)
    assert chat.returncode == 0, chat.stderr
    assert "[dropped the oldest" in chat.stderr and "exchange(s) of the conversation" in chat.stderr


def test_respond_answers_conversations_and_the_judge_sees_their_history(trained, tmp_path):
    from gpt2_scratch.eval.judge_prompts import score_prompt

    out, val, _ = trained
    data = tmp_path / "ask.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                             {"role": "user", "content": "Name a fruit."}]}) + "\n")
    result = run_cli("-m", "gpt2_scratch", "respond", "--model", out, "--data", data, "--out", tmp_path / "r.json",
                     "--max-new-tokens", "5", env=ENV)
    assert result.returncode == 0, result.stderr
    [record] = json.loads((tmp_path / "r.json").read_text())
    assert record["instruction"] == "Name a fruit." and isinstance(record["model_response"], str)
    judged = score_prompt({**record, "output": "A pear."}, record["model_response"])
    assert "### User:\nHi\n\n### Assistant:\nHello.<|endoftext|>\n\n### User:\nName a fruit.`" in judged


BOOK_PHI3 = ("<|user|>\n{instruction}{input}\n<|assistant|>:\n{output}")  # the book's exercise 7.1


@pytest.mark.parametrize("style", ["alpaca", "phi3"])
def test_the_book_records_give_the_book_training_text_byte_for_byte(style):
    from book_reference import format_input as book_alpaca_input

    path = SHARED_DIR / "data" / "instruction-data.json"
    book = json.loads(path.read_text())
    assert len(book) == 1100
    records = load_conversations(str(path))
    assert records == book  # the book's records pass through untouched
    tokenizer = get_tokenizer()
    data = prepare_instruction_data(records, tokenizer, style=style)  # the book's split: train, test, validation
    examples = [*data.train["input_ids"], *data.test["input_ids"], *data.validation["input_ids"]]
    assert len(examples) == 1100
    for entry, ids in zip(book, examples):
        if style == "alpaca":
            text = book_alpaca_input(entry) + f"\n\n### Response:\n{entry['output']}"
        else:
            text = BOOK_PHI3.format(instruction=entry["instruction"], output=entry["output"],
                                    input=f"\n{entry['input']}" if entry["input"] else "")
        assert tokenizer.decode(ids) == text
        assert ids == tokenizer.encode(text)
