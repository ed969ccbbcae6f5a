"""System libraries the Python dependencies need but pip cannot install.

open3d's wheel links against ``libusb-1.0.so.0`` (Debian package ``libusb-1.0-0``) and fails at
import without it. ``python -m shared.sysdeps`` (run by ``make setup``) installs it with apt-get when
it is missing and we are root, and otherwise prints the exact command to run. Only the synthetic
benchmark generator and ransac background removal need open3d; everything else imports it lazily
and works without it.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: put the repo root on sys.path instead of the script dir
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import ctypes.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from shared.cli import ArgumentParser, run_main


@dataclass(frozen=True)
class SystemLibrary:
    soname: str  # name for ctypes.util.find_library
    debian_package: str
    needed_by: str


REQUIRED = (SystemLibrary("usb-1.0", "libusb-1.0-0", "open3d (synthetic benchmark rendering)"),)


def missing_libraries() -> list[SystemLibrary]:
    return [lib for lib in REQUIRED if ctypes.util.find_library(lib.soname) is None]


def install_command(packages: list[str]) -> list[str]:
    return ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def ensure(install: bool = True) -> int:
    """Return 0 when every library is present (after installing it if possible), 1 otherwise."""
    missing = missing_libraries()
    if not missing:
        return 0
    packages = [lib.debian_package for lib in missing]
    can_install = install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")
    if can_install:
        print(f"[sysdeps] installing {' '.join(packages)} (needed by "
              f"{', '.join(lib.needed_by for lib in missing)})", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        ok = subprocess.run(install_command(packages), env=env, stdout=subprocess.DEVNULL).returncode == 0
        if not ok:  # package lists may be missing on a fresh image
            subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
            ok = subprocess.run(install_command(packages), env=env, stdout=subprocess.DEVNULL).returncode == 0
        if ok and not missing_libraries():
            return 0
    cmd = "sudo " + " ".join(install_command(packages))
    print(f"[sysdeps] missing system package(s) {' '.join(packages)}; open3d cannot be imported without "
          f"them. Run:\n    {cmd}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check, never install")
    parser.add_argument("--strict", action="store_true", help="exit 1 if something is still missing")
    args = parser.parse_args(argv)
    status = ensure(install=not args.check)
    return status if args.strict else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
