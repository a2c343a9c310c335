# Runs under the micropython binary: filling a READINGS batch must not allocate.
# The heap is locked around the add() loop; any allocation raises MemoryError.
# Last line on success: "NO ALLOC PASSED <readings>".
import sys

import micropython
import wire

key = wire.Key(b"\x6b\x62\x00\x01\x02\x03\x04\x05", 1, bytes(range(32)))
w = wire.ReadingsWriter(key)
values = [i * 0.25 - 10.0 for i in range(wire.MAX_READINGS)]  # floats made before the lock
huge = 1e300  # beyond float32: clamped to +-inf inside add(), without allocating
tiny = -1e300
w.begin(3, 1, 1767225600000, False)
added = 0
full = late = True
error = None  # every global exists before the lock: creating one could grow the dict
micropython.heap_lock()
try:
    for i in range(wire.MAX_READINGS - 2):
        if w.add(i & 3, i * 5, values[i]):
            added += 1
    if w.add(0, 65535, huge):
        added += 1
    if w.add(255, 65535, tiny):
        added += 1
    full = w.add(0, 0, values[0])  # one past capacity: refused, still without allocating
    late = w.add(0, 65536, values[0])
except MemoryError as e:
    error = e
micropython.heap_unlock()
if error is not None:
    print("NO ALLOC FAILED: add() allocated after", added, "readings")
    sys.exit(1)
if added != wire.MAX_READINGS or full or late:
    print("NO ALLOC FAILED: added", added, "full", full, "late", late)
    sys.exit(1)
frame = w.finish(3, 2)
m = wire.decode(bytes(frame), wire.lookup_for(key), wire.ReplayGuard())
ends = (m.readings[-2][2], m.readings[-1][2])
if len(m.readings) != wire.MAX_READINGS or ends != (float("inf"), float("-inf")):
    print("NO ALLOC FAILED: frame does not decode to the readings")
    sys.exit(1)
print("NO ALLOC PASSED", added)
