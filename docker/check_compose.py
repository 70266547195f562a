"""Cross-check docker/compose.yaml and the Dockerfiles beyond what `compose config` validates.

Run by docker/check.sh: ``python3 docker/check_compose.py docker/compose.yaml``. Needs PyYAML only.
Prints every problem found and exits 1 if there is any.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

MODEL_DIR = "/models/tiny-qwen3"
LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}
ROLES = ("prefill", "decode", "gateway")
_DEFAULT = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate_defaults(text: str) -> str:
    """What Compose substitutes with no variable set: `${X:-d}` / `${X-d}` -> d, `${X}` -> ''."""
    return _DEFAULT.sub(lambda m: m.group(2) or "", text)


def flag(command: list[str], name: str) -> str | None:
    """The value of `--name value` or `--name=value` in an argv list."""
    for i, arg in enumerate(command):
        if arg == name and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def dig(mapping: Any, *keys: str) -> Any:
    """mapping[k1][k2]..., or None where a level is missing."""
    for key in keys:
        mapping = mapping.get(key) if isinstance(mapping, dict) else None
    return mapping


def argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return [str(a) for a in command] if isinstance(command, list) else str(command).split()


def role_of(service: dict[str, Any]) -> str | None:
    command = argv(service)
    if len(command) >= 2 and command[0] == "pdserve" and command[1] in ROLES:
        return command[1]
    return None


def profile_of(service: dict[str, Any]) -> str:
    profiles = service.get("profiles") or []
    return ",".join(sorted(profiles)) or "(none)"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a Compose .env file ({} when it is missing)."""
    if not path.is_file():
        return {}
    lines = (ln.strip() for ln in path.read_text().splitlines())
    return dict(ln.split("=", 1) for ln in lines if "=" in ln and not ln.startswith("#"))


