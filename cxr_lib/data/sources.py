"""The one registry of data sources: a name, its reader, the options the reader takes, and
whether it reads files under a root. `open_source` (the `cxr data prepare` command) and the
cocktail of chapter 6 open every source through it, and the command offers its names.

Readers are imported when a source is opened, so listing the sources imports no reader.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr_lib.data.core import DataError, XrayDataset, check_whole, merge


@dataclass(frozen=True)
class Source:
    """A data source: `reader` ("module:function") returns its XrayDataset; it takes the
    keyword `options` (and, where `needs_root`, the data set's root as its first argument)."""

    name: str
    reader: str
    options: tuple[str, ...]
    needs_root: bool = True

    def read_function(self) -> Callable[..., XrayDataset]:
        module, function = self.reader.split(":")
        return getattr(importlib.import_module(module), function)

    def read(self, root: str | Path | None = None, /, **options) -> XrayDataset:
        """The data set: the reader called with `root` (where it needs one) and `options`."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise DataError(f"source {self.name!r} takes no option {', '.join(unknown)} "
                            f"(it takes {', '.join(self.options)})")
        read = self.read_function()
        return read(root, **options) if self.needs_root else read(**options)


_SPLIT = ("val_fraction", "seed", "name")
SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("chestxray14", "cxr_lib.data.nih:read_chestxray14",
           ("val_fraction", "seed", "split_lists")),
    Source("folder", "cxr_lib.data.folder:read_class_folders", (*_SPLIT, "test_fraction")),
    Source("chexpert", "cxr_lib.data.chexpert:read_chexpert",
           (*_SPLIT, "uncertain", "frontal_only")),
    Source("covid19_radiography", "cxr_lib.data.covid:read_covid_radiography",
           (*_SPLIT, "test_fraction")),
    Source("phantom", "cxr_lib.data.phantoms:phantom_dataset",
           ("n", "size", "seed", "config", "name"), needs_root=False),
)}


def source(name: str) -> Source:
    """The registered source `name`; an unknown name is a DataError listing the known ones."""
    if name not in SOURCES:
        *first, last = SOURCES
        raise DataError(f"unknown source {name!r}: expected {', '.join(first)} or {last}")
    return SOURCES[name]


def read_source(source_name: str, root: str | Path | None = None, /, **options) -> XrayDataset:
    """Source `source_name` read with `options` (its reader's keywords, `name` among them),
    e.g. `read_source("folder", root, seed=0, name="pediatric")`."""
    return source(source_name).read(root, **options)


def open_source(name: str, root=None, *, val_fraction: float = 0.1,
                test_fraction: float | None = None, seed: int = 0, count: int = 1000,
                size: int = 128, split_lists=None) -> XrayDataset:
    """Open a data source by name: 'chestxray14', 'folder', 'chexpert' or 'covid19_radiography'
    (read from `root`), or 'phantom' (`count` synthetic images of `size` pixels; `root` unused).
    `split_lists` (train, val, test files; ChestX-ray14 only) replace the drawn validation.
    `test_fraction` (None: the reader's default) is the share of patients drawn for test by the
    sources that draw one ('folder' where the root has no test images, 'covid19_radiography').

    Every option is checked first, for every source: a value out of range is a mistake even
    where this source ignores it, and refusing it here leaves nothing half-made.
    """
    check_whole("count", count, 1)
    check_whole("size", size, 1)
    check_whole("seed", seed, 0)
    for option, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"{option} must be in [0, 1), got {fraction}")
    readers = [s.name for s in SOURCES.values() if "split_lists" in s.options]
    if split_lists is not None and name not in readers:
        raise DataError(f"split lists are read for {' and '.join(readers)} only, not {name!r}")
    given = {"val_fraction": val_fraction, "seed": seed, "split_lists": split_lists,
             "n": count, "size": size}
    if test_fraction is not None:
        given["test_fraction"] = test_fraction
    chosen = source(name)
    return chosen.read(root, **{k: v for k, v in given.items() if k in chosen.options})


def pair_roots(names: list[str], roots: list) -> list[tuple[str, object]]:
    """Each source name with its root, in order: the roots go to the sources that read files,
    one each (a phantom takes none). A count that does not match is a DataError."""
    needing = [name for name in names if source(name).needs_root]
    if len(roots) != len(needing):
        raise DataError(f"sources {', '.join(names)} read {len(needing)} root(s) "
                        f"({', '.join(needing) or 'none'}), {len(roots)} given: give one --root "
                        "after each source that reads files")
    given = iter(roots)
    return [(name, next(given) if source(name).needs_root else None) for name in names]


def open_sources(pairs: list[tuple[str, object]], **options) -> XrayDataset:
    """Several sources (name, root) opened with `open_source`'s `options` and merged into one
    data set over the union of their findings; each image keeps its source. One pair gives that
    source alone. `split_lists` go to the sources that read them."""
    if len(pairs) == 1:
        return open_source(*pairs[0], **options)
    lists = options.pop("split_lists", None)
    takers = [name for name, _ in pairs if "split_lists" in source(name).options]
    if lists is not None and not takers:
        return open_source(*pairs[0], split_lists=lists, **options)  # refused, as for one
    datasets = [open_source(name, root, split_lists=lists if name in takers else None,
                            **options) for name, root in pairs]
    names = [ds.name for ds in datasets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"sources {', '.join(twice)} given twice: one cache holds each "
                        "source once")
    return merge(datasets, name="+".join(names))
