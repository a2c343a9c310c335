"""`kinhbac gateway run`, the real command, with one fault that a test sets off from outside.

    KINHBAC_TEST_FAULT_FILE=/tmp/crash python tests/helpers/faulty_gateway.py gateway run -c gw.toml

Once the file named by $KINHBAC_TEST_FAULT_FILE exists, the queue's maintenance raises
RuntimeError("injected fault"): an unexpected error in the gateway's housekeeping task. The
fault lives here, beside the tests; nothing in the product reads that variable.
"""

import os
from pathlib import Path

from kinhbac.cli import app
from kinhbac.gateway.queue import Queue

TRIGGER = Path(os.environ["KINHBAC_TEST_FAULT_FILE"])
_maintain = Queue.maintain


async def maintain(self: Queue) -> object:
    if TRIGGER.exists():
        raise RuntimeError("injected fault")
    return await _maintain(self)


Queue.maintain = maintain  # type: ignore[method-assign]

if __name__ == "__main__":
    app(prog_name="kinhbac")
