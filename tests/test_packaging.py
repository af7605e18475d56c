# SPDX-License-Identifier: GPL-2.0-or-later
"""The sdist and the wheel as a packager and a pip user get them: built offline from this tree (python -m
build --no-isolation, with the backend from the test extra), their contents and metadata, and where an
install puts the launcher and the man page. Also: the README as a package index shows it, the Python
versions the classifiers promise, the suite as a user other than root, and the SPDX headers.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.metadata import Metadata

import passt_repair

ROOT = Path(__file__).resolve().parent.parent
NAME = f"passt_repair-{passt_repair.__version__}"
#: What the sdist must hold beyond the package for pytest to run from it as it does in the repo.
SHIPPED_TREES = ("tests", "docs", "contrib", "examples", "bench", "bin", "src", ".ci")
SHIPPED_FILES = ("COPYING", "CHANGELOG.md", "README.md", "pyproject.toml")
#: Files under the shipped trees that are made by running things, not part of the source.
MADE_HERE = re.compile(
    r"(^|/)(__pycache__|\.mypy_cache|\.ruff_cache|\.pytest_cache|\.hypothesis|[^/]+\.egg-info)(/|$)|\.pyc$|^bench/build/"
)
PYTHON_CLASSIFIER = re.compile(r"Programming Language :: Python :: (3\.\d+)$")


@dataclass
class Dists:
    sdist: Path
    wheel: Path
    log: str


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dists(sdist, wheel, r.stdout + r.stderr)


def sdist_members(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tar:
        return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}


def source_files() -> set[str]:
    """The files of this tree the sdist must carry (the same walk works in a checkout and in an unpacked sdist)."""
    found = {name for name in SHIPPED_FILES if (ROOT / name).exists()}
    for tree in SHIPPED_TREES:
        for path in (ROOT / tree).rglob("*"):
            relative = path.relative_to(ROOT).as_posix()
            if (path.is_file() or path.is_symlink()) and not MADE_HERE.search(relative):
                found.add(relative)
    return found


def git_files(*args: str) -> set[str] | None:
    """git ls-files with `args`, or None outside a git checkout (an unpacked sdist)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        return None
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", *args], capture_output=True, timeout=30)
    return set(filter(None, r.stdout.decode().split("\0"))) if r.returncode == 0 else None


# -- the build ------------------------------------------------------------------------


@pytest.mark.slow
def test_build_says_nothing_deprecated(dists: Dists) -> None:
    assert not re.search(r"deprecat|warning", dists.log, re.I), dists.log


# -- the sdist ------------------------------------------------------------------------


@pytest.mark.slow
def test_sdist_holds_the_whole_source_tree(dists: Dists) -> None:
    """The tests' support modules, conftest, contrib/, docs/, examples/, bench/, the licence, the changelog."""
    members = sdist_members(dists.sdist)
    assert source_files() - set(members) == set()
    for needed in ("tests/conftest.py", "tests/support.py", "tests/netns.py", "COPYING", "CHANGELOG.md"):
        assert needed in members


@pytest.mark.slow
def test_sdist_holds_every_tracked_file_and_nothing_made_here(dists: Dists) -> None:
    tracked = git_files()
    if tracked is None:
        pytest.skip("not a git checkout")
    untracked = git_files("--others", "--exclude-standard") or set()
    members = {name for name, m in sdist_members(dists.sdist).items() if not m.isdir()}
    assert tracked - members == set()
    assert members - tracked - untracked == {"PKG-INFO"}


@pytest.mark.slow
def test_sdist_keeps_modes_and_the_man_page_link(dists: Dists) -> None:
    members = sdist_members(dists.sdist)
    assert members["bin/passt-repair"].mode & 0o111
    link = members["src/passt_repair/passt-repair.1"]
    assert link.issym()
    assert link.linkname == "../../docs/passt-repair.1"  # docs/ ships, so the link resolves when unpacked


