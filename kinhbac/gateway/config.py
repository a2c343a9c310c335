"""The gateway's settings: a TOML file, overridden by KINHBAC_GATEWAY_* environment variables.

    KINHBAC_GATEWAY_SITE=riverside  KINHBAC_GATEWAY_MQTT__PORT=8883  kinhbac gateway run -c gw.toml

A bad value stops the gateway with one line that names the field.
"""

import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from kinhbac.loopback import is_loopback_host
from kinhbac.tomlsettings import SettingsFileError, SettingsValueError, TomlFileSettings

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # safe inside an MQTT topic and a file name


class ConfigError(Exception):
    """The configuration cannot be used; the message names the field."""


class MqttSettings(BaseModel):
    host: str = Field("127.0.0.1", description="MQTT broker host")
    port: int = Field(1883, ge=1, le=65535, description="MQTT broker port (8883 for TLS)")
    username: str | None = Field(None, description="broker user (the site's gateway account)")
    password: SecretStr | None = Field(None, description="broker password")
    tls: bool = Field(False, description="connect with TLS; the broker's certificate is verified")
    ca_file: Path | None = Field(None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate, for mutual TLS")
    key_file: Path | None = Field(None, description="client certificate's private key")
    client_id: str | None = Field(
        None, description="MQTT client id (default: kinhbac-<site>-<gateway_id>)"
    )
    keepalive_s: int = Field(
        10, ge=5, le=3600, description="MQTT keepalive: the gateway pings an idle broker this "
        "often; a silent broker is noticed within 2 x this + 2 s (22 s by default), and the "
        "broker publishes the gateway's last will 1.5 x this after it last heard the gateway"
    )
    topic_prefix: str = Field("kinhbac", description="first level of every topic")
    max_inflight: int = Field(
        64, ge=1, le=10000, description="QoS 1 messages awaiting PUBACK at once"
    )
    readings_per_message: int = Field(
        200, ge=1, le=5000, description="readings batched into one telemetry message at most"
    )
    allow_plaintext: bool = Field(
        False, description="allow a broker that is not on this machine without tls: the "
        "broker password and every reading cross the network in clear"
    )
    status_every_s: float = Field(
        30.0, ge=5, le=3600, description="while connected, the gateway's retained status "
        "(online, its drops, its queue's depth and oldest reading) is published again this "
        "often, so that the fleet sees a backlog grow or drain"
    )
    backoff_min_s: float = Field(0.5, gt=0, description="first reconnect delay")
    backoff_max_s: float = Field(
        5.0, gt=0, le=300, description="reconnect delays double up to this, each jittered down "
        "by up to half: a broker back after an outage of any length is tried again within this"
    )

    @model_validator(mode="after")
    def _tls_files(self) -> "MqttSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} does not exist")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("ca_file/cert_file given but tls is false")
        if not self.tls and not self.allow_plaintext and not is_loopback_host(self.host):
            raise ValueError(f"host {self.host} is not this machine and tls is false: set "
                             "tls = true (with ca_file), or allow_plaintext = true to send the "
                             "password and the readings in clear")
        return self


class OtaSettings(BaseModel):
    cache_dir: Path | None = Field(
        None, description="where releases fetched from the fleet are kept for the site's nodes "
        "(default: <data_dir>/ota-cache)"
    )
    cache_bytes: int = Field(
        64 * 1024 * 1024, ge=64 * 1024, description="the release cache's size limit: the least "
        "recently offered release no rollout still needs goes first; a release larger than "
        "this is refused (reported failed for its devices)"
    )


