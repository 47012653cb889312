"""Installed size of a virtualenv, per distribution, from the RECORD files pip writes.

Read on the host from the arm64 tree's files (no emulated interpreter needed). A RECORD line is
``path,hash,size``; pip leaves the size empty for the files it writes after unpacking (the
``.pyc`` it compiles, RECORD itself), so those are measured on disk.
"""

from __future__ import annotations

import csv
import re
from email.parser import HeaderParser
from pathlib import Path

MIB = 2**20


def distribution_sizes(site_packages: Path) -> dict[str, int]:
    """Bytes per installed distribution (its normalised name), counting every file its RECORD lists."""
    sizes: dict[str, int] = {}
    for record in sorted(site_packages.glob("*.dist-info/RECORD")):
        name = normalise(record.parent.name.removesuffix(".dist-info").rsplit("-", 1)[0])
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


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


Requirement = tuple[str, frozenset[str], str | None]  # (name, extras it asks for, the extra it belongs to or None)
_EXTRA = re.compile(r"""\bextra\s*==\s*["']([^"']+)["']""")


def requirements(site_packages: Path) -> dict[str, list[Requirement]]:
    """Each installed distribution's Requires-Dist, with the extras each asks for and the extra it is under."""
    needs: dict[str, list[Requirement]] = {}
    for metadata in site_packages.glob("*.dist-info/METADATA"):
        headers = HeaderParser().parsestr(metadata.read_text(errors="replace"))
        name = normalise(headers.get("Name", metadata.parent.name.split("-", 1)[0]))
        listed: list[Requirement] = []
        for spec in headers.get_all("Requires-Dist") or []:
            head = spec.split(";", 1)[0].strip()
            match = re.match(r"([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", head)
            if not match:
                continue
            wanted = frozenset(normalise(e) for e in (match.group(2) or "").split(",") if e.strip())
            under = _EXTRA.search(spec.split(";", 1)[1]) if ";" in spec else None
            listed.append((normalise(match.group(1)), wanted, normalise(under.group(1)) if under else None))
        needs[name] = listed
    return needs


def closure(needs: dict[str, list[Requirement]], root: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The installed distributions ``root`` (with ``extras``) pulls in, itself included."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(normalise(root), extras)]
    while todo:
        name, asked = todo.pop()
        if (name, asked) in seen or name not in needs:
            continue
        seen.add((name, asked))
        todo.extend((dep, wanted) for dep, wanted, under in needs[name] if under is None or under in asked)
    return {name for name, _ in seen}


def tree_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (no symlink followed): a venv's footprint on disk."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def summary(venv: Path, *, top: int = 12) -> dict[str, object]:
    """The venv's total, torch's whole stack (torch and what it pulls in), the rest, the largest distributions, in MiB.

    ``fedge_without_torch_stack_mib`` is everything else install.sh put in the venv (fedge, its
    dependencies and any extras; pip left out): what fedge's own choices cost on a device, and what
    the agent/aggregator split changes, whichever torch build the device gets.
    """
    site = next(venv.glob("lib/python3*/site-packages"))
    sizes = distribution_sizes(site)
    needs = requirements(site)
    torch_stack = closure(needs, "torch")
    fedge_rest = set(sizes) - torch_stack - {"pip"}
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:top]

    def mib(names: set[str]) -> float:
        return round(sum(sizes.get(n, 0) for n in names) / MIB, 1)

    return {
        "venv_mib": round(tree_bytes(venv) / MIB, 1),
        "torch_mib": mib({"torch"}),
        "torch_stack_mib": mib(torch_stack),
        "torch_stack": sorted(torch_stack),
        "fedge_without_torch_stack_mib": mib(fedge_rest),
        "fedge_without_torch_stack": {name: round(sizes[name] / MIB, 1) for name in sorted(fedge_rest, key=lambda n: -sizes[n])},
        "distributions": sorted(sizes),
        "largest_mib": {name: round(size / MIB, 1) for name, size in largest},
    }
