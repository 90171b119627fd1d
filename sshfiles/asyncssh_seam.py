"""The one module of sshfiles allowed to touch asyncssh internals.

Why a seam: sshfiles relies on a few asyncssh behaviours that have no public API (raw extended SFTP
requests from the client) or that cost too much per packet (the transport fixes below). Private names
change between asyncssh releases without notice, so every use of one lives here, next to the version
check that makes an untested asyncssh fail at import with one clear line instead of misbehaving at
the first packet. To support a new asyncssh release: re-check each item below against its source,
rerun tests/test_speedups.py, tests/test_client.py and tests/unit, then widen ``SUPPORTED``.

Each item says which upstream behaviour it changes and whether the change belongs upstream:

0. SSH wire primitives: ``SSHPacket`` (a reader over a packet body), ``String``/``UInt32``/``UInt64``
   (encoders) and ``PacketDecodeError`` live in ``asyncssh.packet``, which is not public API. They
   are re-exported here unchanged so codecs (``checkfile.py``) need no private import of their own.
   Belongs upstream: exporting them would help every SFTP extension author.

1. ``extended_request`` -- client side, raw SFTP extended requests (``check-file``). asyncssh's
   ``SFTPClient`` has no public way to send a vendor extension and read its EXTENDED_REPLY, and its
   handler rejects an EXTENDED_REPLY for any request name not in the class-level ``_return_types``
   table. We give the one handler instance its own copy of the table with the name added, then call
   the private ``_make_request``. Belongs upstream: yes, as a public
   ``SFTPClient.extended_request(name, payload) -> bytes``.

2. ``request_read`` / ``request_write`` -- client side, exactly one READ/WRITE request per call.
   ``SFTPClientFile.read/write`` split and fan out into tasks of their own, which asyncssh leaves
   unretrieved when the caller cancels (a quota error mid-upload); the transfer engine pipelines its
   own requests, so it needs the per-request calls of the private ``SFTPClient._handler``. Belongs
   upstream: the unretrieved-task warning is an upstream bug; a public per-request API would be nice.

3. ``install_speedups`` -- server side and the ``sshfiles-cli`` process, per-packet costs measured with
   py-spy (README, Performance):

   a. No empty SSH_MSG_IGNORE before every packet. ``SSHConnection.send_packet`` sends one ahead of
      every non-key-exchange packet once encryption is on: RFC 4251 section 9.3.1's countermeasure
      against chosen-plaintext attacks on CBC mode. sshfiles offers no CBC cipher (server.py), so it
      protects nothing here while it doubles the packets on the wire (a second encryption, MAC and
      socket write per data packet). Belongs upstream: yes, as "only when a CBC cipher is in use"
      (OpenSSH never sends it).
   b. One socket write per event-loop turn instead of one per SSH packet. ``SSHConnection._send``
      hands every packet to the transport on its own, so an upload answers each WRITE with a separate
      send() for its small STATUS reply and window adjust; buffering a turn's packets and writing them
      together is the same byte stream with a fraction of the system calls. Belongs upstream: maybe,
      as an option (it delays writes to the end of the current loop turn).
   c. No packet-log formatting when packet logging is off. ``SSHPacketLogger._log_packet`` formats a
      description of every packet (name, byte count, payload copy) before its logger checks the debug
      level (3) that packet logging needs; below 3 the result was always discarded. Belongs
      upstream: yes, a plain bug fix.
   d. A cheaper chacha20-poly1305@openssh.com. asyncssh 2.24 builds three ChaCha20 cipher objects
      per packet (header, Poly1305 key, data) and concatenates each received packet twice; at 32 KiB
      (the largest packet OpenSSH's client accepts) that is about 58 us per packet, of which the
      ChaCha20 and Poly1305 work is about 20 us. ``FastChachaCipher`` derives the Poly1305 key and
      encrypts the data from one ChaCha20 context (block 0 is the Poly1305 key, the data starts at
      block 1, exactly as the OpenSSH construction specifies) and feeds Poly1305 in pieces, so it does
      two cipher setups per packet instead of three, each through ``cryptography``'s
      ``create_encryption_ctx`` directly (about 1.8 us instead of 4.1 us for ``Cipher(...)
      .encryptor()``; a private ``cryptography`` name, checked against the public path at import
      and replaced by it on any difference). Same wire format: tests/test_speedups.py checks it
      byte for byte against asyncssh's implementation and the stock OpenSSH client. Belongs
      upstream: yes (docs/upstream/0003).

   e. Received data cut into packet-sized pieces. ``SSHConnection.data_received`` appends each
      socket read (up to 256 KiB) to a bytes buffer from which the parser takes packets with
      ``buf = buf[n:]``, copying everything behind each packet again: with 32 KiB packets about
      128 KiB of copying per packet received, plus the append itself whenever a partial packet was
      left over. The replacement feeds the parser exactly the piece it waits for (first cipher
      block, then the rest of the packet and MAC), so nothing is copied twice. Same parser, same
      checks; other parser states get asyncssh's own buffering. Belongs upstream: yes (an offset
      into the buffer instead of slicing, or a bytearray with ``del buf[:n]``).

   f. Data packets sent without joining. ``SSHConnection.send_packet`` joins a packet four times
      before the socket (type + arguments, padding, header + ciphertext, + MAC) and
      ``SSHChannel.send_packet`` once more. On an established chacha20 connection the pieces are
      now encrypted and MACed one after the other (same bytes: a stream cipher and an incremental
      MAC) and handed to item 3b's buffer unjoined; key exchange, authentication, a due rekey,
      compression, packet logging at debug level 3 and other ciphers take asyncssh's path (with
      3a's change). Needs 3a and 3d. Belongs upstream: yes, as an ``encrypt_packet`` over pieces.
   g. Replies batched while the peer streams. During an upload each 32 KiB WRITE from OpenSSH's
      client arrives in its own socket read and its STATUS reply went out in its own send() at the
      end of that loop turn: one system call (and one wake-up of the client) per request. When the
      last socket read was bulk data (16 KiB or more), item 3b's flush now waits 1 ms instead of
      one loop turn, so the replies to the requests arriving meanwhile leave in one write (strace
      of a 128 MiB stock-sftp upload: 866 instead of 1648 sendto for 1597 pwrite). Interactive
      traffic (small reads) is flushed at the end of the turn as before, and more than 256 KiB of
      held-back packets are written at once (item 4a's back-pressure sees only the transport's
      buffer, so what waits is bounded by size, not only by time). Needs 3b and 3e.
      Belongs upstream: no (a latency/throughput trade-off for this server's traffic).
   h. SFTP requests taken from the channel's received data without joining or slicing (server
      handlers that declare ``ZERO_COPY_WRITE``; asyncssh_seam item 4's ``recv_packet``).
      asyncssh's ``SFTPHandler.recv_packet`` awaits ``readexactly(4)`` and then
      ``readexactly(length)``, each through ``SSHStreamSession.read``: a lock, and for a request
      that ends inside a received chunk, ``chunk[n:]`` copies the rest of that chunk, the pieces
      are joined, and the SFTP parser copies the WRITE's data once more with ``get_string``. OpenSSH's
      client sends each 32 KiB WRITE (32,797 bytes with its header) in 32 KiB channel messages, so
      no request is aligned with a message: about four 32 KiB copies per WRITE before ``pwrite``.
      Here the handler keeps an offset into the first buffered chunk instead of slicing it, and a
      request inside one chunk becomes a ``memoryview`` of it (no copy at all); one spanning
      chunks is joined once. A WRITE's data reaches ``os.pwrite`` as a view of that buffer; every
      other request is handed on as ``bytes`` (the handlers key dicts by handle and path). Same
      checks as asyncssh (``MAX_SFTP_PACKET_LEN``, EOF mid-request), same accounting of the
      stream's buffered bytes (``_recv_buf_len``, so its pause/resume of reading is unchanged),
      and anything unusual in the buffer (a signal or EOF marker, another reader holding the
      lock) hands the rest to asyncssh's own ``recv_packet``. Belongs upstream: yes
      (docs/upstream/0005).
   i. Channel data handed on as a view of the decrypted packet. asyncssh's ``_recv_packet`` slices
      the payload out of the decrypted packet (``packet_data[1:-padlen]``) and the channel's
      ``_process_data`` slices the data out of the payload (``get_string``): two copies of every
      32 KiB received. On a chacha20 connection (item 3d's decryption), a decrypted
      ``MSG_CHANNEL_DATA`` packet of at least ``_VIEW_MIN`` bytes is returned as a ``memoryview``,
      so both slices are views and the channel's session receives a view of the packet; every
      other message (key exchange, authentication, channel requests: code that calls ``decode``
      on its fields) stays ``bytes``, as does everything while packet logging (debug level 3)
      is on. Readers of the stream get ``bytes`` as before (asyncssh's ``read`` joins; item 3h
      takes views). Needs 3d. Belongs upstream: with the same care (docs/upstream/README.md).

   j. A cheaper AES-GCM (aes128-gcm@openssh.com, aes256-gcm@openssh.com: what sshfiles-cli asks for
      first). asyncssh's ``GCMCipher`` builds a new ``AESGCM`` (key schedule included) for every
      packet, joins every sent packet onto its header and every received one twice (first block +
      rest, then + tag, since ``AESGCM.decrypt`` wants one buffer). ``FastGCMCipher`` keeps the key,
      runs each packet through one streaming GCM context fed in pieces (length as associated data,
      then each part) and so also gives item 3f its unjoined send path for GCM. Same wire format:
      tests/test_speedups.py checks it packet by packet against asyncssh's and with the stock
      OpenSSH client (``sftp -c aes128-gcm@openssh.com``). Belongs upstream: yes.

   k. chacha20-poly1305 packets sealed and opened in one call each, in compiled code
      (``sshfiles/_chachapoly.c``, built by pip from ``setup.py`` when a C compiler is there; optional:
      without it item 3d's Python path runs). Item 3d still builds three ChaCha20 contexts and a
      Poly1305 object through ``cryptography`` per packet, about 14 us of calls around 20 us of
      cipher work per 32 KiB, and a stock OpenSSH client's packets are all 32 KiB or less. The helper
      keeps both keys set up per connection and calls OpenSSL's own ChaCha20 and Poly1305 (the
      system's libcrypto.so.3, found at import: no cipher code of ours, no OpenSSL headers needed to
      build). ``CompiledChachaCipher`` has ``FastChachaCipher``'s interface, so items 3e, 3f and 3i
      work on it unchanged; tests/test_speedups.py checks it byte for byte against asyncssh's
      construction and with the stock OpenSSH client, and runs the same transfers without it.
      Belongs upstream: as a faster backend for asyncssh's ``ChachaCipher``.

   ``install_speedups()`` patches classes, so it affects every connection in the process: only the
   server and the ``sshfiles-cli`` command call it (each a process of one role), never the client
   library. ``SSHFILES_NO_SPEEDUPS=1`` (any value) turns all of
   them off; a comma list of item names (``3d,3e``) turns off just those, for measuring each.

4. ``SFTPServerHandlerBase`` -- server side, the SFTP protocol handler. asyncssh's
   ``SFTPServerHandler`` (not exported) keeps its VERSION extensions, its request dispatch and the
   reply type of each extended request in class-level private tables (``_extensions``,
   ``_packet_handlers``, ``_return_types``), and a handler's state in private attributes
   (``_server``, ``_file_handles``, ``_writer``). The base class lets an adapter declare what it
   adds, drops and replaces (``EXTENSIONS``, ``DROP_EXTENSIONS``, ``REQUESTS``, ``EXTENDED_REPLIES``)
   and reach its state through ``server``/``file_handle()``, so sftp.py touches no private name. It
   also sends the channel's exit status before asyncssh's cleanup closes the channel without one
   (OpenSSH's scp in SFTP mode and ``ssh -s sftp`` report failure otherwise), and calls
   ``on_cleanup`` first so the adapter can tell a vanished client from a clean end. Results that are
   none of asyncssh's own types are sent as EXTENDED_REPLY bodies through their ``encode(version)``
   method (``ExtendedReply``). Belongs upstream: yes: a public way to register extension handlers, and
   the exit status (asyncssh's own sftp subsystem sends none either).

   Resource bounds ("Hardening II"), also here because they change the handler's request loop:

   a. Back-pressure on replies. asyncssh's ``recv_packets`` reads a request, awaits
      ``_process_packet`` (which writes the reply into the channel) and reads the next one; it never
      waits for replies to leave. A client that pipelines READs and stops reading makes the server
      buffer every reply (2000 READs of 256 KiB: 500 MiB): first in the channel's send buffer once
      the client's window is used up, and with a client that advertises a huge window, in the
      connection's transport buffer (asyncssh ignores the transport's ``pause_writing``). Before
      each request, ``_process_packet`` now waits while the replies not yet sent exceed
      ``REPLY_BUFFER_LIMIT``: channel buffer through the public ``SSHWriter.drain()`` (with the
      channel's high-water mark set to the limit), transport buffer (private ``_transport`` of the
      connection) by polling every 10 ms; after more than the limit of replies in one loop turn it
      first lets the loop turn, since item 3b only hands a turn's packets to the transport at its
      end (requests already received are processed without one). While it waits it reads no request, so
      the channel's receive window (2 MiB; 8 MiB for asyncssh clients, server.channel_sizes) closes and
      the client must stop sending: one session's unsent replies are bounded by ``REPLY_BUFFER_LIMIT``
      plus one reply plus the client's window. Belongs upstream: yes, asyncssh's own SFTP server has
      the same unbounded buffering.
   b. Directory handles are closed. asyncssh drops a directory handle's iterator from its table at
      CLOSE (and at the end of the session) without closing it, leaving the open directory to the
      garbage collector. An iterator with an ``aclose()`` (async generators, sftp.py's listing) is
      now closed at CLOSE and at cleanup, so a directory handle's fd and its place in the session's
      handle count are given back at once. Belongs upstream: yes.
   c. ``open_handle_count`` counts directory handles too (``_dir_handles``).

5. ``ChannelSessionBase`` -- server side, one session channel. asyncssh's ``SSHServerStreamSession``
   (not exported) is what turns a channel into the reader/writer streams that its SFTP and SCP servers
   consume; its constructor signature and its ``_chan``/``_conn``/``_encoding`` attributes are
   private. The base class exposes the channel, the streams and a task starter, and ``run_sftp``/
   ``run_scp`` start asyncssh's handlers on them. Belongs upstream: a public way to run the SFTP
   subsystem and SCP on a channel the application dispatches itself.

6. ``serve_accepted`` -- server side, an SSH server connection on a socket the application accepted
   itself (worker_balance.py's shared listener, the PROXY-protocol listener), with options shared by
   every connection, as ``asyncssh.listen`` does. The public ``asyncssh.run_server(sock, options=...)``
   builds a fresh ``SSHServerConnectionOptions`` per connection (about 5 KiB per idle session more,
   measured: 64.3 against 59.5 KiB PSS), and the handler factory is an option, so a per-connection
   factory (the client's address from a PROXY header, the worker's load count) would need one too.
   This creates asyncssh's ``SSHServerConnection`` (not exported; its constructor is what ``listen``
   calls per connection) with the shared options and sets its private ``_protocol_factory`` (the
   option's copy, called once in ``connection_made``) to the connection's own factory. Belongs
   upstream: an ``SSHAcceptor``-like way to serve an already accepted socket with shared options.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable
from typing import Any, cast

import asyncssh

__all__ = [
    "SPEEDUP_ITEMS",
    "SUPPORTED",
    "FastChachaCipher",
    "FastChachaEncryption",
    "PacketDecodeError",
    "SSHPacket",
    "String",
    "UInt32",
    "UInt64",
    "check_version",
    "extended_request",
    "install_speedups",
    "install_speedups_from_env",
    "request_read",
    "request_write",
    "serve_accepted",
    "speedups_disabled",
]

#: The asyncssh versions whose internals this module was checked against: [low, high).
SUPPORTED: tuple[tuple[int, int], tuple[int, int]] = ((2, 24), (2, 25))
_SUPPORTED_TEXT = ">=2.24,<2.25"


def check_version(version: str) -> None:
    """Raise ImportError with one line unless ``version`` is in ``SUPPORTED``.

    Only the release's major.minor is compared (2.24.1 is 2.24); a version that does not parse is
    unsupported too, since nothing can be said about its internals.
    """
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    low, high = SUPPORTED
    if not low <= (major, minor) < high:
        raise ImportError(f"sshfiles needs asyncssh {_SUPPORTED_TEXT} (installed: {version}): "
                          "it relies on internals checked only for that range")


check_version(asyncssh.__version__)

# Imported after the check: on another version these private modules may not even exist.
from asyncssh import encryption as _encryption  # noqa: E402
from asyncssh.channel import SSHChannel  # noqa: E402
from asyncssh.connection import SSHConnection, SSHServerConnection  # noqa: E402
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE, MSG_KEX_LAST  # noqa: E402
from asyncssh.constants import MSG_USERAUTH_LAST as _MSG_USERAUTH_LAST  # noqa: E402
from asyncssh.logging import SSHLogger  # noqa: E402
from asyncssh.packet import PacketDecodeError, SSHPacket, SSHPacketLogger, String, UInt32, UInt64  # noqa: E402
from asyncssh.scp import run_scp_server  # noqa: E402
from asyncssh.sftp import FXP_CLOSE, FXP_EXTENDED_REPLY, FXP_WRITE, SFTPClientHandler, SFTPServerHandler  # noqa: E402
from asyncssh.sftp import MAX_SFTP_PACKET_LEN as _MAX_SFTP_PACKET_LEN  # noqa: E402
from asyncssh.stream import SSHServerStreamSession  # noqa: E402
from cryptography.exceptions import InvalidSignature, InvalidTag  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext  # noqa: E402
from cryptography.hazmat.primitives.ciphers.algorithms import AES, ChaCha20  # noqa: E402
from cryptography.hazmat.primitives.ciphers.modes import GCM  # noqa: E402
from cryptography.hazmat.primitives.poly1305 import Poly1305  # noqa: E402

# --------------------------------------------------------------------------- 1, 2: the SFTP client


def _client_handler(sftp: asyncssh.SFTPClient) -> SFTPClientHandler:
    """The protocol handler behind a public ``SFTPClient`` (private attribute ``_handler``)."""
    return cast(SFTPClientHandler, sftp._handler)


def _accept_extended_reply(handler: SFTPClientHandler, name: bytes) -> None:
    """Let ``handler`` accept an EXTENDED_REPLY for request ``name`` (per instance, never per class)."""
    if name not in handler._return_types:
        handler._return_types = {**handler._return_types, name: FXP_EXTENDED_REPLY}


async def extended_request(sftp: asyncssh.SFTPClient, name: bytes, payload: bytes) -> bytes:
    """Send SFTP extended request ``name`` with ``payload`` (the bytes after the name) and return
    the EXTENDED_REPLY body (the bytes after the request id).

    An error status from the server raises the matching ``asyncssh.SFTPError``; an OK status where a
    reply was due raises ``asyncssh.SFTPBadMessage``, as asyncssh does for its own requests.
    """
    handler = _client_handler(sftp)
    _accept_extended_reply(handler, name)
    reply = cast(SSHPacket, await handler._make_request(name, payload))
    return reply.get_remaining_payload()


async def request_read(sftp: asyncssh.SFTPClient, handle: bytes, offset: int, length: int) -> bytes:
    """One READ request: up to ``length`` bytes at ``offset``; raises ``asyncssh.SFTPEOFError`` at EOF."""
    data, _ = await _client_handler(sftp).read(handle, offset, length)
    return data


async def request_write(sftp: asyncssh.SFTPClient, handle: bytes, offset: int, data: bytes) -> None:
    """One WRITE request of ``data`` at ``offset``."""
    await _client_handler(sftp).write(handle, offset, data)


# --------------------------------------------------------------------------- 3d: chacha20-poly1305

_CHACHA = b"chacha20-poly1305@openssh.com"
_CTR_0 = bytes(8)
_BLOCK0 = bytes(64)


def _chacha20_public(key: bytes, nonce: bytes) -> CipherContext:
    """A ChaCha20 keystream context through ``cryptography``'s public API."""
    return Cipher(ChaCha20(key, nonce), mode=None).encryptor()


