"""Site profiles kept on the technician's laptop, for flashing where there is no internet.

A profile holds the site's WiFi password and claim key, so each is one JSON file readable by
its owner only (0600) in a folder only its owner can enter (0700):

    $KINHBAC_SITES_DIR, else $XDG_CONFIG_HOME/kinhbac/sites, else ~/.config/kinhbac/sites

Every online `kinhbac device flash` refreshes its site's file; `kinhbac device sites fetch`
fetches them ahead of a trip. A kept profile expires $KINHBAC_SITE_PROFILE_DAYS (7) days after
it was fetched: it is then refused and deleted, so that a laptop's secrets do not outlive the
trip they were fetched for (a stolen laptop still yields what its files hold: the secrets
themselves are rotated, docs/security.md). It records when it was fetched and when the site's
claim key was last rotated, which the fleet, when reachable, tells apart from its own
(`staleness`).
"""

import json
import os
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kinhbac.device.errors import DeviceToolError

SITES_DIR_ENV = "KINHBAC_SITES_DIR"
PROFILE_DAYS_ENV = "KINHBAC_SITE_PROFILE_DAYS"
PROFILE_DAYS = 7.0  # a trip's length: a site's secrets are not kept on a laptop much longer
# A profile "fetched" further in the future than this was fetched under a wrong clock.
_CLOCK_SLACK = timedelta(days=1)
# The fleet's slug rule (kinhbac/fleet/models.py): also safe as a file name.
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# What a node's config is made of; a profile without these cannot set a node up.
REQUIRED = ("id", "slug", "claim_key", "sensor_kit")


def default_folder() -> Path:
    """Where profiles are kept unless told otherwise (see the module's docstring)."""
    if os.environ.get(SITES_DIR_ENV):
        return Path(os.environ[SITES_DIR_ENV])
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config_home) / "kinhbac" / "sites"


def profile_days() -> float:
    """How long a kept profile may be used: $KINHBAC_SITE_PROFILE_DAYS, else 7 days."""
    value = os.environ.get(PROFILE_DAYS_ENV)
    if not value:
        return PROFILE_DAYS
    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not 0 < days <= 365:
        raise DeviceToolError(f"{PROFILE_DAYS_ENV}={value!r}: give a number of days, more than "
                              "0 and at most 365")
    return days


def _time(value: Any) -> datetime | None:
    """An aware time from a profile's ISO 8601 field; None if missing or not one."""
    if not isinstance(value, str):
        return None
    try:
        found = datetime.fromisoformat(value)
    except ValueError:
        return None
    return found if found.tzinfo is not None else None


