"""The one registry of data sources: what the command offers, open_source and the cocktail read."""

import argparse
import inspect
import re
from pathlib import Path

import pytest

from cxr_lib.cli import build_parser
from cxr_lib.data import SOURCES, DataError, open_source, read_source
from cxr_lib.data.sources import source


def _prepare_choices() -> list[str]:
    def command(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
        groups = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return groups.choices[name]

    prepare = command(command(build_parser(), "data"), "prepare")
    return next(a.choices for a in prepare._actions if a.dest == "source")


def test_the_command_offers_exactly_the_registered_sources():
    assert _prepare_choices() == list(SOURCES)
    assert list(SOURCES) == ["chestxray14", "folder", "chexpert", "covid19_radiography",
                             "phantom"]


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_source_names_its_readers_own_options_and_root(name):
    entry = SOURCES[name]
    params = inspect.signature(entry.read_function()).parameters
    assert set(entry.options) <= set(params), f"{name}: {set(entry.options) - set(params)}"
    first = next(iter(params))
    assert (first == "root") == entry.needs_root, f"{name}: first parameter {first!r}"
    assert "root" not in entry.options


def test_open_source_refuses_unknown_sources_and_misplaced_split_lists_by_the_registry(
        tmp_path):
    with pytest.raises(DataError, match=r"^unknown source 'mimic': expected chestxray14, "
                                        r"folder, chexpert, covid19_radiography or phantom$"):
        open_source("mimic", tmp_path)
    with pytest.raises(DataError, match=r"^split lists are read for chestxray14 only, "
                                        r"not 'folder'$"):
        open_source("folder", tmp_path, split_lists=["a", "b", "c"])
    with pytest.raises(DataError, match="takes no option count"):
        read_source("folder", tmp_path, count=3)
    assert source("phantom").needs_root is False


def test_read_source_and_open_source_give_the_readers_data_sets():
    from cxr_lib.data.phantoms import phantom_dataset

    direct = phantom_dataset(6, size=16, seed=3)
    for opened in (open_source("phantom", count=6, size=16, seed=3),
                   read_source("phantom", n=6, size=16, seed=3)):
        assert opened.meta.equals(direct.meta) and (opened.labels == direct.labels).all()


def test_the_command_and_the_recipes_open_sources_only_through_the_registry():
    library = Path(source.__code__.co_filename).resolve().parents[1]
    readers = {entry.reader.split(":")[1] for entry in SOURCES.values()}
    direct = [f"{path.relative_to(library)}: {name}"
              for path in [library / "cli.py", *sorted((library / "methods").glob("*.py"))]
              for name in readers if re.search(rf"\b{name}\b", path.read_text())]
    assert direct == []
