"""The CI recipe: [[model]] tables, [[target]] tables whose keys are `edgec build` long options, [bench]."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import click

from compiler.errors import UsageError

MODEL_KEYS = {"name", "path", "adapters"}
BENCH_KEYS = {"devices", "baseline", "fail_if_slower", "prompt_tokens", "new_tokens", "repeats"}
# `edgec build` options a recipe may not set: ci owns where bundles go and insists on validation.
RESERVED_BUILD_OPTIONS = {"model", "adapter", "out", "force", "quiet", "no-validate", "dump-dir"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Model:
    name: str
    path: Path
    adapters: list[str]  # [NAME=]DIR[:WEIGHT], DIR resolved against the recipe's folder


@dataclass
class Target:
    name: str
    options: dict  # long option name (dashes) -> TOML value, as written
    argv: list[str]  # the same options as `edgec build` arguments
    calibration: Path | None = None


@dataclass
class Bench:
    devices: list[str]
    baseline: Path | None = None
    fail_if_slower: float = 0.10  # fraction
    prompt_tokens: int = 32
    new_tokens: int = 32
    repeats: int = 3


@dataclass
class Recipe:
    path: Path
    models: list[Model]
    targets: list[Target]
    bench: Bench | None = None
    text: str = field(default="", repr=False)


class _Locator:
    """Finds the line of a key in the TOML text, so errors can point at it (tomllib keeps no positions)."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def _tables(self, header: str) -> list[int]:
        pattern = re.compile(r"^\s*" + re.escape(header) + r"\s*(#.*)?$")
        return [i for i, line in enumerate(self.lines) if pattern.match(line)]

    def line(self, header: str, index: int, key: str | None) -> int:
        starts = self._tables(header)
        start = starts[index] if index < len(starts) else 0
        if key is None:
            return start + 1
        key_pattern = re.compile(r"^\s*[\"']?" + re.escape(key) + r"[\"']?\s*=")
        for i in range(start, len(self.lines)):
            if i > start and self.lines[i].lstrip().startswith("["):
                break
            if key_pattern.match(self.lines[i]):
                return i + 1
        return start + 1

    def top_level(self, key: str) -> int:
        pattern = re.compile(r"^\s*(\[+\s*" + re.escape(key) + r"\s*\]+|[\"']?" + re.escape(key) + r"[\"']?\s*=)")
        return next((i + 1 for i, line in enumerate(self.lines) if pattern.match(line)), 1)

    def error(self, header: str, index: int, key: str | None, message: str) -> UsageError:
        where = f"{self.path}:{self.line(header, index, key)}"
        return UsageError(f"{where}: {f'{key}: ' if key else ''}{message}")


def _build_options() -> dict[str, click.Parameter]:
    from compiler.cli import build

    options = {}
    for param in build.params:
        if isinstance(param, click.Option):
            long = next((o[2:] for o in param.opts if o.startswith("--")), None)
            if long and long not in RESERVED_BUILD_OPTIONS:
                options[long] = param
    return options


def _argv_for(option: str, param: click.Option, value) -> list[str]:
    """TOML value -> `edgec build` arguments: flags take true/false, repeatable options take lists."""
    if param.is_flag:
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return [f"--{option}"] if value else []
    values = value if isinstance(value, list) else [value]
    if len(values) > 1 and not param.multiple:
        raise ValueError("takes one value, not a list")
    argv = []
    for item in values:
        if isinstance(item, (dict, list, bool)):
            raise ValueError(f"expected a string or number, got {item!r}")
        argv += [f"--{option}", str(item)]
    return argv


