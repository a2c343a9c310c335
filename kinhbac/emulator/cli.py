"""`kinhbac emulator run`: boards on ptys for a person, a terminal program or hil_tests."""

import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kinhbac.emulator.site import Emulator


def run_boards(boards: int, workdir: Path) -> None:
    console = Console()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    workdir = workdir.resolve()  # the default is relative; the boards run in other folders
    with Emulator(workdir) as emu:
        table = Table(title="Emulated ESP32 boards")
        for column in ("board", "serial port", "stable link", "MAC"):
            table.add_column(column)
        for _ in range(boards):
            board = emu.add_board()
            board.power_on()
            table.add_row(board.name, board.tty_path, str(board.workdir / "tty"), board.mac.hex(":"))
        console.print(table)
        console.print(
            f"Open a port with: python -m serial.tools.miniterm {emu.boards[0].tty_path} 115200\n"
            "Flash images stay in the folder above. Ctrl-C stops every board."
        )
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    console.print("All boards stopped.")