@pytest.mark.slow
def test_tests_collect_from_the_unpacked_sdist(dists: Dists, tmp_path: Path) -> None:
    """What failed before with "No module named 'support'": every test module imports from the sdist alone."""
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path, filter="tar")
    unpacked = tmp_path / NAME
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=unpacked,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    collected = {line.split("::", 1)[0] for line in r.stdout.splitlines() if "::" in line}
    assert collected == {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")}


# -- the wheel ------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_the_launcher_and_the_man_page(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        names = set(whl.namelist())
        launcher = whl.getinfo(f"{NAME}.data/scripts/passt-repair")
        assert whl.read(launcher) == (ROOT / "bin" / "passt-repair").read_bytes()
        assert stat.S_IMODE(launcher.external_attr >> 16) == 0o755
        man = whl.read(f"{NAME}.data/data/share/man/man1/passt-repair.1")
        assert man == (ROOT / "docs" / "passt-repair.1").read_bytes()
        assert whl.read("passt_repair/passt-repair.1") == man  # also as package data, for importlib.resources
        assert whl.read(f"{NAME}.dist-info/licenses/COPYING") == (ROOT / "COPYING").read_bytes()
        entry_points = whl.read(f"{NAME}.dist-info/entry_points.txt").decode()
    package = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "passt_repair").rglob("*.py")}
    assert package <= names
    assert "passt_repair/py.typed" in names
    # The helper command must stay the launcher: a console-script wrapper of the same name would replace it.
    assert re.search(r"^passt-repair\s*=", entry_points, re.M) is None
    assert re.search(r"^passt-repair-demo = passt_repair.demo:main$", entry_points, re.M)


@pytest.mark.slow
def test_wheel_metadata_is_what_an_index_shows(dists: Dists) -> None:
    with zipfile.ZipFile(dists.wheel) as whl:
        raw = whl.read(f"{NAME}.dist-info/METADATA")
    meta = Metadata.from_email(raw, validate=True)  # raises on anything an index would refuse
    assert str(meta.metadata_version) >= "2.4"  # the first with License-Expression
    assert str(meta.license_expression) == "GPL-2.0-or-later"
    assert meta.license_files == ["COPYING"]
    assert str(meta.requires_python) == ">=3.10"
    assert meta.description_content_type == "text/markdown"
    assert meta.description == (ROOT / "README.md").read_text()
    assert meta.project_urls
    assert all(url.startswith("https://") for url in meta.project_urls.values())
    headers = email.parser.BytesParser().parsebytes(raw)
    assert headers.get("License") is None  # the deprecated free-text field is gone


