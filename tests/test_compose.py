"""infra/docker-compose.yml and the Dockerfile, checked against the code.

There is no Docker engine where this project is developed, so compose is never run here;
these tests read it (and the Dockerfile) as data and hold them to what the code says:
the services, every ``ppm`` command (parsed by ppm's own parser, never run), the Faust
command, every ``PPM__`` name (a field of the typed config), the addresses, the shared data
volume, ports on 127.0.0.1 only, the image's installs (as infra/dev's) and the topics.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import io
import itertools
import re
import shlex
import tomllib
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from ppm.cli.commands import build_parser
from ppm.config import ENV_PREFIX, Config, KafkaConfig, load_config

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "infra" / "docker-compose.yml"
INFRA_DEV = REPO / "infra" / "dev"

SERVICES = {"kafka", "redis", "topics", "worker", "trainer", "server"}
#: The services that run ppm's code, from the one image built from the Dockerfile.
PPM_SERVICES = {"topics", "worker", "trainer", "server"}
#: The ones that read and write the data dir.
DATA_SERVICES = {"worker", "trainer", "server"}
#: Address names of other schemes, replaced by PPM__KAFKA__BOOTSTRAP and PPM__REDIS__URL.
OLD_NAMES = re.compile(r"(?<![A-Z_])(KAFKA_BOOTSTRAP|REDIS_URL|PPM_REDIS)(?![A-Z_])")


# ---------------------------------------------------------------------------------------
# Reading compose and the Dockerfile


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def command_of(service: dict[str, Any]) -> list[str]:
    """A service's command as an argument list (compose takes a list or a shell string)."""
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment (a mapping, or a list of ``KEY=VALUE``) as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def config_path(name: str) -> tuple[str, ...]:
    """``PPM__KAFKA__BOOTSTRAP`` -> ``("kafka", "bootstrap")``: the field of
    :class:`ppm.config.Config` a ``PPM__`` variable sets, walking ``model_fields`` section
    by section; KeyError if there is no such field."""
    if not name.startswith(ENV_PREFIX):
        raise KeyError(f"{name} does not start with {ENV_PREFIX}")
    path = tuple(name[len(ENV_PREFIX):].lower().split("__"))
    model: type[BaseModel] = Config
    for depth, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            raise KeyError(f"{name}: {model.__name__} has no field {part!r}")
        if depth < len(path) - 1:
            section = field.annotation
            if not (isinstance(section, type) and issubclass(section, BaseModel)):
                raise KeyError(f"{name}: {'.'.join(path[:depth + 1])} is not a section")
            model = section
    return path


def parse_ppm(argv: list[str]):
    """Parse a ppm command line as ``ppm`` would, without running it."""
    assert argv[0] == "ppm", argv
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"ppm's parser refuses {shlex.join(argv)!r}:\n{err.getvalue()}")


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def build(services) -> tuple[Path, Path]:
    """The build context and Dockerfile of the ppm image (the same for every ppm service)."""
    builds = {name: services[name].get("build") for name in PPM_SERVICES}
    assert all(builds.values()), f"every ppm service builds the ppm image: {builds}"
    first = next(iter(builds.values()))
    assert all(b == first for b in builds.values()), f"one image for all: {builds}"
    images = {services[name].get("image") for name in PPM_SERVICES}
    assert len(images) == 1, f"one image name for all ppm services: {images}"
    if isinstance(first, str):
        first = {"context": first}
    context = (COMPOSE.parent / first["context"]).resolve()
    dockerfile = context / first.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), dockerfile
    return context, dockerfile


# ---------------------------------------------------------------------------------------
# The helper itself


def test_config_path_walks_the_typed_config():
    assert config_path("PPM__KAFKA__BOOTSTRAP") == ("kafka", "bootstrap")
    assert config_path("PPM__DATA_DIR") == ("data_dir",)
    assert config_path("PPM__SERVING__MAX_BODY_BYTES") == ("serving", "max_body_bytes")
    for bad in ("PPM__KAFKA__BOOTSTRAPS", "PPM__KAFKAS__BOOTSTRAP", "PPM__DATA_DIR__X",
                "KAFKA_BOOTSTRAP", "PPM__KAFKA__BOOTSTRAP__HOST"):
        with pytest.raises(KeyError):
            config_path(bad)


# ---------------------------------------------------------------------------------------
# Services and commands


def test_the_whole_system_is_there(services):
    assert set(services) >= SERVICES, f"missing: {SERVICES - set(services)}"


