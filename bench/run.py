"""`make bench`: every benchmark, each writing its results with the machine described."""

import sys

from bench import heap_factor


def main() -> int:
    status = heap_factor.main()
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
