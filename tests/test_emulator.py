"""Emulated ESP32 boards: boot, serial/raw REPL, flash, resets, WiFi, watchdog, devices."""

import os
import socket
import subprocess
import threading
import time

import pytest

from kinhbac.emulator.board import DEEPSLEEP_RESET, HARD_RESET, PWRON_RESET, SOFT_RESET, WDT_RESET
from kinhbac.emulator.devices import BME280, AnalogSource, PulseSource
from kinhbac.emulator.interpreter import STANDIN_ALLOWANCE_BYTES
from kinhbac.transport.raw_repl import RemoteError
from kinhbac.transport.serial_link import connect

WIFI = "import network\nw = network.WLAN(network.STA_IF)\nw.active(True)\n" \
       "w.connect('kinhbac-site', 'kinhbac-pass')\n"


def boot_with(board, main_py: str, wait_for: str = ">>> ") -> int:
    board.write_files({"main.py": main_py.encode()})
    board.power_on()
    return board.console.wait_for(wait_for, timeout=15)


def test_board_boots_main_py_from_its_flash(board):
    boot_with(board, "import machine\nprint('cause', machine.reset_cause())\n", "cause 1")
    assert board.boots == [PWRON_RESET]


def test_raw_repl_over_the_pty_runs_code_and_returns_output(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    assert repl.exec("print(6 * 7)") == b"42\r\n"
    assert repl.eval("{'a': [1, 2]}") == {"a": [1, 2]}
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        repl.exec("1/0")
    repl.use_raw_paste = False  # the plain raw mode, as an older board firmware offers
    assert repl.exec("print('plain')") == b"plain\r\n"


def test_large_code_goes_through_raw_paste_flow_control(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    code = "x = 0\n" + "x += 1\n" * 1000 + "print(x)"  # 7 KB: dozens of raw-paste windows
    assert repl.exec(code) == b"1000\r\n"
    assert repl.use_raw_paste


def test_file_written_over_raw_repl_survives_a_reset(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    payload = bytes(range(256)) * 8
    repl.fs_put(payload, "/data.bin")
    mark = board.console.mark()
    board.press_reset()
    board.console.wait_for(">>> ", since=mark)
    assert board.boots == [PWRON_RESET, PWRON_RESET]
    repl = connect(board.tty_path)  # the same path after the reset
    assert repl.fs_get("/data.bin") == payload


def test_machine_reset_reboots_the_board_with_hard_reset_cause(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    mark = board.console.mark()
    repl.enter_raw_repl()
    repl.link.write(b"import machine\nmachine.reset()\x04")
    board.console.wait_for("rst:0xc (SW_CPU_RESET)", since=mark)
    board.console.wait_for(">>> ", since=mark)
    assert board.boots[-1] == HARD_RESET


def test_power_cut_keeps_flash_and_loses_ram_and_rtc_memory(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine\nmachine.RTC().memory(b'kept-in-rtc')\nkept_in_ram = 1")
    repl.exec("f = open('/note.txt', 'w')\nf.write('on flash')\nf.close()")
    assert repl.eval("machine.RTC().memory()") == b"kept-in-rtc"
    mark = board.console.mark()
    board.power_cut()
    board.console.wait_for(">>> ", since=mark)
    repl = connect(board.tty_path)
    assert repl.eval("open('/note.txt').read()") == "on flash"
    assert repl.eval("__import__('machine').RTC().memory()") == b""
    with pytest.raises(RemoteError, match="NameError"):
        repl.exec("print(kept_in_ram)")
    assert board.boots == [PWRON_RESET, PWRON_RESET]


def test_deep_sleep_keeps_rtc_memory_and_wakes_with_deepsleep_reset(board):
    main = (
        "import machine\n"
        "rtc = machine.RTC()\n"
        "if machine.reset_cause() == machine.DEEPSLEEP_RESET:\n"
        "    print('woke with', rtc.memory())\n"
        "else:\n"
        "    rtc.memory(b'count=1')\n"
        "    machine.deepsleep(200)\n"
    )
    boot_with(board, main, "woke with b'count=1'")
    assert board.boots == [PWRON_RESET, DEEPSLEEP_RESET]


def test_ctrl_d_at_the_repl_soft_reboots(board):
    boot_with(board, "print('main ran')\n")
    mark = board.console.mark()
    repl = connect(board.tty_path)
    repl.link.write(b"\x04")
    board.console.wait_for("soft reboot", since=mark)
    board.console.wait_for("main ran", since=mark)
    assert board.boots == [PWRON_RESET, SOFT_RESET]
    assert "rst:" not in board.console.text(mark)  # a soft reset never reaches the ROM


def test_ctrl_c_interrupts_a_running_main_py(board):
    boot_with(board, "import time\nprint('looping')\nwhile True:\n    time.sleep_ms(10)\n",
              "looping")
    repl = connect(board.tty_path)
    mark = board.console.mark()
    repl.enter_raw_repl()
    board.console.wait_for("KeyboardInterrupt", since=mark)
    assert repl.exec("print('reachable')") == b"reachable\r\n"
    assert board.boots == [PWRON_RESET]  # interrupted, not reset


def test_ctrl_c_while_the_board_starts_does_not_reset_it(board):
    # Tools send Ctrl-C to stop a board's app, and may do so while it is still starting.
    board.write_files({"main.py": b"import time\nprint('looping')\nwhile True:\n"
                                  b"    time.sleep_ms(10)\n"})
    port = os.open(board.tty_path, os.O_RDWR | os.O_NOCTTY)
    try:
        board.power_on()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            os.write(port, b"\x03")
            time.sleep(0.01)
    finally:
        os.close(port)
    board.console.wait_for(">>> ", timeout=15)
    assert board.boots == [PWRON_RESET]  # interrupted maybe, never reset


def test_watchdog_resets_a_hung_main_loop(board):
    main = (
        "import machine\n"
        "if machine.reset_cause() != machine.WDT_RESET:\n"
        "    wdt = machine.WDT(timeout=1000)\n"
        "    for _ in range(5):\n"
        "        wdt.feed()\n"
        "        __import__('time').sleep_ms(300)\n"
        "    print('hanging')\n"
        "    while True:\n"
        "        pass\n"
        "print('recovered by the watchdog')\n"
    )
    boot_with(board, main, "recovered by the watchdog")
    assert board.boots == [PWRON_RESET, WDT_RESET]
    assert "hanging" in board.console.text()


def test_watchdog_refuses_a_timeout_the_esp32_port_refuses(board):
    # The port takes any timeout above 0 ms (ports/esp32/machine_wdt.c), and so does the board.
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    with pytest.raises(RemoteError, match="ValueError: WDT timeout too short"):
        repl.exec("import machine\nmachine.WDT(timeout=0)")


def test_serial_port_path_is_stable_across_resets(board):
    path = board.tty_path
    boot_with(board, "pass\n")
    for _ in range(2):
        mark = board.console.mark()
        board.power_cut()
        board.console.wait_for(">>> ", since=mark)
    assert board.tty_path == path
    assert connect(path).exec("print('same port')") == b"same port\r\n"


def test_bme280_model_answers_a_plain_register_read_with_its_chip_id(board):
    board.attach_i2c(BME280(0x76))
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine\ni2c = machine.I2C(0, scl=machine.Pin(22), sda=machine.Pin(21))")
    assert repl.eval("i2c.scan()") == [0x76]
    assert repl.eval("i2c.readfrom_mem(0x76, 0xD0, 1)") == b"\x60"


def test_i2c_read_from_an_absent_device_fails_as_a_nack(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    with pytest.raises(RemoteError, match="ENODEV"):
        repl.exec("import machine\nmachine.I2C(0).readfrom_mem(0x40, 0x00, 1)")


def test_adc_reads_the_voltage_set_on_the_analog_source(board):
    source = AnalogSource(volts=1.65)
    board.attach_analog(34, source)
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import machine\nadc = machine.ADC(machine.Pin(34), atten=machine.ADC.ATTN_11DB)")
    assert repl.eval("adc.read_uv()") == pytest.approx(1_650_000, abs=1000)
    source.volts = 0.5
    assert repl.eval("adc.read_uv()") == pytest.approx(500_000, abs=1000)


def test_meter_pulses_reach_the_pin_irq_handler(board):
    # As on the ESP32 port, the handler is scheduled (micropython.schedule) and runs while the
    # main program runs; 200 pulses a second is well within what the schedule queue keeps up.
    pulses = PulseSource(27)
    board.attach_pulses(27, pulses)
    main = (
        "import machine, time\n"
        "count = 0\n"
        "def on_pulse(pin):\n"
        "    global count\n"
        "    count += 1\n"
        "pin = machine.Pin(27, machine.Pin.IN, machine.Pin.PULL_UP)\n"
        "pin.irq(on_pulse, trigger=machine.Pin.IRQ_FALLING)\n"
        "print('armed')\n"
        "start = time.ticks_ms()\n"
        "while count < 250 and time.ticks_diff(time.ticks_ms(), start) < 10000:\n"
        "    time.sleep_ms(1)\n"
        "print('counted', count)\n"
    )
    boot_with(board, main, "armed")
    pulses.start(200, count=250)
    board.console.wait_for("counted", timeout=15)
    board.console.wait_for(">>> ")
    assert connect(board.tty_path).eval("count") == pulses.emitted == 250


def test_heap_cap_makes_large_allocations_fail_with_memory_error(emulator):
    small = emulator.add_board(heap_bytes=128 * 1024)
    boot_with(small, "pass\n")
    repl = connect(small.tty_path)
    with pytest.raises(RemoteError, match="MemoryError"):
        repl.exec("x = bytearray(160 * 1024)")
    assert repl.exec("print(len(bytearray(8 * 1024)))") == b"8192\r\n"


def test_stand_ins_fit_their_heap_allowance(emulator, board):
    bare = subprocess.run(
        [emulator.micropython, "-c", "import gc; gc.collect(); print(gc.mem_alloc())"],
        capture_output=True, text=True, check=True,
    )
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    in_use = repl.eval("(__import__('gc').collect(), __import__('gc').mem_alloc())[1]")
    overhead = in_use - int(bare.stdout)
    # The allowance must cover the stand-ins, and not hand the firmware much more than an ESP32.
    assert STANDIN_ALLOWANCE_BYTES - 8 * 1024 <= overhead <= STANDIN_ALLOWANCE_BYTES


class EchoServer:
    """A TCP peer on the host that a board reaches through the access point."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)


def test_access_point_going_down_breaks_an_open_socket(emulator, board):
    server = EchoServer()
    main = WIFI + (
        "import socket, time\n"
        "while True:\n"
        "    while not w.isconnected():\n"
        "        time.sleep_ms(10)\n"
        f"    addr = socket.getaddrinfo('127.0.0.1', {server.port})[0][-1]\n"
        "    s = socket.socket()\n"
        "    s.connect(addr)\n"
        "    s.send(b'ping')\n"
        "    print('echo', s.recv(4))\n"
        "    try:\n"
        "        data = s.recv(4)\n"
        "        print('closed' if not data else data)\n"
        "    except OSError as e:\n"
        "        print('socket error', e.errno)\n"
        "    s.close()\n"
        "    for _ in range(100):  # a station notices the lost AP a moment after its sockets\n"
        "        if not w.isconnected():\n"
        "            break\n"
        "        time.sleep_ms(10)\n"
        "    print('wifi', w.isconnected())\n"
    )
    mark = boot_with(board, main, "echo b'ping'")
    emulator.access_point_up(False)
    end = board.console.wait_for("wifi False", since=mark)
    assert ("socket error" in board.console.text(mark)) or ("closed" in board.console.text(mark))
    emulator.access_point_up(True)
    board.console.wait_for("echo b'ping'", since=end)
    assert server.accepted == 2


def test_board_without_wifi_cannot_resolve_names(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    # A name: a dotted address resolves without any network on an ESP32 (lwIP's ipaddr_aton).
    with pytest.raises(RemoteError, match="-202"):
        repl.exec("import socket\nsocket.getaddrinfo('gateway.lan', 80)")


def test_wrong_wifi_password_never_connects(board):
    boot_with(board, "pass\n")
    repl = connect(board.tty_path)
    repl.exec("import network, time\nw = network.WLAN(0)\nw.active(True)\n"
              "w.connect('kinhbac-site', 'wrong')\ntime.sleep_ms(300)")
    assert repl.eval("w.isconnected()") is False


def test_powering_on_a_board_that_is_on_is_refused(board):
    boot_with(board, "pass\n")
    with pytest.raises(RuntimeError, match="already on"):
        board.power_on()
    board.power_cut(restore=False)
    board.power_on()  # after a power cut it boots again, once
    board.console.wait_for(">>> ", timeout=15)
    assert board.boots == [PWRON_RESET, PWRON_RESET]


def test_a_reset_request_read_after_a_power_cut_does_not_power_the_board_on(emulator, board):
    # machine.reset() sends its request and halts; when the power is cut in that instant, the
    # emulator may read the request after the cut. It must not bring the board back: that
    # read is played here, deterministically, through the handler the request reaches.
    boot_with(board, "pass\n")
    board.power_cut(restore=False)

    emulator.call(board._restart(HARD_RESET))

    assert not board.running
    assert board.boots == [PWRON_RESET]
