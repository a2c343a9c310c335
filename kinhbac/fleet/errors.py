"""What the service's operations refuse, each with the HTTP status the API answers with."""


class FleetError(Exception):
    """A refused request; the message is safe to show the caller."""

    status = 400


class NotFound(FleetError):
    status = 404


class Conflict(FleetError):
    """The request contradicts what is stored (a duplicate, a state that does not allow it)."""

    status = 409


class Invalid(FleetError):
    """A value that passed the schema but cannot be used; `field` names it, as a 422 does."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Unavailable(FleetError):
    """The service cannot do this until its operator fixes something on its side (the message
    says what); the request itself was fine."""

    status = 503
