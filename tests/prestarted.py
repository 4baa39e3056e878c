"""Trainer processes without the import: a server that imported TensorFlow, Keras and the
trainer once, and forks a child per `python -m trainer.main ...` a test starts.

Each trainer process of the suite spent about 6 s importing before its first line (2 AVX2
cores, 2026-12-04), and the suite starts many. A child forked from this server is a real
process of its own (its PID, signals, exit code, stdin/stdout/stderr, working directory and
environment are the test's), but its modules are already loaded: `trainer.main` runs in it as
`python -m trainer.main` would, from argument parsing on.

Forking is safe here because the server never starts TensorFlow's runtime (no op, no device,
no thread pool: `serve` checks), which each child then starts for itself. What a prestarted
child cannot show is the cold start itself (what happens during the imports, the environment
read at import time): the tests of those start `sys.executable` themselves.

The protocol, one Unix-socket connection per child: the client sends one JSON line (argv, cwd,
env, start_new_session) with its three standard streams as file descriptors (SCM_RIGHTS); the
child answers its PID on one line once its session, streams, folder and environment are the
test's, and the server, when the child has ended, its wait status on a second. `Popen` is
subprocess.Popen with that exchange in place of fork/exec and waitpid.
"""
from __future__ import annotations

import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import types

PRELOAD = ("trainer.flags", "trainer.errors", "trainer.tools.tool_flags", "trainer.loop.train",
           "trainer.loop.finish", "trainer.tools.serving", "trainer.tools.analysis",
           "trainer.report.figures", "models.registry", "data.check", "data.datasets",
           "data.packed", "matplotlib.pyplot", "tensorboard.plugins.hparams.api")

# The modules whose functions AutoGraph converts in a trainer process: it rewrites a function's
# source at its first call in a process, about 2.3 s of each small run (2 AVX2 cores), so the
# server converts them once and a child finds them in AutoGraph's cache. The first modules hold
# tf.function and strategy.run targets, converted as requested by the user; the others hold
# what those call and dataset.map functions, converted as callees only.
CONVERTED_AS_TARGETS = ("trainer.loop.step", "trainer.loop.actions", "trainer.loop.ema",
                        "trainer.report.performance", "trainer.tools.analysis",
                        "trainer.tools.serving")
CONVERTED_AS_CALLEES = ("trainer.loop.recipes", "data.decode", "data.orders", "data.datasets",
                        "data.packed", "data.augment")


# ---- the server --------------------------------------------------------------------------
def serve(path: str) -> None:
    import importlib
    from trainer.tools.tool_flags import import_tensorflow
    import_tensorflow()  # quietly, as the trainer does
    import matplotlib
    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    # In the background (about 25 s on 2 AVX2 cores): a child forked before the end finds
    # part of the cache filled; _start_child forks under AutoGraph's cache lock, which a
    # conversion holds throughout, so no child starts with the lock taken.
    threading.Thread(target=_convert_ahead, daemon=True,
                     args=(CONVERTED_AS_TARGETS, CONVERTED_AS_CALLEES)).start()
    _check_runtime_not_started()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # nobody reads the pipe from here on
    children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (connection, pid)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(0, selectors.EVENT_READ)  # EOF: the test process is gone
    while True:
        for key, _ in selector.select():
            if key.fileobj == 0:
                if not os.read(0, 1024):
                    listener.close()
                    os.unlink(path)
                    return  # the children run on (a test's kill ends those it started)
            elif key.fileobj is listener:
                connection, _ = listener.accept()
                pid = _start_child(connection, listener, selector, children)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (connection, pid)
                selector.register(pidfd, selectors.EVENT_READ)
            else:
                connection, pid = children.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                _, status = os.waitpid(pid, 0)
                try:
                    connection.sendall(f"{status}\n".encode())
                except OSError:
                    pass  # the test gave up on it
                connection.close()


def _convert_ahead(targets, callees) -> None:
    """Fills AutoGraph's cache, which is keyed by code object and conversion options, with
    every function of these modules (methods, nested functions and lambdas included), under
    the options of a tf.function's own function (`targets` only) and of what it calls. What
    AutoGraph cannot convert is skipped, as it would be in the child."""
    import importlib

    from tensorflow.python.autograph.core import converter
    from tensorflow.python.autograph.impl import api

    def context(user_requested: bool):
        return converter.ProgramContext(converter.ConversionOptions(
            recursive=True, user_requested=user_requested, optional_features=None))
    for names, contexts in ((targets, [context(True), context(False)]),
                            (callees, [context(False)])):
        for name in names:
            module = importlib.import_module(name)
            for code in _code_objects(module):
                cells = tuple(types.CellType() for _ in code.co_freevars)
                function = types.FunctionType(code, module.__dict__, code.co_name, None, cells)
                for program_context in contexts:
                    try:
                        api._TRANSPILER.transform(function, program_context)  # noqa: SLF001
                    except Exception:  # noqa: BLE001 (the child would run it unconverted)
                        pass


def _code_objects(module):
    """The code objects of the functions defined in `module`, nested ones included."""
    import inspect
    pending = []
    for value in vars(module).values():
        members = vars(value).values() if inspect.isclass(value) else [value]
        for member in members:
            member = getattr(member, "__func__", getattr(member, "fget", member))
            code = getattr(inspect.unwrap(member), "__code__", None) \
                if callable(member) else None
            if code is not None and code.co_filename == module.__file__:
                pending.append(code)
    seen = set()
    while pending:
        code = pending.pop()
        if code not in seen:
            seen.add(code)
            pending.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return seen


