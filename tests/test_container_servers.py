"""tests/servers.py's container path, checked without a Docker engine: the containers are
configured (published on 127.0.0.1 only, Ryuk off) before anything starts, and without an
engine the servers are local processes. (testcontainers and docker come with the lock:
the dev extra.)"""

from __future__ import annotations

import pytest
from docker.utils import convert_port_bindings

from tests import servers

#: A docker client that never asks an engine for its API version (there is none here).
NO_ENGINE = {"version": "1.44"}


def test_containers_publish_on_the_loopback_only():
    box = servers.ContainerServers(docker_client_kw=NO_ENGINE)
    kafka, redis = box.kafka, box.redis
    assert kafka.image.endswith(servers.KAFKA_IMAGE)
    assert redis.image.endswith(servers.REDIS_IMAGE)
    assert kafka.ports == {"9092": ("127.0.0.1", box.kafka_port)}
    assert redis.ports == {"6379": ("127.0.0.1", None)}
    # What docker-py hands the engine: a host address on every binding, the loopback.
    for container in (kafka, redis):
        bindings = convert_port_bindings(container.ports)
        assert bindings, container
        for binding in bindings.values():
            assert [b["HostIp"] for b in binding] == ["127.0.0.1"], bindings
    assert convert_port_bindings(kafka.ports)["9092/tcp"][0]["HostPort"] == str(box.kafka_port)
    # Clients are told the address they can reach: the published one.
    assert kafka.env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://127.0.0.1:{box.kafka_port}"
    assert kafka.env["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_start_turns_ryuk_off_before_any_container(monkeypatch):
    """Ryuk publishes its port on every interface, so it must be off before the first
    container starts; a failed start removes what did start."""
    from testcontainers.core.config import testcontainers_config
    from testcontainers.core.container import DockerContainer

    monkeypatch.setattr(testcontainers_config, "_ryuk_disabled", False)
    seen = []

    def fake_start(container):
        seen.append((container.image, testcontainers_config.ryuk_disabled,
                     dict(container.ports)))
        if len(seen) == 2:
            raise RuntimeError("no engine")
        return container

    stopped = []
    monkeypatch.setattr(DockerContainer, "start", fake_start)
    monkeypatch.setattr(DockerContainer, "stop", lambda c, *a, **k: stopped.append(c.image))
    box = servers.ContainerServers(docker_client_kw=NO_ENGINE)
    with pytest.raises(RuntimeError, match="no engine"):
        box.start()
    assert [ryuk_off for _, ryuk_off, _ in seen] == [True, True]
    for _, _, ports in seen:
        assert all(host == "127.0.0.1" for host, _ in ports.values()), ports
    assert stopped == [box.kafka.image]  # the Kafka container that had started


@pytest.fixture
def no_external_servers(monkeypatch):
    """No servers named in the environment: with both, start_servers would use them."""
    for name in ("PPM__KAFKA__BOOTSTRAP", "PPM__REDIS__URL"):
        monkeypatch.delenv(name, raising=False)


def test_without_an_engine_the_servers_are_local_processes(monkeypatch, tmp_path,
                                                           no_external_servers):
    monkeypatch.setattr(servers, "docker_available", lambda: False)
    monkeypatch.setattr(servers.LocalServers, "start", lambda self: self)
    monkeypatch.setattr(servers.ContainerServers, "__init__",
                        lambda *a, **k: pytest.fail("no engine, yet containers"))
    assert isinstance(servers.start_servers(tmp_path), servers.LocalServers)


def test_with_an_engine_the_servers_are_containers(monkeypatch, tmp_path, no_external_servers):
    monkeypatch.setattr(servers, "docker_available", lambda: True)
    monkeypatch.setattr(servers.ContainerServers, "start", lambda self: self)
    monkeypatch.setattr(servers, "ensure_project_topics", lambda bootstrap: None)
    monkeypatch.setattr(servers.LocalServers, "start",
                        lambda self: pytest.fail("an engine, yet local processes"))
    original = servers.ContainerServers.__init__
    monkeypatch.setattr(servers.ContainerServers, "__init__",
                        lambda self: original(self, docker_client_kw=NO_ENGINE))
    assert isinstance(servers.start_servers(tmp_path), servers.ContainerServers)
