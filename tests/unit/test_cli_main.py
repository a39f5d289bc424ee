"""The `snapfs` command line run as a subprocess (snapfs/cli/main.py), against unmounted
repositories: --help everywhere, one-line errors with a non-zero exit and no traceback,
and the commands that work without a mount."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio
from unithelpers import CHUNK as CS
from unithelpers import pattern, write_file

from snapfs.repository import Repository
from snapfs.store.repo import is_repository
from snapfs.vfs.fs import Filesystem

_HERE = Path(sys.executable).with_name("snapfs")
SNAPFS = str(_HERE if _HERE.exists() else Path(__file__).parents[2] / ".venv" / "bin" / "snapfs")


def snapfs(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SNAPFS, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *, contains: str = "") -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("snapfs: "), lines
    assert contains in lines[0], lines[0]
    return lines[0]


def populate(path: str, files: dict[bytes, bytes], volume: str = "v") -> None:
    """Write files into a volume of an unmounted repository through the library."""

    async def main():
        repo = Repository(path)
        try:
            fs = Filesystem(repo)
            if volume not in fs.graph.volumes:
                fs.graph.create_volume(volume)
            view = fs.volume_view(volume)
            for name, data in files.items():
                await write_file(view, name, data)
            await fs.sync()
        finally:
            repo.close()

    trio.run(main)


# -- --help ------------------------------------------------------------------------------------

def all_commands() -> list[list[str]]:
    """Every command and subcommand of the parser (so new ones are covered too)."""
    import argparse

    from snapfs.cli.main import build_parser

    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        out.append(prefix)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


COMMANDS = all_commands()


def test_the_documented_commands_exist():
    for cmd in (["init"], ["mount"], ["umount"], ["volume", "create"], ["volume", "list"],
                ["volume", "delete"], ["commit"], ["snapshot", "list"], ["snapshot", "delete"],
                ["snapshot", "diff"], ["stats"], ["fsck"]):
        assert cmd in COMMANDS, cmd


def test_help_everywhere(tmp_path):
    procs = [(cmd, subprocess.Popen([SNAPFS, *cmd, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=tmp_path))
             for cmd in COMMANDS]
    for cmd, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (cmd, err)
        assert out.startswith("usage: snapfs"), (cmd, out)
        assert " ".join(["snapfs", *cmd]) in out.splitlines()[0], (cmd, out)
        assert err == ""
    top = procs[0][1].args
    assert top[-1] == "--help"


def test_version():
    proc = snapfs("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("snapfs ")


# -- errors ------------------------------------------------------------------------------------


def test_init_into_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(snapfs("init", str(tmp_path)), contains="not empty")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_init_twice(tmp_path):
    repo = str(tmp_path / "r")
    assert snapfs("init", repo).returncode == 0
    assert_one_line_error(snapfs("init", repo), contains="already")


@pytest.mark.parametrize("size", ["3000", "abc", "64M"])
def test_init_with_a_bad_chunk_size(tmp_path, size):
    repo = tmp_path / "r"
    proc = snapfs("init", str(repo), "--chunk-size", size)
    assert_one_line_error(proc)
    assert proc.returncode == 2
    assert not is_repository(str(repo))


def test_init_encrypt_leaves_nothing_behind(tmp_path, monkeypatch):
    """--encrypt with no passphrase source (no variable, no terminal) is refused; the
    refusal must not leave a half-made repository that a retry then refuses as 'already
    a repository'."""
    monkeypatch.delenv("SNAPFS_PASSPHRASE", raising=False)
    monkeypatch.delenv("SNAPFS_PASSPHRASE_FD", raising=False)
    repo = str(tmp_path / "r")
    assert_one_line_error(snapfs("init", repo, "--encrypt"), contains="passphrase")
    assert not is_repository(repo)
    assert snapfs("init", repo).returncode == 0


def test_mount_of_a_non_repository(tmp_path):
    (tmp_path / "mnt").mkdir()
    line = assert_one_line_error(snapfs("mount", str(tmp_path), str(tmp_path / "mnt")),
                                 contains="not a snapfs repository")
    assert "snapfs init" in line


@pytest.mark.parametrize("size", ["1M", "lots"])
def test_mount_with_a_bad_dirty_limit(tmp_path, size):
    """Refused before anything is mounted: too small to hold a batch of chunks, or not a
    size at all."""
    repo = str(tmp_path / "r")
    assert snapfs("init", repo).returncode == 0
    (tmp_path / "mnt").mkdir()
    proc = snapfs("mount", repo, str(tmp_path / "mnt"), "--dirty-limit", size)
    assert_one_line_error(proc)
    assert proc.returncode == 2
    assert not os.path.ismount(tmp_path / "mnt")


@pytest.mark.parametrize("cmd", [["stats"], ["commit", "--volume", "v"],
                                 ["volume", "create", "x"]])
def test_C_of_a_random_directory(tmp_path, cmd):
    proc = snapfs("-C", str(tmp_path), *cmd)
    assert_one_line_error(proc, contains="neither a snapfs repository nor inside a snapfs mount")
    assert proc.returncode == 3


def test_commands_from_a_random_current_directory(tmp_path):
    assert_one_line_error(snapfs("stats", cwd=str(tmp_path)), contains="-C")


def test_fsck_of_a_non_repository(tmp_path):
    assert_one_line_error(snapfs("fsck", str(tmp_path)))


@pytest.mark.parametrize("name", ["a@b", ".hidden"])
def test_volume_create_with_a_bad_name(repo_path, name):
    proc = snapfs("-C", repo_path, "volume", "create", "--", name)
    assert_one_line_error(proc, contains="invalid volume name")
    assert proc.returncode == 2


