"""The process a command runs in: its log lines, the libraries' chatter, bf16 speed, and the processes
``accelerate launch --cpu`` should have started. Nothing here is about training; train/run.py calls it.

    configure_logging(main)   one dense line per event on stdout (WARNING only on the other processes)
    quiet_libraries()         datasets' / transformers' progress bars and INFO lines off
    fast_bf16()               whether bf16 matrix products are fast on this machine
    relaunch_multi_cpu()      make ``accelerate launch --num_processes N --cpu`` really run N processes
    fsdp_without_accelerator() ``accelerate launch --use_fsdp`` on a machine with no GPU: say so, run DDP instead
    terminate_as_interrupt()  inside, SIGTERM interrupts as Ctrl-C does (``Terminated``, exit 143)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from gpt2_scratch.core.errors import Terminated


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
    """Make ``accelerate launch --cpu --num_processes N [--num_machines M --machine_rank R ...]`` really run
    N processes over M machines (call first).

    On CPUs without an MPI host file, accelerate's launcher starts ONE process per machine however many were
    asked for (huggingface/accelerate#2741): it exports only MASTER_ADDR/MASTER_PORT, no rank or world size.
    Each such process would train alone, and with several machines every machine would run a whole separate
    run. Detect that case and start this machine's N/M processes with torch's elastic launcher, which sets
    RANK/WORLD_SIZE so Accelerate sets up DDP over gloo: on one machine with a free local rendezvous port
    (``--standalone``), on several with the launcher's main process address, port and this machine's rank
    (every machine's launcher is given the same values). Exits with the workers' status.
    """
    env = os.environ
    launched_on_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in env
    if not launched_on_cpu or any(k in env for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_SIZE",
                                                     "OMPI_COMM_WORLD_SIZE")):
        return
    launcher = _launcher_settings()
    if launcher is None:
        return
    processes, machines, machine_rank = launcher.num_processes or 1, launcher.num_machines or 1, launcher.machine_rank
    if processes < 2 and machines < 2:
        return
    per_machine = max(processes // machines, 1)
    if machines == 1:
        where = ["--standalone"]
        child_env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    else:
        where = [f"--nnodes={machines}", f"--node_rank={machine_rank}", f"--master_addr={env['MASTER_ADDR']}",
                 f"--master_port={env['MASTER_PORT']}"]
        child_env = dict(env)
    # sys.orig_argv[1:] is how this process was started: a script path, or -m and a module.
    cmd = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={per_machine}",
           *sys.orig_argv[1:]]
    sys.exit(subprocess.run(cmd, env=child_env).returncode)


def _launcher_settings():
    """The settings of the ``accelerate launch`` that started this process (its command line completed from its
    config file, as accelerate itself does), or None when the parent is not accelerate's launcher."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return None
    # `python -m accelerate.commands.launch ARGS`, or the `accelerate` script: `.../accelerate launch ARGS`.
    starts = [i + 1 for i, token in enumerate(argv) if token == "accelerate.commands.launch"
              or (token == "launch" and i > 0 and Path(argv[i - 1]).name == "accelerate")]
    if not starts:
        return None
    import contextlib
    import io

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # deferred: heavy

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = launch_command_parser().parse_args(argv[starts[0]:])
            args, _, _ = _validate_launch_command(args)  # fills what the command line left out from the config
        except (SystemExit, ValueError, OSError):
            return None
    return args


def fsdp_without_accelerator() -> bool:
    """Whether this process was launched for FSDP (``accelerate launch --use_fsdp``, or a config file with
    ``distributed_type: FSDP``, both of which set ``ACCELERATE_USE_FSDP``) on a machine without an accelerator.

    FSDP shards parameters across devices; through Accelerate it needs GPUs (on a CPU every process dies in
    accelerate's FSDP set-up with a traceback, and ``--use_fsdp --cpu`` is refused by the launcher). In that
    case the FSDP request is withdrawn from the environment, so the caller can build a CPU Accelerator: the
    same processes then train with DDP (every process holds the whole model), which the caller says in one line.
    """
    import torch  # deferred: heavy

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        return False
    available = getattr(torch, "accelerator", None)
    if available is not None and available.is_available() or torch.cuda.is_available():
        return False
    os.environ.pop("ACCELERATE_USE_FSDP")
    return True


@contextmanager
def terminate_as_interrupt():
    """Inside, SIGTERM (``kill``, ``timeout``, a scheduler's stop) interrupts as Ctrl-C does: ``Terminated``, a
    KeyboardInterrupt, so whatever cleans up after Ctrl-C does so here too and the command exits 143 with one
    line. Used by the judge and the data tools around their requests (what has arrived is in their cache).
    Off the main thread it does nothing: only the main thread receives signals."""
    def interrupt(signum, frame) -> None:
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