class SiteProfiles:
    """The folder of kept profiles, one `<slug>.json` each, each usable for `max_age_days`."""

    def __init__(self, folder: Path | None = None, *, max_age_days: float | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()
        self.max_age = timedelta(days=max_age_days if max_age_days is not None
                                 else profile_days())

    def path(self, slug: str) -> Path:
        if not _SLUG.match(slug):
            raise DeviceToolError(f"{slug!r} is not a site slug (lower-case letters, digits, - _)")
        return self.folder / f"{slug}.json"

    def save(self, profile: dict[str, Any]) -> Path:
        """Keep `profile` (as the fleet's GET /api/sites/{id}/profile answered), atomically."""
        missing = [name for name in REQUIRED if name not in profile]
        if missing:
            raise DeviceToolError(f"the fleet's site profile lacks {', '.join(missing)}")
        target = self.path(profile["slug"])
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)  # mkdir's mode does not apply to a folder that existed
        fetched_at = datetime.now(UTC).replace(microsecond=0)
        kept = dict(profile, fetched_at=fetched_at.isoformat(),
                    expires_at=(fetched_at + self.max_age).isoformat())
        # mkstemp makes the file 0600 from the start: the secrets are never readable by others,
        # not even between the write and a chmod.
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{profile['slug']}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def expires_at(self, profile: dict[str, Any]) -> datetime | None:
        """When a kept profile stops being usable: the expiry stamped when it was kept, or its
        fetch time plus today's maximum age, whichever is sooner; None: it cannot be trusted
        at all (no fetch time, or one in the future)."""
        fetched = _time(profile.get("fetched_at"))
        if fetched is None or fetched > datetime.now(UTC) + _CLOCK_SLACK:
            return None
        stamped = _time(profile.get("expires_at"))
        latest = fetched + self.max_age
        return min(stamped, latest) if stamped is not None else latest

    def expired(self, profile: dict[str, Any]) -> bool:
        expires = self.expires_at(profile)
        return expires is None or datetime.now(UTC) >= expires

    def _refuse_expired(self, slug: str, profile: dict[str, Any]) -> DeviceToolError:
        """Delete an expired profile, and say how to get it again."""
        self.path(slug).unlink(missing_ok=True)
        expires = self.expires_at(profile)
        when = (f"expired at {expires.isoformat()}" if expires is not None
                else "has no usable fetch time (or this laptop's clock is wrong)")
        return DeviceToolError(
            f"the kept profile of site {slug!r} {when} (profiles are kept "
            f"{self.max_age.total_seconds() / 86400:g} days, {PROFILE_DAYS_ENV}) and has been "
            f"deleted: fetch it again while online with `kinhbac device sites fetch {slug}`"
        )

    def load(self, slug: str) -> dict[str, Any]:
        """A kept profile that has not expired; DeviceToolError says how to get it when there is
        none (an expired one is deleted on the way)."""
        path = self.path(slug)
        try:
            profile = json.loads(path.read_text())
        except FileNotFoundError:
            raise DeviceToolError(
                f"no profile of site {slug!r} on this laptop ({path}): fetch it while online "
                f"with `kinhbac device sites fetch {slug}` (any online flash for the site "
                "keeps it too)"
            ) from None
        except (OSError, ValueError) as exc:
            raise DeviceToolError(
                f"cannot read the profile of site {slug!r} ({path}: {exc}): fetch it again "
                f"with `kinhbac device sites fetch {slug}`"
            ) from exc
        missing = [name for name in REQUIRED if name not in profile]
        if missing:
            raise DeviceToolError(
                f"the kept profile of site {slug!r} ({path}) lacks {', '.join(missing)}: fetch "
                f"it again with `kinhbac device sites fetch {slug}`"
            )
        if self.expired(profile):
            raise self._refuse_expired(slug, profile)
        return profile

    def all(self) -> list[dict[str, Any]]:
        """Every kept profile that has not expired, by slug; unreadable files are skipped
        (load() explains them), expired ones deleted (purge_expired() names them)."""
        self.purge_expired()
        return [profile for profile in self._read_all() if not self.expired(profile)]

    def purge_expired(self) -> list[str]:
        """Delete every expired profile; the slugs deleted."""
        deleted = []
        for profile in self._read_all():
            if self.expired(profile) and isinstance(profile.get("slug"), str) \
                    and _SLUG.match(profile["slug"]):
                self.path(profile["slug"]).unlink(missing_ok=True)
                deleted.append(profile["slug"])
        return deleted

    def _read_all(self) -> list[dict[str, Any]]:
        if not self.folder.is_dir():
            return []
        profiles = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                profile = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(profile, dict):
                profiles.append(profile)
        return profiles


def staleness(kept: dict[str, Any], site: dict[str, Any]) -> str | None:
    """What changed at the site since `kept` was fetched, as the fleet's site record (GET
    /api/sites/{id}, no secrets) shows it, with the command that refreshes it; None if
    nothing did."""
    slug = kept.get("slug", site.get("slug"))
    refresh = f"run `kinhbac device sites fetch {slug}` to refresh"
    rotated = _time(site.get("claim_key_rotated_at"))
    if rotated is not None and rotated != _time(kept.get("claim_key_rotated_at")):
        until = _time(site.get("previous_claim_key_expires_at"))
        boards = (f"a board flashed with the kept key can claim only until {until.isoformat()}, "
                  "if at all" if until is not None and until > datetime.now(UTC)
                  else "a board flashed with the kept key cannot claim")
        return f"stale: the site's claim key was rotated at {rotated.isoformat()} ({boards}); " \
               f"{refresh}"
    changed, kept_at = _time(site.get("updated_at")), _time(kept.get("updated_at"))
    if changed is not None and (kept_at is None or changed > kept_at):
        return f"stale: the site changed at {changed.isoformat()} (its WiFi, gateway or " \
               f"sensor kit may differ); {refresh}"
    return None
