"""``python -m pouch_driver``: the same as the ``pouch-driver`` command."""

import sys

from .cli import main

sys.exit(main())
