"""The process a command runs in: its log lines, the libraries' chatter, bf16 speed, and the processes
``accelerate launch --cpu`` should have started. Nothing here is about training; train/run.py calls it.

    configure_logging(main)   one dense line per event on stdout (WARNING only on the other processes)
    quiet_libraries()         datasets' / transformers' progress bars and INFO lines off
    fast_bf16()               whether bf16 matrix products are fast on this machine
    relaunch_multi_cpu()      make ``accelerate launch --num_processes N --cpu`` really run N processes
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path


class _StdoutHandler(logging.StreamHandler):
    """Log lines go to whatever ``sys.stdout`` is when they are written (tqdm and tests swap it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


# Our modules whose INFO lines (every file a save writes) would bury a run's own lines.
_NOISY = ("accelerate", "httpx", "httpx2", *(f"gpt2_scratch.{m}" for m in (
    "model_dir", "hub", "modeling_gpt2_scratch", "responses", "tokenizer", "core.download")))


def configure_logging(main: bool) -> None:
    """Log lines as plain messages on stdout: INFO on the main process, WARNING on the others; the libraries'
    INFO lines and progress bars off (a run's own lines say what happens)."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, handlers=[_StdoutHandler()],
                        format="%(message)s", force=True)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # save_state's note that the tied lm_head is stored once is expected (reload re-ties it).
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
    quiet_libraries()


def quiet_libraries() -> None:
    """Turn the libraries' progress bars and INFO lines down: a run's own lines say what happens."""
    import datasets  # deferred: heavy, and only training commands need it
    import transformers  # deferred: heavy

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def fast_bf16() -> bool:
    """Whether bf16 matrix products are fast here: a CUDA GPU that has them, or a CPU with AMX or AVX512-BF16.

    Elsewhere (an AVX2-only CPU) torch computes them with a fallback kernel that is tens of times slower
    than fp32, so bf16 autocast would slow training down instead of speeding it up.
    """
    import torch  # deferred: core/ imports no torch at module level

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(probe is not None and probe() for probe in probes)


def relaunch_multi_cpu() -> None:
    """Make ``accelerate launch --num_processes N --cpu ...`` really run N processes (call first).

    For CPUs without an MPI host file, accelerate's launcher starts ONE process however many were
    asked for (huggingface/accelerate#2741); it only exports MASTER_PORT. Detect that case and start
    the N processes with torch's elastic launcher (``--standalone``: a free rendezvous port), which
    sets RANK/WORLD_SIZE so Accelerate sets up DDP over gloo. Exits with the workers' status.
    """
    env = os.environ
    launched_on_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in env
    if not launched_on_cpu or any(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE",
                                                     "OMPI_COMM_WORLD_SIZE")):
        return
    n = _launcher_num_processes()
    if not n or n < 2:
        return
    child_env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    # sys.orig_argv[1:] is how this process was started: a script path, or -m and a module.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           *sys.orig_argv[1:]]
    sys.exit(subprocess.run(cmd, env=child_env).returncode)


def _launcher_num_processes() -> int | None:
    """``--num_processes N`` from the command line of the ``accelerate launch`` that started us."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    for i, token in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if token == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if token.startswith(flag + "="):
                return int(token.split("=", 1)[1])
    return None