def _chacha20_direct_or_none() -> Callable[[bytes, bytes], CipherContext] | None:
    """The same context without ``Cipher``'s per-call checks, if this ``cryptography`` has the call.

    ``Cipher(...).encryptor()`` costs about 4 us, of which about 2.3 us are Python-level checks
    (abstract-class isinstance tests, mode validation) that a fixed algorithm and no mode never
    need; the context itself comes from ``rust_openssl.ciphers.create_encryption_ctx``, which
    ``encryptor()`` calls. That name is private to ``cryptography``: it is looked up once, checked
    against the public path on a test vector, and on any difference or error the public path is used.
    """
    try:
        from cryptography.hazmat.bindings._rust import openssl as rust_openssl

        create = rust_openssl.ciphers.create_encryption_ctx

        def direct(key: bytes, nonce: bytes) -> CipherContext:
            return cast(CipherContext, create(ChaCha20(key, nonce), None))

        key, nonce, probe = bytes(range(32)), bytes(range(16)), bytes(200)
        if direct(key, nonce).update(probe) != _chacha20_public(key, nonce).update(probe):
            return None
        return direct
    except Exception:  # any change inside cryptography: keep the public path
        return None


_chacha20: Callable[[bytes, bytes], CipherContext] = _chacha20_direct_or_none() or _chacha20_public


