"""The fleet's data: one class per role, `XBase -> XCreate / XUpdate -> X(table=True) -> XPublic`.

Table classes hold what is stored (secrets only sealed or hashed); `XPublic` classes are what
the API returns and what the audit log records, so neither can carry a secret by accident.
"""

import json
import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, Literal, Optional, TypeVar

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, field_validator, model_validator
from sqlmodel import Field, Relationship, SQLModel

from kinhbac.fleet.identity import normalise_mac

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # safe inside an MQTT topic and a file name
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_TAGS = 32
MAX_SENSORS = 255  # the node's sensor index is one byte
MAX_KEY_ID = 0xFFFE  # the frame header's key id field; 0xFFFF is the site claim key's


# Named constraints: later migrations (SQLite's batch mode above all) can then refer to them.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _check_slug(value: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{value!r}: use lower-case letters, digits, '-' and '_', at most 63, "
            "starting with a letter or digit"
        )
    return value


# sqlmodel's Field(regex=...) is accepted and then not enforced, so patterns go through here.
Slug = Annotated[str, AfterValidator(_check_slug)]


# Request bodies refuse fields they do not have: {"secret": ...} in a registration is a 422
# naming the field, not silently dropped.
_INPUT = ConfigDict(extra="forbid")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC in and out, also on SQLite (which stores no zone)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the fleet stores timezone-aware UTC only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _enum(cls: type[StrEnum]) -> sa.Enum:
    # Stored as plain strings: adding a state later is a code change, not a type migration.
    return sa.Enum(
        cls, native_enum=False, create_constraint=False, length=16,
        values_callable=lambda members: [m.value for m in members],
    )


def _created() -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, nullable=False)


class Role(StrEnum):
    admin = "admin"  # everything, including users, tokens, sites and gateways
    technician = "technician"  # registers and re-provisions devices, reads site profiles
    viewer = "viewer"  # reads the registry


class DeviceState(StrEnum):
    registered = "registered"  # known by MAC, no credentials yet (CSV pre-registration, later)
    pending = "pending"  # introduced itself with its site's claim key, awaiting approval
    active = "active"  # has credentials; its site's gateways get its key
    revoked = "revoked"  # credentials withdrawn; no gateway gets a key for it
    rejected = "rejected"  # its claim was rejected: its claims are refused from then on


class TokenKind(StrEnum):
    login = "login"  # from /api/auth/login, expires
    api = "api"  # made by an admin for a script or tool


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


# ---- users and tokens


class UserBase(SQLModel):
    email: str = Field(unique=True, index=True, max_length=254)
    full_name: str | None = Field(default=None, max_length=100)
    role: Role = Field(default=Role.viewer, sa_type=_enum(Role))
    is_active: bool = True


def _check_email(value: str) -> str:
    value = value.strip().lower()
    if not _EMAIL.match(value):
        raise ValueError(f"{value!r} is not an e-mail address")
    return value


_SITE_IDS_DOC = "the sites the user is limited to; [] (the default): every site, city-wide"


class UserCreate(UserBase):
    model_config = _INPUT

    password: str = Field(min_length=10, max_length=256)
    site_ids: list[uuid.UUID] = Field(default_factory=list, description=_SITE_IDS_DOC)

    _email = field_validator("email")(_check_email)


class UserUpdate(SQLModel):
    model_config = _INPUT

    full_name: str | None = Field(default=None, max_length=100)
    role: Role | None = None
    is_active: bool | None = None
    password: str | None = Field(default=None, min_length=10, max_length=256)
    site_ids: list[uuid.UUID] | None = Field(default=None, description=_SITE_IDS_DOC)


# A site row's deletion is refused (RESTRICT) while someone is limited to it: cascading would
# leave a user limited to that one site with no limit at all, which means city-wide.
class UserSite(SQLModel, table=True):
    """A site a user is limited to; a user with none is city-wide."""

    __tablename__ = "user_site"

    user_id: uuid.UUID = Field(foreign_key="fleet_user.id", primary_key=True, ondelete="CASCADE")
    site_id: uuid.UUID = Field(foreign_key="site.id", primary_key=True, index=True,
                               ondelete="RESTRICT")


def _site_rows(row_class: str) -> Any:
    return Relationship(sa_relationship_kwargs={
        "cascade": "all, delete-orphan", "lazy": "selectin", "order_by": f"{row_class}.site_id",
    })


class _LimitedToSites:
    """`site_ids` over a table's link rows to sites: its `site_rows`, each a `site_row_class`."""

    site_row_class: ClassVar[type[SQLModel]]
    if TYPE_CHECKING:  # a table's relationship; declared for real it would be a column here
        site_rows: list[Any]

    @property
    def site_ids(self) -> list[uuid.UUID]:
        return [row.site_id for row in self.site_rows]

    def set_sites(self, site_ids: list[uuid.UUID]) -> None:
        wanted = set(site_ids)
        self.site_rows = [row for row in self.site_rows if row.site_id in wanted] + [
            self.site_row_class(site_id=site_id)
            for site_id in sorted(wanted - set(self.site_ids))
        ]


