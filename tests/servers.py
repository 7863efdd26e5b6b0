"""The processes of the distributed path, for tests, benchmarks and people: Kafka and Redis
servers, and a Faust worker.

The servers (``start_servers``) are used by the integration tests and bench/freshness.py.

Where they come from, first match wins:

1. ``PPM__KAFKA__BOOTSTRAP`` and ``PPM__REDIS__URL`` both set (ppm's own configuration
   variables, as ``infra/up`` prints them): servers someone else runs (CI service
   containers, a developer's own). They cannot be restarted from here.
2. A Docker engine answers (``docker info``) and the ``testcontainers`` package is installed
   (the ``dev`` extra has it): throw-away containers of ``apache/kafka:4.1.1`` (KRaft) and
   ``redis:7``, published on 127.0.0.1 only (``ContainerServers``).
3. Otherwise local processes: ``infra/up`` (a Kafka 4 broker from Maven Central jars and
   Debian's redis-server) into a temporary RUN_DIR, ``infra/down`` at the end. These can be
   stopped and started again mid-test with their ports and Kafka data kept.

Every choice ends with the project's topics created (``streams.topics``), as ``infra/up``
does. A server that cannot be started is an error, never a skipped test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parents[1]
INFRA_UP = REPO / "infra" / "up"
INFRA_DOWN = REPO / "infra" / "down"

KAFKA_IMAGE = "apache/kafka:4.1.1"
REDIS_IMAGE = "redis:7"


class Servers:
    """A Kafka bootstrap address and a Redis URL, and (where supported) restarts."""

    kafka_bootstrap: str
    redis_url: str
    can_restart = False
    """Whether stop_*/start_* work; tests that need them use ``restartable_servers``."""

    def stop_kafka(self) -> None:
        raise NotImplementedError(self._no_restart("Kafka"))

    def start_kafka(self) -> None:
        raise NotImplementedError(self._no_restart("Kafka"))

    def stop_redis(self) -> None:
        raise NotImplementedError(self._no_restart("Redis"))

    def start_redis(self) -> None:
        raise NotImplementedError(self._no_restart("Redis"))

    def close(self) -> None:
        """Stop whatever this object started (nothing for external servers)."""

    def _no_restart(self, what: str) -> str:
        return (f"{type(self).__name__} cannot restart {what}: only local processes "
                "(infra/up) can; use the restartable_servers fixture")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kafka_bootstrap={self.kafka_bootstrap!r}, "
                f"redis_url={self.redis_url!r})")


class ExternalServers(Servers):
    """Servers given by ``PPM__KAFKA__BOOTSTRAP`` and ``PPM__REDIS__URL``; never stopped
    from here."""

    def __init__(self, kafka_bootstrap: str, redis_url: str) -> None:
        self.kafka_bootstrap = kafka_bootstrap
        self.redis_url = redis_url


class LocalServers(Servers):
    """Kafka and Redis as local processes, run by ``infra/up`` and ``infra/down``."""

    can_restart = True

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.kafka_bootstrap = ""
        self.redis_url = ""

    def start(self) -> LocalServers:
        """Start both servers fresh and create the topics; raise with the log tail if not."""
        _run([INFRA_UP, self.run_dir])
        env = dict(line.removeprefix("export ").split("=", 1) for line in
                   (self.run_dir / "env").read_text().splitlines() if "=" in line)
        self.kafka_bootstrap = env["PPM__KAFKA__BOOTSTRAP"]
        self.redis_url = env["PPM__REDIS__URL"]
        return self

    # Same ports and (for Kafka) the same storage after a restart: clients reconnect, and
    # records written before the stop are still there.
    def stop_kafka(self) -> None:
        _run([INFRA_DOWN, "--only", "kafka", self.run_dir])

    def start_kafka(self) -> None:
        _run([INFRA_UP, "--only", "kafka", self.run_dir])

    def stop_redis(self) -> None:
        _run([INFRA_DOWN, "--only", "redis", self.run_dir])

    def start_redis(self) -> None:
        _run([INFRA_UP, "--only", "redis", self.run_dir])

    def close(self) -> None:
        _run([INFRA_DOWN, self.run_dir])


LOOPBACK = "127.0.0.1"
"""The only host address test containers publish on."""


class ContainerServers(Servers):
    """Kafka and Redis in throw-away Docker containers (testcontainers 4.15), published on
    127.0.0.1 only.

    Redis is testcontainers' ``RedisContainer``. Kafka is a plain ``DockerContainer`` of
    ``apache/kafka:4.1.1``, the broker compose and ``infra/up`` run: testcontainers'
    ``KafkaContainer`` starts Confluent's ``cp-kafka`` image through that image's own
    scripts and cannot run this one. testcontainers' ``with_bind_ports`` takes a host port
    but no host address (docker then binds every interface), so the containers' port
    bindings are set as docker-py takes them, ``(address, port)``. Ryuk, testcontainers'
    reaper container, is turned off: it publishes its own port on every interface;
    :meth:`close` removes the containers instead (a test run killed with SIGKILL leaves
    them running: ``docker ps --filter label=org.testcontainers``).

    ``docker_client_kw`` goes to docker's client; ``{"version": "1.44"}`` builds the
    containers without asking an engine (what the unit tests do); they start in
    :meth:`start`.
    """

    def __init__(self, docker_client_kw: dict | None = None) -> None:
        self._containers: list = []
        self.kafka_bootstrap = ""
        self.redis_url = ""
        # Kafka tells clients the address in advertised.listeners, so the host port must be
        # known before the container starts: a free one, bound 1:1 to 9092.
        self.kafka_port = free_port()
        self.kafka = kafka_container(self.kafka_port, docker_client_kw)
        self.redis = redis_container(docker_client_kw)

    def start(self) -> ContainerServers:
        from testcontainers.core.config import testcontainers_config

        testcontainers_config.ryuk_disabled = True
        try:
            self._containers.append(self.kafka.start())
            self._containers.append(self.redis.start())
            self.kafka_bootstrap = f"{LOOPBACK}:{self.kafka_port}"
            self.redis_url = f"redis://{LOOPBACK}:{self.redis.get_exposed_port(6379)}/0"
            wait_redis(self.redis_url, timeout_s=60)
            wait_kafka(self.kafka_bootstrap, timeout_s=120)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        while self._containers:
            self._containers.pop().stop()


def kafka_container(host_port: int, docker_client_kw: dict | None = None):
    """An unstarted ``apache/kafka`` container, one KRaft node, its client listener
    published on ``127.0.0.1:host_port`` and advertised as that address."""
    from testcontainers.core.container import DockerContainer

    kafka = DockerContainer(KAFKA_IMAGE, docker_client_kw=docker_client_kw)
    kafka.with_envs(**kraft_env(),
                    KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://{LOOPBACK}:{host_port}")
    kafka.ports["9092"] = (LOOPBACK, host_port)
    return kafka


def redis_container(docker_client_kw: dict | None = None):
    """An unstarted testcontainers ``RedisContainer`` (no snapshots, no append-only file,
    as in compose), published on a free port of 127.0.0.1."""
    from testcontainers.community.redis import RedisContainer

    redis = RedisContainer(REDIS_IMAGE, docker_client_kw=docker_client_kw)
    redis.with_command(["redis-server", "--save", "", "--appendonly", "no"])
    redis.ports[str(redis.port)] = (LOOPBACK, None)  # None: docker picks the port
    return redis


def kraft_env() -> dict[str, str]:
    """The apache/kafka image's settings for one broker+controller node (KAFKA_X_Y = x.y)."""
    return {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_NUM_PARTITIONS": "4",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "true",
    }


