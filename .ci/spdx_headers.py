# SPDX-License-Identifier: GPL-2.0-or-later
"""SPDX licence headers on every source file: list the files without one (--check), or add it.

    python3 .ci/spdx_headers.py --check   # exit 1 and one line per file that lacks the header
    python3 .ci/spdx_headers.py           # add the header to each of them, in its comment syntax

The header goes on the first line, or on the second after a #! line. Which files count as source,
and the comment syntax of each, are the table below; tests/test_packaging.py runs --check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSE = "GPL-2.0-or-later"
TAG = f"SPDX-License-Identifier: {LICENSE}"
#: How many lines from the top a header may sit (a #! line, then the header).
NEAR_TOP = 3

#: The comment that carries the header, by file name suffix.
COMMENT_BY_SUFFIX = {
    ".py": "#",
    ".sh": "#",
    ".c": "//",
    ".h": "//",
    ".service": "#",
    ".sysusers": "#",
    ".te": "#",  # SELinux type enforcement, file contexts, interface
    ".fc": "#",
    ".if": "#",
    ".1": '.\\"',  # roff
}
#: Source files without a telling suffix: scripts, and AppArmor profiles (named after the program).
COMMENT_BY_DIRECTORY = {"bin": "#", ".ci": "#", "contrib/apparmor": "#"}


def candidates() -> list[Path]:
    """The project's files: git's list in a checkout, else every file under the tree (an unpacked sdist)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True, timeout=30
        ).stdout
        names = [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]
    return [ROOT / name for name in sorted(names)]


def comment_for(path: Path) -> str | None:
    """The comment syntax of a source file, or None for a file that is no source (docs, data, licence)."""
    if path.is_symlink():
        return None  # the file it points to carries the header
    relative = path.relative_to(ROOT)
    if path.suffix in COMMENT_BY_SUFFIX:
        return COMMENT_BY_SUFFIX[path.suffix]
    for directory, comment in COMMENT_BY_DIRECTORY.items():
        if relative.parent.as_posix().startswith(directory):
            return comment
    return None


def sources() -> list[tuple[Path, str]]:
    return [(path, comment) for path in candidates() if (comment := comment_for(path)) is not None]


def has_header(path: Path) -> bool:
    return any(TAG in line for line in path.read_text(errors="replace").splitlines()[:NEAR_TOP])


def add_header(path: Path, comment: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    at = 1 if lines and lines[0].startswith("#!") else 0
    lines.insert(at, f"{comment} {TAG}\n")
    path.write_text("".join(lines))


def main(argv: list[str]) -> int:
    missing = [(path, comment) for path, comment in sources() if not has_header(path)]
    if argv[1:] == ["--check"]:
        for path, _ in missing:
            print(f"{path.relative_to(ROOT)}: no '{TAG}' in its first {NEAR_TOP} lines")
        return 1 if missing else 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    for path, comment in missing:
        add_header(path, comment)
        print(f"added: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
