"""The `cxr` command line: the same library calls the notebooks make."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import sys
import traceback
import warnings
from pathlib import Path

from cxr_lib.bench.options import add_bench_arguments
from cxr_lib.data.sources import SOURCES

SHARED = "shared"  # the profile's section of values every chapter receives (seed, device, ...)


class _Settings:
    """The one way an option is resolved: the flag where given, else the profile's value in
    `section` (`SHARED`: its shared values), else the default. A flag left out is absent from
    `args` (argparse.SUPPRESS), so a given `none` (None) is a value; a required setting that
    stays None is named by `check`.
    """

    def __init__(self, args: argparse.Namespace, profile, section: str):
        self.args, self.profile, self.section = args, profile, section
        self.values = profile.shared if section == SHARED else profile.chapters.get(section, {})
        self.missing: list[str] = []

    def __call__(self, name: str, key: str | None = None, default=None, *,
                 required: bool = False, first: bool = False):
        """Option `name` (argument dest), else the profile's `key` (default `name`; with
        `first`, a list whose first item is the value), else `default`."""
        if name in vars(self.args):
            value = getattr(self.args, name)
        elif first:
            value = (self.values.get(name if key is None else key) or [default])[0]
        else:
            value = self.values.get(name if key is None else key, default)
        if required and value is None:
            self.missing.append(name)
        return value

    def check(self) -> None:
        """Refuse the required settings that neither the options nor the profile set."""
        if self.missing:
            from cxr_lib.book.profiles import ProfileError

            missing = sorted(self.missing)
            options = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ProfileError(f"{self.profile.path}: the {self.section} section does not set "
                               f"{', '.join(missing)}; add them there or pass {options}")


def _data_prepare(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import prepare_cache
    from cxr_lib.data.sources import open_sources, pair_roots

    roots = args.root or []
    # one source takes the root as given (none, or one a phantom ignores); several, one each
    pairs = ([(args.source[0], roots[0] if roots else None)] if len(args.source) == 1 and
             len(roots) <= 1 else pair_roots(args.source, roots))
    dataset = open_sources(pairs, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, seed=args.seed, count=args.count,
                           size=args.size, split_lists=args.split_lists)
    cache = prepare_cache(dataset, args.out, size=args.size, workers=args.workers)
    print(cache.summary())


def _data_check(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import check_cache

    print(check_cache(args.dir))


def _book_run(args: argparse.Namespace) -> None:
    from cxr_lib.book.runner import run_book

    run_book(args.profile, data_root=args.data_root, pediatric_root=args.pediatric_root,
             chapters=args.chapters, publish=args.publish)


def _book_build(args: argparse.Namespace) -> None:
    from cxr_lib.book.runner import build_book

    print(build_book(args.profile, published=args.published))


def _mae_recipe_and_config(args: argparse.Namespace):
    from cxr_lib.book.profiles import load_profile
    from cxr_lib.device import resolve_device
    from cxr_lib.engine.config import TrainConfig
    from cxr_lib.methods.mae import MaeRecipe

    profile = load_profile(args.profile)
    resolve_device(profile.shared.get("device", "auto"))
    value, base = _Settings(args, profile, "02_mae_pretraining"), MaeRecipe()
    # The recipe's options default to MaeRecipe's (the paper's; None: the preset's patch and
    # decoder), the optimiser's must be set by the profile or the options
    recipe = MaeRecipe(model=value("model", default=base.model),
                       image_size=value("image_size", default=base.image_size),
                       patch_size=value("patch_size", default=base.patch_size),
                       mask_ratio=value("mask_ratio", default=base.mask_ratio),
                       crop_scale=tuple(value("crop_scale", default=base.crop_scale)),
                       decoder_dim=value("decoder_dim", default=base.decoder_dim),
                       decoder_depth=value("decoder_depth", default=base.decoder_depth),
                       decoder_heads=value("decoder_heads", default=base.decoder_heads),
                       in_chans=value("in_chans", default=base.in_chans),
                       init_weights=None if args.init_weights is None else str(args.init_weights))
    optimiser = {name: value(name, required=True)
                 for name in ("epochs", "batch_size", "base_lr", "warmup_epochs")}
    value.check()
    config = TrainConfig(**optimiser, seed=_seed(args, profile),
                         **_engine_settings(args))
    return profile, recipe, config


def _runs_dir(args: argparse.Namespace, profile) -> Path:
    """`--runs`, else the profile's runs folder, where its chapters train (build/<profile>)."""
    from cxr_lib.chapters.files import runs_dir

    return Path(args.runs) if args.runs else runs_dir(Path("build") / profile.name)


