"""deploy/: the compose files, the image's entrypoint and healthcheck, and certs.sh.

There is no Docker engine here, so the compose files are checked the way
`docker compose config` would see them: interpolated with the variables of
``deploy/.env.example`` (dummy values for the secrets it leaves empty), merged
the way Compose merges ``-f a.yaml -f b.yaml`` (``command``/``entrypoint``/
``healthcheck.test`` replaced, maps merged, ``volumes`` unique by target,
``!reset`` removes) and validated against the official compose-spec schema
(``../shared/schemas/compose-spec.json``). Then, for every combination an
operator runs:

- every command a container runs (``command``, ``sh -c`` scripts, healthchecks)
  is a real CLI and every ``--flag`` it passes exists: ``pilot ...`` through the
  typer app (``--help`` exits 0, flags from the click parameters),
  ``flower-*``/``flwr-*`` from the argparse parser Flower 1.41 builds (read from
  its source, so no slow import; a ``slow`` test checks the same flags against
  the real ``--help``), ``pilot-healthcheck`` from its parser;
- trainers scale (no container_name, no host ports) and reserve a GPU, and so
  does the evaluator; depends_on waits for health where it matters; every
  service has a healthcheck; no secret is written in a compose file;
- the TLS variants use no ``--insecure``, only ``rediss://``, and mount only
  files certs.sh makes (never the CA key).

``certs.sh`` runs for real into a temp dir (twice: the second run keeps every
file), and its SuperNode keys load with Flower's own key loaders. The
entrypoint's GPU / SuperNode-key claims run for real with a fake ``nvidia-smi``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
BIN = Path(sys.executable).parent

HEAD = ["compose.yaml"]
COMBINATIONS = {
    "head": HEAD,
    "head+tls": HEAD + ["compose.tls.yaml"],
    "head+cpu": HEAD + ["compose.cpu.yaml"],
    "head+tls+cpu": HEAD + ["compose.tls.yaml", "compose.cpu.yaml"],
    "worker": ["compose.worker.yaml"],
    "worker+tls": ["compose.worker.yaml", "compose.worker.tls.yaml"],
}
TLS_COMBINATIONS = [name for name in COMBINATIONS if "tls" in name]
# empty in .env.example on purpose (secrets, per-site values): dummies for the checks
DUMMY_ENV = {"REDIS_PASSWORD": "dummy-redis-password", "SUPEREXEC_AUTH_SECRET": "dummy-secret", "HEAD_IP": "10.0.0.5"}
SECRET_VARS = ("REDIS_PASSWORD", "SUPEREXEC_AUTH_SECRET", "WANDB_API_KEY")
SKIPPED_PROGRAMS = {"redis-server", "redis-cli", "grep", "sh", "mkdir", "cp", "chown", "chmod", "docker-entrypoint.sh"}


# --- loading, interpolating and merging compose files ------------------------------------


class Reset:
    """``!reset``: the attribute is removed from the merged model."""


class Override:
    """``!override``: replaces the attribute instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def deploy_env() -> dict[str, str]:
    env = env_example()
    for key, dummy in DUMMY_ENV.items():
        env[key] = env.get(key) or dummy
    return env


_VAR = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_EXPR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", re.S)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$`` is a literal ``$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, env))
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group(1) if match.group(1) is not None else match.group(2)
        parsed = _EXPR.match(expr)
        assert parsed, f"bad interpolation ${{{expr}}}"
        name, op, arg = parsed.groups()
        current = env.get(name)
        empty = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if empty else current  # type: ignore[return-value]
        if op in (":?", "?"):
            if empty:
                raise KeyError(f"required variable {name} unset: {arg}")
            return current  # type: ignore[return-value]
        if op in (":+", "+"):
            return "" if empty else arg
        return current or ""

    return _VAR.sub(one, value)


