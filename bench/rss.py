"""Peak RSS of a command the benchmark runs, without its parent's memory in it.

ru_maxrss from os.wait4 is not the child's own peak: on Linux, exec records the peak of
the memory the child had before it (a copy of, or with vfork the very, Python process
that started it) into the same counter, so a child of a 20 MiB Python process reports at
least 20 MiB however little it uses (`/bin/true` reports the parent's RSS). VmHWM in
/proc/PID/status is the peak of the program's own address space since exec. It is gone
once the process exits, so it is sampled while the command runs; a streaming sync
reaches its peak early and stays there, and what the last sample can miss is the exit.
"""

import collections
import os
import subprocess
import tempfile
import time

SAMPLE_S = 0.005

# peak_kib: the last VmHWM sampled; wait4_maxrss_kib: ru_maxrss as os.wait4 gives it.
Run = collections.namedtuple(
    "Run", "returncode stdout stderr wall_s peak_kib wait4_maxrss_kib")


def vm_hwm_kib(pid):
    """VmHWM of a running process in KiB, or None once it has no address space."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run(cmd, env):
    """Runs `cmd` to its end; returns a Run."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        peak = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            hwm = vm_hwm_kib(child.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            time.sleep(SAMPLE_S)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(child.returncode, out.read(), err.read(), wall, peak, usage.ru_maxrss)
