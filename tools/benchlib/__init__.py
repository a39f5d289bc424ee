"""Helpers of tools/bench, the side-by-side benchmark of issue 5 (see BENCHMARKS.md).

- ``util``: processes, mounts, daemon CPU, fio, caches, machine description.
- ``targets``: the filesystems under test (plain directory, passthrough, snapfs).
- ``jobs``: the workloads; each returns samples measured on one target.
- ``report``: summary, ratios, the table and the JSON file.
- ``cli``: command line and orchestration (interleaving, repeats, cleanup).
"""