def check_compose(path: Path, errors: list[str]) -> None:
    doc = yaml.safe_load(path.read_text())
    services: dict[str, dict[str, Any]] = doc.get("services") or {}
    # Compose 1.x (Debian's docker-compose) rejects the key; the project name lives in docker/.env.
    if "name" in doc:
        errors.append("top-level 'name:': Compose 1.x rejects it; set COMPOSE_PROJECT_NAME in docker/.env")
    env_file = path.with_name(".env")
    env = read_env_file(env_file)
    if env.get("COMPOSE_PROJECT_NAME") != "pdserve" or env.get("COMPOSE_PROFILES") != "cpu":
        errors.append(f"{env_file}: want COMPOSE_PROJECT_NAME=pdserve and COMPOSE_PROFILES=cpu, got {env}")
    if "models" not in (doc.get("volumes") or {}):
        errors.append("top-level volume 'models' is not declared")

    by_profile: dict[str, dict[str, str]] = {}  # profile -> role -> service name
    for name, svc in services.items():
        where = f"service {name!r}"
        profile = profile_of(svc)
        if profile not in ("cpu", "gpu"):
            errors.append(f"{where}: profiles {profile}; want exactly one of cpu, gpu")
        # depends_on: targets exist and are started by the same profile.
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            if dep not in services:
                errors.append(f"{where}: depends_on {dep!r}, which is not a service")
            elif profile_of(services[dep]) not in (profile, "(none)"):
                errors.append(f"{where}: depends_on {dep!r} of profile {profile_of(services[dep])}")
        # Published ports: gateway only, loopback unless told otherwise.
        role = role_of(svc)
        for port in svc.get("ports") or []:
            if role != "gateway":
                errors.append(f"{where}: publishes {port!r}; only the gateway publishes ports")
            spec = interpolate_defaults(str(port))
            host_ip = spec.rsplit(":", 2)[0] if spec.count(":") >= 2 else ""
            if host_ip not in LOOPBACK:
                errors.append(f"{where}: port {port!r} binds {host_ip or 'all interfaces'} by default")
        command = argv(svc)
        if role is None:
            if "make-model" not in " ".join(command) or MODEL_DIR not in " ".join(command):
                errors.append(f"{where}: neither a pdserve service nor `pdserve make-model {MODEL_DIR}`")
            elif not any(str(v).startswith("models:/models") and not str(v).endswith(":ro")
                         for v in svc.get("volumes") or []):  # fmt: skip
                errors.append(f"{where}: makes the model but does not mount volume models at /models rw")
            by_profile.setdefault(profile, {}).setdefault("model", name)
            continue
        if role in by_profile.setdefault(profile, {}):
            errors.append(f"{where}: a second {role} in profile {profile}")
        by_profile[profile][role] = name
        if flag(command, "--model") != MODEL_DIR:
            errors.append(f"{where}: --model {flag(command, '--model')}; want {MODEL_DIR}")
        if not any(str(v).startswith("models:/models") for v in svc.get("volumes") or []):
            errors.append(f"{where}: does not mount volume models at /models")
        if flag(command, "--host") != "0.0.0.0":
            errors.append(f"{where}: --host {flag(command, '--host')}; other containers need 0.0.0.0")
        port = flag(command, "--port")
        if port is None:
            errors.append(f"{where}: no --port")
        # The health check probes this service's own port (gRPC health for prefill/decode, HTTP for
        # the gateway).
        test = " ".join(str(t) for t in (svc.get("healthcheck") or {}).get("test") or [])
        want = f"127.0.0.1:{port}"
        probe = "grpc_health" if role != "gateway" else "/health"
        if want not in test or probe not in test:
            errors.append(f"{where}: healthcheck does not probe {probe} on {want}: {test!r}")
        on_gpu = flag(command, "--device") == "cuda"
        if on_gpu != (profile == "gpu") and role != "gateway":
            errors.append(f"{where}: --device {flag(command, '--device')} in profile {profile}")
        devices = dig(svc, "deploy", "resources", "reservations", "devices")
        if on_gpu and not any(d.get("driver") == "nvidia" for d in devices or []):
            errors.append(f"{where}: --device cuda without an nvidia device reservation")
        if role == "decode" and flag(command, "--advertise-host") != name:
            errors.append(f"{where}: --advertise-host {flag(command, '--advertise-host')}; want {name!r}")
        if role == "gateway":
            published = {interpolate_defaults(str(p)).rsplit(":", 1)[-1] for p in svc.get("ports") or []}
            for f in ("--port", "--grpc-port"):
                if flag(command, f) not in published:
                    errors.append(f"{where}: {f} {flag(command, f)} is not published")

    # Per profile: one model maker, prefill, decode and gateway; the gateway names the other two by
    # service name and --port and waits for them to be healthy.
    for profile, roles in sorted(by_profile.items()):
        for role in ("model", *ROLES):
            if role not in roles:
                errors.append(f"profile {profile}: no {role} service")
        model = roles.get("model")
        for role in ROLES:
            peer = roles.get(role)
            condition = dig(services, peer or "", "depends_on", model or "", "condition")
            if peer and model and condition != "service_completed_successfully":
                errors.append(
                    f"{peer}: depends_on {model} should be condition: service_completed_successfully"
                )
        gw_name = roles.get("gateway")
        if gw_name is None:
            continue
        gw_argv = argv(services[gw_name])
        for role in ("prefill", "decode"):
            peer = roles.get(role)
            if peer is None:
                continue
            target = flag(gw_argv, f"--{role}") or ""
            host, _, port = target.rpartition(":")
            if host != peer:
                errors.append(f"{gw_name}: --{role} {target!r}; the {role} service is {peer!r}")
            listens = flag(argv(services[peer]), "--port")
            if port != listens:
                errors.append(f"{gw_name}: --{role} {target!r}; {peer} listens on {listens}")
            if dig(services, gw_name, "depends_on", peer, "condition") != "service_healthy":
                errors.append(f"{gw_name}: depends_on {peer} should be condition: service_healthy")

    # Images: each one is built by exactly one service and that service's profile is the profile of
    # every service using it (else Compose would try to pull it); every Dockerfile exists and passes.
    builders: dict[str, list[str]] = {}
    for name, svc in services.items():
        if svc.get("build") is not None:
            builders.setdefault(str(svc.get("image")), []).append(name)
    for name, svc in services.items():
        image = str(svc.get("image"))
        built_by = builders.get(image, [])
        if len(built_by) != 1:
            errors.append(f"service {name!r}: image {image} is built by {built_by or 'no service'}; want one")
        elif profile_of(services[built_by[0]]) != profile_of(svc):
            errors.append(f"service {name!r}: image {image} is built by {built_by[0]!r} of another profile")
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (path.parent / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            errors.append(f"service {name!r}: Dockerfile {dockerfile} does not exist")
        else:
            check_dockerfile(dockerfile, context, errors)


_checked: set[Path] = set()


def check_dockerfile(dockerfile: Path, context: Path, errors: list[str]) -> None:
    """COPY sources exist in the context; every package pyproject installs is copied; a non-root USER."""
    if dockerfile in _checked:
        return
    _checked.add(dockerfile)
    where = dockerfile.name
    text = re.sub(r"\\\n", " ", dockerfile.read_text())  # join continuation lines
    instructions = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not instructions or instructions[0].split()[0].upper() not in ("FROM", "ARG"):
        errors.append(f"{where}: does not start with FROM or ARG")
    copied: set[str] = set()
    user = None
    for line in instructions:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "USER":
            user = rest.strip()
        if keyword not in ("COPY", "ADD"):
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        if any(p.startswith("--from") for p in rest.split()):
            continue
        for src in parts[:-1]:
            copied.add(src.strip("/").split("/")[0])
            if not list(context.glob(src.rstrip("/"))):
                errors.append(f"{where}: COPY source {src!r} does not exist in the build context {context}")
    if user is None or user.split(":")[0] in ("root", "0"):
        errors.append(f"{where}: runs as root (no non-root USER)")
    pyproject = context / "pyproject.toml"
    if pyproject.is_file():
        find = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"]["find"]
        for pattern in find.get("include", []):
            package = pattern.rstrip("*").rstrip(".")
            if (context / package).is_dir() and package not in copied:
                errors.append(f"{where}: package {package!r} (pyproject.toml) is not copied into the image")


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("compose.yaml"))
    errors: list[str] = []
    check_compose(path, errors)
    for error in errors:
        print(f"check_compose: {error}", file=sys.stderr)
    if not errors:
        print(f"check_compose: {path} OK ({len(_checked)} Dockerfiles)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
