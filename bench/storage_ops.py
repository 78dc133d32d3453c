"""dreamcache.storage's object operations, the working tree's module against a baseline version, in one run.

    python bench/storage_ops.py                       # baseline: dreamcache/storage.py at git revision main
    python bench/storage_ops.py --baseline 73ea653 --rounds 5 --ops 100 --size 65536

Backends: a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, started as the tests start it, see
tests/s3_server.py) and a local folder. Each round, for each module and backend, on a fresh prefix: ``--ops`` puts
(write_bytes of ``--size`` bytes), gets (read_bytes), stats, then ``--lists`` listings of that prefix (list_objects)
and ``--ops`` deletes. Rounds alternate which module goes first, so the load of a shared machine falls on both
alike; the table gives the medians over rounds of the wall and the client's CPU time per operation, and the
ratios current / baseline (below 1: faster now).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from s3_server import SeaweedS3  # noqa: E402

import dreamcache  # noqa: E402,F401  (the package the baseline's relative imports resolve in)
from dreamcache import storage  # noqa: E402

OPS = ("put", "get", "stat", "list", "delete")


def load_baseline(revision: str, folder: Path) -> ModuleType:
    """dreamcache/storage.py as of ``revision``, imported beside the current one as dreamcache._storage_baseline."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:dreamcache/storage.py"],
                            check=True, capture_output=True, text=True).stdout
    path = folder / "storage_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dreamcache._storage_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def one_round(module: ModuleType, base: str, ops: int, lists: int, data: bytes) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per operation of each kind, on a fresh prefix under ``base``. The CPU time is this
    process's alone (the client side, not the server's): on a loaded machine it varies less than the wall time."""
    prefix = module.join_uri(base, uuid.uuid4().hex[:12])
    uris = [module.join_uri(prefix, f"obj-{i:05d}.bin") for i in range(ops)]
    phases: dict[str, tuple[Callable[[], object], int]] = {
        "put": (lambda: [module.write_bytes(u, data) for u in uris], ops),
        "get": (lambda: [module.read_bytes(u) for u in uris], ops),
        "stat": (lambda: [module.stat(u) for u in uris], ops),
        "list": (lambda: [module.list_objects(prefix) for _ in range(lists)], lists),
        "delete": (lambda: [module.delete(u) for u in uris], ops),
    }
    seconds = {}
    for op, (run, count) in phases.items():
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        seconds[op] = ((time.perf_counter() - wall) / count, (time.process_time() - cpu) / count)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="git revision of the baseline storage.py")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=100, help="objects put, read, stat-ed and deleted per round")
    parser.add_argument("--lists", type=int, default=20, help="listings of the round's prefix per round")
    parser.add_argument("--size", type=int, default=64 * 1024, help="bytes per object")
    args = parser.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="dc-bench-storage-") as tmp, SeaweedS3() as s3:
        os.environ.update(s3.env())
        modules = {"baseline": load_baseline(args.baseline, Path(tmp)), "current": storage}
        backends = {"s3": f"s3://{s3.bucket}/bench", "local": str(Path(tmp) / "local")}
        times: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        for module in modules.values():  # warm-up: clients, connections, imports
            for base in backends.values():
                one_round(module, base, 5, 1, data)
        for r in range(args.rounds):
            order = list(modules.items()) if r % 2 == 0 else list(reversed(modules.items()))
            for name, module in order:
                for backend, base in backends.items():
                    for op, t in one_round(module, base, args.ops, args.lists, data).items():
                        times.setdefault((name, backend, op), []).append(t)
    print(f"{args.rounds} rounds of {args.ops} objects of {args.size} B ({args.lists} listings of {args.ops}); "
          f"baseline: dreamcache/storage.py at {args.baseline}; medians over the rounds, per operation\n")
    print("| backend | op | wall: baseline | current | ratio | client CPU: baseline | current | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for backend in backends:
        for op in OPS:
            cells = []
            for kind in (0, 1):  # wall, CPU
                before = statistics.median(t[kind] for t in times[("baseline", backend, op)])
                after = statistics.median(t[kind] for t in times[("current", backend, op)])
                cells += [f"{before * 1e3:.3f} ms", f"{after * 1e3:.3f} ms", f"{after / before:.2f}"]
            print(f"| {backend} | {op} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