def _check_runtime_not_started() -> None:
    from tensorflow.python.eager import context
    if context.context()._context_handle is not None:  # noqa: SLF001
        raise SystemExit("prestarted: TensorFlow's runtime has started here; forking is unsafe")


def _start_child(connection, listener, selector, children) -> int:
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message)
    sys.stdout.flush()
    sys.stderr.flush()
    _check_runtime_not_started()
    from tensorflow.python.autograph.impl import api
    with api._TRANSPILER._cache_lock:  # noqa: SLF001 (see serve)
        pid = os.fork()
    if pid == 0:
        _child(request, fds, connection,
               [listener, selector] + [c for c, _ in children.values()] + list(children))
    for fd in fds:
        os.close(fd)
    return pid


def _child(request: dict, fds: list[int], connection, inherited: list) -> None:
    """In the forked child: the test's session, streams, folder and environment; then its PID
    to the test (so that, as with subprocess.Popen, all of that is in place when the test has
    the PID), then the program. The signal dispositions are a fresh interpreter's already: the
    server installs no handler."""
    code = 1
    try:
        for item in inherited:
            item.close() if hasattr(item, "close") else os.close(item)
        if request["start_new_session"]:
            os.setsid()
        os.nice(request["nice"])
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in set(fds):
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        connection.sendall(f"{os.getpid()}\n".encode())
        connection.close()
        module, *args = request["argv"]
        sys.argv = [module, *args]
        import runpy
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            code = 128 + signal.SIGINT
        except BaseException:  # noqa: BLE001 (as the interpreter: the traceback, exit 1)
            import traceback
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# ---- the client ----------------------------------------------------------------------------
class Server:
    """The server process of this test process, started on first use."""

    def __init__(self, repo: str):
        # A short path: a Unix socket's is at most 107 bytes.
        self.path = os.path.join(tempfile.mkdtemp(prefix="prestarted-", dir="/tmp"), "socket")
        self.process = subprocess.Popen([sys.executable, "-m", "tests.prestarted", self.path],
                                        cwd=repo, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line != "ready\n":
            raise RuntimeError(f"tests.prestarted did not start (exit {self.process.wait()})")

    def close(self) -> None:
        self.process.stdin.close()  # the server ends at EOF
        self.process.wait()
        os.rmdir(os.path.dirname(self.path))


class Popen(subprocess.Popen):
    """subprocess.Popen of `python -m MODULE ARGS` (args[1:3] == ["-m", MODULE]) as a child of
    `server`: the streams, cwd, env and start_new_session as given, `nice` added to the
    child's niceness; other options are not supported."""

    def __init__(self, args, *, server: Server, nice: int = 0, **kwargs):
        self._server, self._nice = server, nice
        self._status_line = b""
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env,
                       startupinfo, creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite,
                       errread, errwrite, restore_signals, gid, gids, uid, umask,
                       start_new_session, process_group):
        args = [os.fspath(a) for a in args]
        if args[1] != "-m" or shell or preexec_fn or pass_fds:
            raise ValueError(f"prestarted: only `python -m MODULE ARGS` is supported: {args}")
        streams = [p2cread if p2cread != -1 else 0, c2pwrite if c2pwrite != -1 else 1,
                   errwrite if errwrite != -1 else 2]
        request = {"argv": args[2:], "cwd": os.fspath(cwd or os.getcwd()),
                   "env": dict(os.environ if env is None else env),
                   "start_new_session": bool(start_new_session), "nice": self._nice}
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._connection.connect(self._server.path)
            socket.send_fds(self._connection, [json.dumps(request).encode()], streams)
            self.pid = int(self._read_line(block=True))
        finally:
            self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _read_line(self, block: bool) -> str | None:
        while b"\n" not in self._status_line:
            if not block and not select.select([self._connection], [], [], 0)[0]:
                return None
            chunk = self._connection.recv(64)
            if not chunk:
                raise RuntimeError("prestarted: the server closed the connection")
            self._status_line += chunk
        line, self._status_line = self._status_line.split(b"\n", 1)
        return line.decode()

    def _try_wait(self, wait_flags):
        status = self._read_line(block=not wait_flags & os.WNOHANG)
        if status is None:
            return 0, 0
        self._connection.close()
        return self.pid, int(status)

    def _internal_poll(self, _deadstate=None, **_):
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            except OSError:
                if _deadstate is not None:
                    self.returncode = _deadstate
            finally:
                self._waitpid_lock.release()
        return self.returncode


_SERVER: Server | None = None
_LOCK = threading.Lock()


def server(repo: str) -> Server:
    """This process's server, started on first use (and again if it died)."""
    global _SERVER
    with _LOCK:
        if _SERVER is None or _SERVER.process.poll() is not None:
            _SERVER = Server(repo)
        return _SERVER


def close() -> None:
    global _SERVER
    with _LOCK:
        if _SERVER is not None:
            _SERVER.close()
            _SERVER = None


if __name__ == "__main__":
    serve(sys.argv[1])
