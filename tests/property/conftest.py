"""The property tests drive snapfs's vfs layer directly (no kernel, no mount).

oracle.py is the brute-force model they check snapfs against; it lives next to the tests
and imports nothing from snapfs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
