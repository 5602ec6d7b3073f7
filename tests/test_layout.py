"""The package rules of docs/ARCHITECTURE.md: what travels to a device stands alone."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtimes.base import Runtime
from runtimes.registry import RUNTIMES, device_files

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every module a file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "runtimes").glob("*.py")), ids=lambda p: p.name)
def test_runtimes_import_nothing_of_the_compiler_or_the_devices(path):
    assert not imported_packages(path) & {"compiler", "devices", "benchmarks", "tests"}


@pytest.mark.parametrize("fmt", sorted(RUNTIMES))
def test_each_runtimes_agent_package_is_complete_on_its_own(fmt, tmp_path):
    """The files a device receives (AGENT_MODULES, the runtime's module and its companions) import and name
    the runtime that the registry lists, with nothing else of edgec on the path."""
    entry = RUNTIMES[fmt]
    package = tmp_path / "runtimes"
    package.mkdir()
    for name in device_files(entry.module):
        shutil.copy(ROOT / "runtimes" / name, package)
    probe = ("import json, runtimes, runtimes.registry as r; cls = r.runtime_for(%r).load(); "
             "print(json.dumps([runtimes.__file__, cls.__name__, cls.format, cls.name]))" % fmt)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    where, class_name, class_format, name = json.loads(out.stdout)
    assert Path(where).parent == package  # the copy, not the repository's package
    assert (class_name, class_format, name) == (entry.class_name, fmt, entry.name)


def test_every_registered_runtime_is_a_runtime():
    for fmt, entry in RUNTIMES.items():
        runtime = entry.load()
        assert issubclass(runtime, Runtime) and runtime.format == fmt
        assert {"start_sequence", "empty_cache", "forward"} <= {
            name for name in vars(runtime) if callable(vars(runtime)[name])}
