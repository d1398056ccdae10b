"""``python -m gpt2_scratch COMMAND``: the project's one command line (core/cli.py), as ``gpt2-scratch``."""

import sys

from gpt2_scratch.core.cli import main

sys.exit(main(prog="python -m gpt2_scratch"))
