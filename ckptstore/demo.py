"""``python -m ckptstore.demo``: the README's main job (see :mod:`ckptstore.train.demo`)."""

import sys

from ckptstore.train.demo import main

if __name__ == "__main__":
    sys.exit(main())
