"""Installed size of a virtualenv, per distribution, from the RECORD files pip writes.

Read on the host from the arm64 tree's files (no emulated interpreter needed). A RECORD line is
``path,hash,size``; pip leaves the size empty for the files it writes after unpacking (the
``.pyc`` it compiles, RECORD itself), so those are measured on disk.
"""

from __future__ import annotations

import csv
from pathlib import Path

MIB = 2**20


def distribution_sizes(site_packages: Path) -> dict[str, int]:
    """Bytes per installed distribution (its normalised name), counting every file its RECORD lists."""
    sizes: dict[str, int] = {}
    for record in sorted(site_packages.glob("*.dist-info/RECORD")):
        name = record.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0].lower().replace("_", "-")
        total = 0
        with record.open(newline="") as rows:
            for row in csv.reader(rows):
                if not row:
                    continue
                size = row[2] if len(row) > 2 else ""
                if size.isdigit():
                    total += int(size)
                    continue
                try:
                    total += (site_packages / row[0]).stat().st_size
                except OSError:
                    pass  # listed but gone (or outside the venv)
        sizes[name] = total
    return sizes


def tree_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (no symlink followed): a venv's footprint on disk."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def summary(venv: Path, *, top: int = 12) -> dict[str, object]:
    """The venv's total, torch's share and the largest distributions, in MiB."""
    site = next(venv.glob("lib/python3*/site-packages"))
    sizes = distribution_sizes(site)
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:top]
    return {
        "venv_mib": round(tree_bytes(venv) / MIB, 1),
        "torch_mib": round(sizes.get("torch", 0) / MIB, 1),
        "without_torch_mib": round((sum(sizes.values()) - sizes.get("torch", 0)) / MIB, 1),
        "distributions": sorted(sizes),
        "largest_mib": {name: round(size / MIB, 1) for name, size in largest},
    }
