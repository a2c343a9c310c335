# The moments of an update outside its download (docs/ota.md): the result frames, the trial
# boot's confirmation or its expiry, the report of its outcome. A module of its own, loaded for
# the moment and dropped after, so that a trial boot does not hold the download's code.
import machine
from micropython import const

import wire
from node import log
from node.app import APP_PATH, mark_app_valid, read_json, write_json
from node.link import cut

_REASON_MAX = const(200)  # bytes of an OTA_RESULT's reason (str8: at most 255)


def _counter(link):
    counter = link.guard.next_counter()
    link._ota_sent[counter & 1] = counter  # an ERROR that answers it names it
    return counter


async def send_result(link, writer, ref, state, done, reason=""):
    """OTA_RESULT: where the update of release `ref` stands."""
    await link._send(writer, wire.encode_ota_result(
        link.key, link.node.boot, _counter(link), ref, state, done, cut(reason, _REASON_MAX)))


async def send_request(link, writer, ref, index, offset, length):
    await link._send(writer, wire.encode_ota_chunk_request(
        link.key, link.node.boot, _counter(link), ref, index, offset, length))


async def send_report(link, writer):
    """The outcome of an update (confirmed, rolled back), once; later offers get it again."""
    report = link.ota_report
    await send_result(link, writer, *report)
    link.ota_report = None
    if report[1] == wire.OTA_ROLLED_BACK:
        app = read_json(APP_PATH)
        if app.get("rolled_back"):
            app["rolled_back"]["told"] = True
            write_json(APP_PATH, app)


def confirm(node):
    """The trial boot reached its gateway and read every sensor: keep the release."""
    app = node.app
    node.app = None
    app["trial"] = False
    app["boots"] = 0
    app.pop("error", None)
    write_json(APP_PATH, app)
    if app.get("kind") == wire.OTA_IMAGE:
        mark_app_valid()  # only now: the bootloader rolls back an image that never says so
    log.info("release %s confirmed", app["version"])
    node.link.ota_report = (app["ref"], wire.OTA_CONFIRMED, app.get("size", 0), "")
    node.link.wake()


def expire(node):
    """The trial did not confirm in time: a reset, which main.py counts as a trial boot."""
    why = "no ACK from the gateway" if not node.link.acked else "sensor errors"
    limit = node.cfg["ota_trial_s"]
    log.error("release %s not confirmed within %d s (%s): resetting",
              node.app["version"], limit, why)
    node.state.last_error = "trial not confirmed within %d s: %s" % (limit, why)
    node.shutdown()
    machine.reset()


def image_rolled_back(app):
    """At the boot after an image update: True when the bootloader runs another partition
    than the one the update set (it was reset before it confirmed, and ESP-IDF rolled it
    back); /app.json then says so, for the node to report."""
    import esp32

    if esp32.Partition(esp32.Partition.RUNNING).info()[4] == app.get("part"):
        return False
    prev = app.get("prev") or {}
    reason = "the bootloader rolled the image back: reset before it confirmed"
    log.error("release %s: %s", app.get("version"), reason)
    write_json(APP_PATH, {
        "slot": prev.get("slot", ""), "version": prev.get("version"), "ref": prev.get("ref"),
        "kind": prev.get("kind"), "prev": {"slot": ""},
        "rolled_back": {"ref": app.get("ref"), "version": app.get("version"), "reason": reason},
    })
    return True
