"""Entry point of `python -m convert`; the commands live in convert/cli.py."""

import sys

from convert.cli import main

sys.exit(main())
