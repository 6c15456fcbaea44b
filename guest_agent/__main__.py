"""``python -m guest_agent`` is ``balloon-guest``."""

from .entry import main

raise SystemExit(main())
