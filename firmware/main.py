# Runs after boot.py on every start, and is never replaced by an update: it chooses which copy
# of the app runs (docs/ota.md). /app.json names the active app folder ("a" or "b"; "" or no
# file: the base, /lib as flashed) and whether it is on trial. A trial boot is counted before
# the app is imported; after TRIAL_BOOTS that never confirmed, the previous folder runs again
# and the reason is kept for the app to report. json, os, sys and machine only: nothing here
# may depend on the app it chooses.
import json
import os
import sys
import machine

APP_PATH = "/app.json"
TRIAL_BOOTS = 3  # trial boots that never confirmed before the previous app runs again


def _app_read():
    try:
        with open(APP_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # never updated, or unreadable: the base runs


def _app_write(app):
    # A new file renamed over the old one: littlefs renames atomically.
    with open(APP_PATH + ".tmp", "w") as f:
        json.dump(app, f)
    os.rename(APP_PATH + ".tmp", APP_PATH)


def _last_error():
    try:
        with open("/state.json") as f:
            return json.load(f).get("last_error") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def _roll_back(app, reason):
    """The previous app becomes the active one again; the failed release is kept to report."""
    prev = app.get("prev") or {}
    print("kinhbac: release %s rolled back: %s" % (app.get("version"), reason))
    _app_write({
        "slot": prev.get("slot", ""), "version": prev.get("version"), "ref": prev.get("ref"),
        "kind": prev.get("kind"), "prev": {"slot": ""},
        "rolled_back": {"ref": app.get("ref"), "version": app.get("version"),
                        "reason": reason[:200]},
    })


def _choose():
    app = _app_read()
    if app.get("trial") and app.get("kind") != 2:  # an image's trial is the bootloader's
        boots = app.get("boots", 0)
        if boots >= TRIAL_BOOTS:
            _roll_back(app, app.get("error") or _last_error() or
                       "not confirmed in %d trial boots" % boots)
            app = _app_read()
        else:
            app["boots"] = boots + 1  # counted first: a boot that dies anywhere still counts
            _app_write(app)
    slot = app.get("slot") or ""
    if slot:
        sys.path.insert(0, "/%s/lib" % slot)  # before .frozen and /lib
    return app, slot


def _load():
    app, slot = _choose()
    try:
        import node.app

        return node.app
    except Exception as e:
        if not slot:
            raise  # the base: nothing to fall back to
        sys.print_exception(e)
        why = "import failed: %s: %s" % (type(e).__name__, e)
        if app.get("trial"):
            app["error"] = why  # this trial boot is counted; the last one rolls back
            _app_write(app)
        else:
            _roll_back(app, why)
        machine.reset()


_app = _load()
# This file runs in the start-up code's globals, which live as long as the board: its
# functions go, so that their bytecode leaves the app's heap.
del _app_read, _app_write, _last_error, _roll_back, _choose, _load, APP_PATH, TRIAL_BOOTS
_app.main()
