"""Vietnamese and English: every string of every template goes through the catalogues, both
catalogues translate all of them, and the language (with its number and date formats) follows
the user."""

import re
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from io import BytesIO
from zoneinfo import ZoneInfo

import pytest
from babel.messages.extract import extract
from babel.messages.pofile import read_po
from jinja2 import nodes
from sqlmodel import select

from kinhbac.fleet.console import i18n
from kinhbac.fleet.models import AuditEntry, Role

from ..utils import make_user
from .conftest import ORIGIN, form_token, log_in, post_form
from .world import make_city

TEMPLATES = sorted(i18n.TEMPLATE_DIR.glob("*.html"))
# As pybabel extracts them (kinhbac/fleet/console/babel.cfg).
JINJA_OPTIONS = {"extensions": "jinja2.ext.i18n", "trim_blocks": "true",
                 "lstrip_blocks": "true"}
_LETTER = re.compile(r"[^\W\d_]")
_HOLE = "\x00"  # where an expression's value goes: not literal text
# Attributes a person reads (or a screen reader speaks).
_READ_ATTRIBUTES = frozenset({"title", "alt", "placeholder", "aria-label", "label"})


def catalogue(locale: str):
    with i18n.catalogue_path(locale).open("rb") as po:
        return read_po(po, locale=locale)


def msgids(source: str) -> set[str]:
    """The strings Babel's extractor takes from a template's translation calls."""
    found = extract("jinja2", BytesIO(source.encode()), options=JINJA_OPTIONS)
    return {message if isinstance(message, str) else message[0]
            for _, message, _, _ in found}


