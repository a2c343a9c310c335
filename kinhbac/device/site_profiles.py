"""Site profiles kept on the technician's laptop, for flashing where there is no internet.

A profile holds the site's WiFi password and claim key, so each is one JSON file readable by
its owner only (0600) in a folder only its owner can enter (0700):

    $KINHBAC_SITES_DIR, else $XDG_CONFIG_HOME/kinhbac/sites, else ~/.config/kinhbac/sites

Every online `kinhbac device flash` refreshes its site's file; `kinhbac device sites fetch`
fetches them ahead of a trip.
"""

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kinhbac.device.errors import DeviceToolError

SITES_DIR_ENV = "KINHBAC_SITES_DIR"
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


class SiteProfiles:
    """The folder of kept profiles, one `<slug>.json` each."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_folder()

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
        kept = dict(profile, fetched_at=datetime.now(UTC).isoformat(timespec="seconds"))
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

    def load(self, slug: str) -> dict[str, Any]:
        """A kept profile; DeviceToolError says how to get it when there is none."""
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
        return profile

    def all(self) -> list[dict[str, Any]]:
        """Every kept profile, by slug; unreadable files are skipped (load() explains them)."""
        if not self.folder.is_dir():
            return []
        profiles = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                profiles.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return profiles
