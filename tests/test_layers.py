"""The layers import downward only (design.md): the core knows nothing of I/O, stores nothing of HTTP, shells are thin.

Read from the source with ``ast``: every import, function-level ones included, of
every module under ``cachemw/``. A new module outside the known layers fails here
until it is given one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cachemw"

# Lowest first: a layer may import itself and those before it, never those after it.
LAYERS = ("core", "store", "runtime", "writebehind", "observe", "frameworks", "asgi", "wsgi", "orm", "cli")
# Facades for the public names (``from cachemw import CacheMiddleware``; ``cachemw.dashboard.dashboard_app()``).
FACADES = {"cachemw", "cachemw.dashboard", "cachemw.django", "cachemw.otel", "cachemw.sqlalchemy"}
# An ORM is imported by its own hook module only (and the facade that shows it): the rest of cachemw runs without it.
ORM_HOMES = {"sqlalchemy": {"cachemw.orm.sqlalchemy", "cachemw.sqlalchemy"},
             # Django is also the routes' framework: its URLconf, the WSGI handler it is found behind, `--django`.
             "django": {"cachemw.orm.django", "cachemw.django", "cachemw.frameworks.django", "cachemw.wsgi.middleware",
                        "cachemw.cli.common"}}
# The core is pure: nothing that does I/O or belongs to a framework.
CORE_MAY_NOT_IMPORT = {"anyio", "asyncio", "redis", "hiredis", "starlette", "fastapi", "httpx", "socket", "uvicorn",
                       "threading", "subprocess", "trio", "uvloop", "flask", "werkzeug", "django"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    return _imports_in(path.read_text(encoding="utf-8"), package)


def _imports_in(source: str, package: str) -> set[str]:
    """Every module (and ``module.name``) the source imports, relative imports resolved against ``package``."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from cachemw import cli`
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "cachemw" and parts[1] in LAYERS else None


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    homeless = [_module_name(path) for path in MODULES
                if _module_name(path) not in FACADES and _layer(_module_name(path)) is None]
    assert homeless == [], f"modules outside the layers {LAYERS}: {homeless}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: _module_name(path))
def test_imports_go_downward_only(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    if layer is None:
        return  # a facade
    rank = LAYERS.index(layer)
    upward = sorted(name for name in _imports(path)
                    if (target := _layer(name)) is not None and LAYERS.index(target) > rank)
    assert upward == [], f"{module} ({layer}) imports from a layer above it: {upward}"


@pytest.mark.parametrize("path", [p for p in MODULES if _layer(_module_name(p)) == "core"],
                         ids=lambda path: _module_name(path))
def test_the_core_does_no_io_and_knows_no_framework(path: Path) -> None:
    imported = {name.split(".")[0] for name in _imports(path)}
    assert imported & CORE_MAY_NOT_IMPORT == set()


def test_the_check_sees_an_upward_import() -> None:
    """The contract is not vacuous: a lazy import of the shell from the core, absolute or relative, is caught."""
    source = "def f():\n    from cachemw.asgi.middleware import CacheMiddleware\n    from ..asgi import handler\n"
    found = _imports_in(source, "cachemw.core")
    upward = {name for name in found if _layer(name) == "asgi"}
    assert upward == {"cachemw.asgi.middleware", "cachemw.asgi.middleware.CacheMiddleware", "cachemw.asgi",
                      "cachemw.asgi.handler"}


@pytest.mark.parametrize("orm", sorted(ORM_HOMES))
def test_an_orm_is_imported_by_its_hook_only(orm: str) -> None:
    importers = sorted(_module_name(path) for path in MODULES
                       if any(name.split(".")[0] == orm for name in _imports(path)))
    assert set(importers) <= ORM_HOMES[orm], f"{orm} is imported outside its hook: {importers}"
    assert importers, f"no module imports {orm}: the contract names the wrong home"
