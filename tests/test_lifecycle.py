"""``ztfd.daemon.lifecycle`` with real processes and real signals: the stop event, the cold stop, terminate, backoff."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import child_env, wait_until
from ztfd.daemon import lifecycle

# A role in miniature: it stops on the first signal, then takes "forever" to finish (an upload in flight).
SLOW_TO_STOP = """
    import logging, sys, threading
    from ztfd.daemon import lifecycle
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    stop = lifecycle.Stop().install()
    print("ready", flush=True)
    stop.wait()
    print("stopping", flush=True)
    threading.Event().wait(300)  # the clean stop that never ends
    print("finished", flush=True)
"""

# A role that sleeps between rounds of work: the stop must wake it in a thread, in asyncio and in the main loop.
SLEEPING_LOOP = """
    import asyncio, logging, sys, threading
    from ztfd.daemon import lifecycle
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    woken = []

    def side_thread(stop):
        stop.wait(600)
        woken.append("thread")

    async def main(stop):
        event = asyncio.Event()
        stop.call_in(asyncio.get_running_loop(), event.set)
        await asyncio.wait_for(event.wait(), 600)
        woken.append("asyncio")

    with lifecycle.stop_on_signals() as stop:
        thread = threading.Thread(target=side_thread, args=(stop,))
        thread.start()
        print("ready", flush=True)
        asyncio.run(main(stop))
        while not stop.wait(600):
            pass
        thread.join()
    print("woken:", ",".join(sorted(woken)), flush=True)
"""

IGNORES_SIGTERM = """
    import signal, threading
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ready", flush=True)
    threading.Event().wait(300)
"""


def python_child(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def cleanup() -> list[subprocess.Popen[str]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_stops_at_once(first: int, second: int, cleanup: list) -> None:
    proc = python_child(SLOW_TO_STOP)
    cleanup.append(proc)
    proc.send_signal(first)
    assert proc.stdout.readline().strip() == "stopping"  # the first signal only asked for a clean stop
    assert proc.poll() is None
    proc.send_signal(second)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + second
    assert "finished" not in out
    assert f"received {signal.Signals(first).name}: stopping" in err
    assert f"received a second {signal.Signals(second).name}: stopping at once (exit {128 + second})" in err


def test_the_stop_wakes_sleeping_threads_asyncio_and_the_main_loop(cleanup: list) -> None:
    proc = python_child(SLEEPING_LOOP)
    cleanup.append(proc)
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: proc.poll() is not None, 30, "the stop to wake every waiter (each would sleep 600 s)")
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "woken: asyncio,thread" in out
    assert err.count("received SIGTERM: stopping") == 1  # logged once, by whoever saw it first


def test_a_stop_set_by_code_is_not_a_signal() -> None:
    stop = lifecycle.Stop()
    assert not stop.wait(0.01) and not stop.is_set()
    stop.set()
    assert stop.is_set() and stop.wait(0) and stop.signum is None
    with pytest.raises(RuntimeError):
        stop.clear()
    stop.close()


def test_terminate_kills_a_child_that_ignores_sigterm_after_the_timeout(cleanup: list) -> None:
    stubborn = python_child(IGNORES_SIGTERM)
    polite = python_child(SLOW_TO_STOP.replace("threading.Event().wait(300)", "pass"))
    cleanup.extend([stubborn, polite])
    ended: dict[int, int | None] = {}
    codes = lifecycle.terminate([stubborn, polite], 1.0, on_exit=lambda p, code: ended.update({p.pid: code}))
    assert codes == [-signal.SIGKILL, 0]
    assert ended == {stubborn.pid: -signal.SIGKILL, polite.pid: 0}
    assert stubborn.returncode == -signal.SIGKILL and polite.returncode == 0  # reaped


def test_terminate_reaps_a_child_known_only_by_its_pid() -> None:
    child = python_child(IGNORES_SIGTERM)
    (code,) = lifecycle.terminate([child.pid], 0.2)
    assert code == -signal.SIGKILL  # our child: reaped through waitpid
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, 0)


def test_terminate_of_a_process_group_reaches_its_members(cleanup: list) -> None:
    # A shell in its own session, ignoring SIGTERM, starts a grandchild that ignores it too: the SIGKILL after the
    # timeout goes to the whole group.
    code = f"trap '' TERM; {sys.executable} -c 'import threading; print(\"ready\", flush=True); " \
           "threading.Event().wait(300)' & wait"
    leader = subprocess.Popen(["sh", "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    cleanup.append(leader)
    assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
    import psutil

    (grandchild,) = psutil.Process(leader.pid).children()
    lifecycle.terminate([leader], 0.5, group=True)
    assert leader.returncode is not None
    wait_until(lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE, 10,
               "the grandchild to die with its group")


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = lifecycle.Backoff(1.0, 60.0)
    assert [backoff.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff.delay(0) == 1.0 and backoff.delay(10**9) == 60.0  # no overflow, however many attempts
    assert [backoff.delay_after(w) for w in (0, 0.5, 7, 100)] == [1.0, 1.0, 7, 60]


def test_backoff_jitter_only_shortens() -> None:
    backoff = lifecycle.Backoff(2.0, 300.0, jitter=0.5)
    delays = [backoff.delay(3) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(set(delays)) > 1
    assert all(150.0 <= backoff.delay(50) <= 300.0 for _ in range(50))
