"""What the technician's tools refuse or fail at; every message says what to do next."""


class DeviceToolError(Exception):
    """A step of the technician's tools failed; the message is meant for the technician."""


class FleetError(DeviceToolError):
    """The fleet refused a request, or could not be asked; `status` is the HTTP status or None."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class FleetUnreachable(FleetError):
    """No answer from the fleet (wrong address, network down, the service not running).

    `maybe_done`: the request may have reached the fleet and been carried out, its answer
    lost (a timeout after sending); False when no connection was ever made.
    """

    def __init__(self, message: str, *, maybe_done: bool) -> None:
        super().__init__(message)
        self.maybe_done = maybe_done


class FleetAuthError(FleetError):
    """The fleet refused the token (401) or its role (403)."""


class FleetNotFound(FleetError):
    pass


class FleetConflict(FleetError):
    pass


class BoardError(DeviceToolError):
    """The board did not answer on its serial port, or refused what was sent."""


class FlashError(DeviceToolError):
    """esptool could not write the image (no download mode, a failed write, wrong port)."""
