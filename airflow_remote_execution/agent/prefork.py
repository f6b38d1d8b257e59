"""
The next task's process, forked by an idle runner before its workload is known.

Airflow's supervisor forks the task process in ``WatchedSubprocess.start``: socket pairs, ``os.fork()``,
and the child runs ``_fork_main`` on its ends of the pairs. The fork of a ~140 MiB runner and the
copy-on-write faults after it cost ~7 ms of the ~12 ms a runner needs from a workload to a task process;
and the task's pid, which its start report carries, exists only after it.

So a runner forks a *waiting* process while idle (:func:`fork_waiting`). When a gated task comes, the
runner announces that process's pid at once (the agent confirms the lease with it while the supervisor
sets up), and during the supervisor's ``start`` (:func:`armed`) ``os.fork`` hands the waiting process the
child ends of the socket pairs the supervisor just made and returns its pid, as a fork returns the
child's. The waiting process then runs Airflow's own child entry point on them, exactly what the forked
child would have run. Anything else that forks in a runner gets a real fork.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback

_real_fork = os.fork
_PAIRS_PER_START = 4  # WatchedSubprocess.start: stdout, stderr, requests, logs; child end first in each

_waiting: dict = {}  # this runner's waiting process: {"pid", "control"}
_armed: dict = {}  # while a supervisor starts into it: {"pairs": socket pairs made since}


def install() -> None:
    """Route the supervisor's ``socketpair`` and this process's ``os.fork`` through the hand-off (a
    runner calls this once; both behave as before unless :func:`armed`)."""
    from airflow.sdk.execution_time import supervisor

    if getattr(supervisor, "_rex_prefork", False):
        return
    real_socketpair = supervisor.socketpair

    def socketpair(*args, **kwargs):
        pair = real_socketpair(*args, **kwargs)
        if "pairs" in _armed:
            _armed["pairs"].append(pair)
        return pair

    supervisor.socketpair = socketpair
    supervisor._rex_prefork = True
    os.fork = _fork


def waiting_pid() -> int | None:
    """The waiting process's pid, if there is one and it is alive."""
    pid = _waiting.get("pid")
    if pid is None:
        return None
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        done = pid
    if done:
        discard()
        return None
    return pid


def fork_waiting() -> int | None:
    """Fork the next task's process now, unless one is waiting; returns its pid. None where the
    supervisor does not fork bare (it execs on macOS)."""
    if sys.platform != "linux":
        return None
    if (pid := waiting_pid()) is not None:
        return pid
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = _real_fork()
    if pid == 0:
        ours.close()
        _wait_and_run(theirs)  # never returns
    theirs.close()
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # as the supervisor does for its task (new_process_group): both sides
    _waiting.update(pid=pid, control=ours)
    return pid


def discard() -> None:
    """Let the waiting process go (it exits on EOF) and reap it."""
    pid, control = _waiting.pop("pid", None), _waiting.pop("control", None)
    if control is not None:
        control.close()
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@contextlib.contextmanager
def armed():
    """While the supervisor starts a task, its fork becomes the hand-off to the waiting process."""
    _armed["pairs"] = []
    try:
        yield
    finally:
        _armed.clear()


def _fork() -> int:
    pairs = _armed.pop("pairs", None)
    if pairs is None or len(pairs) < _PAIRS_PER_START or "pid" not in _waiting:
        return _real_fork()
    pid, control = _waiting.pop("pid"), _waiting.pop("control")
    try:
        socket.send_fds(control, [b"start"], [pair[0].fileno() for pair in pairs[-_PAIRS_PER_START:]])
    except OSError:  # it died while waiting: fork as usual (the pid differs from the announced one)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return _real_fork()
    finally:
        control.close()
    return pid


def _wait_and_run(control: socket.socket) -> None:
    """Body of the waiting process: wait for the supervisor's sockets, then be its task process. The
    runner's end closing (a stopped or killed runner) ends it."""
    try:
        os.setpgid(0, 0)
        with contextlib.suppress(ImportError):
            from setproctitle import setproctitle

            setproctitle("airflow remote-execution agent: task process (waiting)")
        try:
            _, fds, _, _ = socket.recv_fds(control, 16, _PAIRS_PER_START)
        except OSError:
            fds = []
        control.close()
        if len(fds) != _PAIRS_PER_START:
            os._exit(0)
        from airflow.sdk._shared.secrets_masker import reset_secrets_masker
        from airflow.sdk.execution_time import supervisor

        stdout, stderr, requests, logs = (socket.socket(fileno=fd) for fd in fds)
        # What the supervisor did before its fork, so a forked child would have inherited it.
        supervisor._make_process_nondumpable()
        reset_secrets_masker()
        supervisor._fork_main(requests, stdout, stderr, logs.fileno(), supervisor._subprocess_main)
    except BaseException as e:  # noqa: BLE001 - as the supervisor's own child does
        with contextlib.suppress(BaseException):
            print("Exception in child process, exiting with code 124", file=sys.stderr)
            traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    os._exit(124)  # _fork_main exits itself; as the supervisor's child, never return into the runner