class User(_LimitedToSites, UserBase, table=True):
    __tablename__ = "fleet_user"  # "user" is reserved in PostgreSQL
    site_row_class: ClassVar[type[SQLModel]] = UserSite

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    password_hash: str = Field(max_length=255)
    # The console's language (kinhbac/fleet/console/i18n.py); None: the browser's, vi first.
    locale: str | None = Field(default=None, max_length=8)
    created_at: datetime = _created()
    updated_at: datetime = _created()

    site_rows: list[UserSite] = _site_rows("UserSite")


class UserPublic(UserBase):
    id: uuid.UUID
    site_ids: list[uuid.UUID] = Field(description=_SITE_IDS_DOC)
    created_at: datetime


class ApiTokenBase(SQLModel):
    name: str = Field(min_length=1, max_length=100)


_TOKEN_SITE_IDS_DOC = ("limits the token to these of its user's sites; [] (the default): all "
                       "of its user's sites")


class ApiTokenCreate(ApiTokenBase):
    model_config = _INPUT

    user_id: uuid.UUID
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)
    site_ids: list[uuid.UUID] = Field(default_factory=list, description=_TOKEN_SITE_IDS_DOC)


class ApiTokenSite(SQLModel, table=True):
    """A site an API token is limited to, within its user's; a token with none reaches all of
    its user's sites."""

    __tablename__ = "api_token_site"

    token_id: uuid.UUID = Field(foreign_key="api_token.id", primary_key=True, ondelete="CASCADE")
    site_id: uuid.UUID = Field(foreign_key="site.id", primary_key=True, index=True,
                               ondelete="RESTRICT")


class ApiToken(_LimitedToSites, ApiTokenBase, table=True):
    __tablename__ = "api_token"
    site_row_class: ClassVar[type[SQLModel]] = ApiTokenSite

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    user_id: uuid.UUID = Field(foreign_key="fleet_user.id", index=True, ondelete="CASCADE")
    kind: TokenKind = Field(sa_type=_enum(TokenKind))
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = _created()
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)

    site_rows: list[ApiTokenSite] = _site_rows("ApiTokenSite")


class ConsoleSession(SQLModel, table=True):
    """A console login (kinhbac/fleet/console/sessions.py): its login token is the cookie, so
    whatever ends the token (logout, expiry, a new password, deletion) ends the session too."""

    __tablename__ = "console_session"

    token_id: uuid.UUID = Field(foreign_key="api_token.id", primary_key=True,
                                ondelete="CASCADE")
    csrf_token: str = Field(max_length=64, description="every form of the session carries it")
    created_at: datetime = _created()


class ApiTokenPublic(ApiTokenBase):
    id: uuid.UUID
    user_id: uuid.UUID
    kind: TokenKind
    site_ids: list[uuid.UUID] = Field(description=_TOKEN_SITE_IDS_DOC)
    created_at: datetime
    expires_at: datetime | None


class ApiTokenIssued(ApiTokenPublic):
    token: str = Field(description="the bearer token; shown this once, stored only hashed")


class LoginResult(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime


# ---- sites and gateways


class SensorSpec(BaseModel):
    """One entry of a site's sensor kit, as the node's config `sensors` takes it."""

    model_config = ConfigDict(extra="allow")  # pins, scale, field...: the node checks those

    name: str = Field(min_length=1, max_length=32)
    kind: Literal["bme280", "adc", "pulse"]
    unit: str | None = Field(default=None, max_length=16)


def _check_sensor_kit(kit: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if kit is None:
        return None
    if len(kit) > MAX_SENSORS:
        raise ValueError(f"at most {MAX_SENSORS} sensors")
    names = set()
    checked = []
    for index, entry in enumerate(kit):
        spec = SensorSpec.model_validate(entry)
        if spec.kind == "bme280" and "field" not in entry:
            raise ValueError(f"sensor {index} ({spec.name}): a bme280 entry needs a field")
        if spec.kind != "bme280" and not isinstance(entry.get("pin"), int):
            raise ValueError(f"sensor {index} ({spec.name}): an {spec.kind} entry needs a pin")
        if spec.name in names:
            raise ValueError(f"sensor {index}: the name {spec.name!r} is used twice")
        names.add(spec.name)
        checked.append(spec.model_dump(exclude_none=True))
    return checked


class SiteBase(SQLModel):
    name: str = Field(min_length=1, max_length=100)
    wifi_ssid: str | None = Field(default=None, min_length=1, max_length=32)
    gateway_host: str | None = Field(
        default=None, min_length=1, max_length=253, description="where the nodes find a gateway"
    )
    gateway_port: int | None = Field(default=None, ge=1, le=65535)
    sensor_kit: list[dict[str, Any]] = Field(
        default_factory=list, sa_type=sa.JSON, description="the node config's `sensors` list"
    )


class SiteCreate(SiteBase):
    model_config = _INPUT

    slug: Slug = Field(description="the site in MQTT topics; cannot change later")
    wifi_password: str | None = Field(default=None, min_length=8, max_length=63)

    _kit = field_validator("sensor_kit")(_check_sensor_kit)


class SiteUpdate(SQLModel):
    model_config = _INPUT

    name: str | None = Field(default=None, min_length=1, max_length=100)
    wifi_ssid: str | None = Field(default=None, min_length=1, max_length=32)
    wifi_password: str | None = Field(default=None, min_length=8, max_length=63)
    gateway_host: str | None = Field(default=None, min_length=1, max_length=253)
    gateway_port: int | None = Field(default=None, ge=1, le=65535)
    sensor_kit: list[dict[str, Any]] | None = None

    _kit = field_validator("sensor_kit")(_check_sensor_kit)


class Site(SiteBase, table=True):
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    slug: str = Field(unique=True, max_length=63)
    wifi_password_enc: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    claim_key_enc: bytes = Field(sa_type=sa.LargeBinary)
    # The key a rotation replaced: claims under it are still taken until it expires.
    previous_claim_key_enc: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    previous_claim_key_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claim_key_rotated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = _created()
    updated_at: datetime = _created()


class SitePublic(SiteBase):
    id: uuid.UUID
    slug: str
    claim_key_rotated_at: datetime | None = Field(
        default=None, description="when the claim key was last rotated (null: never); a "
        "profile kept from before then holds the previous key")
    previous_claim_key_expires_at: datetime | None = Field(
        default=None, description="until when claims under the previous claim key are still "
        "taken (null: no previous key)")
    created_at: datetime
    updated_at: datetime


class ClaimKeyRotation(SQLModel):
    model_config = _INPUT

    overlap_hours: float | None = Field(
        default=None, ge=0, le=24 * 30,
        description="how long claims under the old key are still taken (default: "
        "KINHBAC_CLAIM_KEY_OVERLAP_HOURS); 0 ends it at once, as after a leak")


class SiteProfile(SitePublic):
    """What a technician needs to set a node up for the site, secrets included."""

    wifi_password: str | None
    claim_key: str
    claim_key_fingerprint: str = Field(
        description="names the claim key; devices set up by a claim show the one they used")


class GatewayBase(SQLModel):
    name: Slug = Field(max_length=63, description="the gateway id within its site")


class GatewayCreate(GatewayBase):
    model_config = _INPUT

    site_id: uuid.UUID


class Gateway(GatewayBase, table=True):
    __table_args__ = (sa.UniqueConstraint("site_id", "name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    site_id: uuid.UUID = Field(foreign_key="site.id", index=True, ondelete="CASCADE")
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = _created()


class GatewayPublic(GatewayBase):
    id: uuid.UUID
    site_id: uuid.UUID
    created_at: datetime


class GatewayEnrolled(GatewayPublic):
    token: str = Field(description="the gateway's bearer token; shown this once")


class GatewayKey(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    key_id: int
    secret: str = Field(description="32 bytes, hex")


class ApprovedClaim(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    nonce: str = Field(description="the nonce of the claim that was approved, 32 hex digits")
    key_id: int = Field(description="answer the node's CLAIM with IDENTITY under this key id")


class PendingConfig(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    settings: dict[str, Any] = Field(description="deliver to the node as a CONFIG frame")


class PreviousClaimKey(BaseModel):
    claim_key: str = Field(description="the claim key a rotation replaced")
    expires_at: datetime = Field(description="claims under it are refused from then on")


class GatewayKeys(BaseModel):
    """The gateway's key file format, {"devices": [{"device_id", "key_id", "secret"}]}, and what
    only the fleet supplies: the site's claim key (and during a rotation's overlap the previous
    one), approved claims, CONFIG for nodes and the key that signs releases."""

    devices: list[GatewayKey]
    claim_key: str | None = Field(default=None, description="the site's claim key")
    previous_claim_key: PreviousClaimKey | None = Field(
        default=None, description="during a rotation's overlap only: the key it replaced")
    claims: list[ApprovedClaim] = Field(default_factory=list)
    configs: list[PendingConfig] = Field(default_factory=list)
    release_public_key: str | None = Field(
        default=None, description="the Ed25519 key release manifests are signed with: base64 "
        "of its raw 32 bytes (absent until the first release)")


_WIRE_ID = re.compile(r"^6b62[0-9a-f]{12}$")  # "kb" + MAC: the only ids a claim may use
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


class ClaimCreate(BaseModel):
    """A node's CLAIM as its gateway verified it with the site's claim key."""

    model_config = _INPUT

    device_id: str = Field(description="the node's wire id: 6b62 and its MAC, 16 hex digits")
    nonce: str = Field(description="the claim's nonce, 32 hex digits")
    fw_version: str | None = Field(default=None, max_length=64)
    claim_key_fingerprint: str | None = Field(
        default=None, description="which of the site's claim keys verified the CLAIM "
        "(kinhbac/claim_keys.py); none: the current one")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        if not _WIRE_ID.match(value):
            raise ValueError("a claiming node's wire id is 6b62 and its MAC: 16 lower-case hex "
                             "digits")
        return value

    @field_validator("nonce")
    @classmethod
    def _nonce(cls, value: str) -> str:
        if not _NONCE.match(value):
            raise ValueError("the nonce is 16 bytes: 32 lower-case hex digits")
        return value

    @field_validator("claim_key_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        if value is not None and not _FINGERPRINT.match(value):
            raise ValueError("a claim key's fingerprint is 16 lower-case hex digits")
        return value


class ClaimAnswer(BaseModel):
    device_id: str
    state: Literal["pending", "approved", "rejected", "refused"] = Field(
        description="pending: wait for an admin; approved: the keys listing has its identity; "
        "rejected: an admin rejected it; refused: the device has another identity"
    )
    detail: str


# The settings a node takes from a CONFIG frame (firmware/node/config.py REMOTE); the node
# checks their values itself and answers a refusal that the gateway logs.
NODE_SETTINGS = (
    "interval_ms", "batch_max", "send_after_ms", "flash_every", "flash_after_ms",
    "no_network_reboot_s", "deep_sleep_ms", "log_level", "sensors",
)
MAX_NODE_CONFIG_BYTES = 1300  # a CONFIG frame's payload is at most 1362 bytes


class NodeConfigUpdate(BaseModel):
    model_config = _INPUT

    settings: dict[str, Any] = Field(
        description="settings for the node, delivered by its gateway on its next connection; "
        "{} delivers nothing more. Allowed: " + ", ".join(NODE_SETTINGS)
    )

    @field_validator("settings")
    @classmethod
    def _settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(settings) - set(NODE_SETTINGS))
        if unknown:
            raise ValueError(f"not settable on a node: {', '.join(unknown)} (allowed: "
                             f"{', '.join(NODE_SETTINGS)})")
        for name, value in settings.items():
            if name == "sensors":
                if not isinstance(value, list):
                    raise ValueError("sensors must be a list, as a site's sensor kit")
                settings[name] = _check_sensor_kit(value)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a whole number, 0 or more")
        size = len(json.dumps(settings, separators=(",", ":")).encode())
        if size > MAX_NODE_CONFIG_BYTES:
            raise ValueError(f"the settings take {size} bytes as JSON; a CONFIG frame carries "
                             f"{MAX_NODE_CONFIG_BYTES} at most")
        return settings


# ---- what the MQTT ingest keeps (kinhbac/fleet/ingest.py, docs/mqtt.md)


class DeviceStatusBase(SQLModel):
    wire_id: str = Field(primary_key=True, max_length=16, description="the device id on the wire")
    site: str = Field(max_length=63, description="the site in the status topic")
    gateway: str = Field(max_length=63, description="the gateway that heard the device last")
    last_seen_at: datetime = Field(sa_type=UTCDateTime, description="when a gateway last heard it")
    offline_at: datetime = Field(
        sa_type=UTCDateTime, description="when it counts as offline unless heard again"
    )
    firmware: str | None = Field(default=None, max_length=64)
    boot: int | None = Field(default=None, sa_type=sa.BigInteger, description="boot counter")
    reset_cause: str | None = Field(default=None, max_length=32)
    drops: dict[str, int] = Field(
        default_factory=dict, sa_type=sa.JSON, description="the node's drop counters"
    )
    sensors: list[dict[str, str]] = Field(
        default_factory=list, sa_type=sa.JSON, description="[{name, unit}] from its HELLO"
    )
    sensor_failures: dict[str, dict[str, int]] | None = Field(
        default=None, sa_type=sa.JSON,
        description="per sensor name, its failure counts since provisioning: {sensor_error, "
        "out_of_range}; null from a node whose firmware does not count them per sensor",
    )
    received_at: datetime = Field(sa_type=UTCDateTime, description="when the fleet took it")


class DeviceStatus(DeviceStatusBase, table=True):
    """A device's last status as its gateway published it; also for wire ids the registry
    does not know (unknown but seen)."""

    __tablename__ = "device_status"

    @property
    def online(self) -> bool:
        return utcnow() < self.offline_at


class DeviceStatusPublic(DeviceStatusBase):
    pass


# ---- devices


class DeviceBase(SQLModel):
    chip: str | None = Field(default=None, max_length=64, description="e.g. ESP32-D0WD-V3")
    flash_size: int | None = Field(default=None, ge=0, le=2**31 - 1, description="bytes")
    board: str | None = Field(default=None, max_length=64)


def _check_tags(tags: list[str] | None) -> list[str] | None:
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not _TAG.match(tag):
            raise ValueError(f"tag {tag!r}: use letters, digits, '_', '.', ':', '-' (64 at most)")
    return sorted(set(tags))


class DeviceCreate(DeviceBase):
    model_config = _INPUT

    mac: str = Field(description="aa:bb:cc:dd:ee:ff (also accepted: '-' or no separators)")
    site_id: uuid.UUID | None = None
    tags: list[str] = Field(default_factory=list)
    firmware_version: str | None = Field(default=None, max_length=64)

    _mac = field_validator("mac")(normalise_mac)
    _tags = field_validator("tags")(_check_tags)


class DeviceUpdate(SQLModel):
    model_config = _INPUT

    chip: str | None = Field(default=None, max_length=64)
    flash_size: int | None = Field(default=None, ge=0, le=2**31 - 1)
    board: str | None = Field(default=None, max_length=64)
    site_id: uuid.UUID | None = None
    tags: list[str] | None = None

    _tags = field_validator("tags")(_check_tags)


class DeviceTag(SQLModel, table=True):
    __tablename__ = "device_tag"

    device_id: uuid.UUID = Field(foreign_key="device.id", primary_key=True, ondelete="CASCADE")
    tag: str = Field(primary_key=True, max_length=64, index=True)


# device_search_text as SQL, as PostgreSQL writes an index's expression back (so autogenerate
# sees the index migration 0012 made as this one); the planner matches the two either way.
DEVICE_SEARCH_SQL = "((wire_id || ' ') || replace(CAST(id AS VARCHAR), '-', ''))"


class Device(DeviceBase, table=True):
    # pg_trgm's GIN index (migration 0012, which gives it its gin_trgm_ops: the schema is
    # made by migrations, never create_all): a LIKE '%...%' of three characters or more uses
    # it. PostgreSQL only: SQLite reads the table, which suits the small fleets it serves.
    # The device list's site and firmware filters page by wire id: a deep page is read in
    # order from where it starts (migration 0012).
    __table_args__ = (
        sa.Index("ix_device_search_text", sa.text(DEVICE_SEARCH_SQL),
                 postgresql_using="gin").ddl_if(dialect="postgresql"),
        sa.Index("ix_device_site_id_wire_id", "site_id", "wire_id"),
        sa.Index("ix_device_firmware_version_wire_id", "firmware_version", "wire_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    mac: str = Field(unique=True, max_length=17)
    wire_id: str = Field(unique=True, max_length=16)
    site_id: uuid.UUID | None = Field(default=None, foreign_key="site.id", ondelete="SET NULL")
    firmware_version: str | None = Field(default=None, max_length=64)
    boot_counter: int | None = Field(default=None, sa_type=sa.BigInteger)
    key_id: int = 0
    secret_enc: bytes | None = Field(default=None, sa_type=sa.LargeBinary)
    state: DeviceState = Field(default=DeviceState.registered, sa_type=_enum(DeviceState),
                               index=True)
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The last free flash it reported (a status without one keeps it): a bundle's rollout is
    # checked against it (kinhbac/fleet/rollouts.py, too_full).
    free_flash_bytes: int | None = Field(default=None, sa_type=sa.BigInteger)
    free_flash_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The nonce of its claim (claim path only): with the site's claim key it derives the secret.
    claim_nonce: str | None = Field(default=None, max_length=32)
    # Which of its site's claim keys signed that claim: the approval derives the secret with it.
    claim_key_fingerprint: str | None = Field(default=None, max_length=16)
    node_config: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    created_at: datetime = _created()
    updated_at: datetime = _created()

    tag_rows: list[DeviceTag] = Relationship(
        sa_relationship_kwargs={
            "cascade": "all, delete-orphan", "lazy": "selectin", "order_by": "DeviceTag.tag",
        }
    )
    # Joined by wire id, not a foreign key: statuses also arrive for devices not registered.
    status: Optional["DeviceStatus"] = Relationship(
        sa_relationship_kwargs={
            "primaryjoin": "foreign(DeviceStatus.wire_id) == Device.wire_id",
            "viewonly": True, "lazy": "selectin", "uselist": False,
        }
    )

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]

    @property
    def online(self) -> bool:
        """Heard from within the ingest's offline_after_s (KINHBAC_INGEST_OFFLINE_AFTER_S)."""
        return self.status is not None and self.status.online

    def set_tags(self, tags: list[str]) -> None:
        wanted = set(tags)
        self.tag_rows = [row for row in self.tag_rows if row.tag in wanted] + [
            DeviceTag(tag=tag) for tag in sorted(wanted - set(self.tags))
        ]


def device_search_text() -> sa.ColumnElement[str]:
    """What the console's search looks in: the wire id (which holds the MAC's digits) and the
    id without dashes (PostgreSQL's text form has them, SQLite stores it without), a space
    between so that no match spans the two. On PostgreSQL the trigram index below holds it."""
    return Device.wire_id + " " + sa.func.replace(sa.cast(Device.id, sa.String), "-", "")


class DevicePublic(DeviceBase):
    id: uuid.UUID
    mac: str
    wire_id: str
    site_id: uuid.UUID | None
    tags: list[str]
    firmware_version: str | None
    boot_counter: int | None
    key_id: int
    state: DeviceState
    last_seen_at: datetime | None
    free_flash_bytes: int | None = Field(
        default=None, description="flash bytes it last reported free for an update's files "
        "(its HELLO, through its gateway's status); null until it reports one")
    free_flash_at: datetime | None = Field(
        default=None, description="when it reported free_flash_bytes (its gateway heard it)")
    claim_key_fingerprint: str | None = Field(
        default=None, description="set up by a claim: which of its site's claim keys signed it "
        "(after a leak, those under the leaked key are re-provisioned)")
    node_config: dict[str, Any] | None = Field(
        description="settings its gateway delivers to it (PUT .../config)")
    created_at: datetime
    updated_at: datetime
    online: bool = Field(description="its gateway reported it within the offline silence")
    status: DeviceStatusPublic | None = Field(description="its last status from MQTT, if any")


class DeviceProvisioned(DevicePublic):
    secret: str = Field(description="the device secret, 32 bytes hex; shown this once")


# ---- audit


class AuditEntryBase(SQLModel):
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    actor_kind: str = Field(max_length=16, description="user, gateway or cli")
    actor_id: uuid.UUID | None = None
    actor: str = Field(max_length=320, description="e-mail, site/gateway or cli")
    action: str = Field(max_length=64, index=True, description="e.g. device.create")
    entity: str = Field(max_length=32)
    entity_id: str = Field(max_length=64, index=True)
    before: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    after: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)


class AuditEntry(AuditEntryBase, table=True):
    __tablename__ = "audit_entry"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)


class AuditEntryPublic(AuditEntryBase):
    id: uuid.UUID


class GatewayStatus(SQLModel, table=True):
    """A gateway's last status message: online/offline and its policy drops."""

    __tablename__ = "gateway_status"

    site: str = Field(primary_key=True, max_length=63)
    gateway: str = Field(primary_key=True, max_length=63)
    state: str = Field(max_length=16, description="online or offline")
    since_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="when its broker session began"
    )
    dropped: dict[str, int] = Field(default_factory=dict, sa_type=sa.JSON)
    received_at: datetime = Field(sa_type=UTCDateTime)
    queue_depth: int | None = Field(
        default=None, sa_type=sa.BigInteger, description="readings its queue held, not yet "
        "acknowledged by the broker; null: not reported (a gateway before the figure)"
    )
    oldest_queued_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="when the oldest of them was queued; "
        "null while none was (or not reported)"
    )


class ReadingBase(SQLModel):
    boot: int = Field(sa_type=sa.BigInteger)
    seq: int = Field(sa_type=sa.BigInteger)
    sensor: str = Field(max_length=64)
    unit: str = Field(max_length=16)
    value: float | None = Field(description="null for NaN or infinity at the node")
    ts: datetime | None = Field(sa_type=UTCDateTime, description="null: the node's clock never "
                                "synced in that boot")
    boot_ms: int | None = Field(default=None, sa_type=sa.BigInteger,
                                description="ms since boot, when ts is null")
    pre_sync: bool


class RecentReading(ReadingBase, table=True):
    """The ingest's bounded window: the newest readings of each device by (boot, seq)."""

    __tablename__ = "recent_reading"
    # (device, boot, seq) identifies a reading: duplicates conflict, and the key's index
    # serves "newest first" per device.
    __table_args__ = (sa.PrimaryKeyConstraint("wire_id", "boot", "seq"),)

    wire_id: str = Field(max_length=16)


class ReadingPublic(ReadingBase):
    pass


# ---- releases (kinhbac/fleet/releases.py, docs/ota.md)


class ReleaseKind(StrEnum):
    bundle = "bundle"  # the firmware's files, for the inactive app folder
    image = "image"  # one MicroPython image, for the inactive OTA partition


class ReleaseFile(SQLModel, table=True):
    """A file of a release, as its manifest lists it; its bytes are kept by SHA-256
    (kinhbac/fleet/artifacts.py)."""

    __tablename__ = "release_file"
    __table_args__ = (sa.UniqueConstraint("release_id", "path"),)

    release_id: uuid.UUID = Field(foreign_key="release.id", primary_key=True,
                                  ondelete="CASCADE")
    position: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False},
                          description="its index in the manifest (and on the wire)")
    path: str = Field(max_length=255)
    size: int = Field(sa_type=sa.BigInteger)
    sha256: str = Field(max_length=64, index=True)


class ReleaseBase(SQLModel):
    kind: ReleaseKind = Field(sa_type=_enum(ReleaseKind))
    version: str = Field(max_length=64, description="as packaging.version normalises it")


class Release(ReleaseBase, table=True):
    # Versions compare as versions: 1.0 and 1.0.0 are one version, so the key is canonical.
    __table_args__ = (sa.UniqueConstraint("kind", "version_key"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    version_key: str = Field(max_length=64)
    created_at: datetime = _created()
    uploaded_by: str = Field(max_length=320, description="the admin's e-mail")
    uploaded_by_id: uuid.UUID | None = None
    size: int = Field(sa_type=sa.BigInteger, description="its files' bytes together")
    manifest: bytes = Field(sa_type=sa.LargeBinary, description="the canonical bytes signed")
    signature: bytes = Field(sa_type=sa.LargeBinary, description="Ed25519, 64 bytes")
    signing_key: str = Field(max_length=44, description="the public key that verifies it, "
                             "base64 of its raw 32 bytes")

    file_rows: list[ReleaseFile] = Relationship(sa_relationship_kwargs={
        "cascade": "all, delete-orphan", "lazy": "selectin", "order_by": "ReleaseFile.position",
    })

    @property
    def files(self) -> list["ReleaseFilePublic"]:
        return [ReleaseFilePublic(path=row.path, size=row.size, sha256=row.sha256)
                for row in self.file_rows]


class ReleaseFilePublic(BaseModel):
    path: str = Field(description="a bundle's: the absolute board path; an image's: image.bin")
    size: int
    sha256: str


class ReleasePublic(ReleaseBase):
    id: uuid.UUID
    created_at: datetime
    uploaded_by: str
    size: int
    files: list[ReleaseFilePublic]


class ReleaseDetail(ReleasePublic):
    manifest: str = Field(description="the canonical manifest, exactly the bytes signed "
                          "(UTF-8)")
    signature: str = Field(description="Ed25519 over the manifest's bytes, base64")
    signing_key: str = Field(description="the public key that verifies it, base64 of its raw "
                             "32 bytes; gateways take the key from their listing, not from here")


class SignedManifest(BaseModel):
    """A release as a gateway fetches it: check the signature, then the files' SHA-256."""

    id: uuid.UUID
    kind: ReleaseKind
    version: str
    manifest: str = Field(description="the canonical manifest, exactly the bytes signed "
                          "(UTF-8)")
    signature: str = Field(description="Ed25519 over the manifest's bytes, base64; verify "
                           "with release_public_key from GET /api/gateway/keys")


# ---- rollouts (kinhbac/fleet/rollouts.py, docs/ota.md "Rollouts")


class RolloutState(StrEnum):
    created = "created"  # recorded, not started (a rollout starts at once today)
    running = "running"  # its current wave's devices are offered the release
    paused = "paused"  # by an admin, or by itself when a wave failed too often: no offers
    completed = "completed"  # every wave done
    cancelled = "cancelled"  # by an admin: devices not finished are cancelled


class RolloutDeviceState(StrEnum):
    pending = "pending"  # its wave has not started, or the gateway has not offered it yet
    offered = "offered"  # the gateway sent it an OTA_OFFER
    downloading = "downloading"
    verifying = "verifying"
    installed = "installed"  # staged and switched to, not yet booted
    rebooting = "rebooting"  # booting the new version on trial
    confirmed = "confirmed"  # runs the release and confirmed it (or ran it already)
    failed = "failed"  # the node or its gateway gave up (the reason says why)
    rolled_back = "rolled_back"  # the trial never confirmed: the node switched back
    timed_out = "timed_out"  # past its deadline without a final state
    cancelled = "cancelled"  # the rollout was cancelled first


class RolloutEventSource(StrEnum):
    node = "node"  # an OTA_RESULT the node sent, as its gateway relayed it
    gateway = "gateway"  # the gateway's own step: offered, or failed refusing a release
    fleet = "fleet"  # the fleet's rules: a deadline passed, a wave started
    admin = "admin"  # an admin cancelled the rollout


class RolloutTargetKind(StrEnum):
    site = "site"
    tag = "tag"
    devices = "devices"


class Rollout(SQLModel, table=True):
    """One release sent to a target in waves (kinhbac/fleet/rollouts.py)."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    release_id: uuid.UUID = Field(foreign_key="release.id", index=True, ondelete="RESTRICT")
    target_kind: RolloutTargetKind = Field(sa_type=_enum(RolloutTargetKind))
    target_value: Any = Field(sa_type=sa.JSON, description="a site, a tag, or a list of wire "
                              "ids, as the admin gave it")
    waves: list[int] = Field(sa_type=sa.JSON, description="cumulative percents of the target")
    # When each wave started (ISO 8601 UTC); null for a wave not started yet.
    wave_started_at: list[str | None] = Field(default_factory=list, sa_type=sa.JSON)
    success_threshold: int = Field(description="percent of a wave confirmed to advance")
    failure_threshold: int = Field(description="percent of a wave failed to pause")
    device_deadline_s: int
    allow_downgrade: bool = False
    state: RolloutState = Field(default=RolloutState.running, sa_type=_enum(RolloutState),
                                index=True)
    current_wave: int = 0
    paused_reason: str | None = Field(default=None, max_length=500)
    # The current wave's failures an admin's resume accepted: only failures past them pause it.
    failures_accepted: int = 0
    created_at: datetime = _created()
    created_by: str = Field(max_length=320)
    created_by_id: uuid.UUID | None = None
    updated_at: datetime = _created()


class RolloutDevice(SQLModel, table=True):
    """A device's place and progress in a rollout."""

    __tablename__ = "rollout_device"
    # The gateway's query: by device (its site), then the rollout's state and wave.
    __table_args__ = (sa.Index("ix_rollout_device_rollout_id_wave_state", "rollout_id", "wave",
                               "state"),)

    rollout_id: uuid.UUID = Field(foreign_key="rollout.id", primary_key=True, ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="device.id", primary_key=True, index=True,
                                 ondelete="CASCADE")
    position: int = Field(description="its place in the rollout's shuffled order")
    wave: int
    state: RolloutDeviceState = Field(default=RolloutDeviceState.pending,
                                      sa_type=_enum(RolloutDeviceState))
    bytes: int = Field(default=0, sa_type=sa.BigInteger)
    reason: str | None = Field(default=None, max_length=500)
    offered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    deadline_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = _created()


class RolloutEvent(SQLModel, table=True):
    """One step of one device in a rollout, in the order it was reported."""

    __tablename__ = "rollout_event"
    __table_args__ = (
        sa.Index("ix_rollout_event_rollout_id_device_id_at", "rollout_id", "device_id", "at"),
        # A device's page reads its last steps over every rollout, newest first (console
        # devices.py): without it, a scan of every event of the fleet (migration 0013).
        sa.Index("ix_rollout_event_device_id_id", "device_id", "id"),
    )

    # An integer that grows: events at the same instant keep the order they were recorded in.
    id: int | None = Field(default=None, primary_key=True,
                           sa_type=sa.BigInteger().with_variant(sa.Integer(), "sqlite"))
    rollout_id: uuid.UUID = Field(foreign_key="rollout.id", ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="device.id", ondelete="CASCADE")
    at: datetime = Field(sa_type=UTCDateTime, description="the gateway's clock for a node's or "
                         "gateway's step; the fleet's for its own")
    received_at: datetime = _created()
    from_state: RolloutDeviceState = Field(sa_type=_enum(RolloutDeviceState))
    to_state: RolloutDeviceState = Field(sa_type=_enum(RolloutDeviceState))
    bytes: int = Field(default=0, sa_type=sa.BigInteger)
    reason: str | None = Field(default=None, max_length=500)
    source: RolloutEventSource = Field(sa_type=_enum(RolloutEventSource))
    ignored: bool = Field(default=False, description="recorded, not applied: it would move "
                          "the device backwards, or came after its final state")


MAX_WAVES = 20
MAX_TARGET_DEVICES = 10_000  # an explicit device list; a site or a tag may be any size
_HEX16 = re.compile(r"^[0-9a-f]{16}$")


def _check_waves(waves: list[int]) -> list[int]:
    if not waves:
        raise ValueError("give at least one wave, e.g. [100]")
    if len(waves) > MAX_WAVES:
        raise ValueError(f"at most {MAX_WAVES} waves")
    for before, after in zip(waves, waves[1:], strict=False):
        if after <= before:
            raise ValueError(f"waves are cumulative percents, strictly increasing: {after} "
                             f"follows {before}")
    if waves[0] < 1:
        raise ValueError(f"a wave is 1 to 100 percent of the target, not {waves[0]}")
    if waves[-1] != 100:
        raise ValueError(f"the last wave must be 100 (the whole target), not {waves[-1]}")
    return waves


class RolloutTarget(BaseModel):
    """Exactly one of site, tag or devices."""

    model_config = _INPUT

    site: str | None = Field(default=None, min_length=1, max_length=100,
                             description="a site's slug, name or id")
    tag: str | None = Field(default=None, min_length=1, max_length=64)
    devices: list[str] | None = Field(default=None, min_length=1, max_length=MAX_TARGET_DEVICES,
                                      description="wire ids, 16 hex digits each")

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[str] | None) -> list[str] | None:
        if devices is None:
            return None
        seen: set[str] = set()
        for wire_id in devices:
            if not _HEX16.match(wire_id):
                raise ValueError(f"{wire_id[:40]!r} is not a wire id (16 lower-case hex digits)")
            if wire_id in seen:
                raise ValueError(f"{wire_id} is given twice")
            seen.add(wire_id)
        return devices

    def kind_and_value(self) -> tuple[RolloutTargetKind, Any]:
        given = [(kind, value) for kind, value in ((RolloutTargetKind.site, self.site),
                                                  (RolloutTargetKind.tag, self.tag),
                                                  (RolloutTargetKind.devices, self.devices))
                 if value is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of site, tag or devices")
        return given[0]

    @model_validator(mode="after")
    def _one(self) -> "RolloutTarget":
        self.kind_and_value()
        return self


class RolloutCreate(BaseModel):
    model_config = _INPUT

    release_id: uuid.UUID
    target: RolloutTarget
    waves: Annotated[list[int], AfterValidator(_check_waves)] = Field(
        default_factory=lambda: [1, 10, 50, 100],
        description="cumulative percents of the target, strictly increasing, the last 100")
    success_threshold: int = Field(default=95, ge=1, le=100,
                                   description="percent of a wave confirmed to advance")
    failure_threshold: int = Field(default=5, ge=0, le=100,
                                   description="percent of a wave failed to pause (at least "
                                   "one device)")
    device_deadline_s: int = Field(default=86400, ge=60, le=365 * 86400,
                                   description="each device's time from its wave's start")
    allow_downgrade: bool = False


class RolloutRelease(BaseModel):
    id: uuid.UUID
    kind: ReleaseKind
    version: str


class RolloutWave(BaseModel):
    index: int
    percent: int
    size: int = Field(description="devices in this wave (not counting earlier waves)")
    started_at: datetime | None
    counts: dict[str, int] = Field(description="its devices by state")


class RolloutDetail(BaseModel):
    id: uuid.UUID
    release: RolloutRelease
    target: dict[str, Any] = Field(description="as given: {site}, {tag} or {devices}")
    state: RolloutState
    paused_reason: str | None
    waves: list[RolloutWave]
    current_wave: int
    counts: dict[str, int] = Field(description="all its devices by state")
    total: int
    success_threshold: int
    failure_threshold: int
    device_deadline_s: int
    allow_downgrade: bool
    created_at: datetime
    created_by: str
    updated_at: datetime


class RolloutDevicePublic(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    name: str | None = Field(default=None, description="the device's name, if it has one "
                             "(devices have none yet: always null)")
    wave: int
    state: RolloutDeviceState
    bytes: int
    reason: str | None
    offered_at: datetime | None
    deadline_at: datetime | None
    updated_at: datetime


class RolloutEventPublic(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    at: datetime
    from_state: RolloutDeviceState
    to_state: RolloutDeviceState
    bytes: int
    reason: str | None
    source: RolloutEventSource
    ignored: bool


class OtaAssignment(BaseModel):
    device_id: str = Field(description="wire id, 16 hex digits")
    rollout_id: uuid.UUID
    release_id: uuid.UUID
    kind: ReleaseKind
    version: str
    manifest_sha256: str = Field(description="SHA-256 of the release's canonical manifest "
                                 "bytes, 64 hex; the first 4 bytes are the release ref")


class OtaAssignments(BaseModel):
    assignments: list[OtaAssignment]
