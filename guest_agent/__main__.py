"""``python -m guest_agent`` is ``balloon-guest``."""

from .cli import main

raise SystemExit(main())
