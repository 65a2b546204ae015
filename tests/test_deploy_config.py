"""The deployment kit (``deploy/``) checked without a container engine or a cluster.

Why: CI can start neither Docker nor Kubernetes, so a mistyped volume, a CLI
flag renamed in the code, a data folder mounted writable or an ``--insecure``
slipped into a recipe would otherwise first show at a hospital.  Every recipe
is parsed, its commands go through the project's real argument parsers, and
the Kubernetes objects are checked against a schema of the fields they use
(plus the full upstream schemas when ``kubernetes-validate`` is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import re
import shlex
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from client.cli import build_parser as client_parser
from common.configfile import load_config
from server.cli import build_parser as server_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
HOSPITALS = ("hospital1", "hospital2", "hospital3")
KEY_JOBS = tuple(f"{h}-key" for h in HOSPITALS)
TORCH_PIN = "torch==2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NEVER_IN_IMAGE = ("data", "runs", ".venv", "tests")
PORT = 9092


# --------------------------------------------------------------------- helpers

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Compose-style ``${VAR:-default}`` resolved to its default: what a bare ``docker compose up`` uses."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict), "deploy/compose.yaml: the top level must be a mapping"
    return data


@pytest.fixture(scope="module")
def compose(compose_raw: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = interpolate(compose_raw)
    return resolved


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind" or "volume"
    source: str
    target: str
    read_only: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's volumes, short (``src:dst[:ro]``) or long syntax, normalised."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
            kind = "bind" if source.startswith((".", "/", "~", "$")) else "volume"
            out.append(Mount(kind, source, target, ro))
        else:
            out.append(Mount(v["type"], str(v["source"]), v["target"], bool(v.get("read_only", False))))
    return out


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions with continuation lines joined and comments dropped."""
    lines = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined: list[str] = []
    buf = ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            joined.append(buf.strip())
        buf = ""
    out: list[Instruction] = []
    stage = ""
    for ln in joined:
        keyword, _, args = ln.partition(" ")
        if keyword.upper() == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, flags=re.IGNORECASE)
            stage = m.group(1) if m else args
        out.append(Instruction(stage, keyword.upper(), args.strip()))
    return out


def stage_chain(instructions: list[Instruction], stage: str) -> list[Instruction]:
    """Instructions that make up ``stage``: its parents' first (``FROM parent AS stage``)."""
    own = [i for i in instructions if i.stage == stage]
    assert own, f"deploy/Dockerfile: no stage named {stage!r}"
    parent = own[0].args.split()[0]
    stages = {i.stage for i in instructions}
    return (stage_chain(instructions, parent) if parent in stages else []) + own


def exec_form(args: str) -> list[str]:
    """``["a", "b"]`` (Dockerfile exec form) as a list; shell form is rejected."""
    value = yaml.safe_load(args)
    assert isinstance(value, list), f"deploy/Dockerfile: use the exec form (JSON list), not {args!r}"
    return [str(v) for v in value]


def parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    """Parse ``argv`` with the project's real CLI parser; a bad flag fails naming the recipe."""
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(argv)!r} is not accepted by {parser.prog} (see stderr)")


def entrypoint_of_target(target: str) -> list[str]:
    found = [i for i in stage_chain(dockerfile(), target) if i.keyword == "ENTRYPOINT"]
    assert found, f"deploy/Dockerfile: stage {target!r} has no ENTRYPOINT"
    return exec_form(found[-1].args)


