"""What the admin's commands refuse or fail at; every message says what to do next."""


class AdminToolError(Exception):
    """A command could not do its job; the message is meant for the admin."""


class FleetRefused(AdminToolError):
    """The fleet answered with a refusal; `status` is the HTTP status."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class FleetUnreachable(AdminToolError):
    """No answer from the fleet; `maybe_done`: the request may have been carried out, its
    answer lost (a timeout after sending)."""

    def __init__(self, message: str, *, maybe_done: bool) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done
