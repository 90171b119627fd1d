"""Hooks (`--on-upload/--on-download/--on-delete/--on-rename`, hooks.py), against a real `sshfiles serve`.

The hook here is a real program that appends its SSHFILES_* environment to a file, one JSON line
per run: the tests count lines per completed operation and check the facts, with the clients users
run (OpenSSH sftp and scp, paramiko, asyncssh).  Slow and flooded hooks are checked from outside
the server process: its threads, its hook children, and a bystander's transfer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_atomic_uploads import interrupted_paramiko_upload, paramiko_client, serving, temporaries, wait_for
from test_quota import assert_ledger_matches_disk, run

from sshfiles.hooks import HOOK_QUEUE, HOOK_WORKERS

HOOK = """\
import json, os, sys
facts = {k: v for k, v in os.environ.items() if k.startswith("SSHFILES_")}
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(facts, sort_keys=True) + "\\n")
print("hook saw", facts["SSHFILES_PATH"], "\\x1b[31mred")
"""


def recorder(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    events = tmp_path / "events.jsonl"
    return shlex.join([sys.executable, str(script), str(events)]), events


def events_of(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_events(path: Path, n: int, timeout: float = 20.0) -> list[dict[str, str]]:
    wait_for(lambda: len(events_of(path)) >= n, timeout)
    time.sleep(1.0)  # and no more than that come
    got = events_of(path)
    assert len(got) == n, got
    return got


@pytest.mark.parametrize("mode", ["standard", "atomic"])
def test_one_hook_run_per_completed_operation_with_the_facts(tmp_path, host_keys_dir, mode):
    cmd, events = recorder(tmp_path)
    with serving(tmp_path, host_keys_dir, "--upload-mode", mode, "--on-upload", cmd, "--on-download", cmd,
                 "--on-delete", cmd, "--on-rename", cmd) as server:
        user = server.add_user("hana", password=None, quota="3MiB", key=True)
        home = str(user.home.resolve())
        local = tmp_path / "local.bin"
        local.write_bytes(b"s" * 12_345)
        big = tmp_path / "big.bin"
        big.write_bytes(b"b" * 4_000_000)

        # three completed uploads: OpenSSH sftp, OpenSSH scp, paramiko
        res = server.sftp_batch(user, f"put {local} via-sftp.bin\n")
        assert res.returncode == 0, res.stderr
        res = server.openssh("scp", user, [str(local), f"{user.name}@{server.host}:via-scp.bin"])
        assert res.returncode == 0, res.stderr
        t, sftp = paramiko_client(server, user)
        sftp.putfo(open(local, "rb"), "via-paramiko.bin")
        t.close()
        got = wait_events(events, 3)
        assert {e["SSHFILES_PATH"] for e in got} == {"/via-sftp.bin", "/via-scp.bin", "/via-paramiko.bin"}
        for e in got:
            assert e["SSHFILES_EVENT"] == "upload" and e["SSHFILES_USER"] == "hana"
            assert e["SSHFILES_HOST_PATH"] == home + e["SSHFILES_PATH"]
            assert e["SSHFILES_BYTES"] == "12345" and e["SSHFILES_RESULT"] == "ok"
            assert e["SSHFILES_REMOTE_ADDR"].startswith("127.0.0.1:")
            assert "SSHFILES_TARGET" not in e

        # refused (over quota) and interrupted uploads fire nothing
        res = server.sftp_batch(user, f"put {big} big.bin\n")
        assert res.returncode != 0
        interrupted_paramiko_upload(server, user, "cut.bin", b"c" * 50_000)
        wait_for(lambda: "result=interrupted" in server.log())
        wait_events(events, 3)

        # a download, a rename, a delete
        res = server.sftp_batch(user, f"get via-sftp.bin {tmp_path / 'back.bin'}\nrename via-scp.bin renamed.bin\n"
                                      "rm via-paramiko.bin\n")
        assert res.returncode == 0, res.stderr
        got = {e["SSHFILES_EVENT"]: e for e in wait_events(events, 6)[3:]}  # hooks run in parallel: any order
        assert sorted(got) == ["delete", "download", "rename"]
        down, ren, rm = got["download"], got["rename"], got["delete"]
        assert (down["SSHFILES_PATH"], down["SSHFILES_BYTES"]) == ("/via-sftp.bin", "12345")
        assert (ren["SSHFILES_PATH"], ren["SSHFILES_TARGET"]) == ("/via-scp.bin", "/renamed.bin")
        assert ren["SSHFILES_HOST_TARGET"] == home + "/renamed.bin"
        assert (rm["SSHFILES_PATH"], rm["SSHFILES_HOST_PATH"]) == ("/via-paramiko.bin", home + "/via-paramiko.bin")
        # the hook's output reaches the log, escaped
        log = server.log()
        assert "hook event=upload user=hana path=/via-sftp.bin result=ok" in log
        assert "\x1b" not in log and "\\x1b[31mred" in log
        assert temporaries(user.home) == []
        assert_ledger_matches_disk(server, user)


def test_a_slow_hook_is_killed_and_never_delays_a_bystander(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--on-upload", "sleep 10", "--hook-timeout", "1") as server:
        uploader = server.add_user("ida", password=None, key=True)
        bystander = server.add_user("jon", password=None, key=True)

        async def scenario() -> float:
            async with server.sftp(uploader) as sftp:
                for i in range(2 * HOOK_WORKERS):  # every hook thread busy, more waiting
                    async with sftp.open(f"f{i}", "wb") as f:
                        await f.write(b"x")
            async with server.sftp(bystander) as sftp:
                start = time.monotonic()
                async with sftp.open("big", "wb") as f:
                    await f.write(b"y" * 4_000_000)
                for i in range(20):
                    async with sftp.open(f"g{i}", "wb") as f:
                        await f.write(b"z")
                return time.monotonic() - start

        took = run(scenario())
        assert took < 5, f"the bystander's transfers took {took:.1f} s"  # the hooks sleep 10 s each
        wait_for(lambda: "result=killed after the 1 s timeout" in server.log(), 15)
        assert "hook event=upload user=ida path=/f0 result=killed after the 1 s timeout" in server.log()
        assert (bystander.home / "big").stat().st_size == 4_000_000


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _hook_children(pid: int) -> list[int]:
    res = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in res.stdout.split()]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_of_uploads_with_a_slow_hook_stays_bounded(tmp_path, host_keys_dir):
    with serving(tmp_path, host_keys_dir, "--on-upload", "sleep 30", "--hook-timeout", "60") as server:
        user = server.add_user("kai", password=None, key=True)
        assert server.proc is not None
        pid = server.proc.pid
        n = HOOK_QUEUE + HOOK_WORKERS + 200
        children: list[int] = []

        async def flood() -> None:
            async with server.sftp(user) as sftp:
                await sftp.stat(".")
                base_threads, base_rss = _threads(pid), _rss_kib(pid)
                for i in range(n):
                    async with sftp.open(f"u{i}", "wb") as f:
                        await f.write(b"u" * 100)
                children.extend(_hook_children(pid))
                assert len(children) <= HOOK_WORKERS
                # the hook pool, plus at most the loop's default executor growing meanwhile (min(32, CPUs + 4))
                assert _threads(pid) <= base_threads + HOOK_WORKERS + min(32, (os.cpu_count() or 1) + 4)
                assert _rss_kib(pid) - base_rss < 64 * 1024
                async with sftp.open("after", "wb") as f:  # the server still serves at once
                    await f.write(b"ok")

        try:
            run(flood(), timeout=120)
            assert len(os.listdir(user.home)) == n + 1
            wait_for(lambda: "hook queue full" in server.log())
        finally:
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child, 9)  # the hooks' own process groups (the server leaves them running)


def test_hook_command_problems_are_one_line_at_start_and_logged_at_run(tmp_path, host_keys_dir):
    missing = str(tmp_path / "no-such-hook")
    with serving(tmp_path, host_keys_dir, "--on-upload", missing) as server:
        res = subprocess.run([*server.base_cmd(), "serve", "--port", "0", "--on-upload", "/bin/echo 'unclosed"],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--on-upload: cannot split" in res.stderr
        user = server.add_user("lea", password=None, key=True)

        async def upload() -> None:
            async with server.sftp(user) as sftp:
                async with sftp.open("a", "wb") as f:
                    await f.write(b"a")

        run(upload())
        wait_for(lambda: "hook event=upload user=lea path=/a result=cannot-start" in server.log())



def test_the_readme_example_hook_moves_completed_uploads_into_processing(tmp_path, host_keys_dir):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    script = readme.split("Example: move every completed upload", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    processing = tmp_path / "processing"
    hook = tmp_path / "to-processing.sh"
    hook.write_text(script.replace("/srv/processing", str(processing)))
    hook.chmod(0o755)
    with serving(tmp_path, host_keys_dir, "--upload-mode", "atomic", "--on-upload", str(hook)) as server:
        user = server.add_user("mia", password=None, key=True)
        local = tmp_path / "invoice.pdf"
        local.write_bytes(b"%PDF" + os.urandom(300_000))
        res = server.sftp_batch(user, f"mkdir in\nput {local} in/invoice.pdf\n")
        assert res.returncode == 0, res.stderr
        wait_for(lambda: processing.exists() and any((processing / "mia").iterdir()))
        moved = list((processing / "mia").iterdir())
        assert len(moved) == 1 and moved[0].name.endswith("-invoice.pdf")
        assert moved[0].read_bytes() == local.read_bytes()
        assert not (user.home / "in" / "invoice.pdf").exists()
        wait_for(lambda: "result=ok" in server.log() and "output=\"moved /in/invoice.pdf (300004 bytes) from 127.0.0.1:"
                 in server.log())
