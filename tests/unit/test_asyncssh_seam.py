"""sshfiles.asyncssh_seam: the version gate (the patches themselves are tested in tests/test_speedups.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

import sshfiles
from sshfiles.asyncssh_seam import SUPPORTED, check_version


@pytest.mark.parametrize("version", ["2.24.0", "2.24.1", "2.24.99", "2.24"])
def test_supported(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["2.23.9", "2.25.0", "3.0.0", "1.24.0", "2", "", "dev", "2.x"])
def test_unsupported_fails_in_one_line_naming_the_range(version: str) -> None:
    with pytest.raises(ImportError) as exc:
        check_version(version)
    message = str(exc.value)
    assert "\n" not in message and ">=2.24,<2.25" in message and f"installed: {version}" in message


def test_import_fails_on_an_unsupported_asyncssh() -> None:
    """The check runs at import, before any private name is touched (a subprocess: the import is global)."""
    code = "import asyncssh; asyncssh.__version__ = '2.25.0'; import sshfiles.asyncssh_seam"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(sshfiles.__file__).parent.parent)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "ImportError: sshfiles needs asyncssh >=2.24,<2.25 (installed: 2.25.0): "
        "it relies on internals checked only for that range")


def test_installed_version_is_supported() -> None:
    check_version(asyncssh.__version__)
    assert SUPPORTED == ((2, 24), (2, 25))


# Modules that still import asyncssh's private submodules, and what from: to be moved into the seam
# (server.py and sftp.py were being rewritten when the seam was made). Shrink this, never grow it.
def test_only_the_seam_imports_asyncssh_internals() -> None:
    """``import asyncssh`` (the public API) is fine anywhere; ``asyncssh.<submodule>`` only in the seam."""
    root = Path(sshfiles.__file__).parent
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = f"sshfiles/{path.relative_to(root).as_posix()}"
        if rel == "sshfiles/asyncssh_seam.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.startswith("asyncssh."):
                    found.setdefault(rel, set()).add(name)
    assert not found, f"asyncssh internals imported outside asyncssh_seam.py: {found}"