def test_every_ppm_command_parses(services):
    """Every ``ppm`` command in compose is one ppm's argparse parser accepts."""
    parsed = {name: parse_ppm(command_of(s)) for name, s in services.items()
              if command_of(s)[:1] == ["ppm"]}
    assert PPM_SERVICES - {"worker"} <= set(parsed), parsed
    assert parsed["topics"].command == "topics"
    train = parsed["trainer"]
    assert (train.command, train.follow) == ("train", True)
    serve = parsed["server"]
    assert serve.command == "serve"
    # Reachable through the published port only if it listens on every interface inside.
    assert getattr(serve, "host", None) == "0.0.0.0"
    # The commands its comments tell people to run, too.
    text = COMPOSE.read_text()
    told = re.findall(r"`(ppm [^`]*)`", text) + re.findall(r"exec \S+ (ppm [^#\n]*)", text)
    assert len(told) >= 4, told
    for line in told:
        parse_ppm(shlex.split(line))


def test_the_server_is_published_and_checked_on_its_port(services):
    server = services["server"]
    port = parse_ppm(command_of(server)).port
    published = [str(p).rsplit(":", 1)[-1] for p in server.get("ports", [])]
    assert str(port) in published, (port, published)
    health = " ".join(command_of({"command": server["healthcheck"]["test"]}))
    assert f"127.0.0.1:{port}/ready" in health, health


def test_the_worker_metrics_are_reachable(services):
    """The worker's /metrics (kafka.metrics_host, kafka.metrics_port) listens on every
    interface of its container, on the port compose publishes (on the loopback)."""
    worker = services["worker"]
    cfg = load_config(env={k: v for k, v in env_of(worker).items() if k.startswith(ENV_PREFIX)})
    assert cfg.kafka.metrics_host == "0.0.0.0"
    published = [str(p).rsplit(":", 1)[-1] for p in worker.get("ports", [])]
    assert str(cfg.kafka.metrics_port) in published, (cfg.kafka.metrics_port, published)


def test_the_worker_is_the_faust_app(services):
    """``faust -A streams.app worker ...``: the module exists, defines ``app`` at module
    level, and Faust's own command line accepts the arguments (parsed, not run)."""
    from faust.cli.faust import cli

    argv = command_of(services["worker"])
    assert argv[:3] == ["faust", "-A", "streams.app"], argv
    module = REPO / "streams" / "app.py"
    assert module.is_file()
    tree = ast.parse(module.read_text())
    assert any(isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "app" for t in node.targets)
               for node in tree.body), "streams/app.py defines no module-level app"
    ctx = cli.make_context("faust", argv[1:])
    assert ctx.params["app"] == "streams.app"
    # Click 8.3 keeps the subcommand in protected_args (deprecated; 9.0: in args).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        name, command, rest = cli.resolve_command(ctx, [*ctx.protected_args, *ctx.args])
    assert name == "worker"
    command.make_context(name, rest, parent=ctx)  # raises click.UsageError on a bad option


def test_topics_come_from_ppm(services, compose):
    """Topics are created by ``ppm topics`` (streams/topics.py: event, dead-letter and
    Faust's own topics), and the workers and trainer wait for it to finish."""
    assert "kafka-topics" not in COMPOSE.read_text()
    assert command_of(services["topics"])[:2] == ["ppm", "topics"]
    for name in ("worker", "trainer"):
        needs = services[name].get("depends_on", {})
        assert needs.get("topics", {}).get("condition") == "service_completed_successfully"
    # Topics named anywhere (a --topic or a *_TOPIC variable) are the layout's.
    from streams.topics import faust_topics, topic_layout

    kafka = KafkaConfig()
    names = {t.name for t in topic_layout(kafka)} | {t.name for t in faust_topics(kafka)}
    for service in services.values():
        argv = command_of(service)
        for flag, value in itertools.pairwise(argv):
            if flag == "--topic":
                assert value in names, value
        for key, value in env_of(service).items():
            if key.startswith("PPM__KAFKA__") and key.endswith("_TOPIC"):
                assert value in names, (key, value)
    # Topics the broker creates by itself get the configured partition count.
    kafka_env = env_of(services["kafka"])
    assert int(kafka_env["KAFKA_NUM_PARTITIONS"]) == kafka.partitions


# ---------------------------------------------------------------------------------------
# Configuration names and addresses


def test_every_ppm_name_is_a_config_field(services):
    names = {k for s in services.values() for k in env_of(s) if k.startswith("PPM")}
    assert {"PPM__KAFKA__BOOTSTRAP", "PPM__REDIS__URL", "PPM__DATA_DIR"} <= names, names
    for name in sorted(names):
        config_path(name)  # KeyError names the missing section or field
    for service in services.values():
        ppm_env = {k: v for k, v in env_of(service).items() if k.startswith(ENV_PREFIX)}
        load_config(env=ppm_env)  # the values parse, too


