"""Fault injection for the crash-safety tests: counted file-system events, killed or failed on demand.

`IoFaults` wraps the Python calls through which ktq changes a folder (open or os.open for writing, each write or
os.write to such a file, rename, unlink, mkdir, rmtree) for paths under one root, numbers those events (and lists
them, as "call path" under the root, so a test can pick the moment it kills at), and at event `at` either SIGKILLs
the process (after writing half of the data, when the event is a write: a torn write) or raises OSError(ENOSPC).
ktq itself has no test hooks: the tests see exactly the code a user runs.

Killing needs a process of its own. Starting `python -m ktq` per kill point costs a second (imports, Numba's
cache); `python tests/faults.py` is instead a small fork server: it imports ktq once, without running any Numba
code (OpenMP must not be running when a process forks), and forks one child per request. A child is a fresh
process running the real CLI entry point, `ktq.cli.main(argv)`, with the faults installed.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def _direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


class IoFaults:
    def __init__(self, root: Path, at: int | None, action: str = "kill") -> None:
        self.root = os.path.abspath(root)
        self.at, self.action = at, action
        self.events = 0
        self.trace: list[str] = []  # "call path" of every event, in order
        self._saved: list[tuple[object, str, object]] = []

    def _under_root(self, path: object) -> bool:
        try:
            absolute = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return absolute == self.root or absolute.startswith(self.root + os.sep)

    def _relative(self, path: object) -> str:
        try:
            return os.path.relpath(os.path.abspath(os.fspath(path)), self.root)
        except TypeError:  # a file descriptor
            return "?"

    def event(self, call: str, path: object, write=None) -> None:
        self.events += 1
        self.trace.append(f"{call} {self._relative(path)}")
        if self.events != self.at:
            return
        if self.action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if write is not None:  # a torn write: half of the data reaches the file, then the process dies
            write()
        os.kill(os.getpid(), signal.SIGKILL)

    def _patch(self, owner: object, name: str, make) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def install(self) -> "IoFaults":
        faults = self

        class CountedFile:
            """A file opened for writing whose every write is an event."""

            def __init__(self, file, path) -> None:
                self._file, self._path = file, path

            def write(self, data):
                def torn() -> None:
                    part = data if isinstance(data, str) else memoryview(data).cast("B")
                    self._file.write(part[: len(part) // 2])
                    self._file.flush()

                faults.event("write", self._path, torn)
                return self._file.write(data)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._file.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(self._file, name)

        def counted_open(original):
            def wrapper(file, mode="r", *args, **kwargs):
                writing = any(c in mode for c in "wax+")
                if writing and faults._under_root(file):
                    faults.event("open", file)
                    return CountedFile(original(file, mode, *args, **kwargs), file)
                return original(file, mode, *args, **kwargs)
            return wrapper

        def counted(original):
            def wrapper(path, *args, **kwargs):
                if faults._under_root(path) and "dir_fd" not in kwargs:
                    faults.event(original.__name__, args[0] if args and original.__name__ in ("replace", "rename")
                                 else path)
                return original(path, *args, **kwargs)
            return wrapper

        written: dict[int, object] = {}  # descriptors os.open gave for writing under root, and their paths

        def counted_os_open(original):
            def wrapper(path, flags, *args, **kwargs):
                writing = flags & (os.O_WRONLY | os.O_RDWR)
                if writing and faults._under_root(path) and "dir_fd" not in kwargs:
                    faults.event("open", path)
                    fd = original(path, flags, *args, **kwargs)
                    written[fd] = path
                    return fd
                return original(path, flags, *args, **kwargs)
            return wrapper

        def counted_os_write(original):
            def wrapper(fd, data):
                if fd in written:
                    def torn() -> None:  # whole blocks only: O_DIRECT refuses a part of one
                        view = memoryview(data).cast("B")
                        half = len(view) // 2
                        original(fd, view[: half - half % 4096 if _direct(fd) else half])

                    faults.event("write", written[fd], torn)
                return original(fd, data)
            return wrapper

        def forget_on_close(original):
            def wrapper(fd):
                written.pop(fd, None)
                return original(fd)
            return wrapper

        self._patch(builtins, "open", counted_open)
        self._patch(os, "open", counted_os_open)
        self._patch(os, "write", counted_os_write)
        self._patch(os, "close", forget_on_close)
        for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir"):
            self._patch(os, name, counted)
        self._patch(shutil, "rmtree", counted)
        return self

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()

    def __enter__(self) -> "IoFaults":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


@dataclass
class Outcome:
    killed: bool
    code: int | None
    events: int  # events counted by a run that was not killed
    log: str
    trace: list[str]  # "call path" of each of those events, in order (IoFaults.trace)


class ForkServer:
    """The test side of `python tests/faults.py`: run(argv, root, kill_at) -> Outcome."""

    def __init__(self, workdir: Path, command: str = "cpu") -> None:
        """command: the ktq command the children run, whose modules the server imports once."""
        self.workdir = workdir
        self._proc = subprocess.Popen([sys.executable, __file__, command], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self._runs = 0

    def run(self, argv: list[object], root: Path, kill_at: int | None = None) -> Outcome:
        self._runs += 1
        log = self.workdir / f"run{self._runs}.log"
        request = {"argv": [str(a) for a in argv], "root": str(root), "kill_at": kill_at, "log": str(log)}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = json.loads(self._proc.stdout.readline())
        return Outcome(reply["signal"] == signal.SIGKILL, reply["code"], reply["events"], log.read_text(),
                       reply["trace"])

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def _serve(command: str) -> None:
    import contextlib
    import io

    import ktq.cpu.pipeline  # noqa: F401  everything a run needs, imported once
    import ktq.safetensors_io
    from ktq.cli import main
    from ktq.safetensors_io import ALIGN

    if command == "gpu":
        # torch, transformers and llm-compressor imported, no torch operation run: no OpenMP thread yet
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with contextlib.redirect_stdout(io.StringIO()):  # llm-compressor logs to stdout, this server's reply channel
            import ktq.gpu.engine  # noqa: F401
            import ktq.gpu.run  # noqa: F401

    # a shard goes to the disk in stage-sized writes: small ones here give a sample's shard as many writes as a
    # real layer's, for kills to land inside
    ktq.safetensors_io.STAGE_BYTES = 2 * ALIGN
    from numba.core.registry import cpu_target

    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([command, "--help"])  # what Typer imports on first use
    # Numba's lowering and typing registries (most of the time a child would spend loading the kernels from
    # Numba's cache); this compiles and runs nothing, so no OpenMP thread exists when the server forks
    cpu_target.target_context.refresh()
    cpu_target.typing_context.refresh()

    for line in sys.stdin:
        request = json.loads(line)
        events_file = request["log"] + ".events"
        pid = os.fork()
        if pid == 0:
            _child(request, events_file)
        _, status = os.waitpid(pid, 0)
        counted = json.loads(Path(events_file).read_text()) if os.path.exists(events_file) else {}
        print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                          "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                          "events": counted.get("events", -1), "trace": counted.get("trace", [])}), flush=True)


def _child(request: dict, events_file: str) -> None:
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    code = 1
    try:
        from ktq.cli import main

        faults = IoFaults(Path(request["root"]), request["kill_at"]).install()
        try:
            main(request["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        faults.uninstall()
        Path(events_file).write_text(json.dumps({"events": faults.events, "trace": faults.trace}))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1] if len(sys.argv) > 1 else "cpu")
