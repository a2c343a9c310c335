"""What every command that talks to the fleet's API sets up the same way, whoever runs it
(a technician's `kinhbac device`, an admin's `kinhbac release` and `kinhbac rollout`):

- the `--fleet-url` and `--token` options, or the environment;
- the address and the token checked before anything is sent (plain http only to this
  machine, unless KINHBAC_ALLOW_PLAINTEXT=1), and an HTTP session that never follows a
  redirect;
- a failure as one line on stderr, `kinhbac <command>: <what to do next>`, and an exit code.

Each role's client keeps its own words (what its token is for, what to do without the fleet);
only the shape is shared. httpx is imported only when a session is opened, so that `kinhbac`
starts without it.
"""

import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar
from urllib.parse import urlsplit

import typer

from kinhbac.device import FLEET_TOKEN_ENV, FLEET_URL_ENV
from kinhbac.loopback import is_loopback_host

if TYPE_CHECKING:
    import httpx

PLAINTEXT_ENV = "KINHBAC_ALLOW_PLAINTEXT"  # accept http:// to another machine, by name
EXIT_FAILED = 1
EXIT_USAGE = 2

FleetUrl = Annotated[str | None, typer.Option(
    "--fleet-url", envvar=FLEET_URL_ENV, show_default=False,
    help="The fleet's address, e.g. https://fleet.example.org.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


# The --token option (or KINHBAC_FLEET_TOKEN), by the role whose token a command needs.
TechnicianToken = Annotated[str | None, typer.Option(
    "--token", envvar=FLEET_TOKEN_ENV, show_default=False,
    help="A technician's API token (kbt_...).")]
AdminToken = Annotated[str | None, typer.Option(
    "--token", envvar=FLEET_TOKEN_ENV, show_default=False, help="An admin's API token (kbt_...).")]


# ----- the address and the token


def is_local(url: str) -> bool:
    """Whether `url` points at this machine (plain http is acceptable only there)."""
    return is_loopback_host(urlsplit(url).hostname or "")


def checked_fleet_address(url: str | None, token: str | None, *,
                          error: Callable[[str], Exception], token_hint: str,
                          in_clear: str, without_fleet: str = "") -> str:
    """`url` without its trailing slash, once it and `token` can be used; else raises
    `error(message)`. `token_hint`: where such a token comes from; `in_clear`: what plain http
    would expose; `without_fleet`: what the user can do without the fleet, if anything."""
    if not url:
        raise error(f"no fleet address: give --fleet-url or set {FLEET_URL_ENV} "
                    f"(e.g. https://fleet.example.org){without_fleet}")
    if not url.startswith(("http://", "https://")):
        raise error(f"fleet address {url!r}: give an http:// or https:// URL")
    if not token:
        raise error(f"no fleet token: give --token or set {FLEET_TOKEN_ENV} ({token_hint})")
    if url.startswith("http://") and not is_local(url) and os.environ.get(PLAINTEXT_ENV) != "1":
        raise error(f"fleet address {url} is plain http to another machine: {in_clear} would "
                    f"cross the network in clear; use https://, or set {PLAINTEXT_ENV}=1 to "
                    "accept that")
    return url.rstrip("/")


def fleet_http(url: str, token: str, *, timeout: float,
               transport: "httpx.BaseTransport | None" = None) -> "httpx.Client":
    """An HTTP session with the fleet that sends `token` with every request."""
    import httpx

    # Redirects are not followed: they would carry the token to another address.
    return httpx.Client(
        base_url=url, timeout=timeout, follow_redirects=False, transport=transport,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})


def read_pages(request: Callable[..., Any], path: str, params: dict[str, Any],
               limit: int | None, page_size: int) -> Iterator[dict]:
    """Every item of a paged listing (`items`, `total`), up to `limit` (None: all);
    `request(method, path, params=...)` asks for one page."""
    offset = 0
    while True:
        size = page_size if limit is None else min(page_size, limit - offset)
        if size <= 0:
            return
        page = request("GET", path, params={**params, "limit": size, "offset": offset})
        yield from page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return


# ----- the commands' side


def command_failure(command: str, message: str, code: int = EXIT_FAILED) -> typer.Exit:
    """Say on stderr why `kinhbac <command>` stops; raise what this returns."""
    typer.echo(f"kinhbac {command}: {message}", err=True)
    return typer.Exit(code)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=1, sort_keys=True))


class _HasUrl(Protocol):
    url: str


Client = TypeVar("Client", bound=_HasUrl)


@contextmanager
def fleet_session(command: str, connect: Callable[[], AbstractContextManager[Client]],
                  errors: type[Exception], *, extra: str | None = None,
                  warn_in_clear: str | None = None) -> Iterator[Client]:
    """The client `connect()` opens, closed afterwards; an `errors` raised while opening it or
    inside becomes one line on stderr and exit 1. `extra`: the package extra that brings httpx,
    named when it is missing. `warn_in_clear`: what crosses the network in clear over plain
    http (allowed by KINHBAC_ALLOW_PLAINTEXT), said as a warning; None: nothing said."""
    try:
        opened = connect()
    except ImportError as exc:
        if extra is None:
            raise
        raise command_failure(command, f"needs httpx ({exc}): pip install 'kinhbac[{extra}]'"
                              ) from exc
    except errors as exc:
        raise command_failure(command, str(exc)) from exc
    try:
        with opened as client:
            if warn_in_clear and client.url.startswith("http://") and not is_local(client.url):
                typer.echo(f"kinhbac {command}: warning: {client.url} is plain http: "
                           f"{warn_in_clear} cross the network in clear", err=True)
            yield client
    except errors as exc:
        raise command_failure(command, str(exc)) from exc
