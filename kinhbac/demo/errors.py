"""The demo's one error: something it needs could not start; the message says what to do."""


class DemoError(Exception):
    """The demo cannot run; the message is one line for the terminal."""
