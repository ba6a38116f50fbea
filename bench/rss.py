"""Peak RSS of a command the benchmark runs, without its parent's memory in it.

ru_maxrss from os.wait4 is not the child's own peak: on Linux, exec records the peak of
the memory the child had before it (a copy of, or with vfork the very, Python process
that started it) into the same counter, so a child of a 20 MiB Python process reports at
least 20 MiB however little it uses (`/bin/true` reports the parent's RSS). VmHWM in
/proc/PID/status is the peak of the program's own address space since exec. It is gone
once the process exits, so it is sampled while the command runs; a streaming sync
reaches its peak early and stays there, and what the last sample can miss is the exit.

For processes that keep running (a server, subscribers), reset_hwm() starts a new peak
so that the VmHWM read later is the peak of one phase, and cpu_s() reads the CPU time a
process has used so far, to difference over a phase.
"""

import collections
import os
import subprocess
import tempfile
import time

SAMPLE_S = 0.005

# peak_kib: the last VmHWM sampled; wait4_maxrss_kib: ru_maxrss as os.wait4 gives it;
# cpu_s: the command's user + system CPU seconds (its own and its waited-for children's).
Run = collections.namedtuple(
    "Run", "returncode stdout stderr wall_s peak_kib wait4_maxrss_kib cpu_s")


def status_kib(pid, field):
    """A kB field of /proc/PID/status (VmHWM, VmRSS …) of a running process, in KiB,
    or None once it has no address space."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def vm_hwm_kib(pid):
    """VmHWM of a running process in KiB, or None once it has no address space."""
    return status_kib(pid, "VmHWM")


def reset_hwm(pid):
    """Sets the process's VmHWM back to its current RSS (writing 5 to
    /proc/PID/clear_refs, Linux 4.0 and later), so the next VmHWM read is the peak since
    now. Returns False if the kernel or the permissions do not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    """User plus system CPU seconds the process (all its threads, not its children) has
    used since it started, from /proc/PID/stat; None once it is gone. The kernel counts
    in clock ticks (1/SC_CLK_TCK s, 10 ms on Linux): a difference is exact to a tick."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS_PER_S


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
        return Run(child.returncode, out.read(), err.read(), wall, peak, usage.ru_maxrss,
                   usage.ru_utime + usage.ru_stime)


def run_ok(cmd, env=None):
    """Runs `cmd` like run(); exits this script with the command's error if it fails."""
    r = run(cmd, env)
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip()
        raise SystemExit(f"{' '.join(map(str, cmd))} exited {r.returncode}: {err}")
    return r
