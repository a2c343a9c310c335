"""Opening a board's serial port: the only place that knows about DTR/RTS and baud rates."""

import serial

from kinhbac.transport.raw_repl import RawRepl, TransportError

DEFAULT_BAUD = 115200
READ_TIMEOUT_S = 0.05  # short reads, so that RawRepl's own deadlines decide when to give up


def open_serial(port: str, baudrate: int = DEFAULT_BAUD) -> serial.Serial:
    """Open a port without resetting the board.

    On ESP32 development boards DTR and RTS drive EN and IO0 through the auto-reset circuit:
    both released keeps the board running its firmware. A pty has neither line; pyserial
    ignores them there.
    """
    link = serial.Serial()
    link.port = port
    link.baudrate = baudrate
    link.timeout = READ_TIMEOUT_S
    link.dtr = False
    link.rts = False
    try:
        link.open()
    except serial.SerialException as exc:
        raise TransportError(
            f"cannot open serial port {port}: {exc}. Check the cable and the port name "
            "(ls /dev/ttyUSB* /dev/ttyACM*), and that no other program holds it."
        ) from exc
    return link


def connect(port: str, baudrate: int = DEFAULT_BAUD) -> RawRepl:
    """A raw-REPL session on the board at `port`."""
    return RawRepl(open_serial(port, baudrate))
