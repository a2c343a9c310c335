"""The `kinhbac` command: one entry point, a sub-command per role."""

import typer

app = typer.Typer(
    help="Kinhbac: sensor nodes, site gateways and the fleet service.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.command()
def demo(
    boards: int = typer.Option(5, min=1, max=50, help="How many emulated boards to start."),
) -> None:
    """Start emulated boards running the real firmware and show what they send."""
    from kinhbac.demo import run_demo

    run_demo(boards=boards)


if __name__ == "__main__":
    app()
