# Stand-in for the ESP32 port's `network` module: a WLAN station that is connected only while
# the emulator's access point is up and the board is in its range.
import _hw

STA_IF = 0
AP_IF = 1

STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202

_hostname = "esp32"


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name


class WLAN:
    def __init__(self, interface_id=STA_IF):
        self._if = interface_id
        self._active = False
        self._wanted = False

    def active(self, is_active=None):
        if is_active is None:
            return self._active
        self._active = bool(is_active)
        if not self._active and self._wanted:
            self.disconnect()

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not self._active:
            raise OSError("Wifi Not Started")
        self._wanted = True
        payload = (ssid or "").encode() + b"\x00" + (key or "").encode()
        _hw.call(_hw.OP_WLAN_CONNECT, 0, payload)

    def disconnect(self):
        self._wanted = False
        _hw.call(_hw.OP_WLAN_DISCONNECT)

    def isconnected(self):
        return self._active and _hw.link_up

    def status(self, param=None):
        if param == "rssi":
            return -55 if self.isconnected() else 0
        if self.isconnected():
            return STAT_GOT_IP
        return STAT_CONNECTING if self._wanted else STAT_IDLE

    def ifconfig(self, config=None):
        if self.isconnected():
            return ("192.168.4.%d" % (2 + _hw.env_int("BOARD_INDEX", 0)), "255.255.255.0",
                    "192.168.4.1", "192.168.4.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if args == ("mac",):
            import machine
            return machine.unique_id()
        if args == ("hostname",):
            return _hostname
        if args:
            raise ValueError("unknown config param")

    def scan(self):
        return []
