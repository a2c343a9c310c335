# The node's configuration: one JSON file on flash, always replaced atomically (write a
# temporary file, close it, rename it over the old one: littlefs renames atomically), so a
# power cut leaves either the old file or the new one, never half of each.
#
# Every check is made here, the sensor table's included (node/table.py), so that a
# configuration is judged whole before anything is saved or stopped: at boot a bad file means
# safe mode with the reason, and a bad CONFIG frame is refused while the node keeps running.
import json
import os

PATH = "/config.json"

DEFAULTS = {
    "interval_ms": 60000,  # sampling period: a city sensor's minute (24 h fit the flash buffer)
    "batch_max": 20,  # readings per READINGS frame at most (20 fit one small TCP segment)
    "send_after_ms": 2000,  # send a partial batch once its oldest reading is this old
    "ram_readings": 64,  # RAM ring capacity
    "flash_every": 32,  # unacknowledged readings in RAM that trigger a flash write
    "flash_after_ms": 60000,  # ... or the age of the oldest reading not yet on flash
    "flash_readings": 16384,  # flash buffer capacity; beyond it the oldest are dropped
    "ack_timeout_ms": 5000,  # a batch not acknowledged by then: reconnect and resend
    "backoff_min_ms": 500,  # reconnect delays grow from here ...
    "backoff_max_ms": 60000,  # ... to here, with jitter
    "no_network_reboot_s": 900,  # reboot after this long without a gateway ACK (as ESPHome)
    "safe_mode_after": 10,  # boots in a row that never became good
    "safe_mode_retry_s": 3600,  # safe mode tries a normal boot again after this; 0 = never
    "good_after_ms": 60000,  # a boot that lives this long is good
    "watchdog_ms": 10000,  # machine.WDT timeout once armed (ESP32 minimum 1000)
    "console_window_ms": 3000,  # after boot, Ctrl-C within this window keeps the WDT off
    "deep_sleep_ms": 0,  # > 0: battery mode, read-send-sleep cycles of this length
    "log_level": 2,
    "claim_retry_ms": 30000,  # a claiming board asks its gateway again this often
    "pulse_flash_s": 600,  # pulse totals go to flash this often (RTC memory keeps them 4/s)
    "ota_trial_s": 600,  # an update not confirmed by then resets the board (a trial boot)
    "i2c": {"id": 0, "scl": 22, "sda": 21},  # the ESP32 DevKit's usual I2C pins
    "sensors": [],
}

# Settings the gateway may change with a CONFIG frame.
REMOTE = (
    "interval_ms",
    "batch_max",
    "send_after_ms",
    "flash_every",
    "flash_after_ms",
    "no_network_reboot_s",
    "deep_sleep_ms",
    "log_level",
    "sensors",
)

_POSITIVE = (
    ("interval_ms", 1, 86400000),
    ("batch_max", 1, 192),
    ("send_after_ms", 0, 86400000),
    ("ram_readings", 4, 4096),
    ("flash_every", 1, 4096),
    ("flash_after_ms", 0, 86400000),
    ("flash_readings", 0, 1000000),
    ("ack_timeout_ms", 100, 600000),
    ("backoff_min_ms", 10, 600000),
    ("backoff_max_ms", 10, 3600000),
    ("no_network_reboot_s", 0, 604800),
    ("safe_mode_after", 1, 1000),
    ("safe_mode_retry_s", 0, 604800),
    ("good_after_ms", 0, 86400000),
    ("watchdog_ms", 1000, 3600000),
    ("console_window_ms", 0, 60000),
    ("deep_sleep_ms", 0, 86400000),
    ("log_level", 0, 3),
    ("claim_retry_ms", 100, 3600000),
    ("pulse_flash_s", 0, 86400),
    ("ota_trial_s", 10, 86400),
)


class ConfigError(ValueError):
    """A configuration refused; its text starts with the field, e.g. "sensors[2].pin: ...".

    `unsupported`: a setting the gateway may not change at all (wire UNSUPPORTED), as opposed
    to a value that is wrong (BAD_PAYLOAD).
    """

    def __init__(self, text, unsupported=False):
        super().__init__(text)
        self.unsupported = unsupported


