"""``--compile``: torch.compile (inductor) for training, with one line instead of a crash deep in inductor.

Inductor writes and builds C++ (CPU) or Triton (GPU) kernels the first time a shape is seen, so it
needs a working C++ compiler on CPU and a supported backend; where either is missing, the error would
surface at the first training step as a long traceback from inductor's internals. ``compile_model``
compiles a tiny function first and turns such a failure into one ``Failure`` line saying what to do.

The model is compiled in place (``nn.Module.compile``): its state-dict keys stay the same, so
checkpoints, ``--resume``, LoRA and saving need nothing else. Batches of new lengths recompile a few
times until inductor marks the sequence length dynamic; the ``return_logits=False`` loss indexes the
positions that have a target (a data-dependent shape), where the graph breaks into two compiled parts.

Generation runs eager (``eager``): the KV cache grows a token at a time, so every decoding step is a new
shape; compiled, the first steps would each recompile until dynamo's recompile limit, then warn and fall
back to eager anyway, after a minute of compiling for nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager

from gpt2_scratch.core.errors import Failure, one_line

logger = logging.getLogger(__name__)


def check_compiler(device: str = "cpu") -> None:
    """Raise one ``Failure`` line if torch.compile cannot build kernels here."""
    import torch

    if device == "cpu" and not (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
                                or shutil.which("clang++")):
        raise Failure("--compile needs a C++ compiler for inductor's CPU kernels and none was found (c++, g++, clang++ "
                      "or $CXX); install one (e.g. apt-get install g++) or leave --compile out")
    try:
        probe = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
        probe(torch.ones(4, device=device))
    except Exception as err:  # inductor raises many kinds (BackendCompilerFailed, CppCompileError, ...)
        raise Failure(f"--compile: torch.compile does not work on this platform ({type(err).__name__}: "
                      f"{one_line(err, 200)}); leave --compile out") from None


def compile_model(model, device: str | None = None):
    """Compile ``model`` in place for training (after ``check_compiler``); returns it."""
    if device is None:
        device = next(model.parameters()).device.type
    check_compiler(device)
    model.compile()
    logger.info("model compiled with torch.compile (inductor)")
    return model


@contextmanager
def eager():
    """Run a compiled model eager inside the block (generation: a new shape every token); a no-op otherwise."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield
