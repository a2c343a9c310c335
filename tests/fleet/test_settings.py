"""Settings: the service key is checked before anything starts; URLs and folders resolve."""

from pathlib import Path

import pytest

from kinhbac.fleet.settings import SettingsError, load_settings

GOOD_KEY = "Zq3-vN9rT1xY7bW2kL5mP8sD4fH6jG0a"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in ("KINHBAC_ENV", "KINHBAC_SECRET_KEY", "KINHBAC_DATABASE_URL", "KINHBAC_DATA_DIR",
                 "KINHBAC_METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("key", ["changethis", "changeme-changeme-changeme-changeme",
                                 "my-placeholder-key-that-is-long-enough"])
def test_placeholder_secret_key_is_refused_outside_development(monkeypatch, key):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", key)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("KINHBAC_SECRET_KEY is a placeholder")
    assert "KINHBAC_ENV=development" in message


def test_short_secret_key_is_refused_with_its_length(monkeypatch):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", "Zq3-vN9rT1")
    with pytest.raises(SettingsError, match=r"too short \(10 characters, at least 32\)"):
        load_settings()


def test_no_secret_key_at_all_is_refused_by_default():
    with pytest.raises(SettingsError, match="KINHBAC_SECRET_KEY is a placeholder"):
        load_settings()


def test_development_accepts_the_placeholder(monkeypatch):
    monkeypatch.setenv("KINHBAC_ENV", "development")
    assert load_settings().secret_key == "changethis"


def test_a_real_key_starts_in_production(monkeypatch):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", GOOD_KEY)
    settings = load_settings()
    assert settings.env == "production"
    assert settings.secret_key == GOOD_KEY


def test_unknown_env_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv("KINHBAC_ENV", "staging")
    with pytest.raises(SettingsError, match="^env: "):
        load_settings(secret_key=GOOD_KEY)


def test_default_database_is_sqlite_in_data_of_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(secret_key=GOOD_KEY)
    assert settings.database == f"sqlite:///{tmp_path.resolve()}/data/fleet.sqlite3"


def test_default_database_sits_next_to_the_config_file(tmp_path):
    config = tmp_path / "etc" / "fleet.toml"
    config.parent.mkdir()
    config.write_text(f'secret_key = "{GOOD_KEY}"\n')
    settings = load_settings(config)
    assert settings.database == f"sqlite:///{config.parent.resolve()}/data/fleet.sqlite3"


def test_environment_wins_over_the_config_file(monkeypatch, tmp_path):
    config = tmp_path / "fleet.toml"
    config.write_text(f'secret_key = "{GOOD_KEY}"\ndatabase_url = "sqlite:///from-file.db"\n')
    monkeypatch.setenv("KINHBAC_DATABASE_URL", "postgresql://fleet@db.example/fleet")
    assert load_settings(config).database == "postgresql+psycopg://fleet@db.example/fleet"


@pytest.mark.parametrize("url", ["postgres://u@h/db", "postgresql://u@h/db"])
def test_postgresql_urls_use_psycopg_3(url):
    assert load_settings(secret_key=GOOD_KEY, database_url=url).database == (
        "postgresql+psycopg://u@h/db"
    )


def test_other_databases_are_refused_naming_the_setting():
    with pytest.raises(SettingsError, match="^database_url: use a sqlite:/// or postgresql://"):
        load_settings(secret_key=GOOD_KEY, database_url="mysql://u@h/db")


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("secret_key = \n")
    with pytest.raises(SettingsError, match=f"{broken} is not valid TOML"):
        load_settings(Path(broken))


@pytest.mark.parametrize(("token", "why"), [("short", "is too short (5 characters"),
                                            ("changeme" * 5, "is a placeholder")])
def test_a_weak_metrics_token_is_refused_outside_development(monkeypatch, token, why):
    # /metrics is reachable from the internet through the proxy: the token is its only lock.
    monkeypatch.setenv("KINHBAC_SECRET_KEY", GOOD_KEY)
    monkeypatch.setenv("KINHBAC_METRICS_TOKEN", token)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert str(refused.value).startswith(f"KINHBAC_METRICS_TOKEN {why}")
    monkeypatch.setenv("KINHBAC_ENV", "development")
    assert load_settings().metrics_token.get_secret_value() == token


def test_metrics_token_is_unset_by_default_and_kept_secret(monkeypatch):
    monkeypatch.setenv("KINHBAC_SECRET_KEY", GOOD_KEY)
    assert load_settings().metrics_token is None
    monkeypatch.setenv("KINHBAC_METRICS_TOKEN", GOOD_KEY[::-1])
    settings = load_settings()
    assert settings.metrics_token.get_secret_value() == GOOD_KEY[::-1]
    assert GOOD_KEY[::-1] not in repr(settings)
