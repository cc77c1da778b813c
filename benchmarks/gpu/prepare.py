"""Gather, here, what the device machine lacks, into benchmarks/gpu/carry/ (ignored by git; the device tool's `carry`).

    python benchmarks/gpu/prepare.py [--device_freeze FILE] [--python_version 3.11]

The device machine cannot reach PyPI, and the device tool carries at most 64 MiB of ignored files. So this copies
FashionMNIST's four IDX .gz files (30 MB) and downloads, as wheels for the device's Python, every package this
environment has that the device's image lacks: with --device_freeze (the `pip freeze` that `run.sh probe` brings
back) exactly those; without it, everything but torch, torchvision and the CUDA libraries (the image brings those).
Versions are this environment's, so the device runs what the tests here ran. Fails, naming the packages, when the
total passes the limit.
"""

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CARRY = HERE / "carry"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CARRY_LIMIT = 64 * 2**20
# What a GPU image for PyTorch brings, and what is far too large to carry anyway.
IMAGE_PACKAGES = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# Installed here for development only; the check does not need them on the device.
NOT_NEEDED = {"ddpm-fashion", "ddpm_fashion", "pip", "setuptools", "wheel", "ruff"}


def normalized(name: str) -> str:
    """Get a distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages(freeze_file) -> set:
    """Get the normalized names in a `pip freeze` listing (empty without one)."""
    if freeze_file is None:
        return set()
    names = set()
    for line in Path(freeze_file).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)", line.strip())
        if match and not line.startswith("#"):
            names.add(normalized(match.group(1)))
    return names


def wanted(present_on_device: set) -> list:
    """Get name==version of every package installed here that the device's image lacks."""
    pins = []
    for dist in metadata.distributions():
        name = normalized(dist.metadata["Name"])
        if IMAGE_PACKAGES.match(name) or name in NOT_NEEDED or name in present_on_device:
            continue
        pins.append(f"{name}=={dist.version}")
    return sorted(set(pins))


def main(argv=None) -> int:
    """Copy the data and download the wheels into carry/; exit 1 if they pass the device tool's limit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device_freeze", help="the device's `pip freeze` (run.sh probe writes it)")
    parser.add_argument("--python_version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the device's Python, major.minor (run.sh probe reports it)")
    args = parser.parse_args(argv)
    data = CARRY / "fashion-mnist"
    data.mkdir(parents=True, exist_ok=True)
    for source in sorted(DATA_DIR.glob("*.gz")):
        shutil.copyfile(source, data / source.name)
    wheels = CARRY / "wheels"
    for old_wheel in wheels.glob("*.whl"):  # an earlier run's downloads; nothing else in the folder is touched
        old_wheel.unlink()
    pins = wanted(device_packages(args.device_freeze))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                    "--python-version", args.python_version, "--platform", "manylinux2014_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "--dest", str(wheels), *pins], check=True)
    sizes = {path.name: path.stat().st_size for path in CARRY.rglob("*") if path.is_file()}
    total = sum(sizes.values())
    print(f"carry/: {len(pins)} wheels and {len(list(data.glob('*.gz')))} data files, {total / 2**20:.1f} MiB "
          f"(limit {CARRY_LIMIT / 2**20:.0f} MiB)")
    if total > CARRY_LIMIT:
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:8]
        print("too large for the device tool's carry; largest: "
              + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in largest), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
