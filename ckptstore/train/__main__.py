"""``python -m ckptstore.train``: the reference training loop (see :mod:`ckptstore.train.loop`)."""

import sys

from ckptstore.train.loop import main

sys.exit(main())
