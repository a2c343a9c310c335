"""Settings read from a TOML file chosen at run time, with the environment winning over it.

Shared by the gateway's and the fleet's settings: `load()` sets `_toml_file` on the class only
while it builds one instance (pydantic-settings takes sources per class, not per call).
"""

import tomllib
from pathlib import Path
from typing import ClassVar, Self

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)


class SettingsFileError(Exception):
    """The settings file is missing or not TOML (the message says which)."""


class SettingsValueError(Exception):
    """The first setting refused: `.field` (dotted, "" for the whole) and `.message`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class TomlFileSettings(BaseSettings):
    _toml_file: ClassVar[Path | None] = None

    @classmethod
    def load(cls, path: Path | None, **overrides: object) -> Self:
        """Settings from `path` (TOML, optional) under the environment; SettingsFileError or
        SettingsValueError says what is wrong."""
        if path is not None:
            if not path.is_file():
                raise SettingsFileError(f"config file {path} does not exist")
            try:
                tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise SettingsFileError(f"{path} is not valid TOML: {exc}") from exc
        cls._toml_file = path
        try:
            return cls(**overrides)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SettingsValueError(".".join(str(part) for part in first["loc"]),
                                     first["msg"].removeprefix("Value error, ")) from exc
        finally:
            cls._toml_file = None

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
