"""Print the requirements of this project's core and of the named extras, one per line, from
pyproject.toml (an extra naming this project, such as "histotransfer[study]", is expanded).

    python containers/requirements.py [EXTRA ...] > requirements.txt

The image installs them in a layer of their own before the package, so that a change to the sources
rebuilds a small layer and not the dependencies (containers/Dockerfile).
"""

import re
import sys
import tomllib
from pathlib import Path


def requirements(project: dict, extras: list[str]) -> list[str]:
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project.get("dependencies", []))
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"requirements: {name} has no extra {extra!r} (it has {sorted(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            match = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", requirement.strip())
            if match:
                todo += [e.strip() for e in match.group(1).split(",")]
            elif requirement not in out:
                out.append(requirement)
    return out


if __name__ == "__main__":
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    print("\n".join(requirements(project, sys.argv[1:])))