def test_addresses_use_one_scheme(services):
    """No other address names anywhere in compose; the ppm services reach Kafka and Redis
    at the compose services' internal addresses."""
    assert not OLD_NAMES.findall(COMPOSE.read_text())
    advertised = env_of(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")
    internal = {a.split("://", 1)[1] for a in advertised}
    for name in PPM_SERVICES:
        env = env_of(services[name])
        for broker in env["PPM__KAFKA__BOOTSTRAP"].split(","):
            assert broker in internal, (name, broker, internal)
            assert broker.split(":")[0] in services
        url = env["PPM__REDIS__URL"]
        match = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", url)
        assert match, url
        assert match[1] == "redis" and match[2] == "6379", url


def test_ports_bind_the_loopback_only(services):
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)


def test_the_data_dir_is_one_shared_volume(services, compose):
    mounts = set()
    for name in DATA_SERVICES:
        env = env_of(services[name])
        volumes = services[name].get("volumes", [])
        target = env["PPM__DATA_DIR"]
        shared = [v for v in volumes if isinstance(v, str) and v.split(":")[1] == target]
        assert len(shared) == 1, (name, volumes, target)
        source = shared[0].split(":")[0]
        assert source in (compose.get("volumes") or {}), f"{source} is not a named volume"
        mounts.add(shared[0])
    assert len(mounts) == 1, mounts


def test_test_servers_use_the_compose_images(services):
    """tests/servers.py's containers are the brokers compose runs."""
    from tests.servers import KAFKA_IMAGE, REDIS_IMAGE

    assert services["kafka"]["image"] == KAFKA_IMAGE
    assert services["redis"]["image"] == REDIS_IMAGE


# ---------------------------------------------------------------------------------------
# The Dockerfile


def test_the_image_installs_as_infra_dev_does(build):
    _, dockerfile = build
    steps = dockerfile_instructions(dockerfile)
    assert steps[0] == ("FROM", "python:3.11-slim"), steps[0]
    runs = " && ".join(args for op, args in steps if op == "RUN")
    env = " ".join(args for op, args in steps if op == "ENV")
    dev = INFRA_DEV.read_text()
    # The same bootstrap pins, the lock as is without re-resolving, the project editable.
    pins = re.findall(r'"((?:pip|setuptools|wheel)==[^"]+)"', dev)
    assert len(pins) == 3, pins
    for pin in pins:
        assert f'"{pin}"' in runs, pin
    assert "--no-deps -r requirements.lock" in dev
    assert re.search(r"pip install [^&]*--no-deps -r requirements\.lock", runs), runs
    assert re.search(r"--no-deps[^&]* -e \.", dev)
    assert re.search(r"pip install [^&]*--no-deps[^&]* -e \.", runs), runs
    # The photos, and no model hub.
    assert "dataset-fashion-mnist" in re.search(r"DEB_PACKAGES=\(([^)]*)\)", dev)[1]
    assert "dataset-fashion-mnist" in runs
    for offline in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"):
        assert offline in dev and offline in env, offline


def _copied(steps: list[tuple[str, str]]) -> list[str]:
    sources = []
    for op, args in steps:
        if op in ("COPY", "ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def _ignored(source: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(source).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.removeprefix("**/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(PurePosixPath(p).name, pattern)
               for p in prefixes):
            return True
    return False


def test_the_image_copies_what_exists_and_what_the_install_needs(build):
    context, dockerfile = build
    sources = _copied(dockerfile_instructions(dockerfile))
    ignore_file = context / ".dockerignore"
    patterns = [line.strip() for line in ignore_file.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for pattern in (".venv", ".git", ".kafka-libs", "ppm-data"):
        assert pattern in patterns, f".dockerignore does not leave out {pattern}"
    for source in sources:
        assert (context / source).exists(), f"COPY {source}: not in the build context"
        assert not _ignored(source, patterns), f"COPY {source}: left out by .dockerignore"
    # `pip install -e .` needs the metadata and every top-level package of pyproject.
    project = tomllib.loads((context / "pyproject.toml").read_text())
    packages = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    needed = packages | {"requirements.lock", "pyproject.toml", project["project"]["readme"]}
    copied = {PurePosixPath(s).parts[0] for s in sources if s != "."}
    assert "." in sources or needed <= copied, f"not copied: {needed - copied}"