class FastChachaCipher:
    """Same interface as ``asyncssh.crypto.ChachaCipher``, two cheaper cipher setups per packet
    (item 3d)."""

    def __init__(self, key: bytes) -> None:
        half = len(key) // 2
        self._key = key[:half]
        self._adkey = key[half:]

    def _data_stream(self, nonce: bytes) -> tuple[CipherContext, bytes]:
        ctx = _chacha20(self._key, _CTR_0 + nonce)
        poly_key = ctx.update(_BLOCK0)[:32]  # block 0; the data continues at block 1
        return ctx, poly_key

    def encrypt_and_sign(self, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        header = _chacha20(self._adkey, _CTR_0 + nonce).update(header)
        ctx, poly_key = self._data_stream(nonce)
        packet = header + ctx.update(data)
        return packet, Poly1305.generate_tag(poly_key, packet)

    def encrypt_and_sign_parts(self, header: bytes, parts: list[bytes], nonce: bytes) -> list[bytes]:
        """``encrypt_and_sign`` of ``header`` + the concatenated ``parts``, returned as pieces
        (encrypted header, each encrypted part, tag) so the packet is never joined before the socket
        write (item 3f). ChaCha20 is a stream cipher: encrypting the parts one after the other in
        one context is the same as encrypting their concatenation."""
        out = [_chacha20(self._adkey, _CTR_0 + nonce).update(header)]
        ctx, poly_key = self._data_stream(nonce)
        poly = Poly1305(poly_key)
        poly.update(out[0])
        for part in parts:
            encrypted = ctx.update(part)
            poly.update(encrypted)
            out.append(encrypted)
        out.append(poly.finalize())
        return out

    def decrypt_header(self, header: bytes, nonce: bytes) -> bytes:
        return _chacha20(self._adkey, _CTR_0 + nonce).update(header)

    def verify_and_decrypt(self, header: bytes, data: bytes, nonce: bytes, tag: bytes) -> bytes | None:
        return self.verify_and_decrypt_parts(header, (data,), nonce, tag)

    def verify_and_decrypt_parts(self, header: bytes, parts: tuple[bytes, ...], nonce: bytes,
                                 tag: bytes) -> bytes | None:
        """Verify the tag over header + parts without concatenating them, then decrypt the parts."""
        ctx, poly_key = self._data_stream(nonce)
        poly = Poly1305(poly_key)
        poly.update(header)
        for part in parts:
            poly.update(part)
        try:
            poly.verify(tag)
        except InvalidSignature:
            return None
        if len(parts) == 2:  # the packet path: no generator, it showed up in profiles
            return ctx.update(parts[0]) + ctx.update(parts[1])
        return b"".join([ctx.update(part) for part in parts])


try:  # item 3k: the compiled packet crypto, if pip could build it (setup.py; it is optional)
    from sshfiles import _chachapoly
except ImportError:
    _chachapoly = None  # type: ignore[assignment]
#: Item 3k in use (set by ``install_speedups``): new chacha20 connections get ``CompiledChachaCipher``.
_compiled_chacha = False


def compiled_chacha_built() -> bool:
    """Whether pip built item 3k's helper here (the server says so at start when it did not)."""
    return _chachapoly is not None


class CompiledChachaCipher:
    """``FastChachaCipher``'s interface on the compiled helper ``sshfiles._chachapoly`` (item 3k).

    One call into OpenSSL per packet, both ChaCha20 keys set up once per connection, instead of
    three ChaCha20 contexts and a Poly1305 object per packet: a 32 KiB packet opens in about 10 us
    instead of 17 and seals in 8 instead of 15, a length decrypts in 0.3 us instead of 2
    (microbenchmark). The helper returns a sealed packet whole (length, payload and tag written once),
    which item 3f hands to the socket as one piece."""

    def __init__(self, key: bytes) -> None:
        self._c = _chachapoly.ChachaPoly(key)

    def encrypt_and_sign(self, header: bytes, data: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        packet = self._c.seal(header, (data,), int.from_bytes(nonce, "big"))
        return packet[:-16], packet[-16:]

    def encrypt_and_sign_parts(self, header: bytes, parts: list[bytes], nonce: bytes) -> list[bytes]:
        return [self._c.seal(header, parts, int.from_bytes(nonce, "big"))]

    def decrypt_header(self, header: bytes, nonce: bytes) -> bytes:
        return self._c.decrypt_length(header, int.from_bytes(nonce, "big"))

    def verify_and_decrypt(self, header: bytes, data: bytes, nonce: bytes, tag: bytes) -> bytes | None:
        return self._c.open(header, (data,), int.from_bytes(nonce, "big"), tag)

    def verify_and_decrypt_parts(self, header: bytes, parts: tuple[bytes, ...], nonce: bytes,
                                 tag: bytes) -> bytes | None:
        return self._c.open(header, parts, int.from_bytes(nonce, "big"), tag)


class FastChachaEncryption(_encryption.ChachaEncryption):
    """asyncssh's chacha20 packet shim on ``FastChachaCipher``, minus a concatenation of every
    received packet (item 3d)."""

    _cipher: FastChachaCipher | CompiledChachaCipher  # type: ignore[assignment]

    @classmethod
    def new(cls, cipher_name: str, key: bytes, iv: bytes, mac_alg: bytes = b"",
            mac_key: bytes = b"", etm: bool = False) -> FastChachaEncryption:
        return cls(CompiledChachaCipher(key) if _compiled_chacha else FastChachaCipher(key))  # type: ignore[arg-type]

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        data = self._cipher.verify_and_decrypt_parts(first[:header_len], (first[header_len:], rest),
                                                     UInt64(seq), mac)
        if (_channel_data_views and data is not None and len(data) >= _VIEW_MIN
                and data[1] == MSG_CHANNEL_DATA and SSHLogger._debug_level < 3):
            return cast(bytes, memoryview(data))  # item 3i: asyncssh slices it without copying
        return data


#: Item 3i: channel data packets handed on as views (set by ``install_speedups``).
_channel_data_views = False
#: Item 3i: smaller packets are not worth a view (and interactive traffic stays plain bytes).
_VIEW_MIN = 4096


# --------------------------------------------------------------------------- 3j: AES-GCM

_GCM_NAMES = (b"aes128-gcm@openssh.com", b"aes256-gcm@openssh.com")
_GCM_TAG = 16


class FastGCMCipher:
    """Same interface as ``asyncssh.crypto.GCMCipher`` (item 3j), plus the pieces calls of item 3f.

    asyncssh's GCM shim builds a new ``AESGCM`` (a fresh key schedule) for every packet and joins
    every packet twice: the sent ciphertext onto its header, the received data onto its first block
    and then onto its tag (``AESGCM.decrypt`` wants ciphertext and tag in one buffer). Here the key
    is wrapped once and each packet runs through one streaming GCM context, fed in pieces: the
    header as associated data, then each part. Same construction (RFC 5647 as OpenSSH does it: the
    4-byte length in clear as associated data, a 12-byte nonce whose last 8 bytes count packets).
    """

    def __init__(self, key: bytes, iv: bytes) -> None:
        self._algorithm = AES(key)
        self._fixed = iv[:4]
        self._invocation = int.from_bytes(iv[4:], "big")

    def _next_nonce(self) -> bytes:
        nonce = self._fixed + self._invocation.to_bytes(8, "big")
        self._invocation = (self._invocation + 1) & 0xffffffffffffffff
        return nonce

    def encrypt_and_sign(self, header: bytes, data: bytes) -> tuple[bytes, bytes]:
        pieces = self.encrypt_and_sign_parts(header, [data], b"")
        return b"".join(pieces[:-1]), pieces[-1]

    def encrypt_and_sign_parts(self, header: bytes, parts: list[bytes], nonce: bytes) -> list[bytes]:
        """(header, each encrypted part, tag): the packet in pieces for item 3f. ``nonce`` (the
        sequence number chacha20 uses) is ignored: GCM counts its own invocations."""
        ctx = Cipher(self._algorithm, GCM(self._next_nonce())).encryptor()
        ctx.authenticate_additional_data(header)
        out = [header]
        out.extend(ctx.update(part) for part in parts)
        ctx.finalize()
        out.append(ctx.tag)
        return out

    def verify_and_decrypt(self, header: bytes, data: bytes, mac: bytes) -> bytes | None:
        return self.verify_and_decrypt_parts(header, (data,), mac)

    def verify_and_decrypt_parts(self, header: bytes, parts: tuple[bytes, ...], mac: bytes) -> bytes | None:
        """Decrypt header + parts, or None when the tag does not match (nothing decrypted is
        returned before ``finalize`` has checked it)."""
        ctx = Cipher(self._algorithm, GCM(self._next_nonce(), mac)).decryptor()
        ctx.authenticate_additional_data(header)
        if len(parts) == 2:  # the packet path
            data = ctx.update(parts[0]) + ctx.update(parts[1])
        else:
            data = b"".join([ctx.update(part) for part in parts])
        try:
            ctx.finalize()
        except InvalidTag:
            return None
        return data


class FastGCMEncryption(_encryption.GCMEncryption):
    """asyncssh's GCM packet shim on ``FastGCMCipher``, minus the joins of every received packet
    (item 3j)."""

    _cipher: FastGCMCipher  # type: ignore[assignment]

    @classmethod
    def new(cls, cipher_name: str, key: bytes, iv: bytes, mac_alg: bytes = b"",
            mac_key: bytes = b"", etm: bool = False) -> FastGCMEncryption:
        return cls(FastGCMCipher(key, iv))  # type: ignore[arg-type]

    def decrypt_packet(self, seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        return self._cipher.verify_and_decrypt_parts(first[:header_len], (first[header_len:], rest), mac)


# --------------------------------------------------------------------------- 3a: no CBC IGNOREs

_original_send_packet = SSHConnection.send_packet
#: what item 3f falls back to: asyncssh's send_packet with item 3a's change
_previous_send_packet: Callable[..., None] = _original_send_packet


def _send_packet_without_cbc_padding_ignores(self: SSHConnection, pkttype: int, *args: bytes,
                                             handler: Any = None) -> None:
    """``SSHConnection.send_packet``, minus the empty IGNORE it inserts before each packet (item 3a).

    The outer call marks the connection while it runs; the IGNORE it sends from inside is dropped.
    IGNOREs sent on their own (keepalives, user calls) still go out.
    """
    conn: Any = self  # carries our own attribute, which SSHConnection does not declare
    if pkttype == MSG_IGNORE and getattr(conn, "_sshfiles_sending", False):
        return  # the automatic one, requested from inside the outer send_packet below
    previous = getattr(conn, "_sshfiles_sending", False)
    conn._sshfiles_sending = pkttype > MSG_KEX_LAST
    try:
        _original_send_packet(self, pkttype, *args, handler=handler)
    finally:
        conn._sshfiles_sending = previous


# --------------------------------------------------------------------------- 3f: unjoined data packets

#: arguments of at least this many bytes are encrypted in place; smaller ones are joined first
_BIG_PART = 2048
#: the packet shims with an ``encrypt_and_sign_parts`` (items 3d and 3j)
_UNJOINED_ENCRYPTIONS = (FastChachaEncryption, FastGCMEncryption)


def _send_packet_unjoined(self: SSHConnection, pkttype: int, *args: bytes, handler: Any = None) -> None:
    """``SSHConnection.send_packet`` for a connection packet on an established chacha20 connection,
    without joining the packet three times before it reaches the socket (item 3f).

    asyncssh builds ``Byte(type) + join(args)``, then ``Byte(padlen) + payload + padding``, then
    ``header + ciphertext``, then ``packet + mac``: four copies of every 32 KiB of file data. Here
    the pieces are encrypted and MACed one after the other (same bytes on the wire) and handed to
    item 3b's buffer as they are. Anything else (key exchange, authentication, a due rekey,
    compression, packet logging at debug level 3, another cipher) goes through the previous
    ``send_packet`` unchanged. Like item 3a, it sends no CBC-era IGNORE before the packet.
    """
    conn: Any = self  # private attributes of SSHConnection
    encryption = conn._send_encryption
    if (pkttype <= _MSG_USERAUTH_LAST or type(encryption) not in _UNJOINED_ENCRYPTIONS
            or not conn._auth_complete or not conn._kex_complete or conn._compressor is not None
            or conn._rekey_bytes_sent >= conn._rekey_bytes
            or (conn._rekey_seconds and time.monotonic() >= conn._rekey_time)
            or conn.logger._debug_level >= 3):
        _previous_send_packet(self, pkttype, *args, handler=handler)
        return
    payload_len = 1 + sum(map(len, args))
    padlen = -(conn._send_enchdrlen + payload_len) % conn._send_blocksize
    if padlen < 4:
        padlen += conn._send_blocksize
    parts: list[bytes] = []
    small = [bytes((padlen, pkttype))]
    for arg in args:
        if len(arg) >= _BIG_PART:
            parts.append(b"".join(small))
            parts.append(arg)
            small = []
        else:
            small.append(arg)
    small.append(os.urandom(padlen))
    parts.append(b"".join(small))
    pktlen = 1 + payload_len + padlen
    seq = conn._send_seq
    pieces = encryption._cipher.encrypt_and_sign_parts(UInt32(pktlen), parts, UInt64(seq))
    if SSHConnection._send is _send_coalesced:
        _send_pieces(conn, pieces)
    else:
        conn._send(b"".join(pieces))
    conn._send_seq = (seq + 1) & 0xffffffff
    conn._rekey_bytes_sent += pktlen
    # asyncssh's log_sent_packet would log nothing: below debug level 3 packets are not logged


def _channel_send_packet_unjoined(self: SSHChannel[Any], pkttype: int, *args: bytes) -> None:
    """``SSHChannel.send_packet`` passing the channel number and the arguments on as they are,
    instead of joining them first (item 3f)."""
    chan: Any = self  # private attributes of SSHChannel
    if chan._send_chan is None:
        return
    chan._conn.send_packet(pkttype, UInt32(chan._send_chan), *args, handler=self)


# --------------------------------------------------------------------------- 3b: coalesced writes


#: Item 3g: a socket read at least this big means the peer is streaming data to us (an upload).
_BULK_READ = 16 * 1024
#: Item 3g: how long replies wait while the peer streams, so several go out in one write.
_BULK_FLUSH_DELAY = 0.001
#: Item 3g: at most this many bytes wait for the delayed flush; more are written at once, so
#: item 4a's back-pressure (which sees only the transport's buffer) stays exact within this bound.
_BULK_FLUSH_MAX = 256 * 1024
_delay_flush_during_bulk_input = False


def _send_coalesced(self: SSHConnection, data: bytes) -> None:
    """``SSHConnection._send``, buffered until the end of this event-loop turn (item 3b)."""
    _send_pieces(self, (data,))


def _send_pieces(conn: Any, pieces: list[bytes] | tuple[bytes, ...]) -> None:
    transport = conn._transport
    if not transport:
        return
    pending: list[bytes] | None = getattr(conn, "_sshfiles_pending", None)
    if pending is None:
        pending = conn._sshfiles_pending = []
        if _delay_flush_during_bulk_input and getattr(conn, "_sshfiles_bulk_in", False):
            conn._sshfiles_delayed = 0  # item 3g: bytes held back, bounded below
            conn._loop.call_later(_BULK_FLUSH_DELAY, _flush, conn, transport)
        else:
            conn._sshfiles_delayed = None
            conn._loop.call_soon(_flush, conn, transport)
    pending.extend(pieces)
    if conn._sshfiles_delayed is not None:
        conn._sshfiles_delayed += sum(map(len, pieces))
        if conn._sshfiles_delayed > _BULK_FLUSH_MAX:  # a reply stream, not a trickle: send it now
            _flush(conn, transport)


def _flush(conn: Any, transport: asyncio.WriteTransport) -> None:
    pending: list[bytes] | None = conn._sshfiles_pending
    if pending is None:  # already flushed early (item 3g's bound)
        return
    conn._sshfiles_pending = None
    try:
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
    except ConnectionError:  # the peer is gone; asyncssh notices through connection_lost
        pass


# --------------------------------------------------------------------------- 3c: lazy packet logs

_original_log_packet: Callable[..., None] = SSHPacketLogger._log_packet


def _log_packet_if_enabled(self: SSHPacketLogger, msg: str, pkttype: int, pktid: int | None, packet: Any,
                           note: str) -> None:
    """``SSHPacketLogger._log_packet``, skipped when ``SSHLogger.packet`` would drop it anyway (3c)."""
    if self.logger._debug_level >= 3:
        _original_log_packet(self, msg, pkttype, pktid, packet, note)


# --------------------------------------------------------------------------- 3e: packet-sized input

_recv_pkthdr = SSHConnection._recv_pkthdr
_recv_packet = SSHConnection._recv_packet


def _data_received_per_packet(self: SSHConnection, data: bytes, datatype: Any = None) -> None:
    """``SSHConnection.data_received``, handing asyncssh's parser one packet piece at a time (3e).

    asyncssh appends each socket read (up to 256 KiB) to ``_inpbuf`` and then takes packets off its
    front with ``_inpbuf = _inpbuf[n:]``, which copies everything behind the packet: about four
    32 KiB packets' worth of copying per packet received. Here the read is cut into exactly the
    pieces the parser is waiting for (the first cipher block, then the rest of the packet and its
    MAC), so each ``_inpbuf`` holds one piece and taking it off copies nothing. Any other parser
    state (the version banner, a packet still being processed asynchronously) gets the rest of the
    read at once, exactly as asyncssh does.
    """
    conn: Any = self  # private attributes of SSHConnection
    pos, end = 0, len(data)
    conn._sshfiles_bulk_in = end >= _BULK_READ  # item 3g
    while pos < end:
        handler = getattr(conn._recv_handler, "__func__", None)
        have = len(conn._inpbuf)
        if handler is _recv_pkthdr:
            need = conn._recv_blocksize - have
        elif handler is _recv_packet:
            need = 4 + conn._pktlen + conn._recv_macsize - conn._recv_blocksize - have
        else:
            need = end - pos
        if need <= 0:  # never expected: fall back to asyncssh's own buffering
            need = end - pos
        piece = data if pos == 0 and need >= end else data[pos:pos + need]
        pos += len(piece)
        conn._inpbuf += piece  # b"" + piece is piece itself: no copy
        conn._recv_data()
        if conn._transport is None:  # closed while parsing (bad MAC, disconnect): read no further
            return


#: the items ``install_speedups`` applies; ``SSHFILES_NO_SPEEDUPS`` names ones to leave out
SPEEDUP_ITEMS = ("3a", "3b", "3c", "3d", "3e", "3f", "3g", "3h", "3i", "3j", "3k")


def speedups_disabled(env_value: str | None) -> frozenset[str]:
    """Which items ``SSHFILES_NO_SPEEDUPS`` turns off: any non-empty value but a comma list of item
    names (``3d,3e``) turns off all of them, so the benchmark can measure each lever alone."""
    if not env_value:
        return frozenset()
    names = {part.strip() for part in env_value.split(",")}
    return frozenset(names) if names <= set(SPEEDUP_ITEMS) else frozenset(SPEEDUP_ITEMS)


def install_speedups_from_env(env_value: str | None) -> None:
    """``install_speedups`` as ``SSHFILES_NO_SPEEDUPS`` (``env_value``) asks: nothing at all when it
    turns every item off, so that setting measures asyncssh exactly as released."""
    disabled = speedups_disabled(env_value)
    if disabled != frozenset(SPEEDUP_ITEMS):
        install_speedups(disabled)


def install_speedups(disabled: frozenset[str] = frozenset()) -> None:
    """Apply items 3a-3k but ``disabled`` to asyncssh in this process (idempotent). It patches
    classes, so only a process of one role calls it: the server, or the ``sshfiles-cli`` command
    (never the client library, which may run inside someone else's program)."""
    if "3d" not in disabled:
        _encryption._enc_params[_CHACHA] = (FastChachaEncryption, "chacha20-poly1305")
    if "3j" not in disabled:
        for name in _GCM_NAMES:
            _encryption._enc_params[name] = (FastGCMEncryption, _encryption._enc_params[name][1])
    if "3a" not in disabled:
        SSHConnection.send_packet = _send_packet_without_cbc_padding_ignores  # type: ignore[method-assign]
    if "3b" not in disabled:
        SSHConnection._send = _send_coalesced  # type: ignore[method-assign]
    if "3c" not in disabled:
        SSHPacketLogger._log_packet = _log_packet_if_enabled  # type: ignore[method-assign]
    if "3e" not in disabled:
        SSHConnection.data_received = _data_received_per_packet  # type: ignore[method-assign]
    global _previous_send_packet, _delay_flush_during_bulk_input, _zero_copy_requests, _channel_data_views
    global _compiled_chacha
    _compiled_chacha = _chachapoly is not None and not {"3d", "3k"} & disabled
    _zero_copy_requests = "3h" not in disabled
    _channel_data_views = not {"3d", "3i"} & disabled
    _delay_flush_during_bulk_input = not {"3b", "3e", "3g"} & disabled
    if "3f" not in disabled and "3a" not in disabled and not {"3d", "3j"} <= disabled:
        if SSHConnection.send_packet is not _send_packet_unjoined:
            _previous_send_packet = SSHConnection.send_packet
        SSHConnection.send_packet = _send_packet_unjoined  # type: ignore[method-assign]
        SSHChannel.send_packet = _channel_send_packet_unjoined  # type: ignore[method-assign]


# -- 4. the SFTP server protocol handler ---------------------------------------------------------

#: Item 3h: SFTP requests read from the channel's buffer without copies (set by ``install_speedups``).
_zero_copy_requests = False
#: Item 3h: what a stream's buffer holds besides signals: received data, as views with item 3i
_CHUNK_TYPES = (bytes, memoryview)


#: A request handler: called with the handler and the request's packet (after the request id), it
#: returns what asyncssh encodes as the reply (None for OK, bytes/records, or an ``encode``-able).
RequestHandler = Callable[["SFTPServerHandlerBase", SSHPacket], "asyncio.Future[object] | Any"]


class ExtendedReply:
    """An EXTENDED_REPLY body: asyncssh calls ``encode(version)`` on results that are not its own types."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def encode(self, sftp_version: int) -> bytes:
        return self.body


#: Item 4a: unsent reply bytes (channel send buffer + the connection's transport buffer) above which
#: a session reads no further request until they drain. 4 MiB keeps 16 READ replies of 256 KiB in
#: flight (a pipelined download is never throttled by it: OpenSSH's and asyncssh's clients keep at
#: most 2 MiB of window open) while bounding what a client that stops reading can park in memory.
#: Becomes config field ``reply_buffer_limit`` if it ever needs tuning.
REPLY_BUFFER_LIMIT = 4 * 1024 * 1024
_DRAIN_POLL_SECONDS = 0.01


def _transport_of(chan: Any) -> Any:
    """The connection's asyncio transport (private ``SSHConnection._transport``), or None."""
    return getattr(chan.get_extra_info("connection"), "_transport", None)


async def _close_dir_iterator(names: object) -> None:
    aclose = getattr(names, "aclose", None)
    if aclose is not None:
        await aclose()


class SFTPServerHandlerBase(SFTPServerHandler):
    """asyncssh's SFTP server handler with declared changes instead of edited private tables.

    A subclass sets the class attributes; ``__init_subclass__`` builds asyncssh's tables from them.
    """

    #: item 4a's bound, per class
    reply_buffer_limit: int = REPLY_BUFFER_LIMIT

    DROP_EXTENSIONS: tuple[bytes, ...] = ()
    EXTENSIONS: tuple[tuple[bytes, bytes], ...] = ()
    #: request type (an FXP_* number) or extended request name -> handler
    REQUESTS: dict[int | bytes, RequestHandler] = {}  # noqa: RUF012 (read once per subclass)
    #: extended requests whose reply is an EXTENDED_REPLY rather than a STATUS
    EXTENDED_REPLIES: tuple[bytes, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        base = SFTPServerHandler
        cls._extensions = [(n, d) for n, d in base._extensions if n not in cls.DROP_EXTENSIONS]
        cls._extensions += list(cls.EXTENSIONS)
        cls._return_types = dict(base._return_types)
        cls._return_types.update({name: FXP_EXTENDED_REPLY for name in cls.EXTENDED_REPLIES})
        handlers = dict(base._packet_handlers)
        for name in cls.DROP_EXTENSIONS:
            handlers.pop(name, None)
        handlers[FXP_CLOSE] = cast(Any, _process_close)
        handlers.update(cast(Any, cls.REQUESTS))
        cls._packet_handlers = handlers

    _sshfiles_unyielded = 0  # reply bytes sent since item 4a last let the loop turn
    _sshfiles_transport: Any = None  # the connection's transport, once item 4a has set the channel up

    def send_packet(self, pkttype: int, pktid: int | None, *args: bytes) -> None:
        self._sshfiles_unyielded += sum(map(len, args))  # per reply packet: no generator frame
        super().send_packet(pkttype, pktid, *args)

    #: item 3h: the subclass's WRITE handler accepts a packet over a ``memoryview`` (its handle
    #: and data come out of ``get_string`` as views); every other request is always ``bytes``
    ZERO_COPY_WRITE = False
    _sshfiles_off = 0  # item 3h: bytes of the stream's first buffered chunk already taken

    async def recv_packet(self) -> SSHPacket:
        """One SFTP request, cut from the channel's received chunks without copying (item 3h)."""
        reader: Any = self._reader
        session: Any = reader._session if _zero_copy_requests and reader is not None else None
        if session is None or session._read_locks[None].locked():
            return await self._recv_packet_by_asyncssh()
        chunks: list[Any] = session._recv_buf[None]
        while True:
            have = session._recv_buf_len
            if have >= 4 and chunks and isinstance(chunks[0], _CHUNK_TYPES):
                off = self._sshfiles_off
                head: bytes | memoryview = chunks[0]
                if len(head) - off < 4:
                    break  # a length split over chunks (never seen from real clients): asyncssh's way
                pktlen = int.from_bytes(head[off:off + 4], "big")
                if pktlen > _MAX_SFTP_PACKET_LEN:
                    raise asyncssh.SFTPBadMessage("Max packet size exceeded")
                if have >= 4 + pktlen:
                    payload = self._take_request(session, chunks, 4 + pktlen)
                    if payload is None:
                        break
                    return SSHPacket(cast(bytes, payload))  # SSHPacket slices views as well
            if session._eof_received or not all(isinstance(c, _CHUNK_TYPES) for c in chunks):
                break  # EOF or a signal: asyncssh raises what it should
            await session._block_read(None)
        return await self._recv_packet_by_asyncssh()

    def _take_request(self, session: Any, chunks: list[Any], size: int) -> bytes | memoryview | None:
        """Take ``size`` buffered bytes (the length word and the request) off the stream; None,
        taking nothing, if a non-data item (a signal) lies within them."""
        off = self._sshfiles_off
        head: bytes | memoryview = chunks[0]
        end = off + size
        if len(head) >= end:  # the whole request inside one received chunk: a view of it
            if len(head) == end:
                chunks.pop(0)
                self._sshfiles_off = 0
            else:
                self._sshfiles_off = end
            body: bytes | memoryview = memoryview(head)[off + 4:end]
        else:
            pieces: list[bytes | memoryview] = [memoryview(head)[off:]]
            left = size - (len(head) - off)
            i = 1
            while left > 0:
                chunk = chunks[i]
                if not isinstance(chunk, _CHUNK_TYPES):
                    return None
                pieces.append(memoryview(chunk)[:left] if len(chunk) > left else chunk)
                left -= len(chunk)
                i += 1
            del chunks[:i - 1 if left < 0 else i]
            self._sshfiles_off = len(chunks[0]) + left if left < 0 else 0
            body = memoryview(b"".join(pieces))[4:]
        session._recv_buf_len -= size
        session._maybe_resume_reading()
        if not (self.ZERO_COPY_WRITE and body[0] == FXP_WRITE and self.logger._debug_level < 3):
            return bytes(body)
        return body

    async def _recv_packet_by_asyncssh(self) -> SSHPacket:
        """asyncssh's ``recv_packet``, after giving back what item 3h took off the first chunk."""
        if self._sshfiles_off:
            session: Any = cast(Any, self._reader)._session
            chunks = session._recv_buf[None]
            chunks[0] = chunks[0][self._sshfiles_off:]
            self._sshfiles_off = 0
        return cast(SSHPacket, await super().recv_packet())

    async def _process_packet(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        await self._wait_for_reply_room()
        await super()._process_packet(pkttype, pktid, packet)

    async def _wait_for_reply_room(self) -> None:
        """Item 4a: read no request while more than ``reply_buffer_limit`` reply bytes are unsent."""
        writer = self._writer
        if writer is None:
            return
        chan: Any = writer.channel
        limit = self.reply_buffer_limit
        if self._sshfiles_unyielded > limit:
            # Requests already buffered are processed without a loop turn, and item 3b hands a
            # turn's packets to the transport only at its end: let it, so the buffers below are real.
            await asyncio.sleep(0)
            self._sshfiles_unyielded = 0
        transport = self._sshfiles_transport
        if transport is None:
            chan.set_write_buffer_limits(high=limit, low=limit // 2)
            transport = self._sshfiles_transport = _transport_of(chan)
            if transport is None:
                return
        while not chan.is_closing():
            if chan.get_write_buffer_size() > limit:
                await writer.drain()  # until the channel buffer is back under low water
            elif transport.get_write_buffer_size() > limit:
                await asyncio.sleep(_DRAIN_POLL_SECONDS)
            else:
                return
            self._sshfiles_unyielded = 0

    @property
    def server(self) -> asyncssh.SFTPServer:
        """The `asyncssh.SFTPServer` this handler calls for every verb."""
        return self._server

    def file_handle(self, handle: bytes) -> object | None:
        """What the server's ``open`` returned for a handle the client sent, or None."""
        return self._file_handles.get(handle)

    @property
    def open_file_count(self) -> int:
        """File handles the client opened and has not closed."""
        return len(self._file_handles)

    @property
    def open_handle_count(self) -> int:
        """File and directory handles the client opened and has not closed (item 4c)."""
        return len(self._file_handles) + len(self._dir_handles)

    def on_cleanup(self, exc: Exception | None, handles_left_open: bool) -> None:
        """Called once when the session ends, before asyncssh closes the handles still open."""

    async def _cleanup(self, exc: Exception | None) -> None:
        self.on_cleanup(exc, bool(self._file_handles))
        dirs, self._dir_handles = list(self._dir_handles.values()), {}
        for names in dirs:  # item 4b
            try:
                await _close_dir_iterator(names)
            except Exception:  # the session is ending: one bad listing must not keep the rest open
                pass
        writer = self._writer
        if writer is not None and not writer.channel.is_closing():
            try:
                cast(Any, writer.channel).exit(0 if exc is None else 1)
            except OSError:
                pass
        await super()._cleanup(exc)


async def _process_close(self: SFTPServerHandlerBase, packet: SSHPacket) -> None:
    """asyncssh's CLOSE (``SFTPServerHandler._process_close``), closing a directory's iterator (4b)."""
    handle = packet.get_string()
    if self._version < 6:
        packet.check_end()
    file_obj = self._file_handles.pop(handle, None)
    if file_obj:
        result = self._server.close(file_obj)
        if inspect.isawaitable(result):
            await result
        return
    names = self._dir_handles.pop(handle, None)
    if names is not None:
        await _close_dir_iterator(names)
        return
    raise asyncssh.SFTPInvalidHandle("Invalid file handle")


# -- 5. one session channel ------------------------------------------------------------------------


class ChannelSessionBase(SSHServerStreamSession):
    """asyncssh's stream session without its own dispatch: the application decides what runs.

    Subclasses answer ``shell_requested``/``exec_requested``/``subsystem_requested`` (public
    `asyncssh.SSHServerSession` callbacks) and, in ``session_started``, call `streams` and
    `start_task`.
    """

    def __init__(self) -> None:
        super().__init__(None, sftp_factory=None, allow_scp=False)

    def streams(self) -> tuple[asyncssh.SSHServerChannel[bytes], asyncssh.SSHReader[bytes],
                               asyncssh.SSHWriter[bytes], asyncssh.SSHWriter[bytes]]:
        """The channel in binary mode and its stdin, stdout and stderr streams."""
        chan = self._chan
        assert chan is not None
        stdin = asyncssh.SSHReader[bytes](self, chan)
        stdout = asyncssh.SSHWriter[bytes](self, chan)
        stderr = asyncssh.SSHWriter[bytes](self, chan, asyncssh.EXTENDED_DATA_STDERR)
        chan.set_encoding(None)
        self._encoding = None
        return cast(Any, chan), stdin, stdout, stderr

    def start_task(self, coro: Any, logger: Any) -> None:
        """Run a coroutine as the connection's task (asyncssh logs and reports its errors)."""
        assert self._conn is not None
        self._conn.create_task(coro, logger)


#: asyncssh's SCP server on a channel's streams (not exported by asyncssh)
run_scp = run_scp_server


# --------------------------------------------------------------------------- 6: accepted sockets


async def serve_accepted(sock: Any, options: asyncssh.SSHServerConnectionOptions,
                         owner_factory: Callable[[], asyncssh.SSHServer]) -> None:
    """Run an SSH server connection on the accepted socket `sock` with the shared `options` and the
    connection's own handler factory (item 6). Returns once the connection is set up (its handler
    made); the connection then lives on by itself, as one accepted by ``asyncssh.listen`` does."""
    loop = asyncio.get_running_loop()

    def connection() -> SSHServerConnection:
        conn: Any = SSHServerConnection(loop, options)
        conn._protocol_factory = owner_factory
        return cast(SSHServerConnection, conn)

    await loop.connect_accepted_socket(connection, sock)
