"""LocalBroker: private mosquitto (and the amqtt fallback) for tests and the demo; TLS; site ACL.

Tests that need mosquitto fail where it is not installed, unless KINHBAC_REQUIRE_MOSQUITTO=0
says that this machine is meant to run without it: then they skip, with the reason in -ra.
"""

import asyncio
import base64
import logging
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest
from helpers.certs import make_tls_material

from kinhbac import broker as broker_module
from kinhbac.broker import (
    BrokerStartFailed,
    BrokerUnavailable,
    LocalBroker,
    TlsFiles,
    mosquitto_password_hash,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
ACL_EXAMPLE = DEPLOY / "acl.example"
RECEIVE_TIMEOUT_S = 5.0
# Accounts named in deploy/mosquitto/acl.example.
SITE_USERS = {"fleet": "fleet-pw", "gw-site-a": "site-a-pw", "gw-site-b": "site-b-pw"}


def mosquitto_broker(workdir: Path, **kwargs) -> LocalBroker:
    """A LocalBroker that must be mosquitto (see the module docstring for where it is absent)."""
    try:
        return LocalBroker(workdir, require_mosquitto=True, **kwargs)
    except BrokerUnavailable as exc:
        if os.environ.get("KINHBAC_REQUIRE_MOSQUITTO") == "0":
            pytest.skip(f"{exc} (KINHBAC_REQUIRE_MOSQUITTO=0)")
        pytest.fail(f"{exc}; or set KINHBAC_REQUIRE_MOSQUITTO=0 to skip the tests that need it")


def unique_topic(prefix: str = "kinhbac/test") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        async for message in client.messages:
            return message
    raise AssertionError("message iterator ended")


async def round_trip(broker: LocalBroker, **client_kwargs) -> None:
    """Publish one QoS 1 message to a subscriber through broker, and check it arrives."""
    topic = unique_topic()
    payload = uuid.uuid4().bytes
    async with aiomqtt.Client(broker.host, broker.port, **client_kwargs) as sub:
        await sub.subscribe(topic, qos=1)
        async with aiomqtt.Client(broker.host, broker.port, **client_kwargs) as pub:
            await pub.publish(topic, payload, qos=1)
        message = await next_message(sub)
    assert message.topic.value == topic
    assert message.payload == payload


async def gateway_publishes_in_and_outside_its_site(broker: LocalBroker, **tls) -> None:
    """Site A's gateway publishes under site B, then site A: the fleet sees only the second."""
    device = uuid.uuid4().hex[:8]
    own = f"kinhbac/site-a/{device}/telemetry"
    foreign = f"kinhbac/site-b/{device}/telemetry"
    async with aiomqtt.Client(
        broker.host, broker.port, username="fleet", password="fleet-pw", **tls
    ) as fleet:
        await fleet.subscribe("kinhbac/#", qos=1)
        async with aiomqtt.Client(
            broker.host, broker.port, username="gw-site-a", password="site-a-pw", **tls
        ) as gateway:
            # One connection keeps its order: had the foreign publish passed, it would come first.
            await gateway.publish(foreign, b"not yours", qos=1)
            await gateway.publish(own, b"reading", qos=1)
        message = await next_message(fleet)
    assert (message.topic.value, message.payload) == (own, b"reading")


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- plain broker ------------------------------------------------------------------------


def test_round_trip_through_local_broker(tmp_path):
    with LocalBroker(tmp_path / "broker") as broker:
        asyncio.run(round_trip(broker))
        assert f"127.0.0.1:{broker.port}" in broker.describe()
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"


def test_mosquitto_describe_names_version_and_address(tmp_path):
    broker = mosquitto_broker(tmp_path / "broker")
    assert broker.kind == "mosquitto"
    assert broker.describe().startswith("mosquitto 2.")
    assert broker.describe().endswith(f" on 127.0.0.1:{broker.port}")


def test_stop_closes_the_port_even_when_the_test_body_fails(tmp_path):
    broker = mosquitto_broker(tmp_path / "broker")
    with pytest.raises(RuntimeError, match="test body"), broker:
        assert accepts_tcp(broker.port)
        raise RuntimeError("test body")
    assert not broker.running
    assert not accepts_tcp(broker.port)


def test_start_failure_shows_the_broker_log(tmp_path):
    missing = tmp_path / "missing.pem"
    tls = TlsFiles(ca_file=missing, cert_file=missing, key_file=missing)
    broker = mosquitto_broker(tmp_path / "broker", tls=tls)
    with pytest.raises(BrokerStartFailed, match="exited") as caught:
        broker.start()
    assert "Error" in caught.value.log_tail
    assert not broker.running


def test_start_refuses_a_port_someone_else_listens_on(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = mosquitto_broker(tmp_path / "broker", port=port)
        with pytest.raises(BrokerStartFailed, match="taken"):
            broker.start()


# -- restarts and persistence ------------------------------------------------------------


async def _leave_retained_and_queued(broker: LocalBroker, retained: str, queued: str) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="ingest-1", clean_session=False
    ) as offline:
        await offline.subscribe(queued, qos=1)
    async with aiomqtt.Client(broker.host, broker.port) as pub:
        await pub.publish(retained, b"retained", qos=1, retain=True)
        await pub.publish(queued, b"queued while offline", qos=1)


async def _read_retained_and_queued(broker: LocalBroker, retained: str) -> list[bytes]:
    got = []
    async with aiomqtt.Client(broker.host, broker.port) as fresh:
        await fresh.subscribe(retained, qos=1)
        got.append((await next_message(fresh)).payload)
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="ingest-1", clean_session=False
    ) as back:
        got.append((await next_message(back)).payload)
    return got


