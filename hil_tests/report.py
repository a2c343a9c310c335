"""The suite's report: per board, what passed, failed and was skipped (with the reason), and
the measurements only a board can give, printed as one screen per board at the end of the run
and written to <report dir>/<board>.json. JUnit XML comes from pytest's own --junitxml (`make
hil` asks for it)."""

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ALL_BOARDS = "all boards"  # tests of several boards at once (two-board tests)
SUITE = Path(__file__).parent  # `make test` runs this suite beside tests/: only its tests count


@dataclass
class Measurement:
    name: str
    value: float | str
    unit: str
    note: str = ""


@dataclass
class BoardReport:
    name: str
    kind: str = ""  # "emulated" or the port of a real board; none for ALL_BOARDS
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (test, reason)
    measurements: dict[str, Measurement] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"board": self.name, "kind": self.kind, "passed": self.passed,
                "failed": self.failed,
                "skipped": [{"test": t, "reason": r} for t, r in self.skipped],
                "measurements": [vars(m) for m in self.measurements.values()]}


def _test_name(nodeid: str) -> str:
    """The test's name without its file and its board parameter."""
    name = nodeid.split("::")[-1]
    return re.sub(r"\[[^\]]*\]$", "", name)


class HilReport:
    """A pytest plugin collecting results and measurements by board."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.boards: dict[str, BoardReport] = defaultdict(lambda: BoardReport("?"))

    def board(self, name: str, kind: str | None = None) -> BoardReport:
        report = self.boards[name]
        report.name = name
        if kind is not None:
            report.kind = kind
        return report

    def record(self, board: str, name: str, value: float | str, unit: str,
               note: str = "") -> None:
        self.board(board).measurements[name] = Measurement(name, value, unit, note)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        outcome = yield
        if SUITE in Path(item.path).parents:
            report = outcome.get_result()
            report.hil_board = getattr(item, "hil_board", ALL_BOARDS)  # type: ignore[attr-defined]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not hasattr(report, "hil_board"):
            return
        board = self.board(report.hil_board)
        name = _test_name(report.nodeid)
        if report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
                report.longrepr)
            board.skipped.append((name, reason.removeprefix("Skipped: ")))
        elif report.failed:
            if name not in board.failed:
                board.failed.append(name)
        elif report.when == "call" and report.passed:
            board.passed.append(name)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.boards:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write = terminalreporter.write_line
        for name in sorted(self.boards):
            board = self.boards[name]
            (self.folder / f"{_file_name(name)}.json").write_text(
                json.dumps(board.as_json(), indent=1))
            terminalreporter.write_sep("=", f"hil: {name}" + (f" ({board.kind})"
                                                              if board.kind else ""))
            write(f"passed {len(board.passed)}, failed {len(board.failed)}, "
                  f"skipped {len(board.skipped)}")
            for test in board.failed:
                write(f"  FAILED  {test}")
            for test, reason in board.skipped:
                write(f"  skipped {test}: {reason}")
            for m in board.measurements.values():
                value = f"{m.value:,.1f}" if isinstance(m.value, float) else f"{m.value:,}" \
                    if isinstance(m.value, int) else m.value
                write(f"  {m.name}: {value} {m.unit}" + (f"  ({m.note})" if m.note else ""))
        write(f"hil: reports in {self.folder}/")


def _file_name(board: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", board)
