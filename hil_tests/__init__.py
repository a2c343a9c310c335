"""Hardware-in-the-loop tests (docs/hil.md)."""

import sys
from pathlib import Path

# The host's side of a site (gateway process, collector, the fleet's OTA harness) is the test
# suite's: tests/helpers, whose modules import each other as helpers.*.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
