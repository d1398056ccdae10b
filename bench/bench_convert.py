"""Convert time and peak memory for a full-size checkpoint, against the model's size in bytes.

Each step runs in a fresh process (so its peaks are its own) and reports its wall time (after
imports), its peak RSS (`ru_maxrss`, which counts memory-mapped file pages: clean page cache the
kernel can drop) and its peak anonymous memory (RssAnon sampled every 5 ms: what must fit in RAM),
each minus what the imports alone use. Steps: OpenAI TF checkpoint → ours; ours → export-hf; that HF
folder → ours again. The page cache is warm (files were just written), so this measures CPU and
memory, not the disk.

Make a gpt2-medium-sized TF checkpoint first (TensorFlow in a scratch venv, never a dependency):

    /tmp/tfvenv/bin/python tests/fixtures/tf/make_fixtures.py --medium /tmp/gpt2-medium-tf
    python bench/bench_convert.py --openai-dir /tmp/gpt2-medium-tf --work /tmp/bench-convert \
        [--tf-python /tmp/tfvenv/bin/python]   # adds the book's way (TensorFlow) for comparison
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

# Peak RSS counts memory-mapped file pages too; those are clean page cache the kernel can drop.
# The anonymous part (RssAnon, sampled every 5 ms) is the memory that really has to fit in RAM.
SAMPLER = r"""
import threading, time
def _anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
peak_anon = [0]
def _sample():
    while True:
        peak_anon[0] = max(peak_anon[0], _anon())
        time.sleep(0.005)
threading.Thread(target=_sample, daemon=True).start()
"""

CHILD = SAMPLER + r"""
import json, resource, sys, time
t0 = time.perf_counter()
# Imports are not part of the conversion (the package and its command line load torch lazily: import it here).
import torch, transformers, gpt2_scratch.modeling_gpt2_scratch, gpt2_scratch.convert.cli
from gpt2_scratch.core.cli import main as cli_main
imported, imported_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _anon()
t1 = time.perf_counter()
code = cli_main(["convert", *sys.argv[1:]]) if sys.argv[1:] else 0
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
print("BENCH " + json.dumps({"code": code, "import_s": t1 - t0, "run_s": t2 - t1, "import_rss": imported,
                             "peak_rss": peak, "import_anon": imported_anon, "peak_anon": max(peak_anon[0], _anon())}))
"""


# The book's loader (ch. 5 gpt_download.py): TensorFlow reads every variable into numpy. Reading
# only: no model is built and nothing is saved, so it does less than the steps above.
TF_CHILD = SAMPLER + r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np, tensorflow as tf
imported, imported_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, _anon()
t1 = time.perf_counter()
ckpt = tf.train.latest_checkpoint(sys.argv[1])
params = {name: np.squeeze(tf.train.load_variable(ckpt, name)) for name, _ in tf.train.list_variables(ckpt)}
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("BENCH " + json.dumps({"code": 0, "import_s": t1 - t0, "run_s": t2 - t1, "import_rss": imported,
                             "peak_rss": peak, "import_anon": imported_anon, "peak_anon": max(peak_anon[0], _anon())}))
"""


def run_step(argv: list[str], python: str = sys.executable, child: str = CHILD) -> dict:
    proc = subprocess.run([python, "-c", child, *argv], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"step {argv} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1][len("BENCH "):])
    if result["code"] != 0:
        raise SystemExit(f"step {argv} exited {result['code']}:\n{proc.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openai-dir", type=Path, required=True, help="folder with an OpenAI-layout TF checkpoint")
    parser.add_argument("--tf-python", help="a Python with tensorflow, to time the book's TF loader too")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-convert"), help="scratch folder (emptied)")
    args = parser.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    hp = json.loads((args.openai_dir / "hparams.json").read_text())
    model_bytes = (args.openai_dir / "model.ckpt.data-00000-of-00001").stat().st_size  # float32, every tensor once

    steps = [
        ("imports only (torch, transformers, ours)", []),
        ("openai TF checkpoint → ours", ["openai", "--from-dir", str(args.openai_dir), "--out", str(args.work / "ours")]),
        ("ours → export-hf (GPT2LMHeadModel)", ["export-hf", "--model", str(args.work / "ours"), "--out", str(args.work / "hf")]),
        ("hf folder → ours", ["hf", "--from-dir", str(args.work / "hf"), "--out", str(args.work / "ours2")]),
    ]
    print(f"model: n_layer={hp['n_layer']} n_embd={hp['n_embd']} n_vocab={hp['n_vocab']} — "
          f"{model_bytes / 1e9:.2f} GB of float32 weights ({model_bytes / 4e6:.0f}M parameters)\n")
    print("| step | time (s) | peak RSS (GB) | peak RSS − imports | peak anonymous − imports |")
    print("|---|---:|---:|---:|---:|")

    def row(label: str, r: dict) -> None:
        rss, anon = r["peak_rss"] - r["import_rss"], r["peak_anon"] - r["import_anon"]
        print(f"| {label} | {r['run_s']:.1f} | {r['peak_rss'] / 1e9:.2f} | {rss / 1e9:.2f} GB = "
              f"{rss / model_bytes:.2f}× | {anon / 1e9:.2f} GB = {anon / model_bytes:.2f}× |", flush=True)

    for label, argv in steps:
        row(label, run_step(argv))
    if args.tf_python:
        row("book's way: TensorFlow reads the variables (no model, no save)",
            run_step([str(args.openai_dir)], python=args.tf_python, child=TF_CHILD))


if __name__ == "__main__":
    main()
