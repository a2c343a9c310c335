# Stand-in for the ESP32 port's `network` module: a WLAN station that is connected only while
# the emulator's access point is up and the board is in its range.
import _hw

STA_IF = 0
AP_IF = 1

STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
# While the driver retries, status() is the ESP-IDF's last disconnect reason.
STAT_BEACON_TIMEOUT = 200
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204
STAT_NO_AP_FOUND_W_COMPATIBLE_SECURITY = 210
STAT_NO_AP_FOUND_IN_AUTHMODE_THRESHOLD = 211
STAT_NO_AP_FOUND_IN_RSSI_THRESHOLD = 212

# What WLAN.config() sets and queries on the port (ports/esp32/network_wlan.c); besides
# these, "key" and "password" can only be set and "ifname" only queried.
_CONFIG = ("mac", "ssid", "essid", "hidden", "security", "authmode", "channel", "hostname",
           "dhcp_hostname", "max_clients", "reconnects", "txpower", "protocol", "pm")

_hostname = "esp32"


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name


class WLAN:
    IF_STA = STA_IF
    IF_AP = AP_IF
    PM_NONE = 0
    PM_PERFORMANCE = 1
    PM_POWERSAVE = 2

    def __init__(self, interface_id=STA_IF):
        if interface_id not in (STA_IF, AP_IF):
            raise ValueError("invalid WLAN interface identifier")
        self._if = interface_id
        self._active = False
        self._wanted = False
        self._config = {}

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
        self._config["ssid"] = ssid
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
        if param == "stations":
            raise OSError("AP required")  # a station has no stations of its own
        if param is not None:
            raise ValueError("unknown status param")
        if self.isconnected():
            return STAT_GOT_IP
        return STAT_CONNECTING if self._wanted else STAT_IDLE

    def ifconfig(self, config=None):
        if self.isconnected():
            return ("192.168.4.%d" % (2 + _hw.env_int("BOARD_INDEX", 0)), "255.255.255.0",
                    "192.168.4.1", "192.168.4.1")
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "0.0.0.0")

    def config(self, *args, **kwargs):
        if args and kwargs:
            raise TypeError("either pos or kw args are allowed")
        for name in kwargs:
            if name not in _CONFIG and name != "key" and name != "password":
                raise ValueError("unknown config param")
            if name == "hostname" or name == "dhcp_hostname":
                hostname(kwargs[name])
            self._config[name] = kwargs[name]
        if kwargs:
            return None
        if len(args) != 1:
            raise TypeError("can query only one param")
        name = args[0]
        if name == "ifname":
            return "sta" if self._if == STA_IF else "ap"
        if name not in _CONFIG:
            raise ValueError("unknown config param")
        if name == "mac":
            import machine
            return machine.unique_id()
        if name == "hostname" or name == "dhcp_hostname":
            return _hostname
        return self._config.get("ssid" if name == "essid" else name)

    def scan(self):
        return []