def service_argv(service: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint (the service's, or its image target's) + command."""
    entry = service.get("entrypoint") or entrypoint_of_target(service["build"]["target"])
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return [str(a) for a in entry + command]


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def k8s_by_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for _, obj in k8s_objects() if obj.get("kind") == kind]


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------- compose.yaml


def test_compose_has_the_coordinating_site_three_hospitals_and_the_certs_job(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"certs", "server", *HOSPITALS, *KEY_JOBS}


def test_every_service_builds_the_project_image_from_the_repo_root(compose: dict[str, Any]) -> None:
    targets = {i.stage for i in dockerfile()}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        assert build, f"compose service {name}: no build section (it must use the project image)"
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO, f"compose service {name}: build context {context} is not the repository root"
        assert (context / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile", (
            f"compose service {name}: dockerfile"
        )
        assert build.get("target") in targets, (
            f"compose service {name}: target {build.get('target')!r} not in {targets}"
        )
        assert str(svc.get("image", "")).startswith("sacral-fl-"), (
            f"compose service {name}: image {svc.get('image')!r}"
        )
    roles = {name: svc["build"]["target"] for name, svc in compose["services"].items()}
    assert roles == {
        "certs": "server",
        "server": "server",
        **dict.fromkeys(HOSPITALS, "client"),
        **dict.fromkeys(KEY_JOBS, "client"),
    }


def test_nothing_runs_without_tls(compose_raw: dict[str, Any]) -> None:
    texts = {
        p.relative_to(REPO): p.read_text()
        for p in [DEPLOY / "compose.yaml", DEPLOY / "Dockerfile", *K8S.glob("*.yaml")]
    }
    for path, text in texts.items():
        assert "--insecure" not in text, f"{path}: --insecure must not appear in a deployment recipe"


def test_server_command_is_accepted_by_flower_server_with_tls(compose: dict[str, Any]) -> None:
    svc = compose["services"]["server"]
    argv = service_argv(svc)
    assert argv[0] == "flower-server", f"compose server runs {argv[0]!r}"
    args = parse(server_parser(), argv[1:], "deploy/compose.yaml server")
    assert args.command == "run" and not args.insecure
    assert args.certs and args.port == PORT and args.host == "0.0.0.0"  # nginx's address in the container
    assert args.expected_sites == len(HOSPITALS)
    assert args.enroll and not args.open_enrolment, "enrolment must be on: --enroll DIR"
    enrolled = next(m for m in mounts(svc) if m.target == args.enroll)
    assert enrolled.kind == "volume" and enrolled.read_only
    for job in KEY_JOBS:
        assert svc["depends_on"][job]["condition"] == "service_completed_successfully", job
        assert enrolled.source in {m.source for m in mounts(compose["services"][job])}, job
    tls = next(m for m in mounts(svc) if m.target == args.certs)
    assert tls.kind == "volume" and tls.read_only, "the server's TLS folder must be a read-only volume"
    cfg = next(m for m in mounts(svc) if m.target == args.config)
    assert cfg.kind == "bind" and cfg.read_only, "the experiment YAML must be mounted read-only"
    assert (DEPLOY / cfg.source).is_file(), (
        f"default experiment file {cfg.source} missing next to compose.yaml"
    )
    runs = [m for m in mounts(svc) if m.kind == "volume" and not m.read_only]
    assert args.run_dir and any(Path(args.run_dir).is_relative_to(m.target) for m in runs), (
        f"the run folder {args.run_dir} is not on a writable volume: results would be lost with the container"
    )


def test_hospital_commands_are_accepted_by_flower_client_with_the_ca(compose: dict[str, Any]) -> None:
    for name in HOSPITALS:
        svc = compose["services"][name]
        argv = service_argv(svc)
        assert argv[0] == "flower-client", f"compose {name} runs {argv[0]!r}"
        args = parse(client_parser(), argv[1:], f"deploy/compose.yaml {name}")
        assert args.command == "run" and not args.insecure and args.root_cert, f"{name}: TLS with --root-cert"
        assert args.site == name, f"{name}: --site {args.site!r} differs from the service name"
        assert args.server == f"server:{PORT}", f"{name}: --server {args.server!r}"
        by_target = {m.target: m for m in mounts(svc)}
        key_dir = str(Path(args.auth_key).parent) if args.auth_key else ""
        assert key_dir in by_target and by_target[key_dir].read_only, f"{name}: its enrolled key, read-only"
        assert Path(args.auth_key).name == name, f"{name}: the key made for another site"
        data = by_target.get(args.site_dir)
        assert data is not None and data.kind == "bind", (
            f"{name}: the site folder {args.site_dir} is not a bind mount"
        )
        assert data.read_only, f"{name}: the hospital's data folder must be mounted read-only"
        ca_dir = str(Path(args.root_cert).parent)
        assert ca_dir in by_target and by_target[ca_dir].read_only, f"{name}: the CA folder must be read-only"
        assert args.out and args.out in by_target and by_target[args.out].kind == "volume", (
            f"{name}: outputs on a named volume"
        )


def test_hospital_data_paths_come_from_env_vars_with_defaults(compose_raw: dict[str, Any]) -> None:
    for i, name in enumerate(HOSPITALS, start=1):
        sources = [
            v["source"]
            for v in compose_raw["services"][name]["volumes"]
            if isinstance(v, dict) and v["target"] == "/data"
        ]
        assert len(sources) == 1 and re.fullmatch(rf"\$\{{HOSPITAL{i}_DATA:-[^}}]+\}}", sources[0]), (
            f"{name}: {sources}"
        )


def test_hospitals_see_only_the_ca_certificate(compose: dict[str, Any]) -> None:
    certs = compose["services"]["certs"]
    ca_volume = next(m.source for m in mounts(certs) if m.target == "/ca")
    for name in HOSPITALS:
        volumes = {m.source for m in mounts(compose["services"][name]) if m.kind == "volume"}
        assert ca_volume in volumes, f"{name}: does not mount the CA volume {ca_volume!r}"
        # its own key pair is shared with its own key job only
        own_key = {m.source for m in mounts(compose["services"][f"{name}-key"]) if m.target == "/key"}
        others = {
            m.source
            for svc, s in compose["services"].items()
            if svc not in HOSPITALS and svc != f"{name}-key"
            for m in mounts(s)
        } - {ca_volume}
        volumes -= own_key
        assert not volumes & others, (
            f"{name}: mounts volumes of other services: {volumes & others} (keys must not reach hospitals)"
        )


def test_only_the_server_publishes_a_port(compose: dict[str, Any]) -> None:
    published = []
    for p in compose["services"]["server"].get("ports", []):
        assert isinstance(p, str) and p.count(":") == 2, f"server port {p!r}: give the host address"
        host_ip, _, target = p.split(":")
        assert host_ip == "127.0.0.1", f"server port {p!r}: published on {host_ip} by default, not loopback"
        published.append(int(target.split("/")[0]))
    assert published == [PORT]
    for name in ("certs", *HOSPITALS, *KEY_JOBS):
        svc = compose["services"][name]
        assert not svc.get("ports") and not svc.get("expose"), f"{name} must not publish a port"


def test_certs_job_makes_a_certificate_for_the_names_hospitals_dial(compose: dict[str, Any]) -> None:
    script = " ".join(service_argv(compose["services"]["certs"]))
    words = (
        shlex.split(script.split("flower-server", 1)[1].split(";")[0]) if "flower-server" in script else []
    )
    assert words, "the certs service must run `flower-server certs`"
    args = parse(server_parser(), words, "deploy/compose.yaml certs")
    assert args.command == "certs"
    hosts = args.hosts.split(",")
    assert "server" in hosts and "127.0.0.1" in hosts, (
        f"certificate names {hosts}: need the service name and loopback"
    )


def test_startup_order_restarts_and_limits(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["server"]["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert all(services["server"]["depends_on"][j]["condition"] == "service_completed_successfully" for j in KEY_JOBS)
    assert services["server"].get("healthcheck", {}).get("test"), (
        "the hospitals wait for the server's health check"
    )
    for name in ("server", *HOSPITALS):
        svc = services[name]
        assert str(svc.get("restart", "no")).startswith(("on-failure", "unless-stopped", "always")), name
        assert svc.get("init") is True, (
            f"{name}: needs an init process (PID 1 must reap the Flower processes)"
        )
        grace = re.fullmatch(r"(\d+)s", str(svc.get("stop_grace_period", "10s")))
        assert grace and int(grace.group(1)) >= 20, (
            f"{name}: flower-client/-server need >10 s to stop their children"
        )
    for name in HOSPITALS:
        svc = services[name]
        assert svc["depends_on"]["server"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully", name
        limits = svc["deploy"]["resources"]["limits"]
        assert float(limits["cpus"]) > 0 and re.fullmatch(r"\d+[kmg]?b?", str(limits["memory"]).lower()), (
            f"{name}: {limits}"
        )


def test_every_writable_mount_is_a_named_volume(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        assert svc.get("read_only") is True, f"{name}: the root filesystem should be read-only"
        for m in mounts(svc):
            assert m.kind == "volume" or m.read_only, f"{name}: host path {m.source} mounted writable"
            assert m.kind != "volume" or m.source in declared, f"{name}: volume {m.source} is not declared"


def test_site_names_match_the_experiment_config(compose: dict[str, Any]) -> None:
    cfg = load_config(DEPLOY / "experiment.yaml")
    assert tuple(s.name for s in cfg.sites) == HOSPITALS


def test_dockerfile_installs_the_hashed_lock_with_cpu_torch_before_the_project() -> None:
    runs = [i for i in dockerfile() if i.keyword == "RUN"]
    lock_at = [k for k, i in enumerate(runs) if "-r /tmp/requirements.lock" in i.args]
    project_at = [k for k, i in enumerate(runs) if re.search(r"pip install .*(-e )?\.(\s|$)", i.args)]
    assert lock_at, "deploy/Dockerfile: no RUN installs requirements.lock"
    lock_run = runs[lock_at[0]].args
    for flag in ("--require-hashes", "--no-deps", f"--index-url {TORCH_CPU_INDEX}"):
        assert flag in lock_run, f"deploy/Dockerfile: the lock install lacks {flag}"
    assert project_at and lock_at[0] < project_at[0], "the lock must be installed before the project"
    assert "--no-deps" in runs[project_at[0]].args, "the project install must add nothing outside the lock"
    for run in runs:
        for step in run.args.split("&&"):
            words = shlex.split(step)
            if words[:2] == ["pip", "install"]:
                assert not any(w.startswith("torch") for w in words), (
                    f"deploy/Dockerfile: torch installed outside the lock: {step}"
                )


def test_lock_file_pins_every_distribution_by_hash_and_torch_to_the_cpu_build() -> None:
    text = (REPO / "requirements.lock").read_text().replace("\\\n", " ")
    entries = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(entries) > 20
    names = set()
    for words in entries:
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[^\s=]+", words[0]), f"requirements.lock: not an exact pin: {words}"
        assert any(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", w) for w in words[1:]), f"no hash: {words[0]}"
        names.add(words[0].split("==")[0].lower())
    assert f"{TORCH_PIN}+cpu" in {w[0] for w in entries}, "torch must be the CPU build 2.13.0"
    assert not any(n.startswith("nvidia") or "cuda" in n for n in names), "a CUDA package in the lock"
    assert {"flwr", "monai", "opacus", "setuptools"} <= names
    assert "sacral-fl" not in names


def test_dockerfile_copies_only_named_sources() -> None:
    copies = [i for i in dockerfile() if i.keyword in ("COPY", "ADD")]
    assert copies, "deploy/Dockerfile copies nothing"
    sources: list[str] = []
    for c in copies:
        assert c.keyword == "COPY", f"deploy/Dockerfile: use COPY, not ADD ({c.args})"
        words = [w for w in c.args.split() if not w.startswith("--")]
        sources += words[:-1]
    for src in sources:
        top = Path(src.rstrip("/")).parts[0]
        assert src not in (".", "./", "*") and top not in NEVER_IN_IMAGE, f"deploy/Dockerfile copies {src}"
        assert (REPO / src).exists(), f"deploy/Dockerfile copies {src}, which the repository does not have"
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "common/", "client/", "server/", "simulation/"):
        assert needed in sources, f"deploy/Dockerfile does not copy {needed}"


def test_dockerfile_targets_run_the_cli_as_a_non_root_user_with_a_health_check() -> None:
    instructions = dockerfile()
    assert instructions[0].keyword in ("ARG", "FROM")
    froms = [i for i in instructions if i.keyword == "FROM"]
    base_arg = next(
        (i.args for i in instructions if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE=")), ""
    )
    assert froms[0].args.split()[0] in ("python:3.11-slim", "${PYTHON_IMAGE}") and (
        froms[0].args.startswith("python:3.11-slim") or base_arg == "PYTHON_IMAGE=python:3.11-slim"
    ), "the base image must be python:3.11-slim"
    for target, command in (("server", "flower-server"), ("client", "flower-client")):
        chain = stage_chain(instructions, target)
        users = [i.args for i in chain if i.keyword == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"stage {target}: runs as root"
        assert entrypoint_of_target(target) == [command], f"stage {target}: ENTRYPOINT"
        checks = [i.args for i in chain if i.keyword == "HEALTHCHECK"]
        assert checks and "CMD" in checks[-1], f"stage {target}: no HEALTHCHECK"
        assert "sacral-fl-healthcheck" in checks[-1] and target in checks[-1]
    assert any(i.keyword == "EXPOSE" and str(PORT) in i.args for i in stage_chain(instructions, "server"))


def test_no_key_material_in_the_kit() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".key", ".crt", ".pem"), f"{path}: certificate or key file in the kit"
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), (
                f"{path}: contains a private key"
            )


# ------------------------------------------------------------------- healthcheck


def test_healthcheck_server_sees_a_listening_port(monkeypatch: pytest.MonkeyPatch) -> None:
    hc = load_healthcheck()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        monkeypatch.setenv("SACRAL_FL_PORT", str(port))
        assert hc.main(["healthcheck", "server"]) == 0
    assert hc.main(["healthcheck", "server"]) == 1  # closed now
    assert hc.main(["healthcheck"]) == 1  # usage: unhealthy, never Docker's reserved 2


def test_healthcheck_client_finds_the_supernode_process(tmp_path: Path) -> None:
    hc = load_healthcheck()
    (tmp_path / "self").mkdir()
    (tmp_path / "12").mkdir()
    (tmp_path / "12" / "cmdline").write_bytes(
        b"/usr/local/bin/python\0/usr/local/bin/flower-client\0run\0/data\0"
    )
    assert not hc.process_running("flower-supernode", tmp_path)
    (tmp_path / "34").mkdir()
    (tmp_path / "34" / "cmdline").write_bytes(
        b"/usr/local/bin/python\0/usr/local/bin/flower-supernode\0--superlink\0server:9092\0"
    )
    assert hc.process_running("flower-supernode", tmp_path)
    assert not hc.process_running("client.supernode", tmp_path)
    (tmp_path / "56").mkdir()  # what `flower-client run` starts: Flower's SuperNode with shorter polls
    (tmp_path / "56" / "cmdline").write_bytes(b"/usr/local/bin/python\0-m\0client.supernode\0--superlink\0server:9092\0")
    assert hc.process_running("client.supernode", tmp_path)


# ------------------------------------------------------------------ Kubernetes

_STR = {"type": "string", "minLength": 1}
_INT_OR_NAME = {"type": ["integer", "string"]}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "namespace": _STR,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_QUANTITIES = {
    "type": "object",
    "required": ["cpu", "memory"],
    "properties": {
        "cpu": {"type": "string", "pattern": r"^\d+(\.\d+)?m?$"},
        "memory": {"type": "string", "pattern": r"^\d+(Ki|Mi|Gi|Ti)?$"},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image", "resources", "securityContext"],
    "properties": {
        "name": _STR,
        "image": _STR,
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {
                    "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "name": _STR,
                    "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                },
            },
        },
        "resources": {
            "type": "object",
            "required": ["requests", "limits"],
            "properties": {"requests": _QUANTITIES, "limits": _QUANTITIES},
        },
        "securityContext": {
            "type": "object",
            "required": ["allowPrivilegeEscalation", "readOnlyRootFilesystem"],
            "properties": {
                "allowPrivilegeEscalation": {"const": False},
                "readOnlyRootFilesystem": {"const": True},
            },
        },
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "properties": {"readOnly": {"type": "boolean"}},
            },
        },
    },
}
_POD = {
    "type": "object",
    "required": ["containers", "securityContext"],
    "properties": {
        "restartPolicy": {"enum": ["Never", "OnFailure"]},
        "securityContext": {
            "type": "object",
            "required": ["runAsNonRoot"],
            "properties": {"runAsNonRoot": {"const": True}},
        },
        "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
        "volumes": {"type": "array", "items": {"type": "object", "required": ["name"], "minProperties": 2}},
    },
}
K8S_SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": {
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {"apiVersion": {"const": "v1"}},
    },
    "ConfigMap": {
        "required": ["data"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "data": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "PersistentVolumeClaim": {
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "spec": {
                "type": "object",
                "required": ["accessModes", "resources"],
                "properties": {
                    "accessModes": {"type": "array", "minItems": 1},
                    "resources": {
                        "type": "object",
                        "required": ["requests"],
                        "properties": {"requests": {"type": "object", "required": ["storage"]}},
                    },
                },
            },
        },
    },
    "Job": {
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "batch/v1"},
            "spec": {
                "type": "object",
                "required": ["template"],
                "properties": {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "template": {"type": "object", "required": ["spec"], "properties": {"spec": _POD}},
                },
            },
        },
    },
    "Service": {
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "v1"},
            "spec": {
                "type": "object",
                "required": ["ports", "selector"],
                "properties": {
                    "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    "ports": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "integer"},
                                "targetPort": _INT_OR_NAME,
                                "protocol": {"enum": ["TCP"]},
                            },
                        },
                    },
                },
            },
        },
    },
    "NetworkPolicy": {
        "required": ["spec"],
        "properties": {
            "apiVersion": {"const": "networking.k8s.io/v1"},
            "spec": {"type": "object", "required": ["podSelector", "policyTypes"]},
        },
    },
}


def test_every_k8s_manifest_parses_into_named_objects() -> None:
    files = sorted(K8S.glob("*.yaml"))
    assert len(files) >= 5
    seen: set[str] = set()
    for path, obj in k8s_objects():
        assert isinstance(obj, dict), f"{path.name}: a document is not a mapping"
        for key in ("apiVersion", "kind"):
            assert obj.get(key), f"{path.name}: object without {key}"
        assert (obj.get("metadata") or {}).get("name"), f"{path.name}: {obj['kind']} without metadata.name"
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "sacral-fl", (
                f"{path.name}: {obj['kind']} outside the namespace"
            )
        seen.add(obj["kind"])
    assert seen >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Job", "Service"}
    assert "Secret" not in seen, "TLS keys must not be committed: the Secret is created with kubectl"


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    images = {i["name"] for i in kust.get("images", [])}
    assert images == {
        c["image"].split(":")[0]
        for job in k8s_by_kind("Job")
        for c in job["spec"]["template"]["spec"]["containers"]
    }


def test_k8s_objects_match_the_schema_of_their_kind() -> None:
    for path, obj in k8s_objects():
        kind = obj["kind"]
        assert kind in K8S_SCHEMAS, f"{path.name}: no schema here for kind {kind}: add one"
        schema = {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata"],
            "properties": {"metadata": _META},
            "allOf": [K8S_SCHEMAS[kind]],
        }
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.absolute_path)
        )
        assert not errors, f"{path.name} ({kind}): " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_k8s_schema_check_can_fail() -> None:
    job = yaml.safe_load((K8S / "server-job.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    job["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9092"
    schema = {"allOf": [K8S_SCHEMAS["Job"]]}
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(job))) == 2


def test_k8s_manifests_pass_the_upstream_schemas() -> None:
    """Full Kubernetes OpenAPI schemas, offline, when ``kubernetes-validate`` is installed."""
    import kubernetes_validate as kv  # a dev dependency: the upstream schemas, offline
    for path, obj in k8s_objects():
        try:
            kv.validate(obj, "1.30.0", strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{path.name} ({obj['kind']}): {exc}")


def test_server_job_runs_flower_server_with_tls_from_the_secret() -> None:
    (job,) = k8s_by_kind("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse(server_parser(), [str(a) for a in container["args"]], "deploy/k8s/server-job.yaml")
    assert args.command == "run" and not args.insecure and args.port == PORT and args.host == "0.0.0.0"
    mounts_by_path = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert args.enroll and not args.open_enrolment, "enrolment must be on: --enroll DIR"
    enrolled = mounts_by_path[args.enroll]
    assert enrolled.get("readOnly") is True
    assert volumes[enrolled["name"]]["configMap"]["name"] == "sacral-fl-enrolled"
    tls = mounts_by_path[args.certs]
    assert tls.get("readOnly") is True
    secret = volumes[tls["name"]]["secret"]
    assert secret["secretName"] == "sacral-fl-tls"
    assert {i["key"] for i in secret["items"]} == {"ca.crt", "server.crt", "server.key"}, (
        "ca.key stays offline"
    )
    config_mount = mounts_by_path[str(Path(args.config).parent)]
    (cm,) = k8s_by_kind("ConfigMap")
    assert volumes[config_mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert Path(args.config).name in cm["data"]
    runs = next(m for m in container["volumeMounts"] if volumes[m["name"]].get("persistentVolumeClaim"))
    (pvc,) = k8s_by_kind("PersistentVolumeClaim")
    assert volumes[runs["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert args.run_dir and Path(args.run_dir).is_relative_to(runs["mountPath"]), (
        f"run folder {args.run_dir} not on the PVC"
    )
    assert "/tmp" in mounts_by_path, "a writable /tmp is needed with a read-only root filesystem"


def test_configmap_carries_the_same_experiment_as_compose() -> None:
    (cm,) = k8s_by_kind("ConfigMap")
    assert cm["data"]["experiment.yaml"] == (DEPLOY / "experiment.yaml").read_text()


def test_service_exposes_the_server_port_to_the_job_pods() -> None:
    (svc,) = k8s_by_kind("Service")
    (job,) = k8s_by_kind("Job")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["type"] in ("LoadBalancer", "NodePort")
    assert svc["spec"]["selector"].items() <= labels.items(), "the Service selects no server pod"
    (port,) = svc["spec"]["ports"]
    container_ports = {
        p.get("name"): p["containerPort"] for p in job["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    target = port.get("targetPort", port["port"])
    assert port["port"] == PORT and container_ports.get(target, target) == PORT


def test_k8s_inbound_is_limited_to_listed_sources() -> None:
    (svc,) = k8s_by_kind("Service")
    ranges = svc["spec"].get("loadBalancerSourceRanges") or []
    assert ranges and all(ipaddress.ip_network(r) for r in ranges), "loadBalancerSourceRanges must be set"
    assert "0.0.0.0/0" not in ranges
    (policy,) = k8s_by_kind("NetworkPolicy")
    for rule in policy["spec"]["ingress"]:
        sources = rule.get("from") or []
        assert sources, "a NetworkPolicy ingress rule without `from` admits every source"
        for src in sources:
            cidr = src.get("ipBlock", {}).get("cidr")
            assert cidr and ipaddress.ip_network(cidr).prefixlen > 0, f"ingress from {src}"
