"""The build arguments that give `docker build` the package sources this machine's pip uses.

    python3 containers/pip_sources.py SERVE_DIR PORT

pip on a machine may read local folders (`find-links = /opt/wheels`, `extra-index-url =
file:///opt/pypi/simple`), which a build cannot see. For each such folder this makes a link in
SERVE_DIR, to be served on http://127.0.0.1:PORT/ while the build runs (containers/build.sh does), and
prints one `--build-arg NAME=VALUE` per line for PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS and
TORCH_INDEX_URL (empty: torch comes from the same sources, as on this machine). Prints nothing when
pip's configuration names no source, so the Dockerfile's defaults apply.
"""

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

KEYS = {
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
}


def configured() -> dict[str, list[str]]:
    """pip's sources, as `pip config list` shows them (the environment's PIP_* override the files)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, _, value = line.partition("=")
        key = name.rsplit(".", 1)[-1]
        if key in KEYS:
            found[key] = value.strip().strip("'\"").split()
    for key, env in KEYS.items():
        if os.environ.get(env):
            found[key] = os.environ[env].split()
    return found


def served(source: str, serve_dir: Path, port: int, n: int) -> str:
    """A local folder becomes http://127.0.0.1:PORT/N/NAME/ (N: a link in SERVE_DIR to the folder's
    parent, which an index's relative file links such as ../../files/ reach); a URL stays."""
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https"):
        return source
    folder = Path(parsed.path if parsed.scheme == "file" else source)
    if not folder.is_dir():
        return ""  # pip ignores it too
    folder = folder.resolve()
    (serve_dir / str(n)).symlink_to(folder.parent)
    return f"http://127.0.0.1:{port}/{n}/{folder.name}/"


def main(serve_dir: Path, port: int) -> None:
    sources = configured()
    if not sources:
        return
    n = 0
    for key, values in sources.items():
        urls = []
        for value in values:
            urls.append(served(value, serve_dir, port, n))
            n += 1
        print(f"--build-arg={KEYS[key]}={' '.join(u for u in urls if u)}")
    print("--build-arg=TORCH_INDEX_URL=")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
