"""What ``environment="sync"`` gives the nodes: the client's distributions, the key of an
environment, and the wheels the nodes' Python accepts.

Every distribution installed here that provides importable modules is wanted at the version
installed here; one installed from a local path, in editable mode or from version control (the
user's own project) is built into a wheel here (``Wanted.source``); one from version control is
made of its installed files (``installed_wheel``), so that neither the head node nor this client
needs to reach its repository again. The key of an environment hashes what it holds and the nodes'
interpreter, so equal content on the same interpreter is built once.
"""

from __future__ import annotations

import base64
import configparser
import csv
import hashlib
import importlib.metadata
import json
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

#: Bumped when what an environment holds changes for the same distributions (a new build recipe).
FORMAT = 1
#: Never synced: the venv brings its own pip, and the worker ships with every session.
NEVER_SYNCED = frozenset({"pip", "sheepdog-executor"})
_WHEEL_NAME = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(?:-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
#: Files of an installed distribution's .dist-info that describe the installation, not the wheel.
_INSTALLATION_FILES = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})
#: Directories never part of a project's content (for the key of an editable install).
_SKIPPED_DIRS = frozenset({"__pycache__", "build", "dist", "node_modules", ".git", ".hg", ".tox", ".nox"})


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Wanted:
    """One distribution of the client, as the nodes should get it."""

    name: str
    version: str
    #: For a distribution built here: what ``pip wheel`` builds it from (a directory, a wheel file or a
    #: ``vcs+url@commit`` link); None for one any package index has.
    source: str | None = None
    #: What identifies a locally built distribution's content (its RECORD, its files' stamps, or the
    #: commit it was installed from).
    digest: str = ""
    #: For one installed from version control: its .dist-info directory here (a wheel is made of the
    #: installed files, ``source`` is the fallback), and "git commit 0123abcd..." for messages.
    installed: str = ""
    origin: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class EnvironmentSpec:
    """What ``environment="sync"`` asks for: the client's distributions, minus some, plus some."""

    distributions: tuple[Wanted, ...]
    add: tuple[str, ...] = ()

    @classmethod
    def from_client(
        cls, add: Iterable[str] = (), exclude: Iterable[str] = (), path: list[str] | None = None
    ) -> EnvironmentSpec:
        """The distributions of this interpreter (on ``path``, default sys.path) that provide
        importable modules."""
        excluded = {canonical(n) for n in exclude} | NEVER_SYNCED
        wanted = [d for d in client_distributions(path) if canonical(d.name) not in excluded]
        return cls(tuple(wanted), tuple(add))

    def key(self, node: NodePython) -> str:
        """The environment's name on the cluster: a hash of its content and of the nodes' Python."""
        content = {
            "format": FORMAT,
            "python": [node.executable, node.python, node.implementation, node.platform, node.libc],
            "distributions": sorted([canonical(d.name), d.version, d.digest] for d in self.distributions),
            "add": sorted(self.add),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def indexed(self) -> list[str]:
        """Requirements any package index can provide."""
        return [d.requirement for d in self.distributions if d.source is None] + list(self.add)

    @property
    def local(self) -> list[Wanted]:
        return [d for d in self.distributions if d.source is not None]


def client_distributions(path: list[str] | None = None) -> list[Wanted]:
    """Each distribution importable here that provides modules, once (the first on sys.path wins)."""
    found: dict[str, Wanted] = {}
    dists = (
        importlib.metadata.distributions() if path is None else importlib.metadata.distributions(path=path)
    )
    for dist in dists:
        name = dist.metadata["Name"]
        if not name or canonical(name) in found or not _provides_modules(dist):
            continue
        found[canonical(name)] = _wanted(dist, name)
    return sorted(found.values(), key=lambda d: canonical(d.name))


def _provides_modules(dist: importlib.metadata.Distribution) -> bool:
    if (dist.read_text("top_level.txt") or "").strip():  # cheaper than reading RECORD, when there
        return True
    files = dist.files
    if files is None:  # no RECORD (an old-style install): assume it does
        return True
    for path in files:
        top = path.parts[0] if path.parts else ""
        if top == ".." or top.endswith((".dist-info", ".egg-info", ".data")):
            continue
        if path.suffix in (".py", ".so", ".pyd", ".pth"):
            return True
    return False


def _wanted(dist: importlib.metadata.Distribution, name: str) -> Wanted:
    """How the nodes get ``dist``: from an index, or built here from where it was installed from."""
    version = dist.version
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    if not isinstance(direct, dict) or not isinstance(direct.get("url"), str):
        return Wanted(name, version)
    url: str = direct["url"]
    if isinstance(direct.get("vcs_info"), dict):
        vcs, commit = str(direct["vcs_info"].get("vcs", "git")), str(direct["vcs_info"].get("commit_id", ""))
        source = f"{vcs}+{url}@{commit}" if commit else f"{vcs}+{url}"  # pip takes no "name @" here
        if direct.get("subdirectory"):
            source += f"#subdirectory={direct['subdirectory']}"
        info = _dist_info(dist)
        return Wanted(name, version, source, commit, info, f"{vcs} commit {commit[:12]}")
    if not url.startswith("file://"):
        return Wanted(name, version)  # installed from an archive URL: an index's copy is the same
    path = url[len("file://") :]
    if direct.get("dir_info", {}).get("editable"):
        return Wanted(name, version, path, "tree:" + tree_digest(path))
    return Wanted(
        name, version, path, "record:" + hashlib.sha256((dist.read_text("RECORD") or "").encode()).hexdigest()
    )


def _dist_info(dist: importlib.metadata.Distribution) -> str:
    """The .dist-info directory of an installed distribution, or "" (none found)."""
    for path in dist.files or ():
        if path.name == "RECORD" and path.parent.name.endswith(".dist-info"):
            return str(dist.locate_file(path.parent))
    return ""


def installed_wheel(info: str, out: str) -> str | None:
    """A wheel, written into ``out``, of the files the distribution whose .dist-info directory is
    ``info`` installed (its RECORD): what the client runs, byte for byte. None when those files are
    not the whole distribution: no WHEEL file (not installed from a wheel), a file missing, or files
    outside its site directory (data, headers) other than its entry points' scripts, which pip
    writes anew. Compiled files (``__pycache__``) and the installation's own records are left out."""
    meta = Path(info)
    try:
        tags = [
            line.split(":", 1)[1].strip()
            for line in (meta / "WHEEL").read_text().splitlines()
            if line.startswith("Tag:")
        ]
        rows = list(csv.reader((meta / "RECORD").read_text().splitlines()))
    except OSError:
        return None
    if not tags or not all(len(t.split("-")) == 3 for t in tags):
        return None
    scripts = _entry_point_scripts(meta)
    members = _recorded_members(meta, rows, scripts) if scripts is not None else None
    if members is None:
        return None
    prefix = meta.name[: -len(".dist-info")]
    parts = [t.split("-") for t in tags]
    tag = "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))
    wheel = os.path.join(out, f"{prefix}-{tag}.whl")
    _write_wheel(wheel, meta, members)
    return wheel


def _entry_point_scripts(meta: Path) -> set[str] | None:
    """The names of a distribution's console and GUI scripts (None: its entry points do not parse)."""
    scripts: set[str] = set()
    if (meta / "entry_points.txt").is_file():
        points = configparser.ConfigParser(delimiters=("=",), interpolation=None)
        points.optionxform = str  # type: ignore[assignment]
        try:
            points.read(meta / "entry_points.txt")
        except configparser.Error:
            return None
        for section in ("console_scripts", "gui_scripts"):
            scripts.update(points[section] if points.has_section(section) else ())
    return scripts


def _recorded_members(meta: Path, rows: list[list[str]], scripts: set[str]) -> list[str] | None:
    """The files of RECORD's ``rows`` a wheel carries, relative to the site directory; None when
    one is missing or lies outside it (other than an entry point's script)."""
    site = meta.parent
    members = []
    for row in rows:
        if not row or not row[0]:
            continue
        path = PurePosixPath(row[0])
        if path.is_absolute():
            return None
        if path.parent.name in ("bin", "Scripts") and path.name.removesuffix(".exe") in scripts:
            continue
        if ".." in path.parts:
            return None
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        if path.parent.name == meta.name and path.name in _INSTALLATION_FILES:
            continue
        if not (site / path).is_file():
            return None
        members.append(str(path))
    return members


def _write_wheel(wheel: str, meta: Path, members: list[str]) -> None:
    """Zip ``members`` of the site directory into ``wheel`` with a RECORD of their digests."""
    site = meta.parent
    record = []
    members = sorted(members, key=lambda m: (m.startswith(meta.name + "/"), m))  # the .dist-info last
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for member in members:
            data = (site / member).read_bytes()
            archive.writestr(member, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{member},sha256={digest},{len(data)}\n")
        record.append(f"{meta.name}/RECORD,,\n")
        archive.writestr(f"{meta.name}/RECORD", "".join(record))


def tree_digest(root: str) -> str:
    """A cheap fingerprint of a project's files (names, sizes, modification times)."""
    digest = hashlib.sha256()
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIPPED_DIRS
            and not d.startswith(".")
            and not d.endswith(".egg-info")
            and not os.path.exists(os.path.join(directory, d, "pyvenv.cfg"))
        )
        for name in sorted(files):
            path = os.path.join(directory, name)
            try:
                stat = os.stat(path)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class NodePython:
    """The nodes' interpreter, as ``envtool.py probe`` describes it."""

    python: str
    implementation: str
    executable: str
    platform: str
    machine: str
    libc: tuple[str, str]
    ready: tuple[str, ...] = ()

    @classmethod
    def from_probe(cls, data: dict[str, Any]) -> NodePython:
        return cls(
            python=str(data["python"]),
            implementation=str(data["implementation"]),
            executable=str(data["executable"]),
            platform=str(data["platform"]),
            machine=str(data["machine"]),
            libc=(str(data["libc"][0]), str(data["libc"][1])),
            ready=tuple(data.get("ready", ())),
        )

    @property
    def python_tag(self) -> str:
        major, minor = self.python.split(".")[:2]
        return ("pp" if self.implementation == "pypy" else "cp") + major + minor

    def platforms(self) -> list[str]:
        """The wheel platform tags the nodes accept, best first (``pip download --platform``)."""
        arch = self.machine
        if not self.platform.startswith("linux"):
            return [re.sub(r"[-.]", "_", self.platform)]
        tags: list[str] = []
        libc, version = self.libc
        if libc == "glibc" and re.match(r"^\d+\.\d+", version):
            major, minor = (int(p) for p in version.split(".")[:2])
            legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
            for m in range(minor, 4, -1):
                tags.append(f"manylinux_{major}_{m}_{arch}")
                if major == 2 and m in legacy:
                    tags.append(f"{legacy[m]}_{arch}")
        tags.append(f"linux_{arch}")
        return tags

    def accepts(self, wheel: str) -> bool:
        """Whether a wheel file (by its name) installs on the nodes."""
        match = _WHEEL_NAME.match(os.path.basename(wheel))
        if match is None:
            return False
        platforms = set(match["plat"].split("."))
        if "any" in platforms:
            return True
        pythons = set(match["py"].split("."))
        return bool(platforms & set(self.platforms())) and (
            self.python_tag in pythons or "abi3" in match["abi"].split(".")
        )
