"""The `cxr` command line: the same library calls the notebooks make."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _data_prepare(args: argparse.Namespace) -> None:
    from cxr_lib.data import open_source
    from cxr_lib.data.cache import prepare_cache

    dataset = open_source(args.source, args.root, val_fraction=args.val_fraction,
                          seed=args.seed, count=args.count, size=args.size)
    cache = prepare_cache(dataset, args.out, size=args.size, workers=args.workers)
    print(cache.summary())


def _data_check(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import check_cache

    print(check_cache(args.dir))


def _book_run(args: argparse.Namespace) -> None:
    from cxr_lib.book import run_book

    run_book(args.profile, data_root=args.data_root, pediatric_root=args.pediatric_root,
             chapters=args.chapters, publish=args.publish)


def _book_build(args: argparse.Namespace) -> None:
    from cxr_lib.book import build_book

    print(build_book(args.profile, published=args.published))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="prepare and check preprocessing caches")
    data_cmds = data.add_subparsers(dest="command", required=True)
    prep = data_cmds.add_parser("prepare", help="decode a data source once into a uint8 cache")
    prep.add_argument("--source", required=True, choices=["chestxray14", "folder", "phantom"])
    prep.add_argument("--root", type=Path, help="data set root (not used for phantoms)")
    prep.add_argument("--size", type=int, default=256, help="side of the square images")
    prep.add_argument("--out", type=Path, required=True, help="cache folder to write")
    prep.add_argument("--workers", type=int, default=None, help="decoding processes")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of train/val patients drawn for validation")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--count", type=int, default=1000, help="phantoms to draw")
    prep.set_defaults(func=_data_prepare)
    check = data_cmds.add_parser("check", help="verify a cache and print its summary")
    check.add_argument("dir", type=Path)
    check.set_defaults(func=_data_check)

    book = groups.add_parser("book", help="execute the chapters and render the book")
    book_cmds = book.add_subparsers(dest="command", required=True)
    run = book_cmds.add_parser("run", help="execute the chapter notebooks with papermill")
    run.add_argument("--profile", default="cpu", help="profile name or YAML path")
    run.add_argument("--data-root", type=Path, help="ChestX-ray14 root (or the NIH sample)")
    run.add_argument("--pediatric-root", type=Path, help="pediatric pneumonia root")
    run.add_argument("--chapters", nargs="+", help="chapter numbers or names (default: all)")
    run.add_argument("--publish", action="store_true",
                     help="also copy the executed notebooks into book/ (the published edition)")
    run.set_defaults(func=_book_run)
    build = book_cmds.add_parser("build", help="render HTML from an executed set")
    build.add_argument("--profile", default="cpu")
    build.add_argument("--published", action="store_true",
                       help="render the published edition in book/ instead")
    build.set_defaults(func=_book_build)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as err:  # a clear one-line message on the command line, not a traceback
        from cxr_lib.book import BookError
        from cxr_lib.data import DataError

        if isinstance(err, (DataError, BookError, FileNotFoundError)):
            sys.exit(f"cxr: error: {err}")
        raise


if __name__ == "__main__":
    main()
