import subprocess
import sys

from node.base.host.procs import pid_alive, stop_recorded, terminate_pid

IGNORES_TERM = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print(1, flush=True); time.sleep(60)"
)


def test_terminate_escalates_to_kill_and_counts_a_zombie_as_gone():
    process = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE)
    try:
        process.stdout.readline()  # the SIGTERM handler is in place
        assert pid_alive(process.pid)
        assert terminate_pid(process.pid, timeout_s=0.2)
        assert not pid_alive(process.pid)  # a zombie until we reap it below
    finally:
        process.kill()
        process.wait()


def test_stop_recorded_checks_the_command_line_and_removes_the_pid_file(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pid_file = tmp_path / "daemon.pid"
    try:
        pid_file.write_text(str(process.pid))
        assert stop_recorded(pid_file, (b"not-this-program",), 1.0) is None
        assert not pid_file.exists() and pid_alive(process.pid)  # a recycled PID is left alone
        pid_file.write_text(str(process.pid))
        assert stop_recorded(pid_file, (b"time.sleep",), 1.0) == process.pid
        assert not pid_alive(process.pid) and not pid_file.exists()
        assert stop_recorded(tmp_path / "absent.pid", (b"x",), 1.0) is None
    finally:
        process.kill()
        process.wait()
