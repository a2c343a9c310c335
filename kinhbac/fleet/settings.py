"""The fleet service's settings: an optional TOML file, overridden by KINHBAC_* variables.

    KINHBAC_SECRET_KEY=... KINHBAC_DATABASE_URL=postgresql://fleet@db/fleet kinhbac fleet serve

A bad value stops the service with one line that names the setting.
"""

from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    SettingsConfigDict,
)

from kinhbac.tomlsettings import SettingsFileError, SettingsValueError, TomlFileSettings

MIN_SECRET_KEY = 32  # characters; a token_urlsafe(32) is 43, well above brute force
PLACEHOLDER = "changethis"
# Values people paste from examples; a key containing one is not a secret.
_PLACEHOLDER_WORDS = ("changethis", "changeme", "change-me", "change_me", "placeholder", "secret")
DATABASE_FILE = "fleet.sqlite3"
# An image fills at most an OTA slot (1.5 MiB on ESP32_GENERIC-OTA) and a bundle the 960 KiB
# filesystem, so 2 MiB takes either with the form around it, and is what the reverse proxies
# in deploy/ let through.
RELEASE_MAX_UPLOAD_BYTES = 2 * 1024 * 1024


class SettingsError(Exception):
    """The settings cannot be used; the message names the setting."""


class Settings(TomlFileSettings):
    model_config = SettingsConfigDict(env_prefix="KINHBAC_", extra="ignore")

    env: Literal["development", "production"] = Field(
        "production",
        description="development relaxes the secret-key check; anything public is production",
    )
    secret_key: str = Field(
        PLACEHOLDER,
        description="the service key: encrypts device secrets at rest (32+ random characters)",
    )
    data_dir: Path | None = Field(
        None,
        description="folder of the default SQLite database, the release files and the "
        "release signing key (default: ./data, or data/ next to the config file)",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; postgresql://... uses psycopg 3 (default: SQLite in "
        "data_dir)",
    )
    login_token_hours: float = Field(
        12, gt=0, le=24 * 30, description="how long a token from /api/auth/login is valid"
    )
    api_token_days: int = Field(
        90, ge=1, le=3650, description="how long an API token (POST /api/tokens) is valid when "
        "the request gives no expires_in_days"
    )
    login_failures_per_address: int = Field(
        20, ge=1, description="failed logins from one client address within "
        "login_failure_window_s; then 429 until the oldest leaves the window"
    )
    login_failures_per_account: int = Field(
        10, ge=1, description="failed logins for one account within login_failure_window_s; "
        "then 429 for that account (whatever the address) until the oldest leaves the window"
    )
    login_failure_window_s: float = Field(
        900, gt=0, description="the window the login failure limits count over"
    )
    login_concurrent_hashes: int = Field(
        2, ge=1, le=64, description="password checks at once (Argon2id takes 64 MiB each); "
        "more wait up to 5 s, then get 429"
    )
    console_counts_max_age_s: float = Field(
        15, ge=0, le=600, description="how long the overview's counts of devices by state are "
        "kept before a visit counts again (0: every visit counts)"
    )
    max_pending_claims_per_site: int = Field(
        100, ge=1, description="pending devices (claims awaiting an admin) a site holds; "
        "further claims are refused until some are approved or rejected"
    )
    claims_per_gateway_per_minute: int = Field(
        60, ge=1, description="claims one gateway may report within a minute; then 429 until "
        "the oldest is a minute old"
    )
    claims_per_site_per_minute: int = Field(
        120, ge=1, description="claims the gateways of one site may report within a minute, "
        "together; then 429 for that site's gateways"
    )
    claim_key_overlap_hours: float = Field(
        72, ge=0, le=24 * 30, description="after a claim key rotation, how long claims under "
        "the previous key are still taken (boards flashed with the old profile meanwhile)"
    )
    db_wait_s: float = Field(
        30, ge=0, description="how long start-up waits for the database to answer"
    )
    release_max_upload_bytes: int = Field(
        RELEASE_MAX_UPLOAD_BYTES, ge=64 * 1024, le=1024 * 1024 * 1024,
        description="the largest release upload (the whole multipart body); above 2 MiB, raise "
        "the reverse proxy's body limit for /api/releases too",
    )
    console_secure_cookie: bool = Field(
        False, description="mark the console's cookies Secure even when the request reaching "
        "the service is plain HTTP (they are whenever the request is HTTPS, as behind a proxy "
        "that sends X-Forwarded-Proto)"
    )
    console_timezone: str = Field(
        "Asia/Ho_Chi_Minh", description="the time zone the console shows times in (IANA name)"
    )

    metrics_token: SecretStr | None = Field(
        None, description="the bearer token Prometheus sends for /metrics (32+ random "
        "characters); without it /metrics is not served (404)",
    )

    # MQTT ingest (kinhbac/fleet/ingest.py): device and gateway statuses, recent readings.
    ingest_enabled: bool = Field(
        False, description="run the MQTT ingest inside `kinhbac fleet serve`"
    )
    mqtt_host: str = Field("127.0.0.1", min_length=1, description="the city's MQTT broker")
    mqtt_port: int = Field(1883, ge=1, le=65535)
    mqtt_username: str | None = Field(None, description="the fleet's broker account")
    mqtt_password: SecretStr | None = None
    mqtt_tls: bool = Field(
        False, description="connect with TLS; the broker's certificate is always verified"
    )
    mqtt_ca_file: Path | None = Field(
        None, description="CA that signed the broker's certificate (default: the system's CAs)"
    )
    mqtt_client_id: str | None = Field(
        None, min_length=1, max_length=128,
        description="one per instance, fixed: the broker keeps its session (and what is "
        "published meanwhile) across restarts (default: kinhbac-fleet-<host name>)",
    )
    mqtt_topic_prefix: str = Field("kinhbac", description="the gateways' mqtt.topic_prefix")
    mqtt_shared: bool = Field(
        False, description="subscribe through $share/<mqtt_share_group>/... so that the "
        "instances of one group split telemetry and device statuses between them",
    )
    mqtt_share_group: str = Field("kinhbac-fleet", min_length=1, max_length=64)
    ingest_offline_after_s: float = Field(
        180, gt=0, description="a device is offline once no gateway heard it for this long"
    )
    ingest_readings_per_device: int = Field(
        100, ge=1, le=10_000, description="the recent readings kept per device (newest by "
        "boot and seq)",
    )
    ingest_batch_interval_s: float = Field(
        0.25, gt=0, le=60, description="longest a received message waits for its transaction"
    )
    ingest_batch_max: int = Field(
        5000, ge=1, description="messages that start a transaction at once"
    )

    _config_dir: Path | None = PrivateAttr(None)


    @field_validator("database_url")
    @classmethod
    def _psycopg3(cls, url: str | None) -> str | None:
        """postgresql:// and postgres:// mean psycopg 3, the driver this package installs."""
        if url is None:
            return None
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        if not url.startswith(("sqlite:", "postgresql+")):
            raise ValueError("use a sqlite:/// or postgresql:// URL")
        return url

    @field_validator("console_timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{name!r} is not a time zone this machine knows (e.g. "
                             "Asia/Ho_Chi_Minh)") from None
        return name

    @field_validator("mqtt_topic_prefix", "mqtt_share_group")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\0") or value.startswith("$"):
            raise ValueError(f"{value!r}: no MQTT wildcards (+ #), no leading $")
        if value.startswith("/") or value.endswith("/"):
            raise ValueError(f"{value!r}: no leading or trailing /")
        return value

    @model_validator(mode="after")
    def _tls_for_a_ca_file(self) -> "Settings":
        if self.mqtt_ca_file is not None and not self.mqtt_tls:
            raise ValueError("KINHBAC_MQTT_CA_FILE is set but KINHBAC_MQTT_TLS is false")
        return self

    @model_validator(mode="after")
    def _real_secret_outside_development(self) -> "Settings":
        problem = secret_key_problem(self.secret_key)
        if problem and self.env != "development":
            raise ValueError(
                f"KINHBAC_SECRET_KEY {problem}: set it to {MIN_SECRET_KEY}+ random characters "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), "
                "or KINHBAC_ENV=development for a trial"
            )
        return self

    @model_validator(mode="after")
    def _real_metrics_token_outside_development(self) -> "Settings":
        # /metrics is reachable through the reverse proxy from anywhere: its token is all
        # that keeps the fleet's figures (devices per state, traffic) from the internet.
        if self.metrics_token is None:
            return self
        problem = secret_key_problem(self.metrics_token.get_secret_value())
        if problem and self.env != "development":
            raise ValueError(
                f"KINHBAC_METRICS_TOKEN {problem}: set it to {MIN_SECRET_KEY}+ random "
                "characters, or leave it unset to serve no /metrics"
            )
        return self

    @property
    def data_folder(self) -> Path:
        """The data folder in use: the configured one, or data/ next to the config file (or in
        the current folder)."""
        return (self.data_dir or (self._config_dir or Path()) / "data").resolve()

    @property
    def database(self) -> str:
        """The database URL in use: the configured one, or SQLite in the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_folder / DATABASE_FILE}"


def secret_key_problem(key: str) -> str | None:
    """Why `key` is not a usable secret key, or None."""
    lowered = key.lower()
    if any(word in lowered for word in _PLACEHOLDER_WORDS):
        return "is a placeholder"
    if len(key) < MIN_SECRET_KEY:
        return f"is too short ({len(key)} characters, at least {MIN_SECRET_KEY})"
    return None


def load_settings(path: Path | None = None, **overrides: object) -> Settings:
    """Settings from `path` (TOML) and the environment; SettingsError names the bad setting."""
    try:
        settings = Settings.load(path, **overrides)
    except (SettingsFileError, SettingsValueError) as exc:
        raise SettingsError(str(exc)) from exc
    if path is not None:
        settings._config_dir = path.parent
    return settings
