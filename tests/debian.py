"""Install Debian packages from inside a test suite (Slurm, Chromium): CI runs on a fresh machine.

Usage::

    why = apt_install(("chromium",), "browser")   # None once installed, else why not (not root, no apt-get, failed)
    if why: pytest.skip(why)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


def which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders (daemons live there; a user's PATH may lack them)."""
    return shutil.which(name, path=SEARCH_PATH)


def apt_install(packages: tuple[str, ...], label: str) -> str | None:
    """``apt-get install`` the packages (updating the package lists once if the first try fails); None on success,
    else the reason, for a skip. Prints how long it took, prefixed by ``[label]`` (nothing when label is empty)."""
    if os.name != "posix" or os.geteuid() != 0:
        return f"{', '.join(packages)} not installed and we are not root to apt-get it"
    apt = which("apt-get")
    if apt is None:
        return f"{', '.join(packages)} not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [apt, "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *packages]
    start = time.monotonic()
    proc = subprocess.run(install, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # maybe stale package lists: update them once and retry
        subprocess.run([apt, "update", "-o", "DPkg::Lock::Timeout=300"], env=env, capture_output=True, text=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if proc.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed ({took:.0f} s): {(proc.stdout + proc.stderr)[-1500:]}"
    if label:
        print(f"[{label}] installed {' '.join(packages)} with apt-get in {took:.1f} s", flush=True)
    return None
