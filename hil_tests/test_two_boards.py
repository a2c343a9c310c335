"""Two boards at one gateway (MicroPython's multitests pattern: two boards, one test): when one
goes dark the other delivers every reading as before, and the dark one catches up when it is
back."""

import time

from .boards import SENSOR_KIT
from .conftest import install_node

ROUND = len(SENSOR_KIT)  # readings per sampling round: one per sensor
INTERVAL_S = 0.5  # NODE_SETTINGS' interval_ms
DARK_S = 6.0  # a dozen sampling rounds


def _boot(node) -> int:
    return max(b for b, _ in node.readings())


def _missing(node, boot: int) -> list[int]:
    """The seqs of a boot that never arrived: its readings are numbered from 1."""
    seqs = {s for b, s in node.readings() if b == boot}
    return sorted(set(range(1, max(seqs, default=0) + 1)) - seqs)


def _newest_ts(node, boot: int) -> int:
    readings = node.readings()
    newest = max((s for b, s in readings if b == boot), default=None)
    return (readings[(boot, newest)]["ts"] or 0) if newest is not None else 0


def _record(request, board, name: str, value, unit: str, note: str) -> None:
    request.config.pluginmanager.get_plugin("hil-report").record(board.name, name, value, unit,
                                                                   note)


def _running_pair(lab, two_boards):
    nodes = [install_node(lab, board, {}) for board in two_boards]
    for node in nodes:
        node.wait_readings(2 * ROUND, timeout=90, what=f"{node.board.name}'s first readings")
    return nodes


def _dark_for(dark_count, seconds: float) -> tuple[float, float]:
    """Wait `seconds` with a board dark, checking that it is: its count of readings in must
    not move. Returns the window in Unix ms."""
    start_ms = time.time() * 1000
    time.sleep(1.0)  # what the dark board had sent before it went dark is in by now
    stalled = dark_count()
    time.sleep(seconds - 1.0)
    assert dark_count() == stalled, "the dark board's readings still arrive: it is not dark"
    return start_ms, time.time() * 1000


def _assert_unaffected(steady, boot: int, start_ms: float, end_ms: float) -> None:
    """Every reading of the steady board's boot is in, it sampled through the window, and its
    newest reading is seconds old, not a backlog: it went on delivering as it takes them."""
    assert not _missing(steady, boot), _missing(steady, boot)
    during = [r for (b, _), r in steady.readings().items()
              if b == boot and r["ts"] is not None and start_ms <= r["ts"] <= end_ms]
    rounds = (end_ms - start_ms) / 1000 / INTERVAL_S
    assert len(during) >= 0.8 * rounds * ROUND, (len(during), rounds)
    # Sent within send_after_ms of being taken: live, not held back by the other board.
    assert end_ms - _newest_ts(steady, boot) < 3000, (end_ms, _newest_ts(steady, boot))


def test_a_board_out_of_range_leaves_the_other_unaffected_and_catches_up(
        request, lab, two_boards):
    """One board loses its WiFi alone (the access point stays up for the other): the other
    delivers every reading, live; back in range, the first delivers all it took meanwhile,
    in the same boot, nothing missing by (device, boot, seq)."""
    dark, steady = _running_pair(lab, two_boards)
    dark_boot, steady_boot = _boot(dark), _boot(steady)
    dark.board.rig.wifi_range(False)
    try:
        start_ms, end_ms = _dark_for(lambda: dark.site.collector.count(dark.device), DARK_S)
    finally:
        dark.board.rig.wifi_range(True)
    back = time.monotonic()
    _assert_unaffected(steady, steady_boot, start_ms, end_ms)
    try:
        dark.site.collector.wait_for(
            lambda: not _missing(dark, dark_boot) and _newest_ts(dark, dark_boot) >= end_ms,
            90, f"{dark.board.name}'s backlog")
    except TimeoutError:
        pass  # the asserts below say what never came
    missing = _missing(dark, dark_boot)
    assert not missing, (f"{len(missing)} readings of {dark.board.name}'s boot {dark_boot} "
                         f"never reached the broker, seqs {missing[:10]} ... {missing[-10:]}")
    assert _newest_ts(dark, dark_boot) >= end_ms, "what it took out of range never came in"
    _record(request, dark.board, "catch_up", round(time.monotonic() - back, 2), "s",
            f"back in range until all of {DARK_S:.0f} s out of range was in")
    assert _boot(dark) == dark_boot  # out of range is no reason to reboot
    taken = [r for (b, _), r in dark.readings().items()
             if b == dark_boot and r["ts"] is not None and start_ms + 1000 <= r["ts"] <= end_ms]
    assert len(taken) >= 0.8 * (DARK_S - 1) / INTERVAL_S * ROUND, len(taken)
    assert not _missing(steady, steady_boot)


def test_a_board_whose_power_is_cut_leaves_the_other_unaffected_and_reports_again(
        request, lab, two_boards):
    """One board loses its power and stays off: the other delivers every reading, live.
    Powered again, the first starts its next boot and reports it from its first reading."""
    dark, steady = _running_pair(lab, two_boards)
    dark_boot, steady_boot = _boot(dark), _boot(steady)
    dark.board.rig.power_cut(restore=False)
    try:
        start_ms, end_ms = _dark_for(lambda: dark.site.collector.count(dark.device), DARK_S)
    finally:
        dark.board.rig.power_on()
    on = time.monotonic()
    _assert_unaffected(steady, steady_boot, start_ms, end_ms)
    dark.site.collector.wait_for(lambda: _boot(dark) > dark_boot, 90,
                                 f"{dark.board.name}'s readings after its power came back")
    _record(request, dark.board, "back_after_power_cut", round(time.monotonic() - on, 2), "s",
            "power on until the first reading of the next boot was in")
    dark.wait_readings(2 * ROUND, timeout=30)
    assert _boot(dark) == dark_boot + 1
    # What RAM held at the cut is gone (the last unsent round at most, which no gap shows);
    # everything before it came in, and the new boot is whole.
    assert not _missing(dark, dark_boot) and not _missing(dark, dark_boot + 1)
    assert not _missing(steady, steady_boot)

