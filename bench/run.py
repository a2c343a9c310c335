"""`make bench`: every benchmark, each writing its results with the machine described.

    heap factor   bench/HEAP_FACTOR.md   the unix port's heap bytes per 32-bit byte
    firmware heap bench/RESULTS.md       the node firmware's heap on an ESP32, by kind
    gateway       bench/RESULTS.md       readings/s end to end, ACK latency, RSS, vs naive
    fleet ingest  bench/RESULTS.md       messages/s from MQTT into PostgreSQL, lag
    queue         bench/RESULTS.md       bytes a reading on disk, a one-hour backlog's drain
    login         bench/RESULTS.md       fleet RSS and health p99 under 60 clients' bad logins
    ota           bench/RESULTS.md       a release to 100 boards behind one gateway: time,
                                         fetches at the fleet, node heap while downloading
    console       bench/RESULTS.md       the console's pages over 1,000,000 devices at 500
                                         sites in PostgreSQL: p50/p95, the database's size
"""

import sys

from bench import (
    console_bench,
    firmware_heap,
    fleet_ingest_bench,
    gateway_bench,
    heap_factor,
    login_bench,
    ota_bench,
    queue_bench,
)


def main() -> int:
    status = heap_factor.main([])
    status = firmware_heap.main([]) or status
    status = gateway_bench.main([]) or status
    status = fleet_ingest_bench.main([]) or status
    status = queue_bench.main([]) or status
    status = login_bench.main([]) or status
    status = ota_bench.main([]) or status
    status = console_bench.main([]) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