def test_restart_keeps_port_retained_messages_and_sessions(tmp_path):
    retained, queued = unique_topic(), unique_topic()
    with mosquitto_broker(tmp_path / "broker", persistence=True) as broker:
        port = broker.port
        asyncio.run(_leave_retained_and_queued(broker, retained, queued))
        broker.stop()
        assert not accepts_tcp(port)
        broker.start()
        assert broker.port == port
        got = asyncio.run(_read_retained_and_queued(broker, retained))
    assert got == [b"retained", b"queued while offline"]


def test_restart_without_persistence_forgets_retained_messages(tmp_path):
    topic = unique_topic()

    async def publish_retained(broker):
        async with aiomqtt.Client(broker.host, broker.port) as pub:
            await pub.publish(topic, b"retained", qos=1, retain=True)

    async def retained_after_restart(broker):
        async with aiomqtt.Client(broker.host, broker.port) as sub:
            await sub.subscribe(topic, qos=1)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await next_message(sub)

    with mosquitto_broker(tmp_path / "broker") as broker:
        asyncio.run(publish_retained(broker))
        broker.restart()
        asyncio.run(retained_after_restart(broker))


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory):
    return make_tls_material(tmp_path_factory.mktemp("tls"))


def tls_files(material, *, require_client_cert=False) -> TlsFiles:
    return TlsFiles(
        ca_file=material.ca_file,
        cert_file=material.server_cert,
        key_file=material.server_key,
        require_client_cert=require_client_cert,
    )


def test_tls_client_that_trusts_the_ca_exchanges_a_message(tmp_path, tls_material):
    with mosquitto_broker(tmp_path / "broker", tls=tls_files(tls_material)) as broker:
        assert broker.url.startswith("mqtts://")
        params = aiomqtt.TLSParameters(ca_certs=str(tls_material.ca_file))
        asyncio.run(round_trip(broker, tls_params=params))


