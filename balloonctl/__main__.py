"""``python -m balloonctl``: the same as the ``balloonctl`` console script."""

import sys

from .cli import main

sys.exit(main())
