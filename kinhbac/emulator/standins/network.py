# Stand-in for the ESP32 port's `network` module: a WLAN station whose driver the emulator
# plays (kinhbac/emulator/board.py): association takes seconds, and while the driver retries,
# status() gives the ESP-IDF's last disconnect reason by the rules of the port's status()
# (ports/esp32/network_wlan.c, MicroPython v1.24.1). The port's interface objects are
# singletons, so the state lives in the module, not in each WLAN(). Few names here: every new
# one takes the board's heap (qstrs), which the port's C code does not.
import struct
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
_active = [False, False]  # per interface
_config = {}
_reconnects = 0  # conf_wifi_sta_reconnects: 0 retries for ever, else config(reconnects=) + 1


def hostname(name=None):
    global _hostname
    if name is None:
        return _hostname
    _hostname = name


def _sta():
    """The emulated driver (kinhbac/emulator/board.py): (got an IP, connect() asked for and the
    driver still retrying, a lease since boot, the last disconnect reason)."""
    return struct.unpack_from("<BBBH", _hw.call(_hw.OP_WLAN_STATUS))


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

    def active(self, is_active=None):
        if is_active is None:
            return _active[self._if]
        st = _active[self._if]
        _active[self._if] = bool(is_active)
        if st and not is_active and self._if == STA_IF:
            _hw.call(_hw.OP_WLAN_DISCONNECT)  # the driver stops: no link, no retries
        if st != bool(is_active):
            # esp_wifi_start() with the first interface, esp_wifi_stop() with the last: WiFi
            # takes ADC2 meanwhile (network_wlan.c network_wlan_active).
            _hw.call(_hw.OP_WLAN_ACTIVE, _active[0] or _active[1])

    def connect(self, ssid=None, key=None, *, bssid=None):
        if not _active[self._if]:
            raise OSError("Wifi Not Started")
        if ssid is not None:
            _config["ssid"] = ssid
        payload = (_config.get("ssid") or "").encode() + b"\x00" + (key or "").encode()
        _hw.call(_hw.OP_WLAN_CONNECT, _reconnects, payload)

    def disconnect(self):
        _hw.call(_hw.OP_WLAN_DISCONNECT)

    def isconnected(self):
        return _hw.link_up

    def status(self, param=None):
        if param == "rssi":
            if not _hw.link_up:
                raise OSError("Wifi Not Connected")  # esp_wifi_sta_get_ap_info fails
            return -55
        if param == "stations":
            raise OSError("AP required")  # a station has no stations of its own
        if param is not None:
            raise ValueError("unknown status param")
        if self._if != STA_IF:
            return None
        # The order of ports/esp32/network_wlan.c network_wlan_status().
        st = _sta()
        if st[0]:
            return STAT_GOT_IP
        if st[3] == STAT_NO_AP_FOUND or st[3] in (210, 211, 212):
            return st[3]
        if st[3] == STAT_WRONG_PASSWORD or st[3] == 205:  # 205: WIFI_REASON_CONNECTION_FAIL
            return STAT_WRONG_PASSWORD
        if st[3] == 8:  # WIFI_REASON_ASSOC_LEAVE, after disconnect()
            return STAT_IDLE
        if st[1]:
            return STAT_CONNECTING
        if st[3] == 0:
            return STAT_IDLE
        return st[3]

    def ifconfig(self, config=None):
        st = _sta()
        if st[0]:
            return ("192.168.4.%d" % (2 + _hw.env_int("BOARD_INDEX", 0)), "255.255.255.0",
                    "192.168.4.1", "192.168.4.1")
        # esp_netif_down() clears the address; lwIP keeps the DNS server of the last lease.
        return ("0.0.0.0", "0.0.0.0", "0.0.0.0", "192.168.4.1" if st[2] else "0.0.0.0")

    def config(self, *args, **kwargs):
        global _reconnects
        if args and kwargs:
            raise TypeError("either pos or kw args are allowed")
        for name in kwargs:
            if name not in _CONFIG and name != "key" and name != "password":
                raise ValueError("unknown config param")
            if name == "hostname" or name == "dhcp_hostname":
                hostname(kwargs[name])
            if name == "reconnects":  # -1: for ever, as 0 retries for ever on the port
                _reconnects = 0 if kwargs[name] == -1 else int(kwargs[name]) + 1
            _config[name] = kwargs[name]
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
        if name == "reconnects":
            return _reconnects - 1
        return _config.get("ssid" if name == "essid" else name)

    def scan(self):
        return []
