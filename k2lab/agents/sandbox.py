"""Run untrusted Python code or shell commands in a separate process, confined to a workspace directory.

Isolation `"namespaces"` (used when running as root and `unshare` works, as on k2lab's Linux machines):
- fresh pid, network, mount, ipc and uts namespaces (util-linux `unshare`); the network namespace has only a
  loopback device that is down, so no connection can be opened, not even to the host's loopback;
- an unprivileged uid of its own (one per Sandbox), owning only the workspace; `/` is remounted read-only in the
  sandbox's mount namespace; `/tmp`, `/var/tmp`, `/dev/shm`, `/root`, `/home`, `/work`, `/run` are replaced by
  small empty root-owned tmpfs mounts (the workspace and the Python installation are bound back at their own paths), so
  the host's temp files, home directories, worktrees and secrets cannot be read and nothing outside the
  workspace can be written (those tmpfs mounts are not writable to it either);
- a scrubbed environment (PATH, HOME=TMPDIR=workspace, LANG), so no API key or token is inherited;
- rlimits on CPU seconds, address space, file size, open files and processes (a fork bomb hits the process
  limit); a wall-clock timeout and an output cap enforced by the parent; when time is up the whole pid
  namespace is killed, so no process outlives the call.
Not guaranteed: files readable by any user elsewhere (/etc, /usr, /sys) stay readable; there is no seccomp
filter, so kernel bugs are out of scope; the interpreter is the base Python (standard library, no venv packages).

Isolation `"rlimits"` (fallback when namespaces are unavailable, e.g. not root): rlimits, scrubbed environment,
own working directory and process group only; no network or file-system confinement. `isolation()` tells which.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/work", "/run")
OUTCOMES = ("ok", "error", "timeout", "memory", "killed", "output_limit")


@dataclass(frozen=True)
class Limits:
    cpu_s: int = 10
    wall_s: float = 30.0
    memory_mb: int = 1024  # address space
    output_bytes: int = 1_000_000  # stdout and stderr each
    file_mb: int = 64  # largest file it may write
    nproc: int = 64  # processes and threads of its uid
    nofile: int = 256
    tmpfs_mb: int = 64  # size of each tmpfs that replaces a hidden directory

    def __post_init__(self) -> None:
        bad = {k: v for k, v in asdict(self).items() if v <= 0}
        if bad:
            raise ValueError(f"Limits must be positive, got {bad}")


@dataclass
class SandboxResult:
    outcome: str  # one of OUTCOMES
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float = 0.0
    signal: int = 0
    isolation: str = ""
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def as_text(self, limit: int = 8000) -> str:
        """Compact rendering for a tool result."""
        text = f"outcome: {self.outcome} (exit {self.exit_code}, {self.wall_s:.2f}s)\n"
        if self.stdout:
            text += f"stdout:\n{self.stdout[-limit:]}\n"
        if self.stderr:
            text += f"stderr:\n{self.stderr[-limit:]}\n"
        return text


@functools.cache
def isolation() -> str:
    """'namespaces' when this process can build the full sandbox, else 'rlimits'."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not unshare or not os.path.isdir("/srv"):
        return "rlimits"
    probe = subprocess.run([unshare, "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "true"],
                           capture_output=True, timeout=10)
    return "namespaces" if probe.returncode == 0 else "rlimits"


def _base_python() -> tuple[str, str]:
    exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return exe, os.path.realpath(sys.base_prefix)


async def _read_capped(stream: asyncio.StreamReader, cap: int, over: asyncio.Event) -> tuple[bytes, bool]:
    buf, truncated = bytearray(), False
    while chunk := await stream.read(65536):
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]
        if len(buf) >= cap and not truncated and chunk:
            truncated = True
            over.set()
    return bytes(buf), truncated


@dataclass
class Sandbox:
    """A workspace directory and the limits for everything run in it."""

    workspace: Path
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace).resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.mode = isolation()
        # one unprivileged uid per sandbox: its process limit and its files are its own
        self.uid = random.randrange(200_000, 2_000_000) if os.geteuid() == 0 else None

    async def python(self, code: str, limits: Limits | None = None, stdin: str | None = None) -> SandboxResult:
        exe, _ = _base_python()
        return await self.run([exe, "-E", "-s", "-c", code], limits, stdin)

    async def shell(self, command: str, limits: Limits | None = None, stdin: str | None = None) -> SandboxResult:
        return await self.run(["/bin/sh", "-c", command], limits, stdin)

    async def run(self, argv: list[str], limits: Limits | None = None, stdin: str | None = None) -> SandboxResult:
        """Run argv (absolute path first) in the workspace; never raises for anything the program does."""
        lim = limits or self.limits
        exe, prefix = _base_python()
        status_r, status_w = os.pipe()
        cfg = {"workspace": str(self.workspace), "python_prefix": prefix, "hide": list(HIDDEN),
               "namespaces": self.mode == "namespaces", "uid": self.uid, "argv": argv, "status_fd": status_w,
               "limits": asdict(lim), "tmpfs_mb": lim.tmpfs_mb,
               "env": {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.workspace), "LANG": "C.UTF-8",
                       "TMPDIR": str(self.workspace), "PYTHONDONTWRITEBYTECODE": "1"}}
        init = [exe, "-I", "-S", str(Path(__file__).with_name("sandbox_init.py")), json.dumps(cfg)]
        if self.mode == "namespaces":
            init = [shutil.which("unshare"), "--net", "--pid", "--mount", "--ipc", "--uts", "--fork",
                    "--kill-child", "--mount-proc"] + init
        t0 = time.perf_counter()
        try:
            proc = await asyncio.create_subprocess_exec(
                *init, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,), env=cfg["env"],
                start_new_session=True)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        over = asyncio.Event()
        readers = asyncio.gather(_read_capped(proc.stdout, lim.output_bytes, over),
                                 _read_capped(proc.stderr, lim.output_bytes, over))
        if stdin is not None:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        waiter = asyncio.ensure_future(proc.wait())
        overflow = asyncio.ensure_future(over.wait())
        done, _ = await asyncio.wait({waiter, overflow}, timeout=lim.wall_s, return_when=asyncio.FIRST_COMPLETED)
        killed_for = None if waiter in done else ("output_limit" if overflow in done else "timeout")
        if killed_for:
            _kill(proc.pid)
            await waiter
        overflow.cancel()
        (out, t_out), (err, t_err) = await readers
        wall = time.perf_counter() - t0
        status = _read_status(status_r)
        return SandboxResult(outcome=killed_for or _classify(status, err, lim), exit_code=status.get("exit"),
                             stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
                             wall_s=wall, cpu_s=status.get("cpu_s", 0.0), signal=status.get("signal", 0),
                             isolation=self.mode, truncated=t_out or t_err)


def _kill(pid: int) -> None:
    """SIGKILL the process group; with namespaces, unshare's --kill-child then takes the pid namespace down."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_status(fd: int) -> dict:
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    return json.loads(data) if data else {}


def _classify(status: dict, stderr: bytes, lim: Limits) -> str:
    if not status:  # the init process itself died
        return "killed"
    sig = status.get("signal", 0)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and status.get("cpu_s", 0) >= lim.cpu_s - 0.05):
        return "timeout"
    if status.get("exit") != 0 and b"MemoryError" in stderr[-4096:]:
        return "memory"
    if sig:
        return "killed"
    return "ok" if status.get("exit") == 0 else "error"
