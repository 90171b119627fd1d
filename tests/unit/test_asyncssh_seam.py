"""sshfiles.asyncssh_seam: the version gate (the patches themselves are tested in tests/test_speedups.py)."""

from __future__ import annotations

import asyncssh
import pytest

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


def test_installed_version_is_supported() -> None:
    check_version(asyncssh.__version__)
    assert SUPPORTED == ((2, 24), (2, 25))