def _pretrain_mae(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.mae import pretrain_mae, save_encoder

    profile, recipe, config = _mae_recipe_and_config(args)
    runs_dir = _runs_dir(args, profile)
    with _divergence_said_once():
        pretrained = pretrain_mae(open_cache(args.data), recipe, config, runs_dir,
                                  force=args.force)
    _print_run(pretrained.run)
    if args.save:
        print(f"encoder saved to {save_encoder(pretrained, args.save)}")
    _exit_if_diverged(pretrained.run)


def _moco_recipe_and_config(args: argparse.Namespace):
    from cxr_lib.book.profiles import load_profile
    from cxr_lib.device import resolve_device
    from cxr_lib.methods.moco import KnnSettings, MocoRecipe, moco_config

    profile = load_profile(args.profile)
    resolve_device(profile.shared.get("device", "auto"))
    # The 03_moco_baselines values this command reads, defaulting to MoCo v2's as the recipe,
    # the optimiser and the kNN monitor define them; the profile or the options must set those
    # in `required` (a head width of None is MoCo's: as wide as the backbone's features).
    value = _Settings(args, profile, "03_moco_baselines")
    base, monitor = MocoRecipe(), KnnSettings()
    required = ("image_size", "epochs", "batch_size")
    optimiser = inspect.signature(moco_config).parameters
    defaults = {"image_size": None, "epochs": None, "batch_size": None,
                "warmup_epochs": optimiser["warmup_epochs"].default,
                "base_lr": optimiser["base_lr"].default, "queue_size": base.queue_size,
                "momentum": base.momentum, "temperature": base.temperature,
                "hidden_dim": base.hidden_dim, "bn_splits": base.bn_splits,
                "in_chans": base.in_chans,
                "knn_k": monitor.k, "knn_every": monitor.every, "knn_images": monitor.max_images}
    values = {name: value(name, default=default, required=name in required)
              for name, default in defaults.items()}
    values["model"] = value("model", "models", required=True, first=True)
    value.check()
    recipe = MocoRecipe(model=values["model"], image_size=values["image_size"],
                        hidden_dim=values["hidden_dim"], queue_size=values["queue_size"],
                        momentum=values["momentum"], temperature=values["temperature"],
                        bn_splits=values["bn_splits"], in_chans=values["in_chans"])
    config = moco_config(values["epochs"], values["batch_size"], base_lr=values["base_lr"],
                         warmup_epochs=values["warmup_epochs"],
                         seed=_seed(args, profile), **_engine_settings(args))
    knn = KnnSettings(k=values["knn_k"], every=values["knn_every"],
                      max_images=values["knn_images"])
    return profile, recipe, config, knn


def _pretrain_moco(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.moco import pretrain_moco, save_backbone

    profile, recipe, config, knn = _moco_recipe_and_config(args)
    runs_dir = _runs_dir(args, profile)
    monitor = open_cache(args.monitor_data) if args.monitor_data else None
    with _divergence_said_once():
        pretrained = pretrain_moco(open_cache(args.data), recipe, config, runs_dir, knn=knn,
                                   monitor=monitor, force=args.force)
    _print_run(pretrained.run)
    print(f"kNN AUC {pretrained.knn_start:.3f} before pre-training, "
          f"{pretrained.knn_end:.3f} after")
    if args.save:
        print(f"backbone saved to {save_backbone(pretrained, args.save)}")
    _exit_if_diverged(pretrained.run)


def _seed(args: argparse.Namespace, profile) -> int:
    """`--seed`, else the profile's shared seed, else 0."""
    from cxr_lib.data.core import check_whole

    return check_whole("seed", _Settings(args, profile, SHARED)("seed", default=0), 0)


def _add_run_arguments(cmd: argparse.ArgumentParser, *, seed: bool = True) -> None:
    """`--threads` (and `--seed`) of every command that trains or evaluates."""
    if seed:
        cmd.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                         help="seed of the weights, draws and batches (default: the profile's "
                         "shared seed, else 0)")
    cmd.add_argument("--threads", type=int, help="CPU threads for torch (default: one core "
                     "fewer than the machine has, at least 1; printed first)")


def _add_engine_arguments(cmd: argparse.ArgumentParser) -> None:
    """Options of the training engine that every training command shares."""
    _add_run_arguments(cmd)
    cmd.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value "
                     "(off by default; a remedy for a diverging run)")
    cmd.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default "
                     "500; a checkpoint is also written at an epoch's end once "
                     "TrainConfig.checkpoint_minutes have passed, and at the end)")


