"""The fleet service's settings: an optional TOML file, overridden by KINHBAC_* variables.

    KINHBAC_SECRET_KEY=... KINHBAC_DATABASE_URL=postgresql://fleet@db/fleet kinhbac fleet serve

A bad value stops the service with one line that names the setting.
"""

import tomllib
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

MIN_SECRET_KEY = 32  # characters; a token_urlsafe(32) is 43, well above brute force
PLACEHOLDER = "changethis"
# Values people paste from examples; a key containing one is not a secret.
_PLACEHOLDER_WORDS = ("changethis", "changeme", "change-me", "change_me", "placeholder", "secret")
DATABASE_FILE = "fleet.sqlite3"


class SettingsError(Exception):
    """The settings cannot be used; the message names the setting."""


class Settings(BaseSettings):
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
        description="folder of the default SQLite database (default: ./data, or data/ next "
        "to the config file)",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; postgresql://... uses psycopg 3 (default: SQLite in "
        "data_dir)",
    )
    login_token_hours: float = Field(
        12, gt=0, le=24 * 30, description="how long a token from /api/auth/login is valid"
    )
    db_wait_s: float = Field(
        30, ge=0, description="how long start-up waits for the database to answer"
    )

    _toml_file: ClassVar[Path | None] = None  # set only while load_settings() builds one
    _config_dir: Path | None = PrivateAttr(None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_file))
        return tuple(sources)

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

    @property
    def database(self) -> str:
        """The database URL in use: the configured one, or SQLite in the data folder."""
        if self.database_url:
            return self.database_url
        folder = self.data_dir or (self._config_dir or Path()) / "data"
        return f"sqlite:///{folder.resolve() / DATABASE_FILE}"


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
    if path is not None:
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        try:
            tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    Settings._toml_file = path
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{field}: {message}" if field else message) from exc
    finally:
        Settings._toml_file = None
    if path is not None:
        settings._config_dir = path.parent
    return settings
