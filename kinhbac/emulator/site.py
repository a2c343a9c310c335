"""The emulator: emulated boards and their access point, run on a background event loop.

Tests, the demo and hil_tests drive it from ordinary synchronous code:

    with Emulator(tmp_path) as emu:
        board = emu.add_board()
        board.power_on()
        board.console.wait_for(">>> ")
"""

import asyncio
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from kinhbac.emulator.access_point import AccessPoint
from kinhbac.emulator.board import STANDINS, Board
from kinhbac.emulator.interpreter import emulated_heap_bytes, find_micropython

T = TypeVar("T")

ESPRESSIF_OUI = bytes.fromhex("240ac4")  # the MAC prefix of Espressif's own modules
CALL_TIMEOUT_S = 30.0
FACTORY_TIMEOUT_S = 60.0


class Emulator:
    """Owns the boards, the access point and the event loop thread they run on."""

    def __init__(
        self,
        workdir: Path,
        *,
        micropython: str | None = None,
        heap_bytes: int | None = None,
        access_point: AccessPoint | None = None,
    ) -> None:
        # Absolute: each board's interpreter runs in the board's own folder and the flash tool
        # in the stand-ins folder, where a path relative to the caller's would name nothing.
        self.workdir = Path(workdir).resolve()
        self.micropython = micropython or find_micropython()
        self.heap_bytes = heap_bytes or emulated_heap_bytes()
        self.access_point = access_point or AccessPoint()
        self.boards: list[Board] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="emulator", daemon=True)
        # Unix socket paths are limited to ~108 bytes: keep them in a short private folder.
        self._sockdir = Path(tempfile.mkdtemp(prefix="kb-"))

    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def close(self) -> None:
        """Stop every board and the loop; nothing is left running."""
        if not self._thread.is_alive():
            return
        for board in self.boards:
            self.call(board.shutdown())
        self.call(self.access_point.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run a coroutine on the emulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_board(self, name: str | None = None, *, heap_bytes: int | None = None) -> Board:
        """A new board, powered off, with a blank flash (or the one already in its folder)."""
        index = len(self.boards)
        name = name or f"board-{index}"
        mac = ESPRESSIF_OUI + (0x100000 + index).to_bytes(3, "big")
        board = Board(
            self,
            index,
            name,
            self.workdir / name,
            mac,
            heap_bytes or self.heap_bytes,
        )
        self.access_point.join(board)
        self.call(board.start_servers(self._sockdir))
        self.boards.append(board)
        return board

    def access_point_up(self, up: bool) -> None:
        """Take the site's access point down or bring it back up."""
        self.call(self.access_point.set_up(up))

    def factory(self, board: Board, mode: str, files: dict[str, bytes]) -> dict[str, bytes | None]:
        """Write files to, or read one file from, a powered-off board's filesystem."""
        script = str(STANDINS / "_factory.py")
        env = {"KINHBAC_FLASH": str(board.flash.path)}
        if mode == "write":
            with tempfile.TemporaryDirectory(prefix="kb-stage-") as stage:
                for path, data in files.items():
                    target = Path(stage) / path.lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                out = self._run_factory([script, "write", stage], env)
            if "WROTE" not in out:
                raise RuntimeError(f"writing {board.name}'s flash failed: {out}")
            return {}
        (path,) = files
        out = self._run_factory([script, "read", path], env).strip().splitlines()[-1:]
        if out == ["MISSING"]:
            return {path: None}
        return {path: bytes.fromhex(out[0])}

    def _run_factory(self, args: list[str], env: dict[str, str]) -> str:
        result = subprocess.run(
            [self.micropython, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=FACTORY_TIMEOUT_S,
            cwd=STANDINS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"flash tool failed: {result.stdout}{result.stderr}")
        return result.stdout
