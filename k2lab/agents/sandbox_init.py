"""Init process of a sandbox (see sandbox.py): runs as root, pid 1 of fresh pid/net/mount/ipc/uts namespaces.

`python -I -S sandbox_init.py CONFIG_JSON`. It lays out the mount namespace (tmpfs over the writable and the
private places, the workspace and the interpreter bound back at their own paths, / read-only), then forks the
target: rlimits, an unprivileged uid of its own, scrubbed environment, exec. It waits for it, reaps whatever
else runs in the namespace, and writes {"exit", "signal", "cpu_s", "maxrss_kb"} to the status fd. When it
exits the kernel kills everything left in the pid namespace. Standard library only: it starts for every call.
"""

import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
STAGING = "/srv"  # an empty directory on the host, covered by a private tmpfs while the mounts are laid out
_libc = ctypes.CDLL(None, use_errno=True)


def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {target}: {os.strerror(err)}")


def bind(src, target, readonly):
    os.makedirs(target, exist_ok=True)
    mount(src, target, None, MS_BIND | MS_REC)
    if readonly:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def under(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def layout(cfg):
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=700")
    keep = {cfg["workspace"]: False, cfg["python_prefix"]: True}  # path -> read-only
    staged = {}
    for i, path in enumerate(keep):
        staged[path] = f"{STAGING}/{i}"
        bind(path, staged[path], readonly=False)
    for d in cfg["hide"]:
        if os.path.isdir(d):
            mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode=755")
    for path, readonly in keep.items():
        if any(under(path, d) for d in cfg["hide"]):
            bind(staged[path], path, readonly)
    _libc.umount2(STAGING.encode(), MNT_DETACH)
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def child(cfg, status_fd):
    os.close(status_fd)
    os.chdir(cfg["workspace"])
    lim = cfg["limits"]
    # CPU: SIGXCPU at the soft limit, SIGKILL one second later if it is caught
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    for res, value in ((resource.RLIMIT_AS, lim["memory_mb"] << 20),
                       (resource.RLIMIT_FSIZE, lim["file_mb"] << 20), (resource.RLIMIT_NPROC, lim["nproc"]),
                       (resource.RLIMIT_NOFILE, lim["nofile"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    os.umask(0o022)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])


def main():
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    if cfg["namespaces"]:
        layout(cfg)
    if cfg["uid"] is not None:  # the uid must own its workspace; nothing else is writable to it
        for root, dirs, files in os.walk(cfg["workspace"]):
            for name in [root] + [os.path.join(root, n) for n in dirs + files]:
                os.lchown(name, cfg["uid"], cfg["uid"])
    pid = os.fork()
    if pid == 0:
        try:
            child(cfg, status_fd)
        except BaseException as e:  # setup failed: say why on stderr, exit like a shell would
            print(f"sandbox: cannot start {cfg['argv'][0]}: {e}", file=sys.stderr)
            os._exit(127)
    _, status, rusage = os.wait4(pid, 0)
    out = {"exit": os.waitstatus_to_exitcode(status), "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
           "cpu_s": rusage.ru_utime + rusage.ru_stime, "maxrss_kb": rusage.ru_maxrss}
    os.write(status_fd, json.dumps(out).encode())
    os.close(status_fd)


if __name__ == "__main__":
    main()
