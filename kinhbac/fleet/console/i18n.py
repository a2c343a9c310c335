"""The console's one translation layer: gettext catalogues (Babel) for Vietnamese and English,
a Jinja2 environment per language with the i18n extension, and dates, numbers and ages
formatted per locale.

Only the .po files are kept in the repository: each is compiled in memory the first time its
language is used, so nothing generated is committed or written at run time.
"""

import functools
import re
from collections.abc import Callable
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_datetime, format_timedelta
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.numbers import format_decimal
from babel.support import Translations
from jinja2 import Environment, FileSystemLoader, select_autoescape

HERE = Path(__file__).resolve().parent
LOCALE_DIR = HERE / "locale"
TEMPLATE_DIR = HERE / "templates"
DOMAIN = "messages"
# Vietnamese first: the console's users are a Vietnamese city's operations centre.
LOCALES = ("vi", "en")
DEFAULT_LOCALE = "vi"
# Each language named in itself, as a language switch shows them; data, not text to translate.
LANGUAGE_NAMES = {"vi": "Tiếng Việt", "en": "English"}

_LANGUAGE_RANGE = re.compile(r"^\s*([A-Za-z]{1,8})(?:-[A-Za-z0-9]{1,8})*\s*(?:;\s*q\s*=\s*"
                             r"([0-9.]+))?\s*$")


def catalogue_path(locale: str) -> Path:
    return LOCALE_DIR / locale / "LC_MESSAGES" / f"{DOMAIN}.po"


@functools.cache
def translations(locale: str) -> Translations:
    """The compiled catalogue of `locale`, compiled from its .po once per process."""
    with catalogue_path(locale).open("rb") as po:
        catalog = read_po(po, locale=locale, domain=DOMAIN)
    compiled = BytesIO()
    write_mo(compiled, catalog)
    compiled.seek(0)
    return Translations(compiled, domain=DOMAIN)


def negotiate(accept_language: str | None) -> str:
    """The language for a browser's Accept-Language: the first of ours it ranks highest,
    Vietnamese when it names neither (or the header is missing or malformed)."""
    ranked: list[tuple[float, int, str]] = []
    for position, item in enumerate((accept_language or "").split(",")[:20]):
        match = _LANGUAGE_RANGE.match(item)
        if not match:
            continue
        try:
            quality = float(match.group(2)) if match.group(2) else 1.0
        except ValueError:
            continue
        language = match.group(1).lower()
        if language in LOCALES and quality > 0:
            ranked.append((-quality, position, language))
    return min(ranked)[2] if ranked else DEFAULT_LOCALE


def pick(user_locale: str | None, accept_language: str | None) -> str:
    """The user's own choice if it is one of ours, else what the browser asks for."""
    return user_locale if user_locale in LOCALES else negotiate(accept_language)


class Formats:
    """Numbers, dates and ages in one locale and time zone, for the templates."""

    def __init__(self, locale: str, zone: ZoneInfo) -> None:
        self.locale = Locale.parse(locale)
        self.zone = zone
        # The city-wide overview formats some 3,000 counts (500 sites); Babel takes ~20 µs
        # each, a third of the page's rendering, and the same small numbers come back.
        self._integer = functools.lru_cache(maxsize=4096)(self._format_decimal)

    def _format_decimal(self, value: float | int) -> str:
        return format_decimal(value, locale=self.locale)

    def number(self, value: float | int | None) -> str:
        if value is None:
            return ""
        return self._integer(value) if type(value) is int else self._format_decimal(value)

    def when(self, value: datetime | None) -> str:
        if value is None:
            return ""
        return format_datetime(value.astimezone(self.zone), "medium", locale=self.locale)

    def age(self, value: timedelta | None) -> str:
        if value is None:
            return ""
        return format_timedelta(value, threshold=1.0, locale=self.locale)


@functools.cache
def environment(locale: str, zone_name: str) -> Environment:
    """The templates for `locale`: `{% trans %}`, `_()` and `ngettext()` from its catalogue, and
    the filters `number`, `when` and `age` formatting for it in `zone_name`."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATE_DIR),
        autoescape=select_autoescape(default=True, default_for_string=True),
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # Added by the i18n extension, so not in Environment's declared attributes.
    env.install_gettext_translations(  # type: ignore[attr-defined]
        translations(locale), newstyle=True)
    formats = Formats(locale, ZoneInfo(zone_name))
    filters: dict[str, Callable[..., str]] = {
        "number": formats.number, "when": formats.when, "age": formats.age}
    env.filters.update(filters)
    env.globals.update(locale=locale, language_names=LANGUAGE_NAMES, locales=LOCALES)
    return env
