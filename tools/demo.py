"""`make run`: fill a freshly mounted demo repository and print what to try.

Usage: python tools/demo.py DEMO_DIR   (DEMO_DIR/repo is mounted at DEMO_DIR/mnt)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys


def main() -> int:
    demo = os.path.abspath(sys.argv[1])
    mnt = os.path.join(demo, "mnt")
    snapfs = os.path.join(os.path.dirname(sys.executable), "snapfs")

    def run(*args: str) -> None:
        subprocess.run([snapfs, *args], check=True, stdout=subprocess.DEVNULL)

    home = os.path.join(mnt, "home")
    if not os.path.isdir(home):
        run("-C", mnt, "volume", "create", "home")
        docs = "/usr/share/doc"
        for name in sorted(os.listdir(docs))[:40]:
            src = os.path.join(docs, name)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, os.path.join(home, "doc", name), symlinks=True)
        with open(os.path.join(home, "hello.txt"), "w") as f:
            f.write("hello from the first snapshot\n")
        run("commit", home, "--label", "first")
        with open(os.path.join(home, "hello.txt"), "a") as f:
            f.write("a change in the draft of home\n")
    venv_bin = os.path.dirname(sys.executable)
    print(f"""
snapfs demo: repository {demo}/repo is mounted at {mnt}

  export PATH={venv_bin}:$PATH
  cd {mnt}
  ls -a . .snapshots                          # volumes, snapshots, .snapfs
  cat home/hello.txt                          # the volume: head snapshot + draft
  cat .snapshots/home@first/hello.txt         # the committed snapshot, unchanged
  snapfs commit home --label second           # seal the draft into home@second
  echo fix > .snapshots/home@first/fix.txt    # a draft on top of home@first...
  snapfs commit .snapshots/home@first --label hotfix   # ...committed as a branch
  mkdir .snapshots/home@third                 # commit through the filesystem
  cat .snapfs/stats                           # exact accounting, as JSON
  snapfs stats                                # the same as a table
  snapfs snapshot diff home@first home@second

  snapfs umount {mnt}                         # when done (make demo-umount)
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
