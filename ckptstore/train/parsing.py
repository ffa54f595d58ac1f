"""The command-line parser of the reference loop and its demo (torch-free: the demo
starts at once)."""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with usage errors of one line: the options' usage block (a dozen lines)
    would bury it; --help has them."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
