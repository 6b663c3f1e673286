"""A head node out of disk: a tiny tmpfs (mounted here, where the cell's head node ``fear`` runs as
its test user) as the session root. Uploads are checked, and the executor says the disk is full."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import CELL_ALIAS, ssh

from sheepdog_executor import DiskFull, GridEngineExecutor
from sheepdog_executor.bundle import worker_bundle
from sheepdog_executor.distributions import EnvironmentSpec, Wanted
from sheepdog_executor.environment import EnvironmentSync, HeadNode
from sheepdog_executor.jobscript import JobOptions
from sheepdog_executor.shell import SSHShell, SSHTarget

pytestmark = pytest.mark.cluster


@pytest.fixture
def tiny_disk(cell: str) -> Iterator[Callable[[int], Path]]:
    """Mounts a tmpfs of N bytes owned by the cell's test user (the head node of ``fear`` is this
    machine); unmounted after the test."""
    if os.geteuid() != 0 or CELL_ALIAS != "fear" or shutil.which("mount") is None:
        pytest.skip("needs root and the head node on this machine (the fear cell) to mount a tmpfs")
    user = ssh("id -un").stdout.strip()
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        path = Path(f"/tmp/sheepdog-tiny-disk-{os.getpid()}-{len(mounted)}")
        path.mkdir(mode=0o700)
        mounted.append(path)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=700", "tmpfs", str(path)], check=True
        )
        shutil.chown(path, user, user)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def test_a_bundle_that_does_not_fit_fails_the_executor_naming_the_path_and_the_free_bytes(
    tiny_disk: Callable[[int], Path],
) -> None:
    size = 16 * 1024
    assert len(worker_bundle()) > size  # the secret fits, the bundle does not
    root = tiny_disk(size)
    name = f"sd-disk-{os.getpid()}-{time.monotonic_ns()}"
    with pytest.raises(DiskFull) as caught:
        GridEngineExecutor(host=CELL_ALIAS, session_root=str(root), job_name=name, max_workers=2)
    match = re.fullmatch(
        rf"no space left on the cluster: {re.escape(str(root))}/[^ ]+/bundle\.zip \((\d+) bytes free\); .*",
        str(caught.value),
    )
    assert match, str(caught.value)
    assert int(match.group(1)) < len(worker_bundle()) and caught.value.free == int(match.group(1))
    # nothing left behind: the session directory is gone, no job was queued
    assert list(root.iterdir()) == []
    names = [e.findtext("JB_name") for e in ET.fromstring(ssh("qstat -xml").stdout).iter("job_list")]
    assert name not in names


def test_a_sync_into_a_full_disk_fails_fast_saying_so(tiny_disk: Callable[[int], Path], cell: str) -> None:
    root = tiny_disk(64 * 1024)
    said: list[str] = []
    shell = SSHShell(SSHTarget.resolve(cell))
    try:
        sync = EnvironmentSync(EnvironmentSpec((Wanted("six", "1.17.0"),)), progress=said.append)
        with pytest.raises(DiskFull) as caught:
            sync.prepare(HeadNode(shell, JobOptions()), str(root))
    finally:
        shell.close()
    assert re.fullmatch(
        rf"no space left on the cluster: {re.escape(str(root))}/envs\S* \(\d+ bytes free\); .*",
        str(caught.value),
    ), str(caught.value)
    # it stopped there: nothing downloaded here or uploaded after the head node met the full disk
    assert not [m for m in said if "downloading" in m or "uploading" in m], said
