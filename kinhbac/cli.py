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
gateway_app = typer.Typer(help="The site gateway: nodes -> durable queue -> MQTT.")
app.add_typer(gateway_app, name="gateway")


@app.command()
def demo(
    boards: int = typer.Option(5, min=2, max=50,
                               help="How many emulated boards to start, shared by two sites."),
    workdir: Path = typer.Option(
        Path("run/demo"), help="Where the broker, the fleet's database, the gateways' queues and "
        "the boards' flash images live (emptied first)."),
    fleet_port: int = typer.Option(
        None, help="The fleet's port on 127.0.0.1 (0: any free one); default 8080, or any free "
        "port when 8080 is taken."),
    database_url: str = typer.Option(
        None, help="The fleet's database instead of SQLite in the work folder: an empty one of "
        "its own, e.g. postgresql://fleet@127.0.0.1/kinhbac_demo (the demo's sites go in it)."),
) -> None:
    """The whole system: the fleet with its console, two sites each with a gateway and emulated
    boards running the real firmware; prints an admin login; Ctrl-C stops everything."""
    from kinhbac.broker import BrokerError
    from kinhbac.demo import DemoError, run_demo
    from kinhbac.emulator.interpreter import MicroPythonNotFound

    try:
        run_demo(boards=boards, workdir=workdir, fleet_port=fleet_port,
                 database_url=database_url)
    except (DemoError, BrokerError, MicroPythonNotFound) as exc:
        typer.echo(f"The demo could not start: {exc}", err=True)
        raise typer.Exit(2) from None


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


@gateway_app.command("run")
def gateway_run(
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="TOML settings file. Every setting can also come from the environment as "
        "KINHBAC_GATEWAY_<NAME> (nested: KINHBAC_GATEWAY_MQTT__PORT), which wins over the "
        "file. `kinhbac gateway settings` lists them all.",
    ),
) -> None:
    """Run the gateway until SIGTERM or Ctrl-C (both drain in-flight work first).

    Exit status: 0 after such a stop; 1 when one of its tasks died (the log's "gateway
    stopped:" line says which, and why), to be restarted; 2 for a configuration error.
    """
    from kinhbac.gateway.config import ConfigError, load_settings
    from kinhbac.gateway.daemon import GatewayFailed, run_gateway, setup_logging
    from kinhbac.gateway.keys import KeyFileError
    from kinhbac.gateway.queue import QueueLayoutError

    try:
        settings = load_settings(config)
        setup_logging(settings.log_format)
        run_gateway(settings)
    except (ConfigError, KeyFileError, QueueLayoutError) as exc:
        typer.echo(f"kinhbac gateway: {exc}", err=True)
        raise typer.Exit(2) from exc
    except GatewayFailed as exc:
        raise typer.Exit(1) from exc  # the reason is logged already, in one line


@gateway_app.command("settings")
def gateway_settings() -> None:
    """Every gateway setting: its TOML name, environment variable, default and meaning."""
    from kinhbac.gateway.config import describe_settings

    typer.echo(describe_settings())


def _add_device_app() -> None:
    # The technician's commands live in kinhbac.device; its imports (httpx, esptool) are
    # deferred to the commands, so registering it costs nothing to the other roles.
    from kinhbac.device.cli import device_app

    app.add_typer(device_app, name="device")


_add_device_app()


def _add_release_app() -> None:
    # The admin's commands talk to the fleet over HTTP (httpx, imported by the commands).
    from kinhbac.admin.cli import release_app

    app.add_typer(release_app, name="release")


_add_release_app()


def _add_rollout_app() -> None:
    from kinhbac.admin.rollouts import rollout_app

    app.add_typer(rollout_app, name="rollout")


_add_rollout_app()

fleet_app = typer.Typer(help="The fleet service: registry, provisioning, roles (fleet extra).")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("serve")
def fleet_serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    config: Path = typer.Option(
        None, "--config", "-c",
        help="TOML settings file; KINHBAC_* environment variables win over it.",
    ),
) -> None:
    """Wait for the database, migrate it, then serve the fleet API until Ctrl-C or SIGTERM."""
    from kinhbac.fleet.cli import FleetCliError, serve

    try:
        serve(host=host, port=port, config=config)
    except FleetCliError as exc:
        typer.echo(f"kinhbac fleet: {exc}", err=True)
        raise typer.Exit(2) from exc


@fleet_app.command("create-admin")
def fleet_create_admin(
    email: str = typer.Argument(..., help="The admin's e-mail address (their login)."),
    password: str = typer.Option(
        ..., prompt=True, hide_input=True, confirmation_prompt=True,
        envvar="KINHBAC_ADMIN_PASSWORD", help="Asked for when not given (10+ characters).",
    ),
    config: Path = typer.Option(None, "--config", "-c", help="TOML settings file."),
) -> None:
    """Create an admin user, migrating the database first if needed."""
    from kinhbac.fleet.cli import FleetCliError, create_admin

    try:
        user_id = create_admin(email, password, config=config)
    except FleetCliError as exc:
        typer.echo(f"kinhbac fleet: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"admin {email} created (id {user_id})")


@fleet_app.command("ingest")
def fleet_ingest(
    config: Path = typer.Option(
        None, "--config", "-c",
        help="TOML settings file; KINHBAC_* environment variables win over it.",
    ),
) -> None:
    """Run the MQTT ingest alone (no API) until Ctrl-C or SIGTERM."""
    from kinhbac.fleet.cli import FleetCliError
    from kinhbac.fleet.ingest import run_standalone

    try:
        run_standalone(config)
    except FleetCliError as exc:
        typer.echo(f"kinhbac fleet: {exc}", err=True)
        raise typer.Exit(2) from exc


if __name__ == "__main__":
    app()
