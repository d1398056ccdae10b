"""``python -m convert COMMAND``: the ``convert`` commands of the project's command line (core/cli.py)."""

import sys

from gpt2_scratch.core.cli import main

sys.exit(main(prog="python -m convert", group="convert"))
