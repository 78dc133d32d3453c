"""Catalog scale: the driver's peak memory and the time per row of both Ray Data jobs at 10^4..10^6 rows.

    python bench/scale.py                       # 10k, 100k, 1M subjects; the compute run at 10k; generation 1M rows
    python bench/scale.py --sizes 10000,100000 --compute 2000 --generation-subjects 10000

Cases (each job runs in its own process, so its peak RSS is the job driver's alone; Ray's own daemons and
workers are other processes):
  caching rerun     every subject unchanged since the last run: a catalog with image versions (as an S3
                    inventory gives them), the last manifest and the stored caches all agree, nothing is read
  caching invalid   a first run where every reference is missing: one HEAD (stat) each, all error rows
  caching compute   a first run with real caches of the tiny model
  generation        subjects x 5 prompts x 2 seeds where every image already exists
  planning CPUs     the caching rerun at the middle size on a Ray of 1 CPU, then 2

Targets (issue 10): peak RSS at 1M within 1.25x of 10k and under 1.5 GiB; the 1M rerun within 10 minutes; planning
faster with 2 CPUs than with 1. The table prints the ratios; the inputs are written once under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a photo of a toy", "a toy on the beach", "a toy in the snow", "a toy on a table", "a toy in a forest"]
SEEDS = [0, 1]
SHOWN = ("seconds", "peak_rss", "ru_maxrss", "rows")  # printed in their own columns


# -- inputs -------------------------------------------------------------------------------------------------------
def _touch_many(paths, data: bytes = b"") -> None:
    for path in paths:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if data:
            os.write(fd, data)
        os.close(fd)


def caching_inputs(work: Path, n: int, model: str) -> dict:
    """A catalog of n subjects with versions, the stored (empty) caches and a published manifest that matches
    them: a rerun has nothing to do. Also a catalog of n missing images, for the invalid path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.caching.config import CachingJobConfig
    from pipelines.caching.job import manifest_log, model_version
    from pipelines.caching.plan import MANIFEST_SCHEMA

    case = work / f"caching-{n}"
    done = case / "ready.json"
    if done.exists():
        return json.loads(done.read_text())
    out = case / "out"
    out.mkdir(parents=True, exist_ok=True)
    settings = CachingJobConfig(out=str(out), model=model, catalog="unused.parquet").settings()
    version = model_version(model)
    step = 200_000
    parts = []
    for start in range(0, n, step):  # in slices: this set-up process stays small too
        ids = [f"s{i:09d}" for i in range(start, min(n, start + step))]
        uris = [f"{case}/refs/{s}/1.png" for s in ids]
        pq.write_table(pa.table({"subject_id": ids, "image_uri": uris, "image_version": ["v1"] * len(ids)}),
                       case / f"catalog-{start:09d}.parquet")
        pq.write_table(pa.table({"subject_id": ids, "image_uri": [f"{case}/missing/{s}.png" for s in ids]}),
                       case / f"invalid-{start:09d}.parquet")
        _touch_many(f"{out}/{s}.safetensors" for s in ids)
        rows = {
            "subject_id": ids, "status": ["ok"] * len(ids), "error": [None] * len(ids),
            "retryable": [None] * len(ids), "cache_uri": [f"{out}/{s}.safetensors" for s in ids],
            "source_uris": [[u] for u in uris], "source_hashes": [["h"]] * len(ids),
            "source_versions": [["v1"]] * len(ids), "num_references": [1] * len(ids), "bytes": [0] * len(ids),
            "base_model": ["m"] * len(ids), "settings": [settings] * len(ids),
            "model_version": [version] * len(ids), "action": ["computed"] * len(ids), "run_id": ["setup"] * len(ids),
            "read_s": [0.0] * len(ids), "compute_s": [0.0] * len(ids), "write_s": [0.0] * len(ids),
        }
        part = case / "manifest-part" / f"part-{start:09d}.parquet"
        part.parent.mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA), part)
        parts.append(str(part))
    for kind in ("catalog", "invalid"):
        pq.write_table(pa.concat_tables([pq.read_table(p) for p in sorted(case.glob(f"{kind}-*.parquet"))]),
                       case / f"{kind}.parquet")
    manifest_log(str(out)).commit("setup", parts, n, {}, None)
    info = {"catalog": str(case / "catalog.parquet"), "invalid": str(case / "invalid.parquet"), "out": str(out),
            "invalid_out": str(case / "invalid-out")}
    done.write_text(json.dumps(info))
    return info


