"""The import graph follows the layers in the README: imports only point down, and there is no cycle.

Parsed from the source (no import side effects), so it runs in milliseconds.  A new module
must be given a layer here: that is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sshfiles"

# Higher numbers sit above lower ones; a module may import its own layer or below.
LAYERS: dict[str, int] = {
    "cli": 7, "__main__": 7,
    "client": 6,                                   # sshfiles-cli: never imports the server side
    "server": 5,
    "sftp": 4, "exec_commands": 4, "scp": 4,      # protocol adapters
    "session": 3,                                  # one user's operations: the policy layer
    "jail": 2, "folders": 2, "quota": 2, "hashing": 2, "checkfile": 2, "passwords": 2,
    "accounts": 1, "stores": 1,
    "units": 0, "logsafe": 0, "audit": 0, "metrics": 0, "sdnotify": 0, "config": 0, "permissions": 0, "atomic": 0, "hooks": 0, "defence": 0, "proxy_protocol": 0, "worker_balance": 0, "asyncssh_seam": 0, "background": 0, "fileio": 0, "malloc_tuning": 0, "_chachapoly": 0, "__init__": 0,
}
# What the client may use of the package besides itself.
CLIENT_MAY_IMPORT = {"units", "checkfile", "hashing", "asyncssh_seam", "fileio", "malloc_tuning", "__init__"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(rel.parts)


def _top(name: str) -> str:
    return name.split(".")[0]


def _imports(path: Path) -> set[str]:
    """sshfiles modules imported by a file, as dotted names relative to the package."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:  # `from . import x`: a submodule, or a name of the package
                    for a in node.names:
                        sub = ".".join([*base, a.name])
                        is_module = (PACKAGE.joinpath(*sub.split(".")).with_suffix(".py").exists()
                                     or PACKAGE.joinpath(*sub.split(".")).is_dir())
                        found.add(sub if is_module else ".".join([*base, "__init__"]))
                    continue
            elif node.module and node.module.startswith("sshfiles."):
                mod = node.module[len("sshfiles."):]
            elif node.module == "sshfiles":
                found.update(a.name for a in node.names)
                continue
            else:
                continue
            if mod:
                found.add(mod)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("sshfiles."):] for a in node.names if a.name.startswith("sshfiles."))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer() -> None:
    missing = sorted({_top(m) for m in _graph()} - LAYERS.keys())
    assert not missing, f"give these modules a layer in tests/unit/test_layers.py: {missing}"


def test_imports_only_point_down() -> None:
    wrong = []
    for mod, imports in _graph().items():
        for imp in imports:
            a, b = _top(mod), _top(imp)
            if a == b:
                continue
            if a == "client" and b not in CLIENT_MAY_IMPORT:
                wrong.append(f"{mod} -> {imp} (the client stays independent of the server side)")
            elif LAYERS.get(b, 99) > LAYERS.get(a, -1):
                wrong.append(f"{mod} (layer {LAYERS.get(a)}) -> {imp} (layer {LAYERS.get(b)})")
    assert not wrong, "imports running back up a layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    graph = {_top(m): set() for m in _graph()}
    for mod, imports in _graph().items():
        graph[_top(mod)].update(_top(i) for i in imports if _top(i) != _top(mod) and _top(i) in graph)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle.extend([*path, node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*path, node]):
                return True
        state[node] = 2
        return False

    for node in graph:
        if state.get(node) is None and visit(node, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)