def _engine_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig fields of `_add_engine_arguments` that were given."""
    given = {"grad_clip": args.grad_clip, "checkpoint_every": args.checkpoint_every}
    return {name: value for name, value in given.items() if value is not None}


def _print_run(run) -> None:
    state = "loaded the finished run" if run.loaded_from_cache else "trained"
    print(f"{state} {run.path}")


@contextlib.contextmanager
def _divergence_said_once():
    """Train inside: the engine's warning of a diverged run is held back, because the command
    then ends with the same note as its error (`_exit_if_diverged`)."""
    from cxr_lib.engine.config import DivergedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergedWarning)
        yield


def _exit_if_diverged(run) -> None:
    """A run that finished with a loss far above its start ends the command with an error."""
    if run.metrics.get("status") == "diverged":
        sys.exit(f"cxr: error: {run.metrics['diverged']}")


def _parse_optional(text: str) -> float | None:
    """A number, or `none` for "off" (no layer decay, no RandAugment)."""
    return None if text.lower() in ("none", "off") else float(text)


def _recipe_and_config(args: argparse.Namespace):
    from cxr_lib.book.profiles import load_profile
    from cxr_lib.device import resolve_device
    from cxr_lib.methods.finetune import FinetuneRecipe, paper_config
    from cxr_lib.models.classifier import is_vit, supports_layer_decay

    profile = load_profile(args.profile)
    resolve_device(profile.shared.get("device", "auto"))
    value = _Settings(args, profile, "04_finetuning_ablations")
    paper, base = paper_config(), FinetuneRecipe()
    model = value("model", "vit_model", base.model)
    vit, decays = is_vit(model), supports_layer_decay(model)
    recipe = FinetuneRecipe(
        model=model, init=args.init, weights=args.weights,
        image_size=value("image_size", "image_size", base.image_size),
        patch_size=_Settings(args, profile, "02_mae_pretraining")("patch_size") if vit else None,
        layer_decay=(value("layer_decay", "paper_layer_decay", base.layer_decay) if decays
                     else None),
        drop_path=value("drop_path", "paper_drop_path", base.drop_path if decays else 0.0),
        randaug_magnitude=value("randaug", "paper_randaug", base.randaug_magnitude),
        mixup=args.mixup, cutmix=args.cutmix,
        crop_scale=tuple(value("crop_scale", "crop_scale", base.crop_scale)),
        train_fraction=args.train_fraction,
        in_chans=value("in_chans", "in_chans", base.in_chans),
        eval_crop=value("eval_crop", "eval_crop", base.eval_crop))
    config = paper_config(
        epochs=value("epochs", "epochs", paper.epochs),
        warmup_epochs=value("warmup_epochs", "warmup_epochs", paper.warmup_epochs),
        batch_size=value("batch_size", "batch_size", paper.batch_size),
        base_lr=value("base_lr", "base_lr", paper.base_lr),
        min_lr=value("min_lr", "min_lr", paper.min_lr), seed=_seed(args, profile),
        **_engine_settings(args))
    return profile, recipe, config


def _finetune(args: argparse.Namespace) -> None:
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.finetune import finetune

    profile, recipe, config = _recipe_and_config(args)
    runs_dir = _runs_dir(args, profile)
    with _divergence_said_once():
        result = finetune(open_cache(args.data), recipe, config, runs_dir, force=args.force)
    _print_run(result.run)
    print(f"start: {result.load_report.summary}")
    print(f"validation AUC {result.valid_auc:.4f} (best epoch); test AUC {result.test_auc:.4f} "
          f"on {result.run.metrics.get('test_images', 0)} images")
    _exit_if_diverged(result.run)


def _evaluate(args: argparse.Namespace) -> None:
    from cxr_lib.analysis.published import published_for
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.finetune import PAPER_EVAL_CROP, PAPER_NORMALISE, evaluate_weights

    table, report = evaluate_weights(
        open_cache(args.data), args.model, args.weights, split=args.split,
        in_chans=args.in_chans, image_size=args.image_size, patch_size=args.patch_size,
        eval_crop=PAPER_EVAL_CROP if args.eval_crop is None else args.eval_crop,
        normalise=PAPER_NORMALISE if args.normalise is None else tuple(args.normalise),
        batch_size=args.batch_size)
    print(f"{args.weights}: {report.summary}")
    print(f"{args.split} AUC (%) on {table.attrs['images']:,} images")
    print(table.round(2).to_string(index=False))
    published = published_for(args.model)
    if len(published):
        print("published (theirs, not computed here):")
        print(published.to_string(index=False))


def _probe(args: argparse.Namespace) -> None:
    import pandas as pd
    import torch
    from fastai.torch_core import default_device

    from cxr_lib.book.profiles import load_profile
    from cxr_lib.data.cache import open_cache
    from cxr_lib.data.splits import label_subset
    from cxr_lib.device import resolve_device
    from cxr_lib.methods.mae import load_encoder
    from cxr_lib.methods.moco import load_backbone
    from cxr_lib.methods.probe import probe_cache

    if not 0 < args.train_fraction <= 1:
        raise ValueError(f"train_fraction must lie in (0, 1], got {args.train_fraction}")
    profile = load_profile(args.profile)
    resolve_device(profile.shared.get("device", "auto"))
    seed = _seed(args, profile)
    cache = open_cache(args.data)
    # a MoCo file names its backbone; an MAE file holds its recipe alone
    saved = torch.load(args.encoder, map_location="cpu", weights_only=True) \
        if args.encoder.is_file() else {}
    encoder, augment = (load_backbone if "backbone" in saved else load_encoder)(args.encoder)
    rows = label_subset(cache, args.train_fraction, seed)
    splits = ("val", "test")
    results = probe_cache(encoder, augment.plain, cache, rows, splits,
                          max_images=args.max_images, batch_size=args.batch_size,
                          device=default_device())
    kind = f"MoCo {saved['backbone']}" if "backbone" in saved else "MAE"
    used = cache.index.iloc[rows[:args.max_images]]  # the rows probe_cache fits on
    patients = len(used[["source", "patient"]].drop_duplicates())
    print(f"{args.encoder} ({kind}): linear probe fitted on {len(used):,} train images of "
          f"{patients:,} patients (train fraction {args.train_fraction:g}, seed {seed})")
    for split in splits:
        print(f"{split} mean AUC {results[split].mean_auc:.4f} on {results[split].n_val:,} "
              "images")
    table = pd.DataFrame({split: results[split].per_finding for split in splits})
    table = table.reindex([f for f in cache.findings if f in table.index]) * 100
    print("per-finding AUC (%)")
    print(table.rename_axis("finding").reset_index().round(2).to_string(index=False))
    for split in splits:
        if results[split].skipped:
            print(f"not scored on {split} (one class only among its or train's labels): "
                  f"{', '.join(results[split].skipped)}")


def _grid(args: argparse.Namespace) -> None:
    import yaml

    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.grid import run_grid

    profile, recipe, config = _recipe_and_config(args)
    axes = {}
    for axis in args.axis:
        name, sep, values = axis.partition("=")
        if not sep or not values:
            raise ValueError(f"--axis {axis!r}: write NAME=V1,V2 (e.g. layer_decay=0.55,0.75)")
        axes[name] = [None if v.strip().lower() in ("none", "off") else yaml.safe_load(v)
                      for v in values.split(",")]
    runs_dir = _runs_dir(args, profile)
    table = run_grid(recipe, axes, open_cache(args.data), config, runs_dir, name=args.name)
    shown = [*axes, "valid_auc", "test_auc", "train_s", "loaded"]
    print(table[shown].to_string(index=False))
    print(f"table written to {runs_dir}/{args.name or 'grid-<hash>'}.parquet")


def _add_recipe_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--profile", default="cpu", help="profile name or YAML path")
    cmd.add_argument("--data", type=Path, required=True, help="a cache from `cxr data prepare`")
    cmd.add_argument("--runs", type=Path, help="runs folder (default build/<profile>/runs)")
    cmd.add_argument("--init", default="random",
                     choices=["random", "imagenet", "mae", "moco", "torchvision", "finetuned"])
    cmd.add_argument("--weights", type=Path, help="the start's file (mae, moco, torchvision, "
                     "finetuned: a whole classifier, head kept; imagenet: optional, else the "
                     "Hugging Face cache)")
    cmd.add_argument("--patch-size", type=int, help="ViT patch (default: chapter 2's)",
                     default=argparse.SUPPRESS)
    cmd.add_argument("--mixup", type=float, default=0.0)
    cmd.add_argument("--cutmix", type=float, default=0.0)
    cmd.add_argument("--train-fraction", type=float, default=1.0,
                     help="share of the training patients whose labels are used")
    _add_engine_arguments(cmd)
    # Left out, these take the profile's value (absent from args, not None: `none` is a value)
    profiled = cmd.add_argument_group("recipe (default: the profile's chapter 4, else the paper)")
    for flag, kwargs in (
            ("--model", {"help": "vit_tiny_patch16, vit_small_patch16, vit_base_patch16, "
                                 "hiera_tiny, hiera_small, hiera_base, densenet121 or "
                                 "resnet50"}),
            ("--image-size", {"type": int}),
            ("--layer-decay", {"type": _parse_optional, "help": "a number, or none (ViT)"}),
            ("--drop-path", {"type": float}),
            ("--randaug", {"type": _parse_optional, "help": "RandAugment magnitude, or none"}),
            ("--crop-scale", {"type": float, "nargs": 2, "metavar": ("LOW", "HIGH")}),
            ("--epochs", {"type": int}),
            ("--warmup-epochs", {"type": float}),
            ("--batch-size", {"type": int, "help": "global batch (all GPUs together)"}),
            ("--base-lr", {"type": float, "help": "lr = base_lr x batch_size / 256"}),
            ("--min-lr", {"type": float}),
            ("--in-chans", {"type": int, "choices": [1, 3],
                            "help": "3: the gray image replicated to RGB (the papers)"}),
            ("--eval-crop", {"type": float, "help": "share of the side the evaluation view "
                             "keeps (the papers: 0.875, Resize(256) then CenterCrop(224))"})):
        profiled.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def add_finetune_commands(groups: argparse._SubParsersAction) -> None:
    """`cxr finetune` (one run) and `cxr grid` (a product of settings, one table)."""
    tune = groups.add_parser(
        "finetune", help="fine-tune a classifier (chapter 4); unset options come from the "
        "profile's 04_finetuning_ablations section, else the paper's recipe")
    _add_recipe_arguments(tune)
    tune.add_argument("--force", action="store_true", help="train again even if finished")
    tune.set_defaults(func=_finetune)
    grid = groups.add_parser(
        "grid", help="fine-tune every combination of some settings; one table row per run")
    _add_recipe_arguments(grid)
    grid.add_argument("--axis", action="append", required=True, metavar="NAME=V1,V2",
                      help="a FinetuneRecipe or TrainConfig field and its values; repeatable")
    grid.add_argument("--name", help="table name (default grid-<hash of the request>)")
    grid.set_defaults(func=_grid)


def add_evaluate_command(groups: argparse._SubParsersAction) -> None:
    """`cxr evaluate`: a whole fine-tuned classifier file (head kept) scored on a split."""
    ev = groups.add_parser(
        "evaluate", help="per-finding AUC of a fine-tuned classifier file, head included (e.g. "
        "Xiao et al.'s released ViT-S or DenseNet-121), beside the published numbers; defaults "
        "are their evaluation")
    ev.add_argument("--data", type=Path, required=True, help="a cache from `cxr data prepare`")
    ev.add_argument("--weights", type=Path, required=True, help="the fine-tuned classifier")
    ev.add_argument("--model", required=True, help="vit_small_patch16, vit_base_patch16, "
                    "densenet121, ... (the file's architecture)")
    ev.add_argument("--split", default="test")
    ev.add_argument("--in-chans", type=int, default=3, choices=[1, 3],
                    help="3: the gray image replicated to RGB, as the papers feed it")
    ev.add_argument("--image-size", type=int, default=224)
    ev.add_argument("--patch-size", type=int, help="ViT patch (default 16)")
    ev.add_argument("--eval-crop", type=float, help="share of the side kept before resizing "
                    "(default 224/256: their Resize(256), CenterCrop(224); 1: the whole image)")
    ev.add_argument("--normalise", type=float, nargs=2, metavar=("MEAN", "STD"),
                    help="pixel statistics in 0..1 (default theirs, 0.5056 0.252)")
    ev.add_argument("--batch-size", type=int, default=128)
    _add_run_arguments(ev, seed=False)  # nothing drawn: the same file scores the same AUCs
    ev.set_defaults(func=_evaluate)


def add_probe_command(groups: argparse._SubParsersAction) -> None:
    """`cxr probe`: a saved encoder's frozen features, a linear probe, AUC on val and test."""
    probe = groups.add_parser(
        "probe", help="linear probe of a saved encoder (`cxr pretrain mae --save` or `cxr "
        "pretrain moco --save`): logistic regressions on the train split's frozen features, "
        "mean and per-finding AUC on the val and test splits")
    probe.add_argument("--encoder", type=Path, required=True, help="the saved encoder file")
    probe.add_argument("--data", type=Path, required=True, help="a cache from `cxr data "
                       "prepare`")
    probe.add_argument("--profile", default="cpu", help="profile name or YAML path (its "
                       "device and shared seed)")
    probe.add_argument("--train-fraction", type=float, default=1.0,
                       help="share of the training patients whose labels the probe uses")
    probe.add_argument("--max-images", type=int, default=20_000,
                       help="images per split at most (the first)")
    probe.add_argument("--batch-size", type=int, default=128)
    _add_run_arguments(probe)
    probe.set_defaults(func=_probe)


