"""Host-to-board links: the raw REPL over a serial port or an emulated board's pty.

Used by the technician's tools and hil_tests; it must never import the fleet service.
"""
