"""What the interpretation scripts share on the command line: logging set-up and the rule that a
user error ends in one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from datasets import DataError
from utils.checkpoint import CheckpointError

USER_ERRORS = (CheckpointError, DataError, ValueError, FileNotFoundError)


def run_script(program: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], object],
               argv: list[str] | None = None) -> int:
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(args)
    except USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        return 2
    return 0
