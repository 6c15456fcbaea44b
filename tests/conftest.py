"""Test-suite wiring.

pytest runs with ``--import-mode=importlib`` so test files with the same basename in
different folders (``tests/host_daemon/test_cli.py``, ``tests/guest_agent/load/test_cli.py``)
do not collide. That mode leaves ``sys.path`` alone, so the folders' own helper modules
(``hostkit``, ``daemons``, ...) are put on it here, once.
"""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
for folder in sorted({path.parent for path in _TESTS.rglob("*.py") if "node_modules" not in path.parts}):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
if str(_TESTS.parent) not in sys.path:
    sys.path.insert(0, str(_TESTS.parent))