def test_commit_needs_a_volume_on_an_unmounted_repository(repo_path):
    assert_one_line_error(snapfs("-C", repo_path, "commit"), contains="--volume")
    proc = snapfs("-C", repo_path, "commit", "--volume", "nothing")
    assert_one_line_error(proc, contains="no volume named 'nothing'")


def test_damaged_config(repo_path):
    with open(os.path.join(repo_path, "snapfs.json"), "w") as f:
        f.write("{broken")
    assert_one_line_error(snapfs("-C", repo_path, "stats"), contains="damaged")


def test_config_that_is_json_but_not_an_object(repo_path):
    with open(os.path.join(repo_path, "snapfs.json"), "w") as f:
        f.write("[]")
    assert_one_line_error(snapfs("-C", repo_path, "stats"))


_HOLDER = textwrap.dedent("""
    import sys, time
    from snapfs.repository import Repository
    repo = Repository(sys.argv[1], holder="a test mount")
    print("open", flush=True)
    time.sleep(60)
""")


def test_a_locked_repository(repo_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, repo_path], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        res = snapfs("-C", repo_path, "volume", "list")
        line = assert_one_line_error(res, contains=f"a test mount (pid {proc.pid})")
        assert "umount" in line and res.returncode == 4
        assert_one_line_error(snapfs("fsck", repo_path), contains="in use")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# -- commands against an unmounted repository --------------------------------------------------


def test_init_prints_and_creates(tmp_path):
    repo = str(tmp_path / "r")
    proc = snapfs("init", repo, "--chunk-size", "64K")
    assert proc.returncode == 0, proc.stderr
    assert "64 KiB" in proc.stdout
    assert os.path.exists(os.path.join(repo, "meta.db"))
    with open(os.path.join(repo, "snapfs.json")) as f:
        assert json.load(f)["chunk_size"] == 65536


def test_unmounted_workflow(repo_path):
    def ok(*args, cwd=None):
        proc = snapfs(*args, cwd=cwd)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr == ""
        return proc.stdout

    assert "created volume home" in ok("-C", repo_path, "volume", "create", "home")
    populate(repo_path, {b"a": pattern(2 * CS), b"b": b"bee"}, volume="home")
    assert ok("-C", repo_path, "commit", "--volume", "home", "--label", "monday").strip() == \
        "home@monday"
    populate(repo_path, {b"c": pattern(CS, seed=5)}, volume="home")
    # from inside the repository directory, without -C
    assert ok("commit", "--volume", "home", "--label", "tuesday", cwd=repo_path).strip() == \
        "home@tuesday"
    ok("-C", repo_path, "volume", "create", "clone", "--from", "home@monday")

    vols = json.loads(ok("-C", repo_path, "volume", "list", "--json"))["volumes"]
    assert {v["name"]: v["head"] for v in vols} == {"home": "home@tuesday",
                                                     "clone": "home@monday"}
    assert "home@tuesday" in ok("-C", repo_path, "volume", "list")

    snaps = json.loads(ok("-C", repo_path, "snapshot", "list", "--json"))["snapshots"]
    assert [(s["name"], s["parent"], s["delta"], s["referenced"]) for s in snaps] == [
        ("home@monday", None, 3, 3), ("home@tuesday", "home@monday", 1, 4)]
    table = ok("-C", repo_path, "snapshot", "list")
    assert "home@monday" in table and "home@tuesday" in table

    stats = json.loads(ok("-C", repo_path, "stats", "--json"))
    assert stats["totals"]["snapshots"] == 2 and stats["totals"]["unique_chunks"] == 4
    assert stats["totals"]["sum_delta"] == 4
    assert {s["name"] for s in stats["snapshots"]} == {"home@monday", "home@tuesday"}
    assert "sum_delta" in ok("-C", repo_path, "stats")
    # --reclaim answers the question alone (no O(graph) table before it)
    text = ok("-C", repo_path, "stats", "--reclaim", "home@tuesday")
    assert text.startswith("deleting 1 snapshots would free ") and "sum_delta" not in text
    rec = json.loads(ok("-C", repo_path, "stats", "--reclaim", "home@monday..home@tuesday",
                        "--json"))
    assert rec["reclaim"]["snapshots"] == ["home@tuesday", "home@monday"]
    assert rec["reclaim"]["chunks"] == 0  # the volume's draft still holds them all

    diff = json.loads(ok("-C", repo_path, "snapshot", "diff", "home@monday", "home@tuesday",
                         "--json"))
    assert diff["changes"] == [{"change": "added", "path": "/c"}]
    assert ok("-C", repo_path, "snapshot", "diff", "home@monday", "home@tuesday").strip() == "+ /c"

    assert "consistent" in ok("fsck", repo_path)
    assert_one_line_error(snapfs("-C", repo_path, "commit", "--volume", "home", "--label",
                                 "monday"), contains="already exists")

    # deleting a snapshot in the middle of the line, then collecting
    assert "deleted snapshot home@monday" in ok("-C", repo_path, "snapshot", "delete",
                                                "home@monday")
    snaps = json.loads(ok("-C", repo_path, "snapshot", "list", "--json"))["snapshots"]
    assert [(s["name"], s["parent"], s["delta"]) for s in snaps] == [("home@tuesday", None, 4)]
    json.loads(ok("-C", repo_path, "gc", "--json"))
    assert_one_line_error(snapfs("-C", repo_path, "snapshot", "delete", "home@monday"),
                          contains="home@monday")
    assert "consistent" in ok("fsck", repo_path)