def start_servers(run_dir: Path) -> Servers:
    """Servers by the order in the module doc; ``run_dir`` is used for local processes."""
    bootstrap = os.environ.get("PPM__KAFKA__BOOTSTRAP")
    redis_url = os.environ.get("PPM__REDIS__URL")
    if bootstrap and redis_url:
        servers: Servers = ExternalServers(bootstrap, redis_url)
        wait_kafka(bootstrap, timeout_s=60)
        wait_redis(redis_url, timeout_s=30)
    elif docker_available() and testcontainers_available():
        servers = ContainerServers().start()
    else:
        return LocalServers(run_dir).start()  # infra/up has created the topics
    try:
        ensure_project_topics(servers.kafka_bootstrap)
    except BaseException:
        servers.close()
        raise
    return servers


def ensure_project_topics(bootstrap: str) -> None:
    from ppm.config import KafkaConfig
    from streams.topics import ensure_topics

    ensure_topics(KafkaConfig(bootstrap=bootstrap))


def docker_available() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def testcontainers_available() -> bool:
    try:
        import testcontainers.core.container  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_kafka(bootstrap: str, timeout_s: float) -> None:
    """Wait until the broker answers a metadata request; raise TimeoutError if it never does."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Kafka at {bootstrap} not answering after "
                                   f"{timeout_s:.0f}s: {exc!r}") from exc
        time.sleep(0.5)


def wait_redis(url: str, timeout_s: float) -> None:
    """Wait until Redis answers PING; raise TimeoutError if it never does."""
    import redis

    deadline = time.monotonic() + timeout_s
    while True:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis at {url} not answering after "
                                   f"{timeout_s:.0f}s: {exc!r}") from exc
        finally:
            client.close()
        time.sleep(0.2)


def _run(cmd: list) -> None:
    """Run an infra script; on failure raise with its output (it ends with the log tail)."""
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)} did not finish in 300s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr}{proc.stdout}")


def redis_db_url(url: str, db: int) -> str:
    """``url`` (``redis://host:port[/db]``) with database ``db`` instead of its own."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def worker_env(kafka_bootstrap: str, redis_url: str, name: str, data_dir: Path, redis_db: int,
               **pipeline: object) -> dict[str, str]:
    """The environment of a Faust worker (and of its tester's own ``load_config``) on these
    servers with a world of its own: topics ``items-<name>`` and ``behaviors-<name>``,
    consumer group ``ppm-<name>``, ``data_dir``, Redis database ``redis_db``, and
    ``pipeline.<key>`` settings. ``PPM__REDIS__URL`` alone makes ppm use the Redis store
    yaml."""
    return {**os.environ,
            "PPM__KAFKA__BOOTSTRAP": kafka_bootstrap,
            "PPM__KAFKA__ITEMS_TOPIC": f"items-{name}",
            "PPM__KAFKA__BEHAVIORS_TOPIC": f"behaviors-{name}",
            "PPM__KAFKA__APP_ID": f"ppm-{name}",
            "PPM__DATA_DIR": str(data_dir),
            "PPM__REDIS__URL": redis_db_url(redis_url, redis_db),
            **{f"PPM__PIPELINE__{k.upper()}": str(v) for k, v in pipeline.items()},
            "PYTHONWARNINGS": "ignore::DeprecationWarning"}


class FaustWorker:
    """``faust -A streams.app worker`` as a child process, its output in ``log_path``.

    ``env`` is the worker's whole environment (its config comes from ``PPM__`` variables,
    see ``streams.app``).
    """

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 180) -> FaustWorker:
        """Start and wait until Faust says the worker is ready; raise with the log tail if it
        exits or takes longer than ``timeout_s``."""
        self.starts += 1
        mark = f"--- start {self.starts} ---\n"
        with self.log_path.open("a") as fh:
            fh.write(mark)
        with self.log_path.open("a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "faust"), "-A", "streams.app", "worker",
                 "--without-web", "-l", "info"], cwd=REPO, env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "[^Worker]: Ready" in self.log_path.read_text().split(mark)[-1]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"the worker was not ready in {timeout_s}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up, no final commit."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (Faust stops cleanly), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:]