def install_prefix(wheel: Path, *args: str, python: Path | None = None) -> None:
    """pip install the built wheel alone (no index, no dependencies: it has none), into `python`'s environment."""
    into = ["--python", str(python)] if python else []
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            *into,
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-compile",
            *args,
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def man_env(path: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT")}
    return {**env, "PATH": path}


@pytest.mark.slow
def test_system_wide_install_puts_the_man_page_where_man_looks(dists: Dists, tmp_path: Path) -> None:
    """Into a staging root as pip would into /usr/local; man-db's own search path has /usr/local/share/man."""
    if shutil.which("manpath") is None:
        pytest.skip("man-db is not installed")
    install_prefix(dists.wheel, "--ignore-installed", "--root", str(tmp_path), "--prefix", "/usr/local")
    staged = tmp_path / "usr" / "local"
    assert (staged / "bin" / "passt-repair").read_bytes() == (ROOT / "bin" / "passt-repair").read_bytes()
    assert (staged / "share" / "man" / "man1" / "passt-repair.1").is_file()
    r = subprocess.run(["manpath", "-g"], capture_output=True, text=True, env=man_env("/usr/bin:/bin"), timeout=20)
    assert "/usr/local/share/man" in r.stdout.strip().split(":")


@pytest.fixture(scope="module")
def venv(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the built wheel installed, as `pip install passt-repair` makes it."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    install_prefix(dists.wheel, python=venv / "bin" / "python")
    return venv


def version_of(command: Path) -> str:
    r = subprocess.run([str(command), "--version"], capture_output=True, text=True, timeout=20)
    assert (r.returncode, r.stderr) == (0, "")
    return r.stdout


@pytest.mark.slow
def test_launcher_runs_from_the_venv_through_a_link_and_renamed(venv: Path, tmp_path: Path) -> None:
    """Installed, linked to from elsewhere (/usr/bin/passt-repair -> VENV/bin/passt-repair, as in the
    KubeVirt recipe), and copied under another name beside its python3 (the distribution recipe)."""
    assert passt_repair.__version__ in version_of(venv / "bin" / "passt-repair")
    link = tmp_path / "usr-bin" / "passt-repair"
    link.parent.mkdir()
    link.symlink_to(venv / "bin" / "passt-repair")
    assert passt_repair.__version__ in version_of(link)
    renamed = venv / "bin" / "passt-repair-python"
    shutil.copy2(venv / "bin" / "passt-repair", renamed)
    try:
        assert passt_repair.__version__ in version_of(renamed)
    finally:
        renamed.unlink()


@pytest.mark.slow
def test_venv_install_man_finds_the_page_through_path(venv: Path) -> None:
    """In a virtual environment: man-db derives <venv>/share/man from <venv>/bin on PATH, and only then."""
    if shutil.which("man") is None:
        pytest.skip("man-db is not installed")
    page = venv / "share" / "man" / "man1" / "passt-repair.1"
    found = subprocess.run(
        ["man", "-w", "passt-repair"], capture_output=True, text=True, env=man_env(f"{venv}/bin:/usr/bin:/bin")
    )
    assert found.stdout.strip() == str(page)
    elsewhere = subprocess.run(
        ["man", "-w", "passt-repair"], capture_output=True, text=True, env=man_env("/usr/bin:/bin")
    )
    assert found.stdout.strip() not in elsewhere.stdout  # a distribution's own page may be found there


# -- the distribution recipe of docs/deployment.md ----------------------------------------


def distribution_recipe() -> tuple[str, list[str]]:
    """The shell block of the recipe's Distributions section, and the paths of its table."""
    section = (ROOT / "docs" / "deployment.md").read_text().split("\n## Distributions\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"^```sh\n(.*?)^```$", section, re.S | re.M)
    table = re.findall(r"^\| `(/[^`]+)`", section, re.M)
    return block, [path for path in table if "..." not in path]


@pytest.mark.slow
def test_distribution_recipe_installs_every_file_of_its_table(dists: Dists, tmp_path: Path) -> None:
    """The recipe as a packager runs it: on the unpacked sdist, into a DESTDIR, with its own commands."""
    with tarfile.open(dists.sdist) as tar:
        tar.extractall(tmp_path, filter="tar")
    unpacked = tmp_path / NAME
    if not (unpacked / "contrib" / "apparmor").is_dir() or not (unpacked / "contrib" / "selinux").is_dir():
        pytest.skip("the MAC profiles are not in this tree yet")
    for tool in ("make", "checkmodule", "semodule_package"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (CI installs it)")
    if not Path("/usr/share/selinux/devel/Makefile").exists():
        pytest.skip("the reference policy's Makefile is not installed (selinux-policy-dev; CI installs it)")
    block, table = distribution_recipe()
    destdir = tmp_path / "destdir"
    env = {**os.environ, "DESTDIR": str(destdir), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, cwd=unpacked, env=env, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(table) >= 7
    for path in table:
        assert list(destdir.glob(path.lstrip("/"))), f"{path} not installed"
    assert (destdir / "usr" / "bin" / "passt-repair").read_bytes() == (ROOT / "bin" / "passt-repair").read_bytes()
    assert stat.S_IMODE((destdir / "usr" / "bin" / "passt-repair").stat().st_mode) == 0o755


# -- what the metadata and the README promise -------------------------------------------


def test_readme_links_work_outside_the_repository() -> None:
    """A package index shows the README on its own: no relative links, and every file it names ships."""
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", readme) + re.findall(r"^\[[^\]]+\]:\s*(\S+)", readme, re.M)
    assert [t for t in targets if not t.startswith("https://")] == []
    named = set(re.findall(r"`((?:docs|contrib|examples|tests|bench|bin)/[\w./@-]+)`", readme))
    assert named
    assert {n for n in named if not (ROOT / n).exists()} == set()


def python_for(version: str) -> str | None:
    """An interpreter of `version`: on PATH, or installed by pyenv."""
    candidates = [
        shutil.which(f"python{version}"),
        *map(str, Path.home().glob(f".pyenv/versions/{version}.*/bin/python3")),
    ]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True
        )
        if probe.returncode == 0 and probe.stdout.decode().strip() == version:
            return candidate
    return None


def classified_versions() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    return [m[1] for line in text.splitlines() if (m := PYTHON_CLASSIFIER.search(line.strip().strip('",')))]


def test_classifiers_start_at_requires_python() -> None:
    versions = classified_versions()
    assert versions[0] == "3.10"
    assert 'requires-python = ">=3.10"' in (ROOT / "pyproject.toml").read_text()
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions


@pytest.mark.parametrize("version", classified_versions())
def test_every_module_imports_on_each_classified_python(version: str) -> None:
    python = python_for(version)
    if python is None:
        pytest.skip(f"no Python {version} interpreter found")
    modules = sorted(
        ".".join(p.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / "src" / "passt_repair").rglob("*.py")
        if p.name != "__main__.py"
    )
    probe = f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); import " + ", ".join(modules)
    r = subprocess.run([python, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")


# -- the fast subset, and the suite as a user other than root --------------------------------


def test_fast_subset_leaves_out_only_the_slow_tests() -> None:
    """README: `pytest -m "not slow"` is the fast subset; the hostile-server run is the slow one."""
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    every = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)
    fast = subprocess.run([*argv, "-m", "not slow"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert every.returncode == fast.returncode == 0, every.stdout + fast.stdout
    ids = {line for line in every.stdout.splitlines() if "::" in line}
    fast_ids = {line for line in fast.stdout.splitlines() if "::" in line}
    left_out = ids - fast_ids
    assert "tests/test_hostile.py::test_hostile_server" in left_out
    assert fast_ids < ids
    assert len(left_out) < len(ids) / 10  # a subset that still runs nearly everything


# -- the suite as a user other than root --------------------------------------------------


def run_as_non_root(*args: str) -> subprocess.CompletedProcess[str]:
    """pytest as uid 1000 in a user namespace: no capability at all, geteuid() != 0."""
    argv = ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-m", "pytest", *args]
    env = {**os.environ, "HOME": "/nonexistent"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_suite_as_non_root_runs_the_unprivileged_tests_and_skips_the_rest() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    r = run_as_non_root("-q", "-rs", "-p", "no:cacheprovider", "tests/test_protocol.py", "tests/test_helper.py")
    if "unshare: " in r.stderr:
        pytest.skip(f"no user namespace here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    skipped = re.search(r"(\d+) skipped", summary)
    assert passed, summary
    assert int(passed[1]) > 0  # test_protocol.py
    assert skipped, summary
    assert int(skipped[1]) > 0  # test_helper.py
    assert "failed" not in summary
    assert "error" not in summary
    assert "tests/test_helper.py" in r.stdout
    assert "needs root" in r.stdout


# -- SPDX headers --------------------------------------------------------------------------


def test_every_source_file_has_an_spdx_header() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "spdx_headers.py"), "--check"], capture_output=True, text=True
    )
    assert (r.returncode, r.stdout) == (0, "")


def test_spdx_check_sees_every_kind_of_source() -> None:
    """The list the header check works on: every kind of source file is in it, and no document."""
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import spdx_headers
    finally:
        sys.path.remove(str(ROOT / ".ci"))
    checked = {path.relative_to(ROOT).as_posix() for path, _ in spdx_headers.sources()}
    for source in ("bin/passt-repair", "src/passt_repair/helper.py", "tests/conftest.py", "bench/ref_helper.c",
                   "contrib/systemd/passt-repair@.service", "contrib/systemd/passt-repair.sysusers",
                   "docs/passt-repair.1", ".ci/run"):  # fmt: skip
        assert source in checked
    assert not {c for c in checked if c.endswith((".md", ".json", ".png")) or c == "COPYING"}
    assert "src/passt_repair/passt-repair.1" not in checked  # a link to docs/passt-repair.1


@pytest.fixture
def scratch_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    for name in ("bin", "docs", "contrib", "src", ".ci"):
        shutil.copytree(ROOT / name, copy / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_spdx_tool_adds_headers_the_check_accepts(scratch_copy: Path) -> None:
    """On a copy outside git: the tool adds each header in its file's comment syntax, after a #! line."""
    tool = scratch_copy / ".ci" / "spdx_headers.py"
    assert subprocess.run([sys.executable, str(tool)], capture_output=True, timeout=60).returncode == 0
    check = subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=60)
    assert (check.returncode, check.stdout) == (0, "")
    tag = "SPDX-License-Identifier: GPL-2.0-or-later"
    assert (scratch_copy / "bin" / "passt-repair").read_text().splitlines()[:2] == ["#!/bin/sh", f"# {tag}"]
    assert (scratch_copy / "docs" / "passt-repair.1").read_text().splitlines()[0] == f'.\\" {tag}'
    assert (scratch_copy / "src" / "passt_repair" / "cli.py").read_text().splitlines()[0] == f"# {tag}"
    assert subprocess.run([sys.executable, str(tool)], capture_output=True, text=True).stdout == ""  # idempotent
