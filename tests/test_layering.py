"""Imports stay layered: the engine below the doors (server, Flower), the Flower integration
below the scenarios built on it, the HTTP layer on the service's public methods only, and no
import cycles inside a package. Checked on the real modules: imported in a fresh interpreter, or
read with ``ast``."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_modules(package: str, directory: Path) -> list[str]:
    return sorted(
        f"{package}.{path.stem}" if path.stem != "__init__" else package
        for path in directory.glob("*.py")
        if path.stem != "__main__"
    )


#: what each fresh interpreter imports: the engine, every module of the Flower integration,
#: every module of the server (the last two only where their extra is installed)
IMPORTS = {
    "engine": (["contmerge"], None),
    "flower": (package_modules("contmerge.flower", ROOT / "contmerge" / "flower"), "flwr"),
    "server": (package_modules("contmerge.server", ROOT / "contmerge" / "server"), "fastapi"),
}
PROBE = (
    "import importlib, json, sys\n"
    "for name in sys.argv[1:]:\n"
    "    importlib.import_module(name)\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.startswith('contmerge'))))\n"
)


@pytest.fixture(scope="module")
def imported() -> dict[str, set[str]]:
    """The ``contmerge*`` modules each fresh interpreter holds after its imports (run side by
    side: each pays for importing torch)."""
    runs = {
        what: subprocess.Popen(
            [sys.executable, "-c", PROBE, *modules],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for what, (modules, extra) in IMPORTS.items()
        if extra is None or importlib.util.find_spec(extra) is not None
    }
    loaded = {}
    for what, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        loaded[what] = set(json.loads(out))
    return loaded


def test_the_engine_imports_no_door_and_no_scenario(imported: dict[str, set[str]]) -> None:
    loaded = imported["engine"]
    assert not {m for m in loaded if m.startswith(("contmerge.server", "contmerge.flower"))}
    assert not {m for m in loaded if m.startswith("contmerge.simulations")}


def test_the_flower_integration_does_not_import_the_scenarios(
    imported: dict[str, set[str]],
) -> None:
    pytest.importorskip("flwr")
    loaded = imported["flower"]
    assert "contmerge.flower.strategy" in loaded
    assert not {m for m in loaded if m.startswith("contmerge.simulations")}, sorted(loaded)


def test_the_server_imports_neither_flower_nor_the_scenarios(
    imported: dict[str, set[str]],
) -> None:
    pytest.importorskip("fastapi")
    loaded = imported["server"]
    assert "contmerge.server.app" in loaded
    assert not {m for m in loaded if m.startswith(("contmerge.flower", "contmerge.simulations"))}


def imports_in(path: Path, package: str) -> set[str]:
    """The absolute names of the modules ``path`` (a module of ``package``) imports anywhere,
    functions included, leaving out imports made for type checkers (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parent) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            found.add(module)
            if node.module is None:  # from . import x
                found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def test_no_flower_module_imports_a_scenario_even_inside_a_function() -> None:
    reaching = {
        path.name: sorted(m for m in imports_in(path, "contmerge.flower") if "simulations" in m)
        for path in (ROOT / "contmerge" / "flower").glob("*.py")
    }
    assert not {name: found for name, found in reaching.items() if found}


@pytest.mark.parametrize(
    ("package", "directory"),
    [
        ("contmerge.flower", "contmerge/flower"),
        ("contmerge.server", "contmerge/server"),
        ("contmerge.simulations.federated", "simulations/federated"),
    ],
)
def test_no_import_cycle_inside_a_package(package: str, directory: str) -> None:
    def own(name: str) -> str | None:  # the module of the package that ``name`` is in
        if not name.startswith(package + "."):
            return None
        return ".".join(name.split(".")[: package.count(".") + 2])

    graph = {
        f"{package}.{path.stem}": {
            m for name in imports_in(path, package) if (m := own(name)) is not None
        }
        for path in (ROOT / directory).glob("*.py")
        if path.stem != "__init__"
    }
    assert len(graph) > 3, graph

    def cycle_from(module: str, trail: list[str]) -> list[str] | None:
        if module in trail:
            return [*trail[trail.index(module) :], module]
        for imported in sorted(graph.get(module, ())):
            found = cycle_from(imported, [*trail, module])
            if found:
                return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, []))]
    assert not cycles, " -> ".join(cycles[0])


def test_the_http_layer_uses_only_the_services_public_methods() -> None:
    pytest.importorskip("fastapi")
    from contmerge.server.service import MergeService

    tree = ast.parse((ROOT / "contmerge" / "server" / "app.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "service"
    }
    assert "begin_upload" in used
    # attributes set in __init__ (spool, queue, board, settings, metrics...) are not on the
    # class: reaching into them fails here
    reached = {
        name
        for name in used
        if name.startswith("_")
        or not isinstance(
            inspect.getattr_static(MergeService, name, None), (property, types.FunctionType)
        )
    }
    assert not reached, f"app.py reaches into MergeService: {sorted(reached)}"


#: what app.py may import of the server: the service, its upload handle's answer, the HTTP-side
#: helpers (auth, refusals as HTTP answers, the metrics' content type)
APP_MAY_IMPORT = {
    "contmerge.errors",
    "contmerge.server.auth",
    "contmerge.server.bodycheck",
    "contmerge.server.metrics",
    "contmerge.server.service",
    "contmerge.server.upload",
}


def test_the_http_layer_imports_no_internal_of_the_service() -> None:
    """No spool, queue, journal, status board, writer or inbox in app.py: only the door."""
    path = ROOT / "contmerge" / "server" / "app.py"
    ours = {m for m in imports_in(path, "contmerge.server") if m.startswith("contmerge")}
    assert ours <= APP_MAY_IMPORT, f"app.py imports {sorted(ours - APP_MAY_IMPORT)}"
    tree = ast.parse(path.read_text())
    from_upload = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "upload"
        for alias in node.names
    }
    assert from_upload <= {"Accepted"}, from_upload  # the 202's content, not the machinery


def test_the_http_layer_drives_an_upload_through_its_handle_only() -> None:
    """What app.py does with the handle ``begin_upload`` returns: ``receive`` the body, then
    ``finish`` or ``abort`` (and name it in a log line); nothing of its insides (temp file,
    spool, limits, checks)."""
    pytest.importorskip("fastapi")
    from contmerge.server.upload import Upload

    tree = ast.parse((ROOT / "contmerge" / "server" / "app.py").read_text())
    handles = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and "service.begin_upload" in ast.unparse(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert handles, "app.py no longer takes an upload handle from service.begin_upload"
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in handles
    }
    assert {"receive", "finish", "abort"} <= used, used
    methods = {
        name
        for name in used
        if not name.startswith("_")
        and isinstance(inspect.getattr_static(Upload, name, None), (property, types.FunctionType))
    }
    assert used - methods <= {"id"}, f"app.py reaches into the upload: {sorted(used - methods)}"