def test_tls_client_that_trusts_another_ca_is_refused(tmp_path, tls_material):
    async def connect(broker):
        params = aiomqtt.TLSParameters(ca_certs=str(tls_material.other_ca_file))
        async with aiomqtt.Client(broker.host, broker.port, tls_params=params, timeout=5):
            pass

    with (
        mosquitto_broker(tmp_path / "broker", tls=tls_files(tls_material)) as broker,
        pytest.raises(aiomqtt.MqttError, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        asyncio.run(connect(broker))


def test_required_client_certificate_refuses_clients_without_one(tmp_path, tls_material, caplog):
    tls = tls_files(tls_material, require_client_cert=True)
    without_cert = aiomqtt.TLSParameters(ca_certs=str(tls_material.ca_file))
    with_cert = aiomqtt.TLSParameters(
        ca_certs=str(tls_material.ca_file),
        certfile=str(tls_material.client_cert),
        keyfile=str(tls_material.client_key),
    )
    log = logging.getLogger("test_broker.no_client_cert")

    async def connect_without_cert(broker):
        # Under TLS 1.3 the client's handshake completes; the broker's alert comes next, and
        # aiomqtt reports only that CONNACK never came: the client's log has the reason.
        async with aiomqtt.Client(
            broker.host, broker.port, tls_params=without_cert, logger=log, timeout=2
        ):
            pass

    with mosquitto_broker(tmp_path / "broker", tls=tls) as broker:
        with caplog.at_level(logging.DEBUG, logger=log.name), pytest.raises(aiomqtt.MqttError):
            asyncio.run(connect_without_cert(broker))
        assert "CERTIFICATE_REQUIRED" in caplog.text
        asyncio.run(round_trip(broker, tls_params=with_cert))


def test_shipped_mosquitto_conf_example_serves_tls_with_the_acl(tmp_path, tls_material):
    """deploy/mosquitto/mosquitto.conf.example, with its paths moved into tmp_path, runs."""
    probe = mosquitto_broker(tmp_path / "probe")  # finds the binary, or fails as above
    passwd = tmp_path / "passwd"
    broker_module.write_password_file(
        passwd, SITE_USERS, passwd_tool=broker_module.find_mosquitto_passwd()
    )
    moves = {
        "/etc/mosquitto/kinhbac/passwd": passwd,
        "/etc/mosquitto/kinhbac/acl": ACL_EXAMPLE,
        "/etc/mosquitto/kinhbac/ca.pem": tls_material.ca_file,
        "/etc/mosquitto/kinhbac/server.pem": tls_material.server_cert,
        "/etc/mosquitto/kinhbac/server.key": tls_material.server_key,
        "/var/lib/mosquitto/": f"{tmp_path}/",
        "/run/mosquitto/mosquitto.pid": tmp_path / "mosquitto.pid",
        "/var/log/mosquitto/mosquitto.log": tmp_path / "mosquitto.log",
        "listener 8883": f"listener {probe.port} 127.0.0.1",
    }
    text = (DEPLOY / "mosquitto.conf.example").read_text()
    for old, new in moves.items():
        assert old in text, f"mosquitto.conf.example no longer mentions {old}"
        text = text.replace(old, str(new))
    if os.geteuid() == 0:
        text += "user root\n"  # as in LocalBroker: do not drop to a user that cannot read tmp_path
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen([broker_module.find_mosquitto(), "-c", str(conf)])
    try:
        deadline = time.monotonic() + 5
        while not accepts_tcp(probe.port):
            assert proc.poll() is None, (tmp_path / "mosquitto.log").read_text()
            assert time.monotonic() < deadline, "mosquitto did not listen"
            time.sleep(0.01)
        params = aiomqtt.TLSParameters(ca_certs=str(tls_material.ca_file))
        asyncio.run(gateway_publishes_in_and_outside_its_site(probe, tls_params=params))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- users and the site ACL --------------------------------------------------------------


def test_site_acl_confines_a_gateway_to_its_site(tmp_path):
    with mosquitto_broker(tmp_path / "broker", users=SITE_USERS, acl_file=ACL_EXAMPLE) as broker:
        asyncio.run(gateway_publishes_in_and_outside_its_site(broker))


@pytest.mark.parametrize(
    ("username", "password"),
    [(None, None), ("gw-site-a", "wrong"), ("nobody", "site-a-pw")],
    ids=["anonymous", "wrong-password", "unknown-user"],
)
def test_site_broker_refuses_clients_without_an_account(tmp_path, username, password):
    async def connect(broker):
        async with aiomqtt.Client(
            broker.host, broker.port, username=username, password=password, timeout=5
        ):
            pass

    with (
        mosquitto_broker(tmp_path / "broker", users=SITE_USERS, acl_file=ACL_EXAMPLE) as broker,
        pytest.raises(aiomqtt.MqttCodeError, match="[Nn]ot authori[sz]ed"),
    ):
        asyncio.run(connect(broker))


def test_password_hash_matches_mosquitto_passwd():
    # A line mosquitto_passwd 2.0.11 wrote for the password "secret".
    line = (
        "$7$101$NNr1fxzaG99OTWCj$K2ZYmtiqoX3HMzJYN1RfdJ5U4EmPK1w4FGC6+vgtXT8GTVF2LpG7xLu8"
        "jmpdzDrOYACXuGLOPx0YIRBgL1Sabg=="
    )
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_password_hash("secret", salt=salt) == line


def test_passwords_hashed_in_python_work_without_mosquitto_passwd(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "find_mosquitto_passwd", lambda: None)
    users = {"gw-site-a": "site-a-pw"}
    with mosquitto_broker(tmp_path / "broker", users=users) as broker:
        assert "Python" in broker.passwords_note
        assert "mosquitto_passwd not found" in broker.describe()
        asyncio.run(round_trip(broker, username="gw-site-a", password="site-a-pw"))


# -- the amqtt fallback ------------------------------------------------------------------


def test_amqtt_fallback_round_trip_and_restart_on_same_port(tmp_path):
    with LocalBroker(tmp_path / "broker", prefer="amqtt") as broker:
        assert broker.kind == "amqtt"
        assert broker.describe().startswith("embedded amqtt 0.12")
        asyncio.run(round_trip(broker))
        port = broker.port
        broker.stop()
        assert not accepts_tcp(port)
        broker.start()
        assert broker.port == port
        asyncio.run(round_trip(broker))
    assert not accepts_tcp(port)


def test_amqtt_names_the_features_it_cannot_serve(tmp_path):
    with pytest.raises(BrokerUnavailable, match="users, persistence") as caught:
        LocalBroker(tmp_path / "broker", prefer="amqtt", users={"a": "b"}, persistence=True)
    assert caught.value.missing == "mosquitto"


def test_without_mosquitto_the_broker_falls_back_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    monkeypatch.delenv("KINHBAC_REQUIRE_MOSQUITTO", raising=False)
    broker = LocalBroker(tmp_path / "broker")
    assert broker.kind == "amqtt"
    assert "mosquitto is not installed (apt install mosquitto)" in broker.describe()


def test_without_mosquitto_requiring_it_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(broker_module, "find_mosquitto", lambda: None)
    with pytest.raises(BrokerUnavailable, match="apt install mosquitto"):
        LocalBroker(tmp_path / "broker", require_mosquitto=True)
    monkeypatch.setenv("KINHBAC_REQUIRE_MOSQUITTO", "1")
    with pytest.raises(BrokerUnavailable, match="KINHBAC_REQUIRE_MOSQUITTO"):
        LocalBroker(tmp_path / "broker")
