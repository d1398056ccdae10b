"""The benchmark scripts run: every one answers --help, and bench/gpu_check.py prints its whole table on the CPU.

Speed is never asserted (the machine is shared and changes between sessions); what is checked is that the
scripts import against the installed package and that the GPU check degrades to rows, not crashes.
"""

import json
import os
import runpy
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, SHARED_DIR

BENCH = REPO_ROOT / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))
BOOK_DATA = SHARED_DIR / "data" / "instruction-data.json"

# One interpreter for all scripts: a fresh one costs seconds (torch). Each script runs as `python SCRIPT --help`
# would run it: as __main__, with bench/ first on sys.path.
HELP_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys
    scripts, results = sys.argv[1:], {}
    for script in scripts:
        sys.argv = [script, "--help"]
        sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
            code = "returned without exiting"
        except SystemExit as exit:
            code = exit.code or 0
        except BaseException as err:
            code = f"{type(err).__name__}: {err}"
        finally:
            sys.path.pop(0)
        results[script] = [code, out.getvalue()]
    print("RESULTS " + json.dumps(results))
    """
)


def test_every_bench_script_answers_help():
    assert {"gpu_check.py", "gpu_wheelhouse.py", "bench_gguf.py"} <= {p.name for p in SCRIPTS}
    # "system": no script may re-execute the driver with a preloaded malloc (none gets that far on --help).
    result = subprocess.run([sys.executable, "-c", HELP_DRIVER, *map(str, SCRIPTS)], cwd=REPO_ROOT,
                            env={**os.environ, "GPT2_SCRATCH_ALLOCATOR": "system"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULTS "))
    results = json.loads(line[len("RESULTS "):])
    failed = {os.path.basename(s): code for s, (code, _) in results.items() if code != 0}
    assert not failed, f"--help did not exit 0: {failed}\n{result.stderr[-3000:]}"
    for script, (_, usage) in results.items():
        assert usage.startswith("usage: "), f"{script} --help printed no usage:\n{usage[:500]}"


def run_gpu_check(monkeypatch, capsys, *args: str) -> str:
    """bench/gpu_check.py as `python bench/gpu_check.py ARGS` runs it, in this process (no new interpreter)."""
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [str(BENCH / "gpu_check.py"), *args])
    runpy.run_path(str(BENCH / "gpu_check.py"), run_name="__main__")
    return capsys.readouterr().out


ROWS = (
    "matmul (MFU peak)",
    "parity: logits on the device vs the CPU (fp32)",
    "train: full finetuning, eager",
    "train: full finetuning, eager, micro-batch 1",
    "train: LoRA r8 (c_attn c_proj c_fc), eager",
    "generate: batch 8, fp32 weights",
    "generate: batch 8, bf16 weights",
    "fsdp: wrap + 2 train steps",
    "fsdp: sharded checkpoint, resume",
    "fsdp: gathered final model",
    "train: full finetuning, torch.compile",
)


def test_gpu_check_on_the_cpu_prints_every_row(monkeypatch, capsys, tmp_path):
    out = run_gpu_check(monkeypatch, capsys, "--device", "cpu", "--json", str(tmp_path / "rows.json"))
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in out.splitlines() if line.startswith("| ")}
    assert set(ROWS) <= set(cells), out
    for label in ROWS[:-1]:
        assert not cells[label][1].startswith(("failed", "skipped")), cells[label]
    assert cells[ROWS[1]][1].endswith("(ok)")
    assert cells[ROWS[-1]][1] == "skipped"  # inductor's CPU build takes minutes: only with --compile on
    assert "tiny (--tiny)" in out and "The book's chapter-7 run (gpt2-medium)" in out
    # FSDP on the CPU: torch's fully_shard (Accelerate's needs an accelerator), said in the row; all three "ok",
    # and the one-process group it made is gone (this test's process goes on).
    assert "not Accelerate's FSDP" in cells["fsdp: wrap + 2 train steps"][-1]
    assert all(cells[label][1] == "ok" for label in ROWS if label.startswith("fsdp"))
    assert "RANK" not in os.environ and not torch.distributed.is_initialized()
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    train = next(r for r in rows if r["check"] == "train: full finetuning, eager")
    assert train["run_steps"] == 232 and train["run_evaluations"] == 48  # the book's 2 epochs of 116 batches
    assert train["tokens_per_s"] > 0 and 0 < train["mfu"] and train["run_minutes"] > 0
    lora = next(r for r in rows if r["check"].startswith("train: LoRA"))
    assert lora["trainable_params"] < train["trainable_params"] / 10


def test_gpu_check_lengths_stand_in(monkeypatch):
    """Without the book's file the workload has the book's shape: 935/55 examples of 40-91 tokens, 232 steps."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    work = gpu_check.load_workload(None)
    lengths = [len(x) for x in work.train]
    assert len(work.train) == 935 and len(work.validation) == 55 and "synthetic" in work.source
    assert min(lengths) >= 40 and max(lengths) <= 91 and 53 < sum(lengths) / len(lengths) < 60
    steps, tokens = gpu_check.whole_run_tokens(work.train, 1024)
    assert steps == 232 and gpu_check.evaluations(steps) == 48
    batch = gpu_check.collate(work.train[:8], 1024)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, max(lengths[:8]))
    if BOOK_DATA.is_file():  # the stand-in's lengths are the book's, to a few percent
        real = gpu_check.load_workload(BOOK_DATA)
        assert "book" in real.source and len(real.train) == 935
        real_tokens = gpu_check.whole_run_tokens(real.train, 1024)[1]
        assert abs(tokens - real_tokens) / real_tokens < 0.05


