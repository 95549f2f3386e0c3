"""The import layering of docs/architecture.md, enforced by reading every import in the
source (module level, inside functions and under TYPE_CHECKING alike)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# What each layer may import of capsa (besides itself). Layers are the first component
# below ``capsa``; the top (the package itself, cli, doctor, the config re-export, the
# sync face and the servers) may import anything and nothing may import it.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_util": {"errors"},
    "guest": set(),  # runs inside the VM as capsa_guest: stdlib only
    "spec": {"errors", "_util", "net.spec", "net.policy"},
    "net": {"errors", "_util"},
    "devices": {"errors", "_util", "spec"},
    "images": {"errors", "_util", "guest"},
    "oci": {"errors", "_util", "images"},
    "backends": {"errors", "_util", "spec", "net", "devices", "images"},
    "api": {"errors", "_util", "spec", "net", "devices", "images", "oci", "guest", "backends"},
}
TOP = {"capsa", "config", "cli", "doctor", "sync", "server", "remote", "ray"}
# The API reaches backends only through their seam.
API_MAY_IMPORT_FROM_BACKENDS = {"capsa.backends.base", "capsa.backends.registry"}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "capsa").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The capsa modules ``name`` imports (``from a import b`` counts ``a.b`` if a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imports_of(name, path, known)) for name, path in known.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "capsa"


def allowed(source: str, target: str) -> bool:
    src, dst = layer(source), layer(target)
    if src in TOP:
        return True
    if dst in TOP:
        return False
    if src == dst:
        return True
    if src == "api" and dst == "backends":
        return target in API_MAY_IMPORT_FROM_BACKENDS
    rules = ALLOWED[src]
    return dst in rules or ".".join(target.split(".")[1:3]) in rules


def test_no_import_goes_up_or_sideways() -> None:
    wrong = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in sorted(targets)
        if not allowed(source, target)
    ]
    assert wrong == []


def test_only_capsa_ray_imports_ray() -> None:
    """Ray is an optional extra: nothing outside ``capsa.ray`` may need it."""
    users = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                targets = [node.module or ""]
            else:
                continue
            if any(t == "ray" or t.startswith("ray.") for t in targets):
                users.append(name)
    assert users and all(layer(user) == "ray" for user in users), users


def test_every_layer_is_known() -> None:
    layers = {layer(m) for m in graph()}
    assert layers <= set(ALLOWED) | TOP


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_the_checks_can_fail() -> None:
    # A circle and an upward import are both found.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert not allowed("capsa.net.gateway", "capsa.api.network")
    assert not allowed("capsa.backends.qemu.backend", "capsa.api.network")
    assert not allowed("capsa.api.handle", "capsa.backends.qemu.backend")
    assert not allowed("capsa.spec.vm", "capsa.net.stack")
    assert allowed("capsa.spec.vm", "capsa.net.spec")
    assert allowed("capsa.api.launch", "capsa.backends.registry")
