"""Fixtures for the integration tests: real Kafka and Redis (see servers.py for where from)."""

from __future__ import annotations

import pytest

from tests.servers import LocalServers, Servers, start_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """Kafka and Redis for the whole session, with the project's topics created.

    ``.kafka_bootstrap``, ``.redis_url``; ``stop_kafka()``/``start_kafka()`` and the Redis
    pair work only for local processes (``.can_restart``). Fails, never skips, when the
    servers cannot be started.
    """
    srv = start_servers(tmp_path_factory.mktemp("servers"))
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def restartable_servers(servers: Servers, tmp_path_factory: pytest.TempPathFactory):
    """Servers that can be stopped and started mid-test: ``servers`` when they can, else
    local processes of their own (infra/up), so restart tests run everywhere."""
    if servers.can_restart:
        yield servers
        return
    srv = LocalServers(tmp_path_factory.mktemp("restartable")).start()
    yield srv
    srv.close()
