"""Entry point of ``python -m gpt2_scratch`` (see cli.py)."""

from .cli import main

main()
