"""The sandbox as a security boundary: hostile programs end as failures (or their honest result), the
harness keeps running, and nothing outside the sandbox changes."""

import os
import socket
import textwrap

import pytest

from multitoken.eval.sandbox import UID_BASE, UID_SPAN, SandboxLimits, run_program, sandbox_capabilities

LIMITS = SandboxLimits(timeout=4, memory_bytes=512 << 20, file_size_bytes=8 << 20, disk_bytes=32 << 20,
                       max_processes=32, output_bytes=16 << 10)
CAPS = sandbox_capabilities()
needs_separate_uid = pytest.mark.skipif(not CAPS.separate_uid, reason=f"sandbox mode {CAPS.mode}: no separate uid "
                                        "(run as root): a fork bomb or kill(-1) would reach our own processes")
needs_namespaces = pytest.mark.skipif(not CAPS.namespaces, reason=f"sandbox mode {CAPS.mode}: no network namespace")


def run(code: str, limits: SandboxLimits = LIMITS):
    return run_program(textwrap.dedent(code), limits)


def sandbox_processes() -> list[int]:
    """Live processes owned by a sandbox uid (leftovers would mean containment failed)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if UID_BASE <= entry.stat().st_uid < UID_BASE + UID_SPAN:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_a_correct_program_passes_and_its_output_is_captured():
    r = run("import hashlib, json\nprint(json.dumps(hashlib.md5(b'').hexdigest()))\n")
    assert r.passed and r.result == "passed"
    assert r.stdout == '"d41d8cd98f00b204e9800998ecf8427e"\n'


def test_a_failing_assertion_fails_with_its_reason():
    r = run("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not r.passed and r.result == "failed: AssertionError: arithmetic"
    assert "AssertionError" in r.stderr


def test_infinite_loop_times_out_and_leaves_nothing_running():
    r = run("while True:\n    pass\n", SandboxLimits(timeout=2, memory_bytes=512 << 20))
    assert r.status == "timed out" and not r.passed
    assert sandbox_processes() == []


def test_a_child_that_sleeps_forever_is_killed_with_the_program():
    # The program exits at once, but leaves a detached child (new session) sleeping: it must not survive.
    r = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(1000)
        """)
    assert r.passed  # the program itself ran to its end: its honest result
    assert sandbox_processes() == []


@needs_separate_uid
def test_fork_bomb_is_contained():
    r = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    assert not r.passed
    assert sandbox_processes() == []


def test_allocating_50_gb_fails():
    r = run("x = bytearray(50 * 10**9)\nprint('allocated')\n")
    assert not r.passed and "MemoryError" in r.result and "allocated" not in r.stdout


def test_writing_a_10_gb_file_fails_and_leaves_no_file(tmp_path):
    r = run("""
        chunk = b'x' * (1 << 20)
        with open('big.bin', 'wb') as f:
            for _ in range(10 * 1024):
                f.write(chunk)
        """)
    assert not r.passed and r.status == "failed"
    assert ("File too large" in r.result) or ("No space left" in r.result)


def test_the_working_directory_is_fresh_and_removed(tmp_path):
    r = run("import os\nopen('mine.txt', 'w').write('x')\nprint(os.getcwd())\nprint(sorted(os.listdir('.')))\n")
    cwd, listing = r.stdout.splitlines()
    assert r.passed and listing == "['mine.txt']"  # nothing but what the program wrote
    assert not os.path.exists(cwd)