def test_gpu_check_turns_a_missing_piece_into_a_row(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match="peft is not installed"):
        gpu_check.add_lora(object())
    check = gpu_check.Check.__new__(gpu_check.Check)  # the row machinery alone, no model or data
    check.args = type("Args", (), {"budget": 60.0, "json": None})()
    check.rows, check.cuda, check.started = [], False, __import__("time").perf_counter()
    check.fresh = check.sync = lambda: None

    def boom():
        raise RuntimeError("CUDA out of memory | tried to allocate 2 GiB")

    check.run_row("train: something", boom, 10)
    check.run_row("train: slow", lambda: __import__("time").sleep(5), 0.2)
    assert [r.result for r in check.rows] == ["failed: RuntimeError", "failed: TimeoutError"]
    assert "|" not in check.rows[0].cells()[-1] and "out of memory" in check.rows[0].note


def test_wheelhouse_places_every_dependency(monkeypatch):
    """A dependency added to pyproject.toml must be carried to the GPU machine or known to be there."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_wheelhouse

    requirements = gpu_wheelhouse.project_requirements()
    assert "torch" in requirements and "datasets" in requirements
    assert gpu_wheelhouse.unplaced(requirements) == []
    assert "torch" not in gpu_wheelhouse.GPU_IMAGE_LACKS + gpu_wheelhouse.MAYBE_OLDER_THERE
    assert set(gpu_wheelhouse.GPU_CHECK_NEEDS) <= set(gpu_wheelhouse.GPU_IMAGE_LACKS)
    assert gpu_wheelhouse.unplaced({"some-new-dependency": "some-new-dependency>=1"}) == ["some-new-dependency"]


def test_step_profile_accounts_for_the_whole_step():
    """bench_step.py on a 2-layer model: every op group is a row, and the groups add up to the profiled total
    (no operator is lost between them)."""
    result = subprocess.run([sys.executable, str(BENCH / "bench_step.py"), "--preset", "gpt2-small", "--n-layers", "2",
                             "--lengths", "16", "24", "--rounds", "1"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(BENCH))
    try:
        from bench_step import GROUPS
    finally:
        sys.path.pop(0)
    rows = {}
    for line in result.stdout.splitlines():
        cells = line.split()
        for group in GROUPS:
            if line.startswith(group + " "):
                rows[group] = (float(cells[-2]), float(cells[-1].rstrip("%")))
    assert set(rows) == set(GROUPS), result.stdout
    total = next(float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("total "))
    assert sum(seconds for seconds, _ in rows.values()) == pytest.approx(total, abs=0.005)
    assert sum(share for _, share in rows.values()) == pytest.approx(100, abs=0.5)
    assert rows["matrix products"][1] > 30  # a training step is mostly its matrix products
    assert "step MFU" in result.stdout
