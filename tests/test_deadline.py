"""The tests' one deadline (tests/conftest.py): a child that outlives it is killed with everything it started, and
the failure names what was awaited and what the child printed last."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import start_command, wait_until


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def test_a_child_past_its_deadline_is_killed_with_its_process_group_and_its_output_shown(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # a launcher that starts a worker and hangs, as a torchrun whose worker waits at a barrier forever
    launcher = start_command([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        "print('waiting at the barrier', flush=True)\n"
        "time.sleep(3600)\n")])
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "" and "barrier" in launcher.stdout(),
               "the launcher to start its worker", output=launcher.output, process=launcher)
    worker = int(pid_file.read_text())
    assert alive(worker)
    with pytest.raises(pytest.fail.Exception) as failed:
        launcher.finish(timeout=0.5)  # it sleeps for an hour: past any deadline
    message = str(failed.value)
    assert "timed out after 0 s (GEOLLAVA_TEST_TIMEOUT) waiting for" in message and "to finish" in message
    assert "waiting at the barrier" in message  # what it printed last
    assert launcher.process.poll() is not None  # the launcher is gone...
    # ...and its worker, killed with it (the signal is sent; its end is an event to wait for, not an instant)
    wait_until(lambda: not alive(worker), "the worker to be gone")


def test_waiting_for_an_event_stops_at_once_when_the_process_exits_without_it():
    child = start_command([sys.executable, "-c", "print('no address today'); raise SystemExit(3)"])
    with pytest.raises(pytest.fail.Exception, match=r"waiting for the server's address, but the process exited "
                                                    r"with status 3; its last output:\nno address today"):
        wait_until(lambda: "http://" in child.output(), "the server's address", output=child.output, process=child)
