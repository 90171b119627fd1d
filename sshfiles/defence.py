"""Per-source defence before authentication: admission limits, scoring and bans.

Plain Python, no SSH and no store: server.py asks these objects on the event
loop (every call is a few dict operations, never I/O), and persists or
refreshes bans from the watcher thread.

* A *source* is the client's address reduced to what one party controls: an
  IPv4 address (/32), or an IPv6 /64 (one customer's prefix; per-address
  counters would let one host rotate through 2**64 addresses).
  IPv4-mapped IPv6 addresses count as their IPv4 address.
* `Admission` is OpenSSH's MaxStartups and PerSourceMaxStartups plus a
  per-source connection rate: it counts connections that have not yet
  authenticated, in total and per source; between `start` and `full` total
  it refuses new ones with a probability growing linearly from `rate` to 100 %
  (random early drop, so a flood cannot deterministically fill the last slots),
  and a source over its own share or its rate is refused outright.  Admission
  runs when the TCP connection is accepted, before the version exchange and
  any cryptography.
* `Defender` is SFTPGo's defender / OpenSSH's PerSourcePenalties: failed
  logins, pre-auth timeouts, protocol errors and refusals score against the
  source within a sliding window; reaching the threshold bans the source for
  `ban_time`, doubled on every repeat (strikes) up to `ban_max`.  Exempt
  networks are never scored nor banned.  The ban list itself lives in the
  store (shared by every worker); `Defender` keeps this process's cached copy
  plus the bans it decided and has not yet written (`take_new_bans`).
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Admission", "Defender", "NewBan", "parse_cidrs", "source_key"]


def source_key(address: str) -> str:
    """The unit per-source rules count: "192.0.2.7", or "2001:db8:1:2::/64" for any address in that /64."""
    host = address.split("%", 1)[0]  # a scope id is not part of who the client is
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def parse_cidrs(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """"127.0.0.0/8, 2001:db8::/32" -> networks; ValueError naming the bad entry."""
    out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR network: {part!r}") from None
    return out


def _in_networks(address: str, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    host = address.split("%", 1)[0]
    if host.endswith("/64"):
        host = host[:-3]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)



#: How long an ended ban is remembered for its strikes (a repeat ban of the source is longer): a
#: week, like a slow brute-forcer's return. Past that the source starts again from a first ban, and
#: the session watcher deletes its row (`SshfilesService._sync_bans`): the ban list stays bounded by
#: the sources banned in the last week, not by every source ever banned.
STRIKE_MEMORY = 7 * 86400.0


class Admission:
    """Limits on connections that have not authenticated yet (see the module docstring).

    `start`/`rate`/`full` are MaxStartups' start:rate:full (rate in percent);
    `per_source` caps one source's unauthenticated connections; `per_source_rate`
    connections per second with a burst of `burst` are one source's new-connection budget
    (a token bucket).  Zero disables a limit.
    """

    def __init__(self, start: int, rate: int, full: int, per_source: int, per_source_rate: float,
                 burst: int, rng: random.Random | None = None) -> None:
        self.start, self.rate, self.full = start, rate, full
        self.per_source, self.per_source_rate, self.burst = per_source, per_source_rate, max(1, burst)
        self.total = 0
        self.by_source: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, last refill time)
        self._rng = rng or random.Random()
        self._elsewhere: Callable[[], int] = lambda: 0
        self._publish: Callable[[int], None] = lambda _total: None

    def share(self, elsewhere: Callable[[], int], publish: Callable[[int], None]) -> None:
        """Count the totals across processes (``--workers N``): `elsewhere()` is the other processes'
        unauthenticated connections, `publish(total)` tells them this one's. The MaxStartups limits
        (start, rate, full) then hold for the server as a whole; the per-source rules stay per process."""
        self._elsewhere, self._publish = elsewhere, publish
        publish(self.total)

    def admit(self, source: str, now: float | None = None, per_source: bool = True) -> str | None:
        """Count a new connection and return None, or return why it is refused (and count nothing).

        `per_source=False` (an exempt source) skips the per-source rules; the totals still apply.
        """
        now = time.monotonic() if now is None else now
        if per_source and self.per_source_rate > 0:
            tokens, last = self._buckets.get(source, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.per_source_rate)
            if tokens < 1.0:
                self._buckets[source] = (tokens, now)
                return "connection rate"
            self._buckets[source] = (tokens - 1.0, now)
            if len(self._buckets) > 4096:  # forget sources whose bucket is full again
                self._buckets = {s: (t, t0) for s, (t, t0) in self._buckets.items()
                                 if t + (now - t0) * self.per_source_rate < self.burst}
        if per_source and self.per_source and self.by_source.get(source, 0) >= self.per_source:
            return "per-source startups"
        total = self.total + self._elsewhere()
        if self.full and total >= self.full:
            return "startups full"
        if self.full and self.start and total >= self.start:
            span = max(1, self.full - self.start)
            p = (self.rate + (100 - self.rate) * (total - self.start) / span) / 100.0
            if self._rng.random() < p:
                return "startups (random early drop)"
        self.total += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self._publish(self.total)
        return None

    def release(self, source: str) -> None:
        """The connection authenticated or ended: it no longer counts."""
        n = self.by_source.get(source, 0)
        if n <= 0:
            return
        self.total -= 1
        if n == 1:
            del self.by_source[source]
        else:
            self.by_source[source] = n - 1
        self._publish(self.total)


@dataclass
class NewBan:
    source: str
    until: float   # epoch seconds
    reason: str
    strikes: int


class Defender:
    """Scores per source, and this process's view of the bans (see the module docstring).

    `threshold`: the points that ban when they fall within `window` seconds (a sliding
    window: `threshold` failed logins within `window` ban, a slow trickle does not).
    """

    # What each event costs, OpenSSH PerSourcePenalties-like: a refused or broken
    # connection is cheap for the attacker, a password guess is what we defend against.
    SCORES: ClassVar[dict[str, float]] = {"auth-failed": 1.0, "preauth-timeout": 2.0,
                                          "protocol-error": 1.0, "refused": 0.5}

    def __init__(self, threshold: float, window: float, ban_time: float, ban_max: float,
                 exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.threshold, self.window = threshold, window
        self.ban_time, self.ban_max = ban_time, ban_max
        self.exempt = list(exempt)
        self._scores: dict[str, list[tuple[float, float]]] = {}  # source -> [(monotonic time, points)] in window
        self._bans: dict[str, float] = {}                   # source -> until (epoch), the store's view
        self._strikes: dict[str, int] = {}                  # source -> bans so far (the store's view)
        self._new: list[NewBan] = []

    def is_exempt(self, source: str) -> bool:
        return _in_networks(source, self.exempt)

    def banned(self, source: str, now: float | None = None) -> bool:
        until = self._bans.get(source)
        return until is not None and until > (time.time() if now is None else now)

    def record(self, source: str, event: str, now_mono: float | None = None,
               now: float | None = None) -> NewBan | None:
        """Score an event; returns the ban it caused (also queued for the store), or None."""
        if self.threshold <= 0 or self.is_exempt(source) or self.banned(source, now):
            return None
        now_mono = time.monotonic() if now_mono is None else now_mono
        events = [(t, p) for t, p in self._scores.get(source, ()) if now_mono - t < self.window]
        events.append((now_mono, self.SCORES.get(event, 1.0)))
        if sum(p for _, p in events) < self.threshold:
            self._scores[source] = events
            if len(self._scores) > 65536:  # a spoofed-looking spread of sources: forget the oldest
                self._scores.pop(next(iter(self._scores)))
            return None
        self._scores.pop(source, None)
        strikes = self._strikes.get(source, 0) + 1
        duration = min(self.ban_max, self.ban_time * 2 ** (strikes - 1)) if self.ban_max else \
            self.ban_time * 2 ** min(strikes - 1, 30)
        until = (time.time() if now is None else now) + duration
        ban = NewBan(source, until, event, strikes)
        self._bans[source] = until
        self._strikes[source] = strikes
        self._new.append(ban)
        return ban

    def take_new_bans(self) -> list[NewBan]:
        """The bans decided here and not yet written to the store (the watcher writes them)."""
        new, self._new = self._new, []
        return new

    def replace_bans(self, bans: Iterable[tuple[str, float, int]]) -> None:
        """Adopt the store's list of (source, until, strikes), keeping the bans not yet written."""
        rows = list(bans)
        self._bans = {s: u for s, u, _ in rows}
        self._strikes = {s: k for s, _, k in rows}
        for b in self._new:
            self._bans[b.source] = max(b.until, self._bans.get(b.source, 0.0))
            self._strikes[b.source] = max(b.strikes, self._strikes.get(b.source, 0))
