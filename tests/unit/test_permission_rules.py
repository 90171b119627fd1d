"""permissions.py: the vocabulary, parsing and the inheritance rule (pure, no I/O)."""

from __future__ import annotations

import pytest

from sshfiles.permissions import (
    PERMISSIONS,
    PermissionRules,
    allowed,
    effective,
    format_perms,
    governs,
    normalize_rule_path,
    parse_perms,
)


def test_parse_and_format_round_trip() -> None:
    assert parse_perms("download, list") == frozenset({"list", "download"})
    assert format_perms(parse_perms("download,list")) == "list,download"
    assert parse_perms("list,*") == frozenset({"*"}) and format_perms({"*"}) == "*"
    assert parse_perms("none") == frozenset() and format_perms(frozenset()) == "none"
    assert parse_perms([]) == frozenset()
    assert format_perms(parse_perms(",".join(PERMISSIONS))) == ",".join(PERMISSIONS)


@pytest.mark.parametrize("text", ["", " , ", "list,fly", "read", "none,list"])
def test_parse_refuses_unknown_words(text: str) -> None:
    with pytest.raises(ValueError):
        parse_perms(text)


def test_rule_paths_are_normalised_and_dotdot_refused() -> None:
    assert normalize_rule_path("/") == "/"
    assert normalize_rule_path("drop/") == "/drop"
    assert normalize_rule_path("//a/./b//") == "/a/b"
    for bad in ("", "/a/../b", "..", "a\x00b"):
        with pytest.raises(ValueError):
            normalize_rule_path(bad)


def test_no_rules_is_everything() -> None:
    assert all(allowed({}, "/any/where", p) for p in PERMISSIONS)
    assert not PermissionRules().restricted
    assert not PermissionRules(rules={"/": frozenset({"*"})}).restricted


def test_deeper_rules_override_and_are_inherited() -> None:
    rules = {"/": frozenset({"list", "download"}), "/drop": frozenset({"upload"}),
             "/drop/open": frozenset({"*"})}
    assert allowed(rules, "/", "list") and not allowed(rules, "/", "upload")
    assert allowed(rules, "/docs/deep", "download")                 # inherited from /
    assert allowed(rules, "/drop", "upload") and not allowed(rules, "/drop", "list")   # replaces, not adds
    assert allowed(rules, "/drop/x/y", "upload") and not allowed(rules, "/drop/x/y", "download")
    assert allowed(rules, "/drop/open/z", "delete")
    assert effective(rules, "/dropbox") == frozenset({"list", "download"})   # a prefix is not a parent
    assert PermissionRules(rules=rules).restricted


def test_governs_finds_rules_at_or_below_a_path() -> None:
    rules = {"/a/b": frozenset({"list"})}
    assert governs(rules, "/a") and governs(rules, "/a/b") and governs(rules, "/")
    assert not governs(rules, "/a/b/c") and not governs(rules, "/ab") and not governs({}, "/")