class GatewaySettings(TomlFileSettings):
    model_config = SettingsConfigDict(
        env_prefix="KINHBAC_GATEWAY_", env_nested_delimiter="__", extra="forbid"
    )

    site: str = Field(description="the site this gateway serves: part of every MQTT topic")
    gateway_id: str = Field(
        default_factory=lambda: re.sub(r"[^a-z0-9_-]", "-", socket.gethostname().lower())[:63],
        description="this gateway's name within the site (default: the host name)",
    )
    listen_host: str = Field("0.0.0.0", description="address the node listener binds")
    listen_port: int = Field(7878, ge=0, le=65535, description="TCP port for nodes (0: any)")
    data_dir: Path = Field(
        Path("/var/lib/kinhbac"),
        description="where the queue database and the fleet key cache live",
    )
    key_file: Path | None = Field(
        None, description="JSON file of device keys: the offline option (set this or fleet_url)"
    )
    fleet_url: str | None = Field(
        None, description="the fleet service (https://host): device keys come from its "
        "/api/gateway/keys (set this or key_file)"
    )
    allow_plaintext_fleet: bool = Field(
        False, description="allow an http:// fleet_url that is not this machine: the gateway "
        "token and the device secrets cross the network in clear"
    )
    fleet_token: SecretStr | None = Field(
        None, description="this gateway's token from the fleet (kbg_...), needed with fleet_url"
    )
    key_refresh_s: float = Field(
        60, ge=1, le=86400, description="how often the keys are fetched from the fleet: a "
        "revoked device is refused within this"
    )
    node_config_dir: Path | None = Field(
        None, description="folder of <device id>.json CONFIG settings, sent on a node's next HELLO"
    )
    disk_cap_bytes: int = Field(
        0, ge=0, description="queue size limit; beyond it the oldest go (0: a quarter of the "
        "data_dir filesystem, 64 MiB to 16 GiB)"
    )
    max_age_s: int = Field(7 * 86400, ge=60, description="queued readings older than this go")
    commit_window_ms: float = Field(
        2.0, ge=0, le=1000, description="how long a commit waits to gather more frames"
    )
    metrics_host: str = Field("127.0.0.1", description="address of the /metrics endpoint")
    metrics_port: int = Field(
        9108, ge=0, le=65535, description="port of /metrics (Prometheus text; 0: any free port)"
    )
    idle_timeout_s: float = Field(
        120, gt=0, description="a node connection silent this long between frames is closed"
    )
    frame_timeout_s: float = Field(
        10, gt=0, description="a connection's first frame, and every frame once started, must "
        "be complete within this (silent and slow-loris connections cannot hold slots)"
    )
    max_connections: int = Field(2000, ge=1, description="node connections at once")
    max_connections_per_address: int = Field(
        64, ge=1, description="node connections at once from one IP address (one host on the "
        "site's WiFi cannot take every slot); nodes behind a NAT share one: raise it for them"
    )
    log_format: str = Field("text", pattern="^(text|json)$", description="text or json lines")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    ota: OtaSettings = Field(default_factory=OtaSettings)

    @field_validator("site", "gateway_id")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits, '-' and '_' (at most 63)")
        return value

    @field_validator("disk_cap_bytes")
    @classmethod
    def _cap_room(cls, value: int) -> int:
        if 0 < value < 64 * 1024:
            raise ValueError("give 0 (a quarter of the disk) or at least 65536 bytes")
        return value

    @field_validator("fleet_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("give an http:// or https:// URL, e.g. https://fleet.example.org")
        if parts.query or parts.fragment:
            raise ValueError("give the service's base URL, without ? or #")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source(self) -> "GatewaySettings":
        if (self.key_file is None) == (self.fleet_url is None):
            which = "neither is" if self.key_file is None else "both are"
            raise ValueError(f"set exactly one of key_file and fleet_url ({which} set)")
        if self.fleet_url is not None and not (
                self.fleet_token and self.fleet_token.get_secret_value()):
            raise ValueError("fleet_url needs fleet_token (or KINHBAC_GATEWAY_FLEET_TOKEN)")
        if (self.fleet_url is not None and self.fleet_url.startswith("http://")
                and not self.allow_plaintext_fleet
                and not is_loopback_host(urlsplit(self.fleet_url).hostname or "")):
            raise ValueError("fleet_url is plain http to another machine: use https://, or "
                             "set allow_plaintext_fleet = true to send the gateway token and "
                             "device secrets in clear")
        return self

    @property
    def database(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @property
    def fleet_key_cache(self) -> Path:
        """The last device keys the fleet gave, for a start while it is unreachable."""
        return self.data_dir / "fleet-keys.json"

    @property
    def ota_cache_dir(self) -> Path:
        """Releases fetched for the site's nodes."""
        return self.ota.cache_dir or self.data_dir / "ota-cache"

    @property
    def fleet_ota_cache(self) -> Path:
        """The last update assignments the fleet gave, for a start while it is unreachable."""
        return self.data_dir / "fleet-ota.json"


def describe_settings() -> str:
    """A plain listing of every setting, for `kinhbac gateway settings`."""
    lines = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                lines.append(f"\n[{prefix}{name}]")
                walk(annotation, f"{prefix}{name}.")
                continue
            if info.is_required():
                default = "(required)"
            elif info.default_factory is not None:
                default = "(computed)"
            elif isinstance(info.default, Path):
                default = repr(str(info.default))
            else:
                default = repr(info.default)
            env = "KINHBAC_GATEWAY_" + (prefix + name).upper().replace(".", "__")
            lines.append(f"{prefix}{name} = {default}\n    {info.description}  [{env}]")

    walk(GatewaySettings, "")
    return "\n".join(lines)


def load_settings(path: Path | None, **overrides: object) -> GatewaySettings:
    """Settings from `path` (TOML) and the environment; ConfigError names the first bad field."""
    try:
        return GatewaySettings.load(path, **overrides)
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from exc
    except SettingsValueError as exc:
        raise ConfigError(f"config error in {exc.field or 'config'}: {exc.message}") from exc
    finally:
        GatewaySettings._toml_file = None