def _fail(msg):
    raise ConfigError(msg)


def claiming(cfg):
    """True for a board set up offline: it has its site's claim key, not yet an identity."""
    return "secret" not in cfg and "claim_key" in cfg


def _validate_identity(cfg):
    for name in ("device_id", "key_id", "secret"):
        if name not in cfg:
            _fail("missing " + name + " (or a claim_key, to claim an identity)")
    if not isinstance(cfg["device_id"], str) or len(cfg["device_id"]) != 16:
        _fail("device_id must be 16 hex digits")
    if not isinstance(cfg["secret"], str) or len(cfg["secret"]) < 32:
        _fail("secret must be at least 16 bytes in hex")
    try:
        bytes.fromhex(cfg["device_id"] + cfg["secret"])
    except ValueError:
        _fail("device_id and secret must be hex")
    if not isinstance(cfg["key_id"], int) or not 0 <= cfg["key_id"] < 0xFFFF:
        _fail("key_id must be 0..65534 (65535 is the claim key's)")


def _validate_claim(cfg):
    if not isinstance(cfg["claim_key"], str) or len(cfg["claim_key"]) < 16:
        _fail("claim_key must be the site profile's claim key")
    nonce = cfg.get("claim_nonce")
    if nonce is not None:
        try:
            ok = isinstance(nonce, str) and len(bytes.fromhex(nonce)) == 16
        except ValueError:
            ok = False
        if not ok:
            _fail("claim_nonce must be 32 hex digits")


def validate(cfg, table=True):
    """Raise ConfigError naming the first bad field; table=False leaves the sensor table out."""
    for name in ("wifi", "gateway"):
        if name not in cfg:
            _fail("missing " + name)
    if claiming(cfg):
        _validate_claim(cfg)
    else:
        _validate_identity(cfg)
    wifi = cfg["wifi"]
    if not isinstance(wifi, dict) or not isinstance(wifi.get("ssid"), str):
        _fail("wifi needs an ssid")
    gw = cfg["gateway"]
    if not isinstance(gw, dict) or not isinstance(gw.get("host"), str) or not isinstance(
            gw.get("port"), int):
        _fail("gateway needs a host and a port")
    for name, low, high in _POSITIVE:
        value = cfg[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            _fail("%s must be a whole number from %d to %d" % (name, low, high))
    if cfg["flash_every"] > cfg["ram_readings"]:
        _fail("flash_every cannot exceed ram_readings")
    if not table:
        return
    from node.sensors import check_table

    try:
        check_table(cfg["sensors"], cfg["i2c"])
    except ValueError as e:  # the table's rules name the field too ("sensors[2].pin: ...")
        raise ConfigError(str(e))


def load(path=PATH):
    """The saved configuration over the defaults; ValueError ("config: ...") names what is wrong."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except OSError:
        _fail_load("no " + path + " on flash: provision the node first")
    except ValueError:
        _fail_load(path + " is not valid JSON")
    if not isinstance(saved, dict):
        _fail_load(path + " must hold a JSON object")
    cfg = dict(DEFAULTS)
    cfg.update(saved)
    try:
        validate(cfg)
    except ConfigError as e:
        _fail_load(str(e))
    return cfg


def _fail_load(msg):
    raise ValueError("config: " + msg)


def save(cfg, path=PATH):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f)
    os.rename(tmp, path)


def apply_remote(cfg, settings):
    """A copy of cfg with a CONFIG frame's settings applied; ConfigError if any is refused.

    The whole result is checked, the sensor table to the last pin: nothing is saved or
    stopped for a CONFIG that would not run.
    """
    for name in settings:
        if name not in REMOTE:
            raise ConfigError(name + ": not changeable remotely", unsupported=True)
    new = dict(cfg)
    new.update(settings)
    # The running table passed its check at boot. A CONFIG that leaves it alone does not load
    # the table's rules again: they cost about 4.6 KB of heap on an ESP32 as .mpy, at the
    # moment the node has least to spare (node/config.py is loaded too).
    validate(new, "sensors" in settings)
    return new