def test_deleting_files_outside_its_directory_fails(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    shared = f"/tmp/multitoken-canary-{os.getpid()}"  # in the world-writable /tmp, owned by us
    with open(shared, "w") as f:
        f.write("alive")
    try:
        r = run(f"""
            import os, shutil
            for path in ({str(canary)!r}, {shared!r}):
                try:
                    os.remove(path)
                except OSError:
                    pass
            shutil.rmtree({str(tmp_path)!r}, ignore_errors=True)
            open({str(tmp_path / 'planted.txt')!r}, 'w').write('x')
            """)
        assert not r.passed  # planting a file in our folder failed
        assert canary.read_text() == "alive" and open(shared).read() == "alive"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["canary.txt"]
    finally:
        os.remove(shared)


@needs_separate_uid
def test_writes_to_shared_tmp_do_not_escape():
    name = f"/tmp/multitoken-planted-{os.getpid()}"
    r = run(f"open({name!r}, 'w').write('x')\n")
    try:
        # With a mount namespace /tmp is the sandbox's own tmpfs (the write succeeds, inside);
        # without one the sandbox uid may still create files in /tmp (documented).
        if CAPS.namespaces:
            assert r.passed and not os.path.exists(name)
    finally:
        if os.path.exists(name):
            os.remove(name)


def test_the_parents_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("MULTITOKEN_TEST_SECRET", "hunter2-secret-value")
    r = run("""
        import os
        found = 'hunter2-secret-value' in repr(dict(os.environ))
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    found |= b'hunter2-secret-value' in open(f'/proc/{pid}/environ', 'rb').read()
                except OSError:
                    pass
        print('FOUND' if found else 'hidden')
        assert not found
        """)
    assert r.passed and r.stdout.strip() == "hidden"


@needs_namespaces
def test_network_connections_are_impossible():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        r = run(f"""
            import socket
            s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
            s.sendall(b'exfiltrated')
            """)
        assert not r.passed and ("unreachable" in r.result or "refused" in r.result or "OSError" in r.result)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_killing_its_parent_does_not_kill_the_harness():
    r = run("""
        import os, signal
        os.kill(os.getppid(), signal.SIGKILL)
        """)
    # Either the kill is refused/ignored and the program ends honestly (passes), or it killed its
    # disposable runner and failed; the harness (this test) is alive in both cases.
    assert r.status in ("passed", "failed")
    assert os.getpid() > 0


@needs_separate_uid
def test_killing_the_harness_and_everything_fails():
    r = run(f"""
        import os, signal
        for target in ({os.getpid()}, {os.getppid()}, -1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError:
                pass
        os.kill({os.getpid()}, signal.SIGKILL)
        """)
    assert not r.passed  # the last kill cannot reach us, so it raises
    assert sandbox_processes() == []


def test_exiting_with_status_0_before_the_assertions_fails():
    r = run("""
        import os
        os._exit(0)
        assert False
        """)
    assert not r.passed and r.returncode == 0  # exit status 0 is not a pass: the nonce never came


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)\nassert False\n",
    "raise SystemExit(0)\nassert False\n",
    "exit()\nassert False\n",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    # Guess at the verdict: write plausible pass markers to every descriptor.
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'passed\\n')\n    except OSError:\n        pass\nos._exit(0)\n",
    # Read stdin (where the nonce came from) and echo it everywhere, then quit early.
    "import os, sys\ndata = sys.stdin.buffer.read()\nfor fd in range(1, 64):\n    try:\n        os.write(fd, data or b'x')\n    except OSError:\n        pass\nos._exit(0)\n",
])
def test_exit_tricks_fail(trick):
    r = run(trick)
    assert not r.passed, r.result


def test_patching_the_checker_fails():
    # A completion that redefines `check` and `assert`-relevant builtins before the tests run: the tests
    # redefine check after it, and the verdict does not come from check's return value.
    prog = """
        import builtins, sys
        def check(candidate):
            return True
        builtins.AssertionError = type('Nothing', (Exception,), {})
        sys.excepthook = lambda *a: None
        def add(a, b):
            return a - b

        def check(candidate):
            assert candidate(2, 2) == 4

        check(add)
        """
    r = run(prog)
    assert not r.passed


def test_megabytes_of_output_are_capped():
    r = run("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 50000 + '\\n')\nprint('end')\n")
    assert r.passed  # the program ran to its end: honest result
    assert len(r.stdout) < 20_000 and "more bytes dropped" in r.stdout


def test_a_syntax_error_fails():
    r = run("def f(:\n")
    assert not r.passed and "SyntaxError" in r.result


def test_the_harness_keeps_going_after_hostile_programs():
    assert run("print('still here')\n").stdout == "still here\n"
