"""The ``ckptstore`` command.

    ckptstore train [...]     the reference training loop (python -m ckptstore.train)

Inspecting, verifying, exporting, pruning and syncing checkpoints are not commands yet.
"""

from __future__ import annotations

import sys

USAGE = """usage: ckptstore COMMAND [...]

commands:
  train    train a GPT-style model, checkpointed by ckptstore (ckptstore train --help)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "train":
        from ckptstore.train.loop import main as train

        return train(rest)
    print(f"ckptstore: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