def compute_inputs(work: Path, n: int) -> dict:
    from PIL import Image

    case = work / f"compute-{n}"
    refs = case / "refs"
    if not (case / "ready").exists():
        colours = [(r, g, b) for r in range(0, 256, 32) for g in range(0, 256, 32) for b in range(0, 256, 32)]
        for i in range(n):
            (refs / f"s{i:07d}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), colours[i % len(colours)]).save(refs / f"s{i:07d}" / "1.png")
        (case / "ready").touch()
    return {"images": str(refs), "out": str(case / "out")}


def generation_inputs(work: Path, subjects: int, model: str) -> dict:
    """A caching manifest of ``subjects`` subjects and an image (1 byte) for every row of subjects x 5 prompts x
    2 seeds, under the names the job derives: every row is already rendered."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.generation.plan import SubjectSource, image_name, prompt_spec, row_parameters
    from pipelines.generation.settings import GenerationJobConfig

    case = work / f"generation-{subjects}"
    done = case / "ready.json"
    if done.exists():
        return json.loads(done.read_text())
    caches, out = case / "caches", case / "out"
    caches.mkdir(parents=True, exist_ok=True)
    adapter = str(Path(model) / "adapter.safetensors")
    config = GenerationJobConfig(model=model, adapter=adapter, caches=str(caches), prompts=PROMPTS, seeds=SEEDS,
                                 out=str(out), steps=2)
    prompts = [prompt_spec(p, config, "bench") for p in PROMPTS]
    ids = [f"s{i:08d}" for i in range(subjects)]
    pq.write_table(pa.table({"subject_id": ids, "status": ["ok"] * subjects,
                             "cache_uri": [f"{caches}/{s}.safetensors" for s in ids]}), case / "caching.parquet")
    for subject_id in ids:
        folder = out / subject_id
        folder.mkdir(parents=True, exist_ok=True)
        source = SubjectSource(subject_id, f"{caches}/{subject_id}.safetensors")
        names = [image_name(row_parameters(config, source, p, seed))[1] for p in prompts for seed in SEEDS]
        _touch_many((str(folder / name) for name in names), b"x")
    info = {"caches": str(case / "caching.parquet"), "out": str(out), "model": model, "adapter": adapter}
    done.write_text(json.dumps(info))
    return info


# -- one case, in its own process ---------------------------------------------------------------------------------
def own_peak_rss() -> int:
    """This process's peak RSS since it started, in bytes. Not ``ru_maxrss``: Linux carries the spawning
    process's peak across fork and exec into it, so a case started by this script after it built 1M-row inputs
    reported the script's peak, not its own. ``VmHWM`` is the high-water mark of this process's own memory map."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: ru_maxrss is the best there is (macOS reports bytes, not KiB)
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_case(args: argparse.Namespace) -> None:
    from pipelines.kernel.ray_runtime import init_ray

    spec = json.loads(args.case)
    init_ray(num_cpus=spec.get("cpus", 2))
    start = time.perf_counter()
    if spec["job"] == "caching":
        from pipelines.caching import CachingJobConfig, run_caching

        kwargs = {"images": spec["images"]} if "images" in spec else {"catalog": spec["catalog"]}
        summary = run_caching(CachingJobConfig(out=spec["out"], model=spec["model"], batch_size=32, **kwargs))
        rows = summary.computed + summary.skipped + (summary.errors if "invalid" in spec["name"] else 0)
        detail = {"computed": summary.computed, "skipped": summary.skipped, "errors": summary.errors}
    else:
        from pipelines.generation import GenerationJobConfig, run_generation

        summary = run_generation(GenerationJobConfig(
            model=spec["model"], adapter=spec["adapter"], caches=spec["caches"], prompts=PROMPTS, seeds=SEEDS,
            out=spec["out"], steps=2, contact_sheet="none"))
        rows = summary.planned
        detail = {"rendered": summary.rendered, "skipped": summary.skipped, "failed": summary.failed}
    seconds = time.perf_counter() - start
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # what this bench reported before
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss": own_peak_rss(), "ru_maxrss": inherited,
                                  "rows": rows, **detail}))


