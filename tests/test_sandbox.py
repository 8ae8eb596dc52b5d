"""Sandbox: limits and escape attempts. Each attempt must fail and be reported in the result."""

import asyncio
import os
import socket
import subprocess
import time

import pytest

from k2lab.agents.sandbox import Limits, Sandbox, isolation

needs_ns = pytest.mark.skipif(isolation() != "namespaces", reason="needs root and unshare (full isolation)")
FAST = Limits(cpu_s=2, wall_s=6.0, memory_mb=512)


def run(sb, code, limits=None):
    return asyncio.run(sb.python(code, limits))


def test_runs_code_in_its_workspace(tmp_path):
    sb = Sandbox(tmp_path / "ws", FAST)
    (tmp_path / "ws" / "solution.py").write_text("def add(a, b):\n    return a + b\n")
    tests = ("import unittest\nfrom solution import add\n"
             "class T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
             "unittest.main(argv=['x'], exit=True)\n")
    r = run(sb, tests)
    assert r.ok and r.exit_code == 0 and "OK" in r.stderr
    r = run(sb, "open('out.txt', 'w').write('hello'); import os; print(os.getcwd())")
    assert r.ok and r.stdout.strip() == str(tmp_path / "ws")
    assert (tmp_path / "ws" / "out.txt").read_text() == "hello"
    r = asyncio.run(sb.shell("cat out.txt && exit 3"))
    assert r.stdout == "hello" and r.exit_code == 3 and r.outcome == "error"


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="cpu_s"):
        Limits(cpu_s=0)


@needs_ns
def test_writing_outside_the_workspace_fails(tmp_path):
    sb = Sandbox(tmp_path / "ws", FAST)
    for target in (tmp_path / "escape.txt", "/etc/k2lab_escape", "/work/k2lab_escape", "/root/k2lab_escape"):
        r = run(sb, f"open({str(target)!r}, 'w').write('x')")
        assert r.outcome == "error" and ("Permission denied" in r.stderr or "Read-only file system" in r.stderr)
        assert not os.path.exists(target)
    r = asyncio.run(sb.shell(f"echo x > {tmp_path}/escape2.txt"))
    assert r.outcome == "error" and not (tmp_path / "escape2.txt").exists()


@needs_ns
def test_secrets_in_env_and_files_are_not_readable(tmp_path, monkeypatch):
    monkeypatch.setenv("K2LAB_API_KEY", "sk-very-secret")
    secret = tmp_path / "secret.txt"
    secret.write_text("sk-file-secret")
    secret.chmod(0o644)  # readable by any user on the host: only the mount namespace hides it
    sb = Sandbox(tmp_path / "ws", FAST)
    r = run(sb, "import os; print(dict(os.environ)); print(open('/proc/1/environ','rb').read())")
    assert "sk-very-secret" not in r.stdout + r.stderr and "K2LAB_API_KEY" not in r.stdout
    r = run(sb, f"print(open({str(secret)!r}).read())")
    assert r.outcome == "error" and "No such file" in r.stderr and "sk-file-secret" not in r.stdout
    r = run(sb, "import os; print(os.listdir('/root'), os.listdir('/work'))")
    assert r.ok and ".npmrc" not in r.stdout and "'wt'" not in r.stdout


@needs_ns
def test_network_is_unreachable_even_on_loopback(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sb = Sandbox(tmp_path / "ws", FAST)
    try:
        for host in ("127.0.0.1", "1.1.1.1"):
            r = run(sb, f"import socket; socket.create_connection(({host!r}, {port}), timeout=2)")
            assert r.outcome == "error" and ("unreachable" in r.stderr or "refused" in r.stderr)
    finally:
        listener.close()


@needs_ns
def test_fork_bomb_is_contained_and_cleaned_up(tmp_path):
    sb = Sandbox(tmp_path / "ws", Limits(cpu_s=2, wall_s=3.0, nproc=32))
    r = run(sb, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    assert r.outcome == "timeout"
    # the kernel takes the killed pid namespace down asynchronously: under load that takes a moment
    deadline = time.monotonic() + 10
    while (left := subprocess.run(["pgrep", "-u", str(sb.uid)], capture_output=True, text=True).stdout) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == "", f"processes of the sandbox uid survived: {left}"


def test_allocating_10gb_fails(tmp_path):
    r = run(Sandbox(tmp_path / "ws", FAST), "x = bytearray(10 * 2**30)")
    assert r.outcome == "memory" and "MemoryError" in r.stderr


def test_infinite_loop_hits_cpu_limit_and_sleep_hits_wall_clock(tmp_path):
    sb = Sandbox(tmp_path / "ws", Limits(cpu_s=1, wall_s=1.5))
    r = run(sb, "while True: pass")
    assert r.outcome == "timeout" and r.wall_s < 5
    r = run(sb, "import time; time.sleep(60)")
    assert r.outcome == "timeout" and 1.4 < r.wall_s < 5


def test_output_cap(tmp_path):
    sb = Sandbox(tmp_path / "ws", Limits(output_bytes=1000, wall_s=5))
    r = run(sb, "while True: print('a' * 100)")
    assert r.outcome == "output_limit" and r.truncated and len(r.stdout) == 1000
