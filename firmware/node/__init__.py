# The node app. Modules that only some moments need (the config file's checks, the sensor
# table's rules, claim mode, safe mode) are imported then, and the first two are dropped
# after with forget(), so that their bytecode leaves the heap. A frozen image keeps bytecode
# in flash, where this saves nothing and costs nothing.
import sys


def forget(name):
    """Drop node.<name> from the module table and from this package, so that its code can be
    collected once nothing else refers to it. Its interned names stay: MicroPython never frees
    them."""
    sys.modules.pop("node." + name, None)
    try:
        delattr(sys.modules["node"], name)
    except AttributeError:
        pass