class _Literals(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def _check(self, text: str | None) -> None:
        text = (text or "").replace(_HOLE, " ").strip()
        if _LETTER.search(text):
            self.found.append(text)

    def handle_data(self, data: str) -> None:
        self._check(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in _READ_ATTRIBUTES:
                self._check(value)


def untranslated(source: str) -> list[str]:
    """Literal text of a template outside translation calls: the page's text and the attributes
    people read, with every expression (translated or data) taken out."""
    env = i18n.environment("en", "UTC")

    def walk(node: nodes.Node):
        if isinstance(node, nodes.TemplateData):
            yield node.data
        elif isinstance(node, nodes.Expr):
            yield _HOLE  # a value: `_()`, `{% trans %}` (compiled to a call), or data
        else:
            for child in node.iter_child_nodes():
                yield from walk(child)

    parser = _Literals()
    parser.feed("".join(walk(env.parse(source))))
    parser.close()
    return parser.found


def test_the_checks_catch_an_untranslated_literal_and_a_string_missing_from_the_catalogues():
    assert untranslated("<p>Devices offline</p>") == ["Devices offline"]
    assert untranslated('<input aria-label="Search" name="q">') == ["Search"]
    assert untranslated("{% if x %}<td>never</td>{% endif %}") == ["never"]
    assert untranslated("<p>{{ _('Overview') }} · {{ site.name }}: {{ n|number }}</p>") == []
    assert untranslated("<p>{% trans %}Overview{% endtrans %}</p>") == []
    translated = catalogue("vi")
    assert "A string nobody translated" not in translated
    assert msgids("<p>{{ _('A string nobody translated') }}</p>") == {
        "A string nobody translated"}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_string_of_every_template_is_a_translation_call(template):
    assert untranslated(template.read_text()) == []


@pytest.mark.parametrize("locale", i18n.LOCALES)
def test_each_catalogue_translates_every_template_string_and_holds_no_stale_one(locale):
    wanted = set().union(*(msgids(t.read_text()) for t in TEMPLATES))
    assert wanted, "no translation calls found: is the extractor reading the templates?"
    translated = {m.id: m.string for m in catalogue(locale) if m.id}
    assert sorted(wanted - set(translated)) == [], "missing: run pybabel (docs/console.md)"
    assert sorted(i for i in wanted if not translated[i]) == [], "empty msgstr"
    assert sorted(set(translated) - wanted) == [], "no longer in any template"
    # Placeholders survive translation: a lost %(site)s would drop a site's name.
    for msgid, text in translated.items():
        assert sorted(re.findall(r"%\(\w+\)s", msgid)) == sorted(
            re.findall(r"%\(\w+\)s", text)), msgid


@pytest.mark.parametrize(("header", "locale"), [
    (None, "vi"), ("", "vi"), ("fr-FR,fr;q=0.9", "vi"), ("en-US,en;q=0.9", "en"),
    ("en;q=0.5, vi;q=0.8", "vi"), ("vi-VN, en;q=0.9", "vi"), ("de, en;q=0.1", "en"),
    ("en;q=0", "vi"), ("garbage;;q=x,,", "vi"),
])
def test_the_browsers_language_decides_until_the_user_chooses_vietnamese_first(header, locale):
    assert i18n.negotiate(header) == locale


def test_numbers_and_dates_are_formatted_per_locale():
    zone = ZoneInfo("Asia/Ho_Chi_Minh")
    vi, en = i18n.Formats("vi", zone), i18n.Formats("en", zone)
    assert vi.number(1234.5) == "1.234,5" and en.number(1234.5) == "1,234.5"
    moment = datetime(2026, 12, 6, 1, 5, tzinfo=UTC)  # 08:05 in Hanoi
    assert "08:05" in vi.when(moment) and "thg 12" in vi.when(moment)
    assert "8:05" in en.when(moment) and "Dec" in en.when(moment)
    assert vi.age(timedelta(minutes=3)) == "3 phút" and en.age(timedelta(minutes=3)) == "3 minutes"


def test_switching_language_changes_the_page_text_and_number_format_and_sticks(
        app, browser, session, box):
    make_city(session, box, app)
    admin, _ = make_user(session, Role.admin)
    log_in(browser, admin.email)
    page = browser.get("/console/")
    assert '<html lang="vi">' in page.text and "Tổng quan" in page.text
    assert "12.345" in page.text  # the away gateway's drops, in Vietnamese digits
    answer = post_form(browser, "/console/locale", {"locale": "en",
                                                    "csrf_token": form_token(page)})
    assert answer.status_code == 303
    page = browser.get("/console/", headers={"Accept-Language": "vi"})
    assert '<html lang="en">' in page.text and "Overview" in page.text
    assert "Tổng quan" not in page.text
    assert "12,345" in page.text and "12.345" not in page.text
    # It is the user's: another browser that asks for Vietnamese gets English after login.
    browser.cookies.clear()
    log_in(browser, admin.email, headers={"Accept-Language": "vi"})
    assert "Overview" in browser.get("/console/", headers={"Accept-Language": "vi"}).text
    entry = session.exec(select(AuditEntry).where(AuditEntry.action == "user.locale")).one()
    assert entry.before == {"locale": None} and entry.after == {"locale": "en"}


def test_an_unknown_language_changes_nothing(browser, session):
    user, _ = make_user(session, Role.viewer)
    log_in(browser, user.email)
    token = form_token(browser.get("/console/"))
    post_form(browser, "/console/locale", {"locale": "fr", "csrf_token": token})
    assert "Tổng quan" in browser.get("/console/").text


def test_a_failed_login_answers_in_the_language_of_the_form(browser, session):
    """The English form, sent by a browser that asks for Vietnamese, comes back in English."""
    user, _ = make_user(session, Role.viewer)
    vietnamese = {"Accept-Language": "vi"}
    page = browser.get("/console/login?lang=en", headers=vietnamese)
    assert 'action="/console/login?lang=en"' in page.text
    answer = browser.post("/console/login?lang=en", headers={"Origin": ORIGIN, **vietnamese},
                          data={"username": user.email, "password": "not it",
                                "csrf_token": form_token(page)}, follow_redirects=False)
    assert answer.status_code == 401 and "Wrong e-mail or password." in answer.text
