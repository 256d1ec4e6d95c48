"""compose.yaml against the real CLI: every `logitfuse ...` command of a service parses with the command's
own click/typer definition (names, option names, value types, required options), the teacher service
reserves GPUs and its inline teachers.yaml validates, the store is S3-compatible, and the stages run as
one-shot jobs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml

from clients.cli import app

try:  # recent typer vendors its own click: its commands raise that click's exceptions
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - typer on the real click
    from click import UsageError

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "compose.yaml").read_text())
_VAR = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")


def _substitute(text: str) -> str:
    """Compose variable interpolation with each variable unset: its default, else a placeholder."""
    return _VAR.sub(lambda m: m.group(2) if m.group(2) else f"value-of-{m.group(1)}", text)


def _logitfuse_services() -> dict[str, list[str]]:
    out = {}
    for name, svc in COMPOSE["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] == "logitfuse":
            out[name] = [_substitute(str(a)) for a in cmd]
    return out


def test_expected_services_exist():
    services = _logitfuse_services()
    assert {"teachers", "submit", "fuse", "train", "merge", "teachers-ray", "extract-ray"} <= set(services)
    assert [services[s][1] for s in ("teachers", "fuse", "train", "merge")] == ["serve", "fuse", "train", "merge"]


@pytest.mark.parametrize("service", sorted(_logitfuse_services()))
def test_service_command_parses_with_the_cli(service):
    args = _logitfuse_services()[service][1:]
    group = typer.main.get_command(app)
    name = args[0]
    assert name in group.commands, f"{service}: `logitfuse {name}` is not a command ({', '.join(group.commands)})"
    command = group.commands[name]
    rest = args[1:]
    while hasattr(command, "commands"):  # e.g. `logitfuse store verify URI`
        command, rest = command.commands[rest[0]], rest[1:]
    try:
        command.make_context(name, list(rest))
    except UsageError as e:
        pytest.fail(f"compose service {service!r}: `logitfuse {' '.join(args)}` does not parse: {e.format_message()}")


def test_teacher_service_shape():
    from teacher_server.config import parse_config

    teachers = COMPOSE["services"]["teachers"]
    devices = teachers["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    assert "vllm" in teachers["build"]["args"]["EXTRAS"].strip("[]").split(",")
    env = teachers["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    cmd = _logitfuse_services()["teachers"]
    assert cmd[cmd.index("--store") + 1].startswith("s3://")
    cfg = parse_config(yaml.safe_load(COMPOSE["configs"]["teachers"]["content"]), "compose teachers config")
    assert all(t.backend == "vllm" for t in cfg.teachers) and cfg.max_resident == 1
    assert "/config/teachers.yaml" in cmd and teachers["configs"][0]["target"] == "/config/teachers.yaml"
    assert COMPOSE["services"]["minio"]["image"].startswith("minio/")


def test_stages_are_one_shot_jobs():
    for name in ("submit", "fuse", "train", "merge"):
        svc = COMPOSE["services"][name]
        assert svc["restart"] == "no" and svc["profiles"] == ["jobs"], name


def test_ray_head_and_worker():
    """Profile "ray": a Ray head and GPU workers (the image carries the ray extra), both with the store's
    S3 credentials (replicas write shards themselves); the engine-ray service and the `extract --ray` job
    point at the head, and the service's teachers.yaml validates with `engine: ray` teachers."""
    from teacher_server.config import parse_config

    services = COMPOSE["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert "ray" in head["build"]["args"]["EXTRAS"].strip("[]").split(",")
    assert head["command"][:3] == ["ray", "start", "--head"] and "--port=6379" in head["command"]
    assert worker["command"][:3] == ["ray", "start", "--address=ray-head:6379"]
    for svc in (head, worker):
        assert "--block" in svc["command"] and svc["profiles"] == ["ray"]
        assert any("gpu" in d.get("capabilities", []) for d in svc["deploy"]["resources"]["reservations"]["devices"])
        assert svc["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000" and "AWS_SECRET_ACCESS_KEY" in svc["environment"]
    extract = _logitfuse_services()["extract-ray"]
    assert extract[extract.index("--ray") + 1] == "ray-head:6379"
    cfg = parse_config(yaml.safe_load(COMPOSE["configs"]["teachers-ray"]["content"]), "compose teachers-ray config")
    assert cfg.teachers and all(t.engine == "ray" and t.ray.address == "ray-head:6379" for t in cfg.teachers)
    assert services["teachers-ray"]["configs"][0]["source"] == "teachers-ray"
