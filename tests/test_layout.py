"""The package layout README's Architecture section describes: one `genserve` namespace, layers that import only
downwards (models <- artifacts <- {training, service}), no import circle, and a wheel that installs nothing but
`genserve`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("models", "artifacts", "training", "service")
# What each layer may import from genserve, besides itself.
ALLOWED = {
    "models": set(),
    "artifacts": {"models"},
    "training": {"models", "artifacts"},
    "service": {"models", "artifacts"},
}
# The command line composes training and serving (`genserve train`, and `genserve serve` trains the default models
# the store lacks), so it alone may import training.
EXCEPTIONS = {("genserve.service.cli", "training")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["genserve", *parts])


def genserve_imports(path: Path) -> set[str]:
    """Every genserve module `path` imports, at module level or inside functions ("from pkg import mod" counts as
    the module when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("genserve.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("genserve.") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if modules().get(sub) else node.module)
    return found


_MODULES: dict[str, Path] = {}


def modules() -> dict[str, Path]:
    if not _MODULES:
        for layer in LAYERS:
            for path in sorted((ROOT / layer).rglob("*.py")):
                _MODULES[module_name(path)] = path
    return _MODULES


def graph() -> dict[str, set[str]]:
    return {name: genserve_imports(path) for name, path in modules().items()}


def with_packages(name: str, targets: set[str]) -> set[str]:
    """`targets` and the packages above them, which Python imports (runs their __init__) first, but for the
    packages `name` itself is in (already being imported when it runs)."""
    own = {name.rsplit(".", i)[0] for i in range(1, name.count("."))}
    out = set(targets)
    for target in targets:
        parts = target.split(".")
        out |= {".".join(parts[:i]) for i in range(2, len(parts))} - own
    return out


def test_no_top_level_imports_of_our_folders():
    """Code imports genserve.models, never a bare `models`: both names would load the same files twice."""
    bad = []
    for path in [*modules().values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in LAYERS]
    assert not bad, bad


def test_layers_import_only_downwards():
    wrong = []
    for name, imports in graph().items():
        layer = name.split(".")[1]
        for target in imports:
            other = target.split(".")[1]
            if other != layer and other not in ALLOWED[layer] and (name, other) not in EXCEPTIONS:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports against the layering (models <- artifacts <- {training, service}):\n" + "\n".join(wrong)


def test_no_import_circle():
    """A depth-first search over every genserve import, function-level ones included: none leads back."""
    edges = {name: {t for t in with_packages(name, targets) if t in modules() and t != name}
             for name, targets in graph().items()}
    # A package's __init__ re-exporting its modules is not a circle with them.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p) for layer in LAYERS for p in (ROOT / layer).rglob("__init__.py")}
    assert set(config["packages"]) == folders
    assert config["package-dir"] == {f"genserve.{layer}": layer for layer in LAYERS}


def test_the_wheel_installs_only_genserve(tmp_path):
    """Build the wheel, install it into a clean venv (its dependencies borrowed from this one's site-packages, which
    stay behind the wheel on sys.path and carry no editable finder there) and import the app from outside the repo."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=240)
    (wheel,) = tmp_path.glob("genserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"genserve", wheel.name.split("-py")[0] + ".dist-info"}
    assert "genserve/service/ui/static/index.html" in names
    assert "genserve/service/ui/static/vendor/swagger-ui/swagger-ui-bundle.js" in names

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)  # a wheel is installed by unpacking it into site-packages
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    check = ("import genserve.service.app as app, genserve.training.text_pipeline, genserve.service.cli, "
             "importlib.util as u; print(app.__file__); "
             "print([m for m in ('models', 'service', 'training', 'artifacts') if u.find_spec(m)])")
    out = subprocess.run([str(python), "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": deps})
    assert out.returncode == 0, out.stderr[-3000:]
    app_file, missing = out.stdout.strip().splitlines()
    assert app_file.startswith(site), app_file
    assert missing == "[]", f"top-level packages installed besides genserve: {missing}"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_alone(layer):
    """Each package imports in a fresh interpreter with nothing of the layers above it loaded."""
    code = (f"import sys, pkgutil, importlib, genserve.{layer} as p\n"
            f"for m in pkgutil.walk_packages(p.__path__, 'genserve.{layer}.'): importlib.import_module(m.name)\n"
            "print(sorted({n.split('.')[1] for n in sys.modules if n.startswith('genserve.')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = set(eval(out.stdout.strip().splitlines()[-1]))
    assert loaded <= {layer, *ALLOWED[layer], *(e[1] for e in EXCEPTIONS if e[0].split(".")[1] == layer)}
