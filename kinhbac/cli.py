"""The `kinhbac` command: one entry point, a sub-command per role."""

from pathlib import Path

import typer

app = typer.Typer(
    help="Kinhbac: sensor nodes, site gateways and the fleet service.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
emulator_app = typer.Typer(help="Emulated ESP32 boards (needs the emulator extra).")
app.add_typer(emulator_app, name="emulator")


@app.command()
def demo(
    boards: int = typer.Option(5, min=1, max=50, help="How many emulated boards to start."),
    workdir: Path = typer.Option(Path("run/demo"), help="Where the boards' flash images live."),
) -> None:
    """Start emulated boards running the real firmware and show what they send."""
    from kinhbac.demo import run_demo

    run_demo(boards=boards, workdir=workdir)


@emulator_app.command("run")
def emulator_run(
    boards: int = typer.Option(1, min=1, max=50, help="How many boards to start."),
    workdir: Path = typer.Option(
        Path("run/emulator"), help="Folder for the boards' flash images and serial port links."
    ),
) -> None:
    """Start boards and keep them running until Ctrl-C; each one's serial port is printed."""
    from kinhbac.emulator.cli import run_boards

    run_boards(boards=boards, workdir=workdir)


if __name__ == "__main__":
    app()