def _bench(args: argparse.Namespace) -> None:
    if args.report is not None:  # a saved report: its tables, without importing torch
        from cxr_lib.bench.tables import format_report, read_report

        print(format_report(read_report(args.report), args.markdown))
        return
    from cxr_lib.bench.run import main_bench

    main_bench(args)  # prints the tables, then the JSON report (also written to --json FILE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description=__doc__)
    groups = parser.add_subparsers(dest="group", required=True)

    data = groups.add_parser("data", help="prepare and check preprocessing caches")
    data_cmds = data.add_subparsers(dest="command", required=True)
    prep = data_cmds.add_parser("prepare", help="decode one data source, or several merged, "
                                "once into a uint8 cache")
    prep.add_argument("--source", required=True, choices=list(SOURCES), action="append",
                      help="repeatable: several sources go into one cache, each image keeping "
                      "its source")
    prep.add_argument("--root", type=Path, action="append", help="data set root, one after "
                      "each --source that reads files (phantoms take none)")
    prep.add_argument("--size", type=int, default=256, help="side of the square images")
    prep.add_argument("--out", type=Path, required=True, help="cache folder to write")
    prep.add_argument("--workers", type=int, default=None, help="decoding processes")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of train/val patients drawn for validation")
    prep.add_argument("--test-fraction", type=float, help="share of the patients drawn for "
                      "test where a source draws one (folder: only where the root has no test "
                      "images, default 0.2; covid19_radiography: default 0.1)")
    prep.add_argument("--split-lists", type=Path, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                      help="chestxray14: the splits of these lists (Xiao et al.'s "
                      "train_official.txt val_official.txt test_official.txt format) instead "
                      "of the drawn validation")
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
    run.add_argument("--chapters", nargs="+",
                     help="chapter numbers or names, by spaces or commas (default: all)")
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
    # Left out, a recipe option is absent from args (SUPPRESS): _Settings then reads the profile
    unset = {"default": argparse.SUPPRESS}
    mae.add_argument("--profile", default="cpu", help="profile name or YAML path")
    mae.add_argument("--data", type=Path, required=True, help="a cache from `cxr data prepare`")
    mae.add_argument("--runs", type=Path, help="runs folder (default build/<profile>/runs)")
    mae.add_argument("--model", help="vit_tiny_patch16, vit_small_patch16 or vit_base_patch16",
                     **unset)
    mae.add_argument("--image-size", type=int, **unset)
    mae.add_argument("--patch-size", type=int, **unset)
    mae.add_argument("--decoder-dim", type=int, **unset)
    mae.add_argument("--decoder-depth", type=int, **unset)
    mae.add_argument("--decoder-heads", type=int, **unset)
    mae.add_argument("--in-chans", type=int, choices=[1, 3], help="3: the gray image "
                     "replicated to RGB, as the papers feed it (default: the profile's, else 1)",
                     **unset)
    mae.add_argument("--init-weights", type=Path, help="continue from these MAE or ViT weights "
                     "(e.g. a released MAE: its decoder kept, other channel counts adapted)")
    mae.add_argument("--mask-ratio", type=float, help="share of the patches masked (default: "
                     "the profile's, else the X-ray MAE paper's)", **unset)
    mae.add_argument("--crop-scale", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     help="area fractions of the random crop (default: the profile's, else "
                     "the X-ray MAE paper's)", **unset)
    mae.add_argument("--epochs", type=int, **unset)
    mae.add_argument("--warmup-epochs", type=float, **unset)
    mae.add_argument("--batch-size", type=int, help="global batch (all GPUs together)", **unset)
    mae.add_argument("--base-lr", type=float, help="lr = base_lr x batch_size / 256", **unset)
    mae.add_argument("--save", type=Path, help="also write the encoder here (timm ViT keys)")
    mae.add_argument("--force", action="store_true", help="train again even if finished")
    _add_engine_arguments(mae)
    mae.set_defaults(func=_pretrain_mae)
    moco = pretrain_cmds.add_parser(
        "moco", help="MoCo v2 pre-training of a CNN (chapter 3); unset options come from the "
        "profile's 03_moco_baselines section, else MoCo v2's defaults")
    moco.add_argument("--profile", default="cpu", help="profile name or YAML path")
    moco.add_argument("--data", type=Path, required=True, help="a cache from `cxr data prepare`")
    moco.add_argument("--monitor-data", type=Path,
                      help="a cache whose labels the kNN monitor reads (default: --data), for a "
                      "pool of several sources pre-trained together")
    moco.add_argument("--runs", type=Path, help="runs folder (default build/<profile>/runs)")
    moco.add_argument("--model", help="a timm backbone, e.g. densenet121 or resnet50 (default: "
                      "the first of the profile's models)", **unset)
    moco.add_argument("--image-size", type=int, **unset)
    moco.add_argument("--epochs", type=int, **unset)
    moco.add_argument("--warmup-epochs", type=float, **unset)
    moco.add_argument("--batch-size", type=int, help="global batch (all GPUs together)",
                      **unset)
    moco.add_argument("--base-lr", type=float, help="lr = base_lr x batch_size / 256", **unset)
    moco.add_argument("--queue-size", type=int, help="negative keys kept (MoCo: 65536)",
                      **unset)
    moco.add_argument("--momentum", type=float, help="of the key encoder (MoCo: 0.999)",
                      **unset)
    moco.add_argument("--temperature", type=float, help="of the InfoNCE softmax (MoCo v2: 0.2)",
                      **unset)
    moco.add_argument("--hidden-dim", type=int, help="width of the projection head (default: "
                      "the backbone's feature width, as MoCo's code)", **unset)
    moco.add_argument("--in-chans", type=int, choices=[1, 3],
                      help="3: the gray image replicated to RGB, as the papers feed it", **unset)
    moco.add_argument("--bn-splits", type=int, help="batch-norm groups of the global batch (8)",
                      **unset)
    moco.add_argument("--knn-k", type=int, help="neighbours of the kNN monitor (20)", **unset)
    moco.add_argument("--knn-every", type=int, help="epochs between kNN evaluations (1)",
                      **unset)
    moco.add_argument("--knn-images", type=int, help="images per split in the kNN monitor",
                      **unset)
    moco.add_argument("--save", type=Path, help="also write the backbone here (timm keys)")
    moco.add_argument("--force", action="store_true", help="train again even if finished")
    _add_engine_arguments(moco)
    moco.set_defaults(func=_pretrain_moco)
    add_finetune_commands(groups)
    add_evaluate_command(groups)
    add_probe_command(groups)
    bench = groups.add_parser(
        "bench", help="images/s of the papers' PNG + torchvision pipeline, the study's engine "
        "and the model step alone, with FLOPs, share of peak and memory (book/performance.md)")
    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if "threads" in vars(args):  # before any work: torch's default may crawl (device.py)
            from cxr_lib.device import use_threads

            print(f"threads: {use_threads(args.threads)}", flush=True)
        args.func(args)
    except Exception as err:  # a clear one-line message on the command line, not a traceback
        from cxr_lib.book.runner import BookError
        from cxr_lib.engine.config import TrainingDiverged
        from cxr_lib.models.classifier import WeightsUnavailable

        # The library raises ValueError (DataError, ProfileError and ReportError among them)
        # for settings, files and data it refuses, with a message written for the user.
        if isinstance(err, (ValueError, BookError, TrainingDiverged, WeightsUnavailable,
                            FileNotFoundError)):
            frame = traceback.extract_tb(err.__traceback__)[-1]
            sys.exit(f"cxr: error: {err} ({type(err).__name__} at "
                     f"{Path(frame.filename).name}:{frame.lineno})")
        raise


if __name__ == "__main__":
    main()