def load(path: Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot read the recipe: {e.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML: {e}") from None
    where = _Locator(path, text)
    base = path.parent
    for key in data:
        if key not in ("model", "target", "bench"):
            raise UsageError(f"{path}:{where.top_level(key)}: {key}: unknown key "
                             f"(known: [[model]], [[target]], [bench])")
    models = [_model(where, i, table, base) for i, table in enumerate(_tables(where, data, "model"))]
    targets = [_target(where, i, table, base) for i, table in enumerate(_tables(where, data, "target"))]
    for kind, items in (("model", models), ("target", targets)):
        if not items:
            raise UsageError(f"{path}: no [[{kind}]] table; a recipe needs at least one")
        seen = set()
        for i, item in enumerate(items):
            if item.name in seen:
                raise where.error(f"[[{kind}]]", i, "name", f"'{item.name}' is used twice")
            seen.add(item.name)
    bench = _bench(where, data["bench"], base) if "bench" in data else None
    return Recipe(path, models, targets, bench, text)


def _tables(where: _Locator, data: dict, kind: str) -> list[dict]:
    tables = data.get(kind, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise where.error(kind, 0, kind, f"write it as [[{kind}]] tables")
    return tables


def _name(where, header, index, table) -> str:
    name = table.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise where.error(header, index, "name" if "name" in table else None,
                          "missing" if name is None else f"{name!r} is not a folder-safe name (letters, digits, . _ -)")
    return name


def _model(where: _Locator, index: int, table: dict, base: Path) -> Model:
    header = "[[model]]"
    for key in table:
        if key not in MODEL_KEYS:
            raise where.error(header, index, key, f"unknown key in [[model]] (known: {', '.join(sorted(MODEL_KEYS))})")
    name = _name(where, header, index, table)
    if not isinstance(table.get("path"), str):
        raise where.error(header, index, "path" if "path" in table else None, "path: expected the model's folder as a string")
    model_path = base / table["path"]
    if not model_path.is_dir():
        raise where.error(header, index, "path", f"{model_path}: no such folder")
    adapters = table.get("adapters", [])
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise where.error(header, index, "adapters", "expected a list of [NAME=]DIR[:WEIGHT] strings")
    from compiler.frontend.lora import AdapterSpec

    resolved = []
    for text in adapters:
        try:
            spec = AdapterSpec.parse(text)
        except UsageError as e:
            raise where.error(header, index, "adapters", str(e)) from None
        adapter_dir = base / spec.path
        if not adapter_dir.is_dir():
            raise where.error(header, index, "adapters", f"{adapter_dir}: no such folder")
        named = f"{spec.name}=" if spec.name else ""
        weighted = text.removeprefix(named) != str(spec.path)
        resolved.append(named + (f"{adapter_dir}:{spec.weight}" if weighted else str(adapter_dir)))
    return Model(name, model_path, resolved)


def _target(where: _Locator, index: int, table: dict, base: Path) -> Target:
    header = "[[target]]"
    name = _name(where, header, index, table)
    known = _build_options()
    options, argv, calibration = {}, [], None
    for key, value in table.items():
        if key == "name":
            continue
        option = key.replace("_", "-")
        if option not in known:
            hint = " (ci sets it)" if option in RESERVED_BUILD_OPTIONS else ""
            raise where.error(header, index, key, f"unknown key in [[target]]{hint}; use `edgec build` long options, "
                                                  f"e.g. format, quant, optimize, gate")
        if option == "calibration" and isinstance(value, str):
            calibration = base / value
            if not calibration.is_file():
                raise where.error(header, index, key, f"{calibration}: no such file")
            value = str(calibration)
        try:
            argv += _argv_for(option, known[option], value)
        except ValueError as e:
            raise where.error(header, index, key, str(e)) from None
        options[option] = value
    _check_with_click(where, index, name, argv, options)
    return Target(name, options, argv, calibration)


def _check_with_click(where: _Locator, index: int, name: str, argv: list[str], options: dict) -> None:
    """Bad values fail here, before any build, with `edgec build`'s own parsing and gate names."""
    from compiler.cli import _parse_formats, _parse_gates, build
    from compiler.config import ValidationConfig
    from compiler.errors import UsageError as EdgecUsage

    try:
        ctx = build.make_context("edgec build", ["--model", ".", "--out", "."] + argv, resilient_parsing=False)
    except click.ClickException as e:
        message = e.format_message()
        key = next((k for k in options if f"--{k}" in message or f"'{k}'" in message), None)
        raise where.error("[[target]]", index, _written_key(where, index, key), message) from None
    params = ctx.params
    try:
        _parse_formats(params["formats"])
    except EdgecUsage as e:
        raise where.error("[[target]]", index, _written_key(where, index, "format"), str(e)) from None
    try:
        gates = _parse_gates(params["gates"])
        ValidationConfig(gate_overrides=gates).gates("int4" if params["quant"] == "int4" else "fp32")
    except EdgecUsage as e:
        raise where.error("[[target]]", index, _written_key(where, index, "gate"), str(e)) from None


def _written_key(where: _Locator, index: int, option: str | None) -> str | None:
    """The key as the recipe spells it (block_size or block-size) so the error names what the user wrote."""
    if option is None:
        return None
    underscored = option.replace("-", "_")
    starts = where._tables("[[target]]")
    start = starts[index] if index < len(starts) else 0
    for line in where.lines[start:]:
        if re.match(r"^\s*" + re.escape(underscored) + r"\s*=", line):
            return underscored
    return option


def _bench(where: _Locator, table, base: Path) -> Bench:
    header = "[bench]"
    if not isinstance(table, dict):
        raise where.error(header, 0, "bench", "write it as a [bench] table")
    for key in table:
        if key not in BENCH_KEYS:
            raise where.error(header, 0, key, f"unknown key in [bench] (known: {', '.join(sorted(BENCH_KEYS))})")
    devices = table.get("devices", ["local"])
    from devices.base import PROFILES

    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise where.error(header, 0, "devices", "expected a list such as [\"local\", \"profile:rpi4\"]")
    for device in devices:
        profile = device.partition(":")[2] if device.startswith("profile:") else None
        if device != "local" and profile not in PROFILES:
            raise where.error(header, 0, "devices", f"'{device}': expected local or profile:NAME "
                                                    f"(profiles: {', '.join(sorted(PROFILES))})")
    bench = Bench(devices)
    if "baseline" in table:
        if not isinstance(table["baseline"], str):
            raise where.error(header, 0, "baseline", "expected a folder holding an earlier run's results.json")
        bench.baseline = base / table["baseline"]
    if "fail_if_slower" in table:
        text = str(table["fail_if_slower"]).strip()
        try:
            bench.fail_if_slower = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise where.error(header, 0, "fail_if_slower", f"{text!r}: expected a percentage such as \"10%\"") from None
    for key in ("prompt_tokens", "new_tokens", "repeats"):
        if key in table:
            if not isinstance(table[key], int) or isinstance(table[key], bool) or table[key] < 1:
                raise where.error(header, 0, key, "expected a positive integer")
            setattr(bench, key, table[key])
    return bench