def _volume_target(entry: Any) -> Any:
    if isinstance(entry, dict):
        return entry.get("target")
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's merge rules, as far as these files use them."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, (*path, key))
            else:
                out[key] = merge({}, value, (*path, key)) if isinstance(value, dict) else value
        return out
    if isinstance(base, list) and isinstance(over, list):
        if path[-1:] in (("command",), ("entrypoint",)) or path[-2:] == ("healthcheck", "test"):
            return over
        if path[-1:] == ("volumes",) and len(path) >= 2 and path[0] == "services":
            targets = {_volume_target(v) for v in over}
            return [v for v in base if _volume_target(v) not in targets] + over
        return base + [v for v in over if v not in base]
    return over


def load(name: str) -> dict[str, Any]:
    return yaml.load((DEPLOY / name).read_text(), Loader=ComposeLoader)  # noqa: S506 (SafeLoader subclass)


def config(combination: str) -> dict[str, Any]:
    """The model `docker compose -f ... config` would build for a combination."""
    env = deploy_env()
    files = COMBINATIONS[combination]
    merged = interpolate(load(files[0]), env)
    for name in files[1:]:
        override = interpolate(load(name), env)
        for service in override.get("services", {}):
            assert service in merged["services"], f"{name} adds service {service!r} that {files[0]} lacks"
        merged = merge(merged, override)
    return merged


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    import json

    import jsonschema

    if not SCHEMA.is_file():
        pytest.fail(f"compose-spec schema not found at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    # the file says "https://json-schema.org/draft-07/schema" (no "#"), which jsonschema does not look up
    draft7 = "draft-07" in schema.get("$schema", "")
    cls = jsonschema.Draft7Validator if draft7 else jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


# --- what a command line is --------------------------------------------------------------


def invocations(argv: list[str]) -> Iterator[list[str]]:
    """The program invocations in a command: itself, or each one of an ``sh -c`` script."""
    if len(argv) >= 3 and argv[0] in ("sh", "bash") and argv[1] == "-c":
        words = shlex.split(argv[2])
        current: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    yield current[1:] if current[0] == "exec" else current
                current = []
            else:
                current.append(word)
    else:
        yield argv


def healthcheck_argv(test: list[str] | str) -> list[str]:
    if isinstance(test, str):
        return ["sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", test[1]]
    assert test[0] == "CMD", f"healthcheck test must start with CMD or CMD-SHELL: {test}"
    return list(test[1:])


def service_commands(cfg: dict[str, Any]) -> Iterator[tuple[str, str, list[str]]]:
    """(service, where, argv) for every program the containers run."""
    for name, service in cfg["services"].items():
        for where, argv in (("command", service.get("command")), ("entrypoint", service.get("entrypoint"))):
            if argv:
                argv = shlex.split(argv) if isinstance(argv, str) else argv
                for call in invocations([str(a) for a in argv]):
                    yield name, where, call
        test = (service.get("healthcheck") or {}).get("test")
        if test:
            for call in invocations(healthcheck_argv(test)):
                yield name, "healthcheck", call


def flags_of(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if a.startswith("--")]


# --- the CLIs' real flags -------------------------------------------------------------------


def pilot_command(args: list[str]) -> tuple[list[str], set[str]]:
    """The sub-command path of ``pilot ARGS`` and its options (click parameters)."""
    import click
    import typer

    from pilot.cli import app

    command: click.Command = typer.main.get_command(app)
    path: list[str] = []
    for word in args:
        if word.startswith("-") or not isinstance(command, click.Group):
            break
        sub = command.get_command(click.Context(command), word)
        have = sorted(command.list_commands(click.Context(command)))
        assert sub is not None, f"`pilot {' '.join([*path, word])}` is not a command (have: {have})"
        command, path = sub, [*path, word]
    assert not isinstance(command, click.Group), f"`pilot {' '.join(path)}` is a group, not a command"
    options = {"--help"}
    for param in command.params:
        options.update(o for o in [*param.opts, *param.secondary_opts] if o.startswith("--"))
    return path, options


@cache
def pilot_help_ok(path: tuple[str, ...]) -> str:
    from typer.testing import CliRunner

    from pilot.cli import app

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"`pilot {' '.join(path)} --help` exited {result.exit_code}: {result.output}"
    return result.output


# Flower's console scripts -> the function that builds their argparse parser (1.41).
FLOWER_PARSERS = {
    "flower-superlink": ("flwr.superlink.cli.flower_superlink", "_parse_args_run_superlink"),
    "flower-supernode": ("flwr.supernode.cli.flower_supernode", "_parse_args_run_supernode"),
    "flower-superexec": ("flwr.supercore.cli.flower_superexec", "_parse_args"),
    "flwr-serverapp": ("flwr.superlink.cli.flwr_serverapp", "_parse_args_run_flwr_serverapp"),
    "flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "_parse_args_run_flwr_clientapp"),
}


@cache
def _flwr_root() -> Path:
    spec = importlib.util.find_spec("flwr")  # locates the package without importing it
    assert spec is not None and spec.origin, "flwr is not installed"
    return Path(spec.origin).parent


@cache
def _module_tree(module: str) -> tuple[ast.Module, str] | None:
    """(AST, package) of a flwr module, read from source (nothing imported)."""
    parts = module.split(".")
    if parts[0] != "flwr":
        return None
    base = _flwr_root().joinpath(*parts[1:])
    for path, package in ((base.with_suffix(".py"), ".".join(parts[:-1])), (base / "__init__.py", module)):
        if path.is_file():
            return ast.parse(path.read_text()), package
    return None


def _resolve(module: str, name: str, depth: int = 0) -> tuple[str, ast.FunctionDef] | None:
    """The def that ``name`` means inside ``module`` (following flwr's own imports)."""
    loaded = _module_tree(module)
    if loaded is None or depth > 8:
        return None
    tree, package = loaded
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return module, node
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    source = node.module or ""
                    if node.level:
                        anchor = package.split(".")
                        anchor = anchor[: len(anchor) - (node.level - 1)]
                        source = ".".join([*anchor, source] if source else anchor)
                    found = _resolve(source, alias.name, depth + 1)
                    if found is None and _module_tree(f"{source}.{alias.name}"):
                        return None  # a module, not a function
                    return found
    return None


def _bindings(func: ast.FunctionDef, call: ast.Call | None) -> dict[str, Any]:
    """Constant parameter values of ``func`` as called by ``call`` (defaults, then keywords)."""
    args = func.args.args
    values = {a.arg: d.value for a, d in zip(args[len(args) - len(func.args.defaults):], func.args.defaults)
              if isinstance(d, ast.Constant)}
    for keyword in call.keywords if call is not None else []:
        if keyword.arg and isinstance(keyword.value, ast.Constant):
            values[keyword.arg] = keyword.value.value
    return values


def _suppressed(call: ast.Call) -> bool:
    return any(k.arg == "help" and isinstance(k.value, ast.Attribute) and k.value.attr == "SUPPRESS"
               for k in call.keywords)


@cache
def flower_flags(command: str) -> frozenset[str]:
    """The option strings of a Flower 1.41 command's parser, read from its source.

    Starts at the parser-building function and follows every call into flwr's own
    functions, collecting ``add_argument("--x", ...)`` literals; hidden
    (``help=argparse.SUPPRESS``: deprecated or refused) flags are left out, and an
    ``if flag_param:`` guard is decided from the caller's constant arguments.
    ``-h/--help`` come from argparse.
    """
    assert command in FLOWER_PARSERS, f"no parser known for {command}; add it to FLOWER_PARSERS"
    module, function = FLOWER_PARSERS[command]
    start = _resolve(module, function)
    assert start is not None, f"{module}.{function} not found: has Flower's CLI moved? (flwr {flwr_version()})"
    flags: set[str] = {"--help", "-h"}
    seen: set[tuple[str, str, str]] = set()
    todo: list[tuple[str, ast.FunctionDef, ast.Call | None]] = [(*start, None)]

    def visit(where: str, statements: list[ast.stmt], bound: dict[str, Any]) -> None:
        for statement in statements:
            if isinstance(statement, ast.If) and isinstance(statement.test, ast.Name) and statement.test.id in bound:
                visit(where, statement.body if bound[statement.test.id] else statement.orelse, bound)
                continue
            nested = [getattr(statement, f) for f in ("body", "orelse", "finalbody") if hasattr(statement, f)]
            nested += [h.body for h in getattr(statement, "handlers", [])]
            if nested and not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for block in nested:
                    visit(where, block, bound)
                heads = [getattr(statement, f) for f in ("test", "iter", "items") if hasattr(statement, f)]
            else:
                heads = [statement]
            for head in heads:
                for node in ast.walk(head) if isinstance(head, ast.AST) else [n for h in head for n in ast.walk(h)]:
                    if not isinstance(node, ast.Call):
                        continue
                    callee = node.func
                    name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
                    if name == "add_argument":
                        if not _suppressed(node):
                            flags.update(a.value for a in node.args
                                         if isinstance(a, ast.Constant) and str(a.value).startswith("-"))
                    elif isinstance(callee, ast.Name):
                        target = _resolve(where, callee.id)
                        if target is not None:
                            todo.append((*target, node))

    while todo:
        where, func, call = todo.pop()
        bound = _bindings(func, call)
        key = (where, func.name, repr(sorted(bound.items())))
        if key in seen:
            continue
        seen.add(key)
        visit(where, func.body, bound)
    assert len(flags) > 4, f"found almost no flags for {command}: {sorted(flags)}"
    return frozenset(flags)


def flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")


@cache
def healthcheck_module() -> Any:
    spec = importlib.util.spec_from_file_location("pilot_healthcheck", DEPLOY / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def healthcheck_flags(kind: str) -> frozenset[str]:
    root = healthcheck_module().parser()
    subparsers = next(a for a in root._actions if a.choices and isinstance(a.choices, dict))
    assert kind in subparsers.choices, f"pilot-healthcheck has no `{kind}` check"
    sub = subparsers.choices[kind]
    return frozenset(o for a in sub._actions for o in a.option_strings)


def check_invocation(service: str, where: str, argv: list[str]) -> str | None:
    """None when ``argv`` is a real CLI with real flags, else what is wrong."""
    program = argv[0]
    flags = flags_of(argv)
    if program in SKIPPED_PROGRAMS:
        return None
    if program == "pilot":
        try:
            path, options = pilot_command(argv[1:])
            pilot_help_ok(tuple(path))
        except AssertionError as exc:
            return f"{service} ({where}): {str(exc).splitlines()[0]}"
        known = options
    elif program in FLOWER_PARSERS:
        known = set(flower_flags(program))
    elif program == "pilot-healthcheck":
        known = set(healthcheck_flags(argv[1])) | {"--help"}
    else:
        return f"{service} ({where}): unknown program {program!r} in {argv}"
    unknown = [f for f in flags if f not in known]
    if unknown:
        return f"{service} ({where}): `{' '.join(argv[:3])} ...` has no option(s) {unknown}"
    return None


# --- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_compose_files_validate_against_the_compose_spec(combination: str, schema_validator: Any) -> None:
    files = COMBINATIONS[combination]
    alone = interpolate(load(files[0]), deploy_env())
    errors = sorted(schema_validator.iter_errors(alone), key=str)
    assert not errors, f"{files[0]}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    cfg = config(combination)
    errors = sorted(schema_validator.iter_errors(cfg), key=str)
    assert not errors, f"{files}: " + "; ".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    for name, service in cfg["services"].items():
        assert "image" in service or "build" in service, f"{combination}: {name} has neither image nor build"
        assert (service.get("healthcheck") or {}).get("test"), f"{combination}: {name} has no healthcheck"


def _docker_compose() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True, check=False).returncode == 0:
            return cmd
    return None


@pytest.mark.docker
@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_docker_compose_config_accepts_it(combination: str, tmp_path: Path) -> None:
    """Where Compose itself is installed (not here: no engine, no plugin), ask it too."""
    compose = _docker_compose()
    assert compose is not None
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in deploy_env().items()))
    files = [arg for name in COMBINATIONS[combination] for arg in ("-f", str(DEPLOY / name))]
    result = subprocess.run([*compose, "--env-file", str(env_file), *files, "config", "--quiet"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_required_variables_fail_loudly() -> None:
    env = deploy_env()
    del env["REDIS_PASSWORD"]
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(load("compose.yaml"), env)
    env = deploy_env()
    env["HEAD_IP"] = ""
    with pytest.raises(KeyError, match="HEAD_IP"):
        interpolate(load("compose.worker.yaml"), env)


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_every_command_is_a_real_cli_with_real_flags(combination: str) -> None:
    problems = [p for call in service_commands(config(combination)) if (p := check_invocation(*call))]
    assert not problems, "\n".join(problems)


def test_the_services_run_what_the_design_says() -> None:
    cfg = config("head")
    programs = {name: [c[2][:3] for c in service_commands({"services": {name: s}}) if c[1] == "command"]
                for name, s in cfg["services"].items()}
    assert programs["redis"] == [["redis-server", "--requirepass", DUMMY_ENV["REDIS_PASSWORD"]]]
    assert programs["superlink"][0][0] == "flower-superlink"
    assert programs["serverapp"][0][0] == "flower-superexec"
    assert programs["evaluator"][0][:2] == ["pilot", "evaluator"]
    assert programs["tokenizer"][0][:3] == ["pilot", "tokenizer", "serve"]
    assert programs["tokenizer-worker"][0][:3] == ["pilot", "tokenizer", "worker"]
    assert programs["trainer"][0][0] == "flower-supernode"
    redis = cfg["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "Redis data (AOF) must live on a volume"
    superlink = cfg["services"]["superlink"]["command"]
    assert superlink[superlink.index("--isolation") + 1] == "process"
    serverapp = cfg["services"]["serverapp"]
    assert serverapp["environment"]["PILOT_COORDINATOR_BIND"] == "0.0.0.0"
    # one shared base dir, the same path everywhere
    for name in ("serverapp", "evaluator", "tokenizer", "tokenizer-worker", "trainer"):
        service = cfg["services"][name]
        base = service["environment"]["PILOT_BASE_DIR"]
        assert f"pilot-data:{base}" in service["volumes"], f"{name} must mount pilot-data at {base}"


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


@pytest.mark.parametrize("combination", ["head", "head+tls", "worker", "worker+tls"])
def test_trainers_scale_and_reserve_one_gpu_each(combination: str) -> None:
    cfg = config(combination)
    trainer = cfg["services"]["trainer"]
    assert "container_name" not in trainer and "ports" not in trainer, "a scaled service owns no name, no host port"
    assert "hostname" not in trainer
    devices = _gpu_devices(trainer)
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert str(devices[0]["count"]) == "1", "default: one GPU per trainer replica"
    assert trainer["environment"]["PILOT_CLAIM_GPU"] == "1"
    if combination.startswith("head"):
        evaluator = _gpu_devices(cfg["services"]["evaluator"])
        assert evaluator and evaluator[0]["driver"] == "nvidia" and str(evaluator[0]["count"]) == "1"


def test_cpu_override_asks_docker_for_no_gpu() -> None:
    cfg = config("head+cpu")
    assert not _gpu_devices(cfg["services"]["trainer"]) and not _gpu_devices(cfg["services"]["evaluator"])
    assert cfg["services"]["trainer"]["environment"]["PILOT_TRAINER_DEVICE"] == "cpu"
    evaluator = cfg["services"]["evaluator"]["command"]
    assert evaluator[evaluator.index("--device") + 1] == "cpu"


def test_peers_wait_for_health() -> None:
    cfg = config("head")
    wants = {"serverapp": {"superlink", "redis"}, "trainer": {"superlink", "redis"}, "evaluator": {"redis"},
             "tokenizer-worker": {"redis"}}
    for name, peers in wants.items():
        depends = cfg["services"][name].get("depends_on") or {}
        for peer in peers:
            condition = (depends.get(peer) or {}).get("condition")
            assert condition == "service_healthy", f"{name} must wait for {peer} to be healthy"


def test_trainer_commands_agree_between_head_and_worker_files() -> None:
    for head, worker in (("head", "worker"), ("head+tls", "worker+tls")):
        a, b = config(head)["services"]["trainer"], config(worker)["services"]["trainer"]
        assert a["command"] == b["command"], f"{head} and {worker} trainers run different commands"
        assert a["healthcheck"]["test"] == b["healthcheck"]["test"]
        assert a["deploy"] == b["deploy"]
        shared = set(a["environment"]) & set(b["environment"])
        assert {"PILOT_REDIS_URL", "SUPERLINK_ADDRESS", "PILOT_CLAIM_GPU", "PILOT_TRAINER_DEVICE"} <= shared


_INLINE_PASSWORD = re.compile(r"://[^/@\s:]*:(?!\$\{)[^@\s/]+@")


@pytest.mark.parametrize("name", sorted(p.name for p in DEPLOY.glob("compose*.yaml")))
def test_no_secret_is_written_in_a_compose_file(name: str) -> None:
    text = (DEPLOY / name).read_text()
    assert not _INLINE_PASSWORD.search(text), f"{name}: a URL with a literal password"
    raw = yaml.load(text, Loader=ComposeLoader)  # noqa: S506

    def walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from walk(v, f"{path}[{i}]")
        elif isinstance(node, str):
            yield path, node

    for path, value in walk(raw, ""):
        key = path.rsplit(".", 1)[-1]
        if re.search(r"PASSWORD|SECRET|API_KEY|AUTH$", key) and value:
            assert value.startswith("${"), f"{name}{path}: secrets come from ${{VAR}}, not literals"
    command = (raw.get("services", {}).get("redis") or {}).get("command") or []
    if "--requirepass" in command:
        assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    # interpolated with the test env, every password in a URL is the one from the env file
    cfg = interpolate(raw, deploy_env())
    for _, value in walk(cfg, ""):
        for match in re.finditer(r"rediss?://:([^@]*)@", value):
            assert match.group(1) == DUMMY_ENV["REDIS_PASSWORD"]


def test_env_example_holds_no_secret_and_git_ignores_the_real_ones() -> None:
    env = env_example()
    for key in SECRET_VARS:
        assert key in env and env[key] == "", f".env.example must leave {key} empty"
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "/certs/" in ignored and "/.env" in ignored
    if shutil.which("git"):
        for path in ("deploy/certs/ca.key", "deploy/.env"):
            result = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO, check=False)
            assert result.returncode == 0, f"git does not ignore {path}"


@pytest.mark.parametrize("combination", TLS_COMBINATIONS)
def test_tls_variants_encrypt_everything(combination: str, certs: Path) -> None:
    cfg = config(combination)
    made = {str(p.relative_to(certs)) for p in certs.rglob("*")}
    for name, service in cfg["services"].items():
        for _, where, argv in service_commands({"services": {name: service}}):
            assert "--insecure" not in argv, f"{combination}: {name} ({where}) runs --insecure"
        url = (service.get("environment") or {}).get("PILOT_REDIS_URL")
        if url:
            assert url.startswith("rediss://") and "ssl_cert_reqs=required" in url, f"{name}: Redis over TLS, verified"
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith("./certs/"):
                relative = source.removeprefix("./certs/")
                assert relative in made, f"{name} mounts {source}, which certs.sh does not make"
                assert relative != "ca.key", f"{name} must not see the CA key"
                assert str(volume).endswith(":ro"), f"{name}: certificates are mounted read-only"
    if combination.startswith("head"):
        superlink = cfg["services"]["superlink"]["command"]
        for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
            assert flag in superlink
    trainer = " ".join(cfg["services"]["trainer"]["command"])
    assert "--root-certificates" in trainer and "--auth-supernode-private-key" in trainer


def test_dockerfile_builds_pilot_with_uv_from_python_slim() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", text)
    assert "uv sync --frozen --no-dev" in text
    assert "rustup" in text, "the Rust toolchain builds the rustbpe extension"
    assert 'ENTRYPOINT ["pilot-entrypoint"]' in text
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (REPO / source.rstrip("/")).exists(), f"Dockerfile copies {source}, which is not in the repo"
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and "!deploy/entrypoint.sh" in ignore and "!deploy/healthcheck.py" in ignore


# --- certs.sh ----------------------------------------------------------------------------------


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("certs.sh needs openssl and ssh-keygen")
    out = tmp_path_factory.mktemp("deploy") / "certs"
    cmd = ["bash", str(DEPLOY / "certs.sh"), "--out", str(out), "--host", "head.example.org", "--host", "10.0.0.5",
           "--supernodes", "2", "--node-name", "gpu1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr + result.stdout
    return out


def test_certs_sh_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(DEPLOY / "certs.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_certs_sh_makes_a_ca_server_certs_and_supernode_keys(certs: Path) -> None:
    servers = ("superlink", "redis", "coordinator", "tokenizer", "evaluator")
    expected = {"ca.key", "ca.crt"} | {f"{s}.{e}" for s in servers for e in ("crt", "key")}
    expected |= {f"supernode/gpu1-{i}.{e}" for i in range(2) for e in ("key", "pub")}
    assert set(_digests(certs)) == expected
    for path in certs.rglob("*.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path.name} must be 0600"
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for service in servers:
        names = [service, "serverapp"] if service == "coordinator" else [service]
        crt = certs / f"{service}.crt"
        verify = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(crt)],
                                capture_output=True, text=True, check=False)
        assert verify.returncode == 0, verify.stderr
        sans = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-ext", "subjectAltName"],
                              capture_output=True, text=True, check=True).stdout
        for want in [*(f"DNS:{n}" for n in names), "DNS:localhost", "IP Address:127.0.0.1", "DNS:head.example.org",
                     "IP Address:10.0.0.5"]:
            assert want in sans, f"{service}.crt lacks {want}: {sans}"


def test_supernode_keys_load_with_flowers_own_loaders(certs: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    for i in range(2):
        private = load_ssh_private_key((certs / f"supernode/gpu1-{i}.key").read_bytes(), None)
        public = load_ssh_public_key((certs / f"supernode/gpu1-{i}.pub").read_bytes())
        # what flower-supernode --auth-supernode-private-key and `flwr supernode register` accept
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()


def test_certs_sh_run_again_keeps_every_file(certs: Path) -> None:
    before = _digests(certs)
    result = subprocess.run(["bash", str(DEPLOY / "certs.sh"), "--out", str(certs), "--host", "head.example.org",
                             "--host", "10.0.0.5", "--supernodes", "2", "--node-name", "gpu1"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert _digests(certs) == before, "a second run without --force must not replace anything"
    assert "keeping" in result.stdout


# --- the image's entrypoint and healthcheck ------------------------------------------------------


def test_entrypoint_is_valid_sh() -> None:
    result = subprocess.run(["sh", "-n", str(DEPLOY / "entrypoint.sh")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("flock") is None, reason="the entrypoint's claims need flock (util-linux)")
def test_entrypoint_gives_each_replica_its_own_gpu_and_supernode_key(tmp_path: Path, certs: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    uuids = ["GPU-aaaaaaaa-1111-2222-3333-444444444444", "GPU-bbbbbbbb-1111-2222-3333-444444444444"]
    smi.write_text("#!/bin/sh\n" + "".join(f"echo {u}\n" for u in uuids))
    smi.chmod(0o755)
    certs_src = tmp_path / "certs-src"
    shutil.copytree(certs / "supernode", certs_src / "supernode")
    shutil.copy(certs / "ca.crt", certs_src / "ca.crt")
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "PILOT_BASE_DIR": str(tmp_path / "base"),
           "PILOT_CERTS_SRC": str(certs_src), "PILOT_CERTS_DIR": str(tmp_path / "run-certs"),
           "PILOT_RUN_USER": "pilot-no-such-user", "PILOT_CLAIM_GPU": "1", "PILOT_NODE_NAME": "box",
           "PILOT_SUPERNODE_KEYS": str(tmp_path / "run-certs" / "supernode")}
    env.pop("PILOT_TRAINER_ID", None)
    show = 'echo "$CUDA_VISIBLE_DEVICES $PILOT_SUPERNODE_KEY $PILOT_TRAINER_ID"; exec sleep 30'
    entry = ["sh", str(DEPLOY / "entrypoint.sh"), "sh", "-c", show]
    replicas = []
    try:
        seen = []
        for _ in range(2):
            # one at a time: each copies the certs into the shared dir before claiming
            proc = subprocess.Popen(entry, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            replicas.append(proc)
            line = proc.stdout.readline().split()  # type: ignore[union-attr]
            assert len(line) == 3, proc.stderr.read() if proc.poll() is not None else line  # type: ignore[union-attr]
            seen.append(line)
        gpus, keys, ids = zip(*seen)
        assert len(set(gpus)) == 2 and all(g.startswith("GPU-") for g in gpus)
        assert len(set(keys)) == 2 and all(Path(k).parent == tmp_path / "run-certs" / "supernode" for k in keys)
        assert sorted(ids) == ["gpu1-0", "gpu1-1"], "a trainer is named after its SuperNode key"
        key_mode = stat.S_IMODE(Path(keys[0]).stat().st_mode)
        assert key_mode == 0o400, f"copied keys must be 0400, got {oct(key_mode)}"
        third = subprocess.run(entry, env={**env, "PILOT_CERTS_SRC": str(tmp_path / "none")}, capture_output=True,
                               text=True, timeout=30, check=False)
        assert third.returncode == 1 and "held by other containers" in third.stderr, third.stderr
        # without keys, the id is <node name>-<GPU uuid prefix>
        env_nokeys = {k: v for k, v in env.items() if k != "PILOT_SUPERNODE_KEYS"}
        replicas[0].terminate()
        replicas[0].wait(timeout=10)
        time.sleep(0.1)
        fourth = subprocess.run(["sh", str(DEPLOY / "entrypoint.sh"), "sh", "-c", 'echo "$PILOT_TRAINER_ID"'],
                                env={**env_nokeys, "PILOT_CERTS_SRC": str(tmp_path / "none")}, capture_output=True,
                                text=True, timeout=30, check=False)
        assert fourth.returncode == 0, fourth.stderr
        assert fourth.stdout.strip() == f"box-{gpus[0].removeprefix('GPU-')[:8]}"
    finally:
        for proc in replicas:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def test_healthcheck_reports_unhealthy_peers(capsys: pytest.CaptureFixture[str]) -> None:
    main = healthcheck_module().main
    for args in (["http", "http://127.0.0.1:9/health", "--timeout", "1"], ["grpc", "127.0.0.1:9", "--timeout", "1"]):
        assert main(args) == 1
        assert "unhealthy" in capsys.readouterr().err
    assert (DEPLOY / "healthcheck.py").read_text().startswith("#!/usr/bin/env python\n")


# --- slow: the flags against Flower's real --help ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["flower-superlink", "flower-supernode", "flower-superexec"])
def test_flower_flags_match_the_real_help(command: str) -> None:
    """Each flag the compose files pass to ``command`` is in its real ``--help``,
    and the source-read parser (what the fast tests use) has exactly the flags the help lists."""
    exe = BIN / command
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "COLUMNS": "200"}
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr
    usage = result.stdout[result.stdout.index("usage:"):].split("\n\n", 1)[0]
    listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage))
    static = set(flower_flags(command)) - {"--help", "--version", "-h", "-V"}
    assert listed == static, f"source-read parser vs --help: extra {static - listed}, missing {listed - static}"
    used = {f for combination in COMBINATIONS for _, _, argv in service_commands(config(combination))
            if argv[0] == command for f in flags_of(argv)}
    assert used, f"no compose file runs {command}"
    assert used <= listed, f"{command} --help does not list {used - listed}"
