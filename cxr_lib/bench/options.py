"""What `cxr bench` measures with, and its command-line options: plain Python, no torch, so
that `cxr --help` and every other `cxr` command start without importing the training stack."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

# The tasks of `cxr_lib.bench.run.TASKS`, in their order (the tests check that the two agree).
TASK_NAMES = ("mae_vit_s", "mae_vit_s_8b", "finetune_vit_s", "finetune_densenet121",
              "moco_densenet121")


@dataclass(frozen=True)
class BenchSettings:
    """What `run_bench` measures with; the defaults are the issue's one-H100 comparison."""

    device: str = "auto"  # "auto", "cuda", "cpu"
    batch_size: int = 256
    steps: int = 50  # timed steps
    warmup: int = 10  # untimed steps first (compilation, autotuning, worker start-up)
    image_size: int = 224  # the model's input
    cache_size: int | None = None  # None: image_size x 8/7 (256 px for 224), as the study
    png_dir: Path | None = None  # real PNG files; None: synthetic phantoms are written
    png_size: int = 1024  # side of the phantom PNGs
    png_count: int = 64  # phantom PNGs to write
    workers: int = 16  # the reference's DataLoader workers; also writes PNGs and the cache
    model: str | None = None  # another ViT for the ViT tasks, e.g. vit_base_patch16
    tiny: bool = False  # stand-in models, same code paths: checks that the bench runs (CPU)
    compile: bool = False  # TrainConfig.compile for ours and the step alone
    work_dir: Path | None = None  # PNGs, caches, throwaway runs; None: a temporary folder
    seed: int = 0

    @property
    def cache_px(self) -> int:
        return self.cache_size or round(self.image_size * 8 / 7)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def check(self) -> None:
        for name in ("batch_size", "steps", "warmup", "image_size", "png_size", "png_count"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"BenchSettings.{name} must be at least 1, got "
                                 f"{getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"BenchSettings.workers must be >= 0, got {self.workers}")
        if self.cache_px < self.image_size:
            raise ValueError(f"cache_size {self.cache_px} is smaller than image_size "
                             f"{self.image_size}")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `cxr bench` (defaults: BenchSettings)."""
    d = BenchSettings()
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--device", default=d.device, help="auto, cuda or cpu")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--cache-size", type=int, help="cache side (default image size x 8/7)")
    parser.add_argument("--png-dir", type=Path,
                        help="real PNG files (e.g. the NIH images); default: write phantoms")
    parser.add_argument("--png-size", type=int, default=d.png_size, help="phantom PNG side")
    parser.add_argument("--png-count", type=int, default=d.png_count, help="phantom PNGs")
    parser.add_argument("--workers", type=int, default=d.workers,
                        help="DataLoader workers of the reference pipeline")
    parser.add_argument("--model", help="another ViT for the ViT tasks, e.g. vit_base_patch16")
    parser.add_argument("--tiny", action="store_true",
                        help="stand-in models, same code paths: a quick check that it runs")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the engine's step (and the step alone)")
    parser.add_argument("--work-dir", type=Path,
                        help="keep PNGs and caches here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the JSON report to this file")
    parser.add_argument("--markdown", action="store_true",
                        help="print the tables as Markdown (as on book/performance.md)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="measure nothing: print the tables of a saved JSON report")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The BenchSettings of parsed `cxr bench` options."""
    return BenchSettings(
        device=args.device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
        image_size=args.image_size, cache_size=args.cache_size, png_dir=args.png_dir,
        png_size=args.png_size, png_count=args.png_count, workers=args.workers,
        model=args.model, tiny=args.tiny, compile=args.compile, work_dir=args.work_dir)
