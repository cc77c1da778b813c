"""Every module of ddpm_fashion imports on its own, and none but `__main__` imports the command line.

The library must not depend on `ddpm_fashion.cli` (the cycle cli <-> classifier <-> evaluate once hid an import
inside a function to dodge it). Two independent checks: the source (every import statement, also those inside
functions, relative ones resolved), and the running interpreter (what importing each module alone loads).
"""

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import ddpm_fashion

PACKAGE = "ddpm_fashion"
PACKAGE_DIR = Path(ddpm_fashion.__file__).parent
CLI = "ddpm_fashion.cli"
# `python -m ddpm_fashion` is the command line; cli itself (and its submodules, should it become a package) is too.
ALLOWED_TO_IMPORT_CLI = {"ddpm_fashion.__main__"}


def is_cli(module: str) -> bool:
    """Whether a module name is the command line or inside it."""
    return module == CLI or module.startswith(CLI + ".")


def module_name(path: Path) -> str:
    """Get the dotted module name of a .py file under the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_on_disk() -> dict:
    """Get {module name: path} for every .py file under the package, namespace subpackages included."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def all_modules() -> list:
    """Get every module of the package: pkgutil's walk, plus .py files in folders it skips (no __init__.py)."""
    def fail(name):
        raise ImportError(f"pkgutil could not import package {name} to walk it")

    walked = {module.name for module in pkgutil.walk_packages(ddpm_fashion.__path__, PACKAGE + ".", onerror=fail)}
    return sorted(walked | set(modules_on_disk()) | {PACKAGE})


def imported_modules(source: str, module: str, is_package: bool = False) -> set:
    """Get the absolute names of the modules a source file imports anywhere in it (relative imports resolved)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names.add(base)
            # `from package import name` may import the submodule package.name.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


@pytest.mark.parametrize("source, module, expected", [
    ("import ddpm_fashion.cli", "ddpm_fashion.evaluation.sample_quality", True),
    ("from ddpm_fashion.cli import main", "ddpm_fashion.evaluation.sample_quality", True),
    ("from ddpm_fashion import cli", "ddpm_fashion.evaluation.sample_quality", True),
    ("def f():\n    from ..cli import one_line", "ddpm_fashion.evaluation.sample_quality", True),
    ("from .. import cli", "ddpm_fashion.commands.sample", True),
    ("from ..cli import main", "ddpm_fashion.commands.sample", True),
    ("importlib.import_module('ddpm_fashion.cli')", "ddpm_fashion.evaluation.sample_quality", True),
    ("from . import checks, files", "ddpm_fashion.evaluation.sample_quality", False),
    ("from .cli_helpers import x", "ddpm_fashion.evaluation.sample_quality", False),
    ("from . import cli", "ddpm_fashion.commands.sample", False),  # ddpm_fashion.commands.cli is another module
])
def test_the_source_check_finds_every_form_of_importing_the_cli(source, module, expected):
    assert any(is_cli(name) for name in imported_modules(source, module)) is expected


def test_no_module_source_imports_the_cli():
    offenders = {}
    for module, path in modules_on_disk().items():
        if module in ALLOWED_TO_IMPORT_CLI or is_cli(module):
            continue
        imports = imported_modules(path.read_text(), module, is_package=path.name == "__init__.py")
        cli_imports = sorted(name for name in imports if is_cli(name))
        if cli_imports:
            offenders[module] = cli_imports
    assert offenders == {}, "library modules must not import the command line; move what they need to a leaf module"


# Run in a fresh interpreter: load the third-party libraries once, then import each of our modules in a forked
# child, which starts with no ddpm_fashion module loaded, and report what that import loaded.
IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys
preload, modules, report = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name in preload:
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an optional or missing library: the module that needs it reports the failure itself
assert not any(name.split(".")[0] == "ddpm_fashion" for name in sys.modules), "a library imported ddpm_fashion"
results = {}
for module in modules:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            importlib.import_module(module)
            error = None
        except BaseException as exception:
            error = f"{type(exception).__name__}: {exception}"
        loaded = sorted(name for name in sys.modules if name.split(".")[0] == "ddpm_fashion")
        with os.fdopen(write_end, "w") as pipe:
            json.dump({"error": error, "loaded": loaded}, pipe)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    results[module] = json.loads(text) if text else {"error": f"the child died (wait status {status})", "loaded": []}
with open(report, "w") as file:
    json.dump(results, file)
"""


def third_party_imports() -> list:
    """Get every absolute module name our sources import that is not ours, to load once before forking."""
    names = set()
    for module, path in modules_on_disk().items():
        names |= imported_modules(path.read_text(), module, is_package=path.name == "__init__.py")
    return sorted(name for name in names if name and name.split(".")[0] != PACKAGE)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module; the source check above still runs")
def test_each_module_imports_alone_without_loading_the_cli(tmp_path):
    modules = all_modules()
    assert {"ddpm_fashion.schedulers.ddpm", "ddpm_fashion.__main__", CLI} <= set(modules)
    report = tmp_path / "imports.json"
    environment = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, json.dumps(third_party_imports()), json.dumps(modules),
                    str(report)], check=True, env=environment, cwd=PACKAGE_DIR.parent, timeout=600)
    results = json.loads(report.read_text())
    assert sorted(results) == modules
    failed = {module: result["error"] for module, result in results.items() if result["error"]}
    assert failed == {}, "these modules fail to import on their own"
    for module, result in results.items():
        assert module in result["loaded"]  # each child really imported its module
    library = [module for module in modules if module not in ALLOWED_TO_IMPORT_CLI and not is_cli(module)]
    pulled_in_cli = {module: results[module]["loaded"] for module in library
                     if any(map(is_cli, results[module]["loaded"]))}
    assert pulled_in_cli == {}, "importing these alone loads ddpm_fashion.cli"
    # The check sees the cli when it is loaded: __main__ does load it.
    assert CLI in results["ddpm_fashion.__main__"]["loaded"]
