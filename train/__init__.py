"""Training (``gpt2_scratch.train``), read from the top down:

    sft.py dpo.py classify.py   the commands: each an Args dataclass, set_up(args) -> (Run, Task), a Task
    run.py                      a run's life: start (every check), launch (the first write), finish
    loop.py                     the one training loop: fit, train_step (``book_exact.py``: the book's own)
    task.py                     the Task base class: every hook the loop and finish call, documented
    state.py checkpoints.py stopping.py lm_outputs.py   what those stand on

A new kind of training is one new module beside sft.py (see task.py). No module here imports one that
imports it back (tests/test_layers.py)."""
