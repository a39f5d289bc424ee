"""The "real source tree" of the untar, rm -rf and git status jobs.

By default: the Python standard library of the running interpreter (without its
site-packages and __pycache__) and the virtualenv's site-packages, in sorted order, cut
at ``limit`` files. Files over 1 MiB (static libraries, bundled wheels, large shared
objects) are left out, so that the tree looks like source code. The tarball is built
once and cached as ``WORKDIR/cache/tree-<limit>-u<uid>.tar`` (delete it to rebuild).
"""

from __future__ import annotations

import json
import os
import sysconfig
import tarfile
from pathlib import Path

from .jobs import Tree
from .util import MiB, log

MAX_FILE = 1 * MiB


def default_sources() -> dict[str, Path]:
    paths = sysconfig.get_paths()
    sources = {"stdlib": Path(paths["stdlib"]), "site-packages": Path(paths["purelib"])}
    return {name: path for name, path in sources.items() if path.is_dir()}


def _members(sources: dict[str, Path], limit: int | None) -> list[tuple[str, Path]]:
    """(archive name, path) of directories, files and symlinks, parents first."""
    chosen: list[tuple[str, Path]] = []
    files = 0
    for prefix, root in sources.items():
        chosen.append((prefix, root))
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(
                d for d in dirnames
                if d != "__pycache__" and not (prefix == "stdlib" and rel == Path(".")
                                               and d == "site-packages")
            )
            for name in dirnames:
                chosen.append((f"{prefix}/{rel / name}", Path(dirpath, name)))
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if not path.is_symlink() and not (path.is_file()
                                                  and path.stat().st_size <= MAX_FILE):
                    continue
                if limit is not None and files >= limit:
                    return chosen
                chosen.append((f"{prefix}/{rel / name}", path))
                files += 1
    return chosen


def build_tree(cache_dir: Path, limit: int | None,
               sources: dict[str, Path] | None = None) -> Tree:
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = f"tree-{limit if limit is not None else 'all'}-u{os.geteuid()}"
    tarball, meta = cache_dir / f"{stem}.tar", cache_dir / f"{stem}.json"
    if tarball.exists() and meta.exists():
        info = json.loads(meta.read_text())
        return Tree(tarball, info["entries"], info["files"], info["bytes"])
    sources = sources or default_sources()
    log(f"building the source tree tarball {tarball} from "
        + ", ".join(os.fspath(p) for p in sources.values()))
    entries = files = size = 0
    tmp = tarball.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for arcname, path in _members(sources, limit):
            info = tar.gettarinfo(path, arcname=arcname)
            # owned by whoever runs the benchmark, so that tar --compare agrees
            info.uid, info.gid = os.geteuid(), os.getegid()
            info.uname = info.gname = ""
            entries += 1
            if info.isfile():
                size += info.size
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            files += info.isfile() or info.issym() or info.islnk()
    os.replace(tmp, tarball)
    meta.write_text(json.dumps({"entries": entries, "files": files, "bytes": size}))
    return Tree(tarball, entries, files, size)
