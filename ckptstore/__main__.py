"""``python -m ckptstore``: the ``ckptstore`` command (see :mod:`ckptstore.cli`)."""

import sys

from ckptstore.cli import main

sys.exit(main())
