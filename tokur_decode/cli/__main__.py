"""``python -m tokur_decode.cli``: the ``tokur-decode`` command."""

import sys

from . import main

sys.exit(main())