def case(spec: dict, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "a") as handle:
        done = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=handle)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"case {spec['name']} failed (rc {done.returncode}); see {log}")
    return json.loads(lines[-1][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="caching subjects per case ('': none)")
    parser.add_argument("--compute", type=int, default=10_000, help="subjects of the compute run (0: skip)")
    parser.add_argument("--generation-subjects", type=int, default=100_000, help="x 5 prompts x 2 seeds (0: skip)")
    parser.add_argument("--work", default="/tmp/dreamcache-scale", help="inputs are written here once and reused")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        run_case(args)
        return
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from dreamcache.models import write_tiny_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.exists():
        write_tiny_model(model)
    log = work / "scale.log"
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results: list[tuple[str, int, dict]] = []

    def record(name: str, n: int, spec: dict) -> dict:
        started = time.perf_counter()
        result = case({"name": name, "model": str(model), **spec}, log)
        results.append((name, n, result))
        print(f"{name:<22} {n:>10,} rows  {result['seconds']:8.1f} s  {1e3 * result['seconds'] / max(n, 1):8.3f} ms/row"
              f"  {result['rows'] / result['seconds']:10,.0f} rows/s  driver peak {result['peak_rss'] / 2**20:7.0f} MiB"
              f" (ru_maxrss {result['ru_maxrss'] / 2**20:.0f}, this script {own_peak_rss() / 2**20:.0f})"
              f"   ({', '.join(f'{k} {v:,}' for k, v in result.items() if k not in SHOWN)};"
              f" {time.perf_counter() - started:.0f} s with start-up)", flush=True)
        return result

    print(f"machine: {os.cpu_count()} CPUs; inputs under {work}; job logs in {log}", flush=True)
    for n in sizes:
        inputs = caching_inputs(work, n, str(model))
        # The same manifest every time: rerun cases publish a new version on top; reset to the set-up's.
        record("caching rerun", n, {"job": "caching", "catalog": inputs["catalog"], "out": inputs["out"]})
        record("caching invalid", n, {"job": "caching", "catalog": inputs["invalid"],
                                      "out": inputs["invalid_out"] + f"-{time.time_ns()}"})
    planning: tuple[int, dict, dict] | None = None
    if sizes:
        middle = sizes[len(sizes) // 2]
        inputs = caching_inputs(work, middle, str(model))
        one = record("caching rerun, 1 CPU", middle, {"job": "caching", "catalog": inputs["catalog"],
                                                     "out": inputs["out"], "cpus": 1})
        two = record("caching rerun, 2 CPUs", middle, {"job": "caching", "catalog": inputs["catalog"],
                                                      "out": inputs["out"], "cpus": 2})
        planning = middle, one, two
    if args.compute:
        inputs = compute_inputs(work, args.compute)
        record("caching compute", args.compute, {"job": "caching", "images": inputs["images"],
                                                 "out": inputs["out"] + f"-{time.time_ns()}"})
    if args.generation_subjects:
        inputs = generation_inputs(work, args.generation_subjects, str(model))
        record("generation existing", args.generation_subjects * len(PROMPTS) * len(SEEDS),
               {"job": "generation", **{k: inputs[k] for k in ("caches", "out", "adapter")}})

    reruns = {n: r for name, n, r in results if name == "caching rerun"}
    if len(reruns) > 1:
        low, high = min(reruns), max(reruns)
        ratio = reruns[high]["peak_rss"] / reruns[low]["peak_rss"]
        print(f"driver peak RSS, rerun {high:,} vs {low:,} subjects: {ratio:.3f}x (target <= 1.25x; "
              f"{reruns[high]['peak_rss'] / 2**30:.2f} GiB, target < 1.5 GiB); by ru_maxrss, which counts this "
              f"script's own peak: {reruns[high]['ru_maxrss'] / reruns[low]['ru_maxrss']:.3f}x")
        print(f"rerun of {high:,} subjects: {reruns[high]['seconds'] / 60:.1f} min (target <= 10 min)")
    if planning:
        middle, one, two = planning
        print(f"planning {middle:,} subjects, 2 CPUs vs 1: {one['seconds'] / two['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
