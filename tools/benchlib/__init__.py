"""Helpers of tools/bench, the side-by-side benchmark of issue 5 (see BENCHMARKS.md).

- ``util``: processes, mounts, daemon CPU, fio, caches, machine description.
- ``targets``: the filesystems under test (plain directory, passthrough, snapfs, encrypted
  snapfs, snapfs with a long history).
- ``jobs``: the workloads; each returns samples measured on one target.
- ``report``: summary, ratios (also snapfs-enc and snapfs-history against snapfs), the
  tables and the JSON file.
- ``pyspy``: ``--profile``: py-spy profiles of the daemons during the timed parts, and a
  summariser of them.
- ``cli``: command line and orchestration (interleaving, repeats, cleanup).
"""
