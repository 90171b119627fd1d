"""defence.py: source keys, admission (MaxStartups, per source, rate), scoring and growing bans."""

from __future__ import annotations

import random

import pytest

from sshfiles.defence import Admission, Defender, parse_cidrs, source_key


def test_source_key_is_the_address_for_ipv4_and_the_slash_64_for_ipv6() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:2:bbbb::9") == source_key("2001:db8:1:2:aaaa::1")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("fe80::1%eth0") == "fe80::/64"


def test_parse_cidrs_names_the_bad_entry() -> None:
    assert [str(n) for n in parse_cidrs("127.0.0.0/8, 2001:db8::/32,,10.1.2.3")] == \
        ["127.0.0.0/8", "2001:db8::/32", "10.1.2.3/32"]
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33'"):
        parse_cidrs("10.0.0.0/8,10.0.0.0/33")


def test_per_source_startups_and_release() -> None:
    a = Admission(0, 0, 0, per_source=2, per_source_rate=0, burst=1)
    assert a.admit("a") is None and a.admit("a") is None
    assert a.admit("a") == "per-source startups"
    assert a.admit("b") is None
    a.release("a")
    assert a.admit("a") is None
    assert a.admit("x", per_source=False) is None  # exempt sources skip per-source rules
    a.release("nobody")  # releasing what was never admitted changes nothing
    assert a.total == 4


def test_random_early_drop_between_start_and_full() -> None:
    a = Admission(start=10, rate=30, full=20, per_source=0, per_source_rate=0, burst=1, rng=random.Random(1))
    results = [a.admit(f"s{i}") for i in range(200)]
    assert results[:10] == [None] * 10           # below start: always admitted
    assert a.total == 20                        # never beyond full
    assert results.count(None) == 20
    assert "startups full" in results and "startups (random early drop)" in results


def test_per_source_rate_is_a_token_bucket() -> None:
    a = Admission(0, 0, 0, per_source=0, per_source_rate=2.0, burst=3)
    assert [a.admit("a", now=0.0) for _ in range(4)] == [None, None, None, "connection rate"]
    assert a.admit("b", now=0.0) is None        # another source has its own budget
    assert a.admit("a", now=0.5) is None        # one token back after 1/rate seconds
    assert a.admit("a", now=0.5) == "connection rate"


def test_threshold_in_window_bans_and_repeat_bans_grow() -> None:
    d = Defender(threshold=3, window=60, ban_time=100, ban_max=250)
    assert d.record("a", "auth-failed", now_mono=0, now=1000) is None
    assert d.record("a", "auth-failed", now_mono=1, now=1001) is None
    ban = d.record("a", "auth-failed", now_mono=2, now=1002)
    assert ban is not None and ban.until == 1102 and ban.strikes == 1
    assert d.banned("a", now=1050) and not d.banned("a", now=1103) and not d.banned("b", now=1050)
    assert [b.source for b in d.take_new_bans()] == ["a"] and d.take_new_bans() == []
    for t in range(3):
        ban = d.record("a", "auth-failed", now_mono=200 + t, now=1200 + t)
    assert ban is not None and ban.strikes == 2 and ban.until == 1202 + 200
    for t in range(3):
        ban = d.record("a", "auth-failed", now_mono=600 + t, now=1600 + t)
    assert ban is not None and ban.strikes == 3 and ban.until == 1602 + 250  # capped at ban_max


def test_a_slow_trickle_is_not_banned_and_exempt_sources_never_are() -> None:
    d = Defender(threshold=3, window=10, ban_time=100, ban_max=1000, exempt=parse_cidrs("10.0.0.0/8"))
    assert all(d.record("a", "auth-failed", now_mono=t * 6, now=t * 6) is None for t in range(20))
    assert all(d.record("10.1.2.3", "auth-failed", now_mono=0, now=0) is None for _ in range(20))
    assert not d.banned("10.1.2.3", now=1)


def test_store_view_replaces_the_cache_but_keeps_unwritten_bans() -> None:
    d = Defender(threshold=1, window=10, ban_time=100, ban_max=1000)
    d.record("a", "auth-failed", now_mono=0, now=0)           # decided here, not written yet
    d.replace_bans([("b", 500.0, 4)])                           # the store's list (an admin ban)
    assert d.banned("a", now=50) and d.banned("b", now=50)
    d.take_new_bans()
    d.replace_bans([])                                          # ban removed by the admin
    assert not d.banned("a", now=50) and not d.banned("b", now=50)
    ban = d.record("b", "auth-failed", now_mono=1, now=600)    # strikes were forgotten with the row
    assert ban is not None and ban.strikes == 1


def test_shared_admission_counts_the_other_processes_too() -> None:
    """Admission.share: the MaxStartups limits hold for all workers together; per-source stays local."""
    others = {"n": 7}
    published: list[int] = []
    adm = Admission(start=10, rate=100, full=10, per_source=3, per_source_rate=0, burst=1)
    adm.share(lambda: others["n"], published.append)
    assert published == [0]
    assert adm.admit("a") is None and adm.admit("b") is None and adm.admit("c") is None
    assert published[-1] == 3
    assert adm.admit("d") == "startups full"  # 3 here + 7 elsewhere = 10
    others["n"] = 0
    assert adm.admit("a") is None and adm.admit("a") is None
    assert adm.admit("a") == "per-source startups"  # this process's count of one source
    adm.release("a")
    assert published[-1] == adm.total == 4
