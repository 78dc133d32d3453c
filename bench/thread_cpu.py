"""CPU by thread of every Ray worker process on this machine, sampled every 10 s, one JSON line per sample:
{"t": ..., "procs": {pid: {"name": its command line, "threads": {tid: [thread name, utime + stime ticks]}}}}.
Run beside a bench (e.g. bench/serve_load.py) to see where a replica's CPU goes; compare two samples per thread.

    python bench/thread_cpu.py OUT.jsonl SECONDS
"""

from __future__ import annotations

import json
import os
import sys
import time


def ray_command(pid: str) -> str | None:
    try:
        command = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return None
    return command[:80] if command.startswith("ray::") else None


def threads_of(pid: str) -> dict[str, list]:
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue  # a thread that ended between the listing and the read
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        threads[tid] = [name, int(fields[11]) + int(fields[12])]  # utime + stime, in clock ticks
    return threads


def main() -> None:
    out, seconds = sys.argv[1], float(sys.argv[2])
    end = time.time() + seconds
    with open(out, "w") as f:
        while time.time() < end:
            sample: dict = {"t": time.time(), "procs": {}}
            for pid in filter(str.isdigit, os.listdir("/proc")):
                name = ray_command(pid)
                if name:
                    try:
                        sample["procs"][pid] = {"name": name, "threads": threads_of(pid)}
                    except OSError:
                        continue  # the process ended
            f.write(json.dumps(sample) + "\n")
            f.flush()
            time.sleep(10)


if __name__ == "__main__":
    main()
