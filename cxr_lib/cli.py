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


def _pretrain_mae(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import open_cache
    from cxr_lib.pretrain import MaeRecipe, pretrain_mae, save_encoder
    from cxr_lib.profiles import load_profile
    from cxr_lib.study import resolve_device
    from cxr_lib.train import TrainConfig

    profile = load_profile(args.profile)
    resolve_device(profile.shared.get("device", "auto"))
    defaults = profile.chapters.get("02_mae_pretraining", {})

    def value(name: str):
        given = getattr(args, name)
        return given if given is not None else defaults[name]

    recipe = MaeRecipe(model=value("model"), img_size=value("image_size"),
                       patch_size=value("patch_size"), mask_ratio=args.mask_ratio,
                       crop_scale=tuple(args.crop_scale), decoder_dim=value("decoder_dim"),
                       decoder_depth=value("decoder_depth"), decoder_heads=value("decoder_heads"))
    config = TrainConfig(epochs=value("epochs"), batch_size=value("batch_size"),
                         base_lr=value("base_lr"), warmup_epochs=value("warmup_epochs"),
                         seed=profile.shared.get("seed", 0))
    runs_dir = args.runs or Path("build") / profile.name / "runs"
    pretrained = pretrain_mae(open_cache(args.data), recipe, config, runs_dir, force=args.force)
    state = "loaded the finished run" if pretrained.run.loaded_from_cache else "trained"
    print(f"{state} {pretrained.run.path}")
    if args.save:
        print(f"encoder saved to {save_encoder(pretrained, args.save)}")


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

    pretrain = groups.add_parser("pretrain", help="self-supervised pre-training")
    pretrain_cmds = pretrain.add_subparsers(dest="command", required=True)
    mae = pretrain_cmds.add_parser(
        "mae", help="masked-autoencoder pre-training (chapter 2); unset options come from the "
        "profile's 02_mae_pretraining section")
    mae.add_argument("--profile", default="cpu", help="profile name or YAML path")
    mae.add_argument("--data", type=Path, required=True, help="a cache from `cxr data prepare`")
    mae.add_argument("--runs", type=Path, help="runs folder (default build/<profile>/runs)")
    mae.add_argument("--model", help="vit_tiny_patch16, vit_small_patch16 or vit_base_patch16")
    mae.add_argument("--image-size", type=int)
    mae.add_argument("--patch-size", type=int)
    mae.add_argument("--decoder-dim", type=int)
    mae.add_argument("--decoder-depth", type=int)
    mae.add_argument("--decoder-heads", type=int)
    mae.add_argument("--mask-ratio", type=float, default=0.9)
    mae.add_argument("--crop-scale", type=float, nargs=2, default=[0.5, 1.0],
                     metavar=("LOW", "HIGH"))
    mae.add_argument("--epochs", type=int)
    mae.add_argument("--warmup-epochs", type=float)
    mae.add_argument("--batch-size", type=int, help="global batch (all GPUs together)")
    mae.add_argument("--base-lr", type=float, help="lr = base_lr x batch_size / 256")
    mae.add_argument("--save", type=Path, help="also write the encoder here (timm ViT keys)")
    mae.add_argument("--force", action="store_true", help="train again even if finished")
    mae.set_defaults(func=_pretrain_mae)
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
