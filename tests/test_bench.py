"""`cxr bench` on a CPU with tiny stand-in models: every task runs its three pipelines and the
table and JSON report every field (not the speed); the tables of a saved report and the goals
checked in them; FLOP counting, the phantom PNGs and the peak table. Then the engine's
fast-path options: torch.compile with its fallback to eager, channels-last CNNs, the fused
optimizer's construction, and the operational settings.
"""

import argparse
import copy
import json
import re
import subprocess
import sys
from functools import partial

import fastai.torch_core
import numpy as np
import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from cxr_lib.bench import run as bench
from cxr_lib.bench.options import TASK_NAMES, BenchSettings, add_bench_arguments
from cxr_lib.bench.run import (
    TASKS,
    count_flops,
    main_bench,
    peak_tflops,
    png_files,
    run_bench,
    write_phantom_pngs,
)
from cxr_lib.bench.tables import (
    GOALS,
    PIPELINES,
    ReportError,
    format_markdown,
    format_table,
    goal_rows,
    goals_unchecked,
    read_report,
)
from cxr_lib.book.profiles import repo_root
from cxr_lib.cli import main
from cxr_lib.data.core import DataError
from cxr_lib.engine import runs
from cxr_lib.engine.config import TrainConfig
from cxr_lib.engine.fastpath import cnn_fast_path, cudnn_benchmark
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import masked_bce_loss
from cxr_lib.engine.schedule import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
COLUMNS = ("task", "pipeline", "img/s", "vs reference", "of step", "GFLOP/img", "TFLOP/s",
           "% of peak", "peak GiB", "syncs/step")
FIELDS = ("images_per_s", "seconds", "peak_memory_gib", "syncs_per_step", "speedup_vs_reference",
          "fraction_of_step", "tflops", "peak_fraction")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """`cxr bench` through its command-line entry: every task, tiny, 2 PNGs of 96 px."""
    work = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--device", "cpu", "--batch-size", "4", "--steps", "2",
                              "--warmup", "1", "--image-size", "64", "--png-size", "96",
                              "--png-count", "2", "--workers", "1", "--tiny",
                              "--work-dir", str(work / "work"), "--json", str(work / "b.json")])
    results = main_bench(args)
    return results, json.loads((work / "b.json").read_text()), work


def test_bench_runs_every_task_and_reports_every_field(bench_run):
    results, report, work = bench_run
    assert [r.task for r in results] == list(TASKS)
    assert report["settings"]["tiny"] is True and report["settings"]["batch_size"] == 4
    assert [t["task"] for t in report["tasks"]] == list(TASKS)
    for r, entry in zip(results, report["tasks"], strict=True):
        assert r.flops_per_image > 0 and entry["flops_per_image"] == r.flops_per_image
        assert r.device == "cpu" and r.peak_tflops is None
        assert set(entry["pipelines"]) == set(PIPELINES)
        for name, p in entry["pipelines"].items():
            assert set(FIELDS) <= set(p), name
            assert p["images_per_s"] > 0 and p["seconds"] > 0 and p["tflops"] > 0
            assert p["peak_fraction"] is None and p["peak_memory_gib"] is None  # CPU: n/a
            assert p["syncs_per_step"] is None
            assert p["tflops"] == pytest.approx(r.flops_per_image * p["images_per_s"] / 1e12)
        ref, step = entry["pipelines"]["reference"], entry["pipelines"]["step"]
        assert ref["speedup_vs_reference"] == 1.0 and step["fraction_of_step"] == 1.0
        ours = entry["pipelines"]["ours"]
        assert ours["speedup_vs_reference"] == pytest.approx(
            ours["images_per_s"] / ref["images_per_s"])
        assert any("cache of 12 images at 73 px" in note for note in r.notes)  # 4 x 3 rows


def test_the_cxr_command_starts_without_the_training_stack():
    """`cxr --help`, every other command and the tables of a saved report import no torch
    (it took 7 s to import on 2 cores when `cxr` loaded the bench for its options)."""
    code = ("import sys; import cxr_lib.cli, cxr_lib.bench.tables; "
            "cxr_lib.cli.build_parser().parse_args(['bench', '--tiny']); "
            "print(sorted({'torch', 'fastai', 'timm'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert tuple(TASKS) == TASK_NAMES  # the options' task names are the bench's tasks


def test_bench_table_has_a_row_per_task_and_pipeline(bench_run):
    results, report, _ = bench_run
    table = format_table(report)
    assert table == format_table(bench.bench_report(results, BenchSettings(**report["settings"])))
    lines = table.splitlines()
    assert all(col in lines[0] for col in COLUMNS)
    rows = [line.split() for line in lines[1:1 + 3 * len(TASKS)]]
    assert [(row[0], row[1]) for row in rows] == [(t, p) for t in TASKS for p in PIPELINES]
    assert all(row[-3:] == ["n/a", "n/a", "n/a"] for row in rows)  # peak share, memory, syncs
    assert re.search(r"^device: cpu \(no listed peak\); batch 4, 64 px, 2 timed steps after 1, "
                     r"phantom PNGs of 96 px, reference on 1 data-loader worker; torch \S+$",
                     table, re.MULTILINE)
    assert ("goals (one H100, 224 px, the default models): not checked: tiny stand-in models"
            in table)


def _as_if_on(report, device, **ours):
    """The report with its device renamed, the default settings, and "ours" measuring `ours`
    per task (a dict of fields) for checking the goals."""
    out = copy.deepcopy(report)
    out["settings"].update(tiny=False, image_size=224)
    for t in out["tasks"]:
        t["device"] = device
        t["pipelines"]["ours"].update(ours.get(t["task"], {}))
    return out


def test_goals_are_checked_on_an_h100_at_the_default_settings(bench_run):
    _, report, _ = bench_run
    cpu_rows = goal_rows(report)
    assert [(r["task"], r["met"]) for r in cpu_rows] == [(g.task, "n/a") for g in GOALS]
    assert len(cpu_rows) == 2 * len(TASKS)  # a speed or speed-up, and the share of the step
    assert [r["task"] for r in cpu_rows] == [t for t in TASK_NAMES for _ in range(2)]
    on_h100 = _as_if_on(
        report, "NVIDIA H100 80GB HBM3",
        mae_vit_s={"images_per_s": 12_000.0, "fraction_of_step": 0.95},
        mae_vit_s_8b={"images_per_s": 5_499.0, "fraction_of_step": 0.9},
        finetune_vit_s={"images_per_s": 4_000.0, "fraction_of_step": 0.89},
        finetune_densenet121={"images_per_s": 2_500.0, "fraction_of_step": 1.0},
        moco_densenet121={"speedup_vs_reference": 3.2, "fraction_of_step": 0.97})
    assert goals_unchecked(on_h100) is None
    met = {(r["task"], r["goal for ours"]): (r["measured"], r["met"])
           for r in goal_rows(on_h100)}
    assert met[("mae_vit_s", "at least 10,000 img/s (aim 14,000 img/s)")] == ("12,000 img/s",
                                                                              "yes")
    assert met[("mae_vit_s_8b", "at least 5,500 img/s")] == ("5,499 img/s", "no")
    assert met[("finetune_vit_s", "at least 4,000 img/s")] == ("4,000 img/s", "yes")
    assert met[("finetune_vit_s", "at least 90% of the step alone")] == (
        "89% of the step alone", "no")
    assert met[("moco_densenet121", "at least 3.00x the reference")] == (
        "3.20x the reference", "yes")
    assert "goals (one H100, 224 px, the default models): checked" in format_table(on_h100)
    assert goals_unchecked(_as_if_on(report, "NVIDIA H200")) is None
    assert goals_unchecked(_as_if_on(report, "NVIDIA A100-SXM4-80GB")) == (
        "NVIDIA A100-SXM4-80GB, not an H100")
    smaller = _as_if_on(report, "NVIDIA H100 80GB HBM3")
    smaller["settings"]["image_size"] = 64
    assert goals_unchecked(smaller) == "64 px, not 224"
    smaller["settings"].update(image_size=224, model="vit_base_patch16")
    assert goals_unchecked(smaller) == "another model (vit_base_patch16)"


def test_markdown_tables_for_the_performance_page(bench_run):
    _, report, _ = bench_run
    page = format_markdown(report)
    assert page.startswith("Device: cpu (no listed peak); batch 4, 64 px")
    blocks = [b.splitlines() for b in page.split("\n\n") if b.startswith("|")]
    assert [len(b) for b in blocks] == [2 + 3 * len(TASKS), 2 + len(GOALS)]  # header, rule
    for block in blocks:
        cells = [line.count("|") for line in block]
        assert len(set(cells)) == 1 and block[1].startswith("| --- |")
    assert blocks[0][0] == "| " + " | ".join(COLUMNS) + " |"
    assert "Goals (one H100, 224 px, the default models): not checked" in page
    assert any(line.startswith("- mae_vit_s: tiny stand-in model") for line in
               page.splitlines())


def test_cxr_bench_prints_the_tables_of_a_saved_report(bench_run, tmp_path, capsys):
    _, report, work = bench_run
    main(["bench", "--report", str(work / "b.json")])
    assert capsys.readouterr().out == format_table(report) + "\n"
    main(["bench", "--report", str(work / "b.json"), "--markdown"])
    assert capsys.readouterr().out == format_markdown(report) + "\n"
    assert read_report(work / "b.json") == report


def test_a_file_that_is_not_a_bench_report_is_refused(bench_run, tmp_path):
    _, report, _ = bench_run
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match=r"^cxr: error: .*bad.json: not JSON"):
        main(["bench", "--report", str(bad)])
    bad.write_text(json.dumps({"tasks": []}))
    with pytest.raises(ReportError, match="not a cxr bench report"):
        read_report(bad)
    other = copy.deepcopy(report)
    other["tasks"][0]["task"] = "mae_vit_b"
    bad.write_text(json.dumps(other))
    with pytest.raises(ReportError, match="task 'mae_vit_b' is not a cxr bench task"):
        read_report(bad)
    with pytest.raises(SystemExit, match="cxr: error: .*missing.json"):
        main(["bench", "--report", str(tmp_path / "missing.json")])


def test_bench_writes_png_files_and_reuses_its_cache(bench_run):
    _, report, work = bench_run
    pngs = sorted((work / "work" / "png-96px").glob("*.png"))
    assert len(pngs) == 2
    caches = [p for p in (work / "work").glob("cache-73px-12-*") if p.is_dir()]  # not .lock
    assert len(caches) == 1 and (caches[0] / "meta.json").exists()


def test_a_failing_task_leaves_the_report_of_the_tasks_before_it(tmp_path, monkeypatch):
    real = bench.bench_task

    def second_fails(task, *args):
        if task.name == "mae_vit_s":
            raise RuntimeError("CUDA out of memory")
        return real(task, *args)

    monkeypatch.setattr(bench, "bench_task", second_fails)
    settings = BenchSettings(device="cpu", tiny=True, batch_size=4, steps=2, warmup=1,
                             image_size=64, png_size=96, png_count=2, workers=1,
                             work_dir=tmp_path / "work")
    lines = []
    with pytest.raises(RuntimeError, match="out of memory"):
        run_bench(["finetune_densenet121", "mae_vit_s"], settings, json_out=tmp_path / "b.json",
                  log=lines.append)
    report = json.loads((tmp_path / "b.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["finetune_densenet121"]
    assert re.fullmatch(r"bench: finetune_densenet121: reference [\d,]+ img/s, "
                        r"ours [\d,]+ img/s, step [\d,]+ img/s", lines[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "work"]  # no temp file


def test_the_performance_page_states_the_goals_and_shows_every_saved_report():
    page = (repo_root() / "book" / "performance.md").read_text()
    for goal in GOALS:
        if goal.measure != "fraction_of_step":
            assert f"| `{goal.task}` | {goal.text} |" in page
    assert {g.bar for g in GOALS if g.measure == "fraction_of_step"} == {0.9}
    assert "| every task | at least 90% of the step alone:" in page
    results = page.split("\n## Results\n")[1]
    reports = sorted((repo_root() / "book" / "bench").glob("*.json"))
    for path in reports:  # the page's tables are `cxr bench --report PATH --markdown`
        assert format_markdown(read_report(path)) in results, path.name
    if not reports:
        assert results.startswith("\nNo GPU run has been made yet, so no goal has been checked.")


# ----------------------------------------------------------------------------- pieces

def test_flops_of_a_linear_layer_by_hand():
    layer, x = nn.Linear(8, 4), torch.randn(3, 8)
    assert count_flops(lambda: layer(x)) == 2 * 3 * 8 * 4  # 3 rows x 4 outputs x 8 mul-adds
    # backward: the weight's gradient is one more product of the same size (x needs none)
    assert count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * 3 * 8 * 4)
    x.requires_grad_(True)  # and the input's gradient a third
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * (2 * 3 * 8 * 4)


def test_phantom_pngs_are_real_1024_px_pngs(tmp_path):
    (path,) = write_phantom_pngs(tmp_path, 1)
    with Image.open(path) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (1024, 1024))
        assert len(np.unique(np.asarray(img))) > 50  # an image, not a flat square


def test_phantom_pngs_at_another_size_are_kept_between_runs(tmp_path):
    paths = write_phantom_pngs(tmp_path, 3, size=48, workers=2)
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = write_phantom_pngs(tmp_path, 3, size=48)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == stamps
    for p in paths:
        with Image.open(p) as img:
            assert img.size == (48, 48)
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_real_pngs_are_taken_from_png_dir(tmp_path):
    for name in ("b.png", "a.png"):
        Image.new("L", (20, 20), 7).save(tmp_path / name)
    found = png_files(BenchSettings(png_dir=tmp_path), tmp_path / "work")
    assert [p.name for p in found] == ["a.png", "b.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"{empty}: no .png files"):
        png_files(BenchSettings(png_dir=empty), tmp_path / "work")


def test_an_unreadable_png_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    files = bench.PngFiles([bad], np.zeros((1, 14), np.float32), lambda img: img)
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        files[0]


def test_peak_table_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None and peak_tflops("NVIDIA GeForce RTX 3090") is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown bench tasks"):
        run_bench(["mae_vit_b"], BenchSettings(device="cpu"))
    with pytest.raises(ValueError, match="BenchSettings.steps must be at least 1"):
        BenchSettings(steps=0).check()
    with pytest.raises(ValueError, match="cache_size 100 is smaller than image_size 224"):
        BenchSettings(cache_size=100).check()


# ----------------------------------------------------------------------------- engine fast path

def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 1, 6, 6), generator=g, dtype=torch.uint8)  # [N, 1, 6, 6]
    y = (x.float().mean((1, 2, 3))[:, None] > torch.tensor([120.0, 136.0])).float()  # [N, 2]
    return DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 2))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _fit(model, root, cbs=(), channels=1, **config):
    cfg = TrainConfig(epochs=2, batch_size=6, base_lr=0.5, **config)
    return fit(model, _loaders(), None, cfg, root, "fast", loss_func=masked_bce_loss,
               batch_tfm=lambda x: x.float().repeat(1, channels, 1, 1) / 255, cbs=list(cbs),
               progress=False)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


class _Unavailable(nn.Module):
    """What a broken compiler gives: a module that fails at its first call."""

    def forward(self, *args):
        raise RuntimeError("no C++ compiler found")


def test_failed_compile_falls_back_to_eager_and_trains_the_same_weights(tmp_path, monkeypatch):
    eager = _mlp()
    _fit(eager, tmp_path / "eager")
    monkeypatch.setattr(torch, "compile", lambda model, **kw: _Unavailable())
    fallback = _mlp()
    with pytest.warns(UserWarning, match="torch.compile failed, training eagerly"):
        res = _fit(fallback, tmp_path / "compiled", compile=True)
    assert res.metrics["compile"] == "RuntimeError: no C++ compiler found"
    assert _same(fallback, eager)  # the trial ran on a copy, under a forked RNG


def test_compiled_training_saves_plain_checkpoints(tmp_path, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", partial(real_compile, backend="eager"))  # dynamo only
    model = _mlp()
    res = _fit(model, tmp_path, compile=True)
    reference = _mlp()
    _fit(reference, tmp_path / "eager")
    assert res.metrics["compile"] == "compiled"
    ckpt = torch.load(res.path / runs.CHECKPOINT, weights_only=True)
    assert list(ckpt["model"]) == list(_mlp().state_dict())  # no `_orig_mod.` prefix
    for name, weights in reference.state_dict().items():
        assert torch.allclose(model.state_dict()[name], weights, atol=1e-6), name
    assert type(model) is nn.Sequential  # the caller's model is not left wrapped


class _Layout(Callback):
    order = 50  # after the engine's input callback (5)

    def before_batch(self):
        self.seen = self.learn.xb[0].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_cnn(tmp_path, monkeypatch):
    # the engine trains on fastai's default device: keep it on the CPU on a GPU machine too
    monkeypatch.setattr(fastai.torch_core.defaults, "use_cuda", False)
    model, layout = _cnn(), _Layout()
    _fit(model, tmp_path / "on", [layout], channels=3, channels_last=True)
    assert layout.seen
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    auto, layout = _cnn(), _Layout()
    _fit(auto, tmp_path / "auto", [layout], channels=3)  # auto: CUDA only
    assert not layout.seen
    cuda = torch.device("cuda")  # the decision only reads the device type
    assert cnn_fast_path(None, _cnn(), cuda) and not cnn_fast_path(None, _mlp(), cuda)
    assert not cnn_fast_path(None, _cnn(), torch.device("cpu"))
    assert cnn_fast_path(True, _mlp(), torch.device("cpu"))


def test_make_optimizer_is_the_engines_and_fused_on_cuda():
    model = _mlp()
    config = TrainConfig(batch_size=512, base_lr=1e-3)
    groups = [{"params": model[1].parameters(), "lr_scale": 0.5},
              {"params": model[4].parameters(), "weight_decay": 0.0}]
    opt = make_optimizer(model, config, torch.device("cpu"), groups)
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3), pytest.approx(2e-3)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.95)
    default = make_optimizer(model, config, torch.device("cpu"))
    assert sorted(g["weight_decay"] for g in default.param_groups) == [0.0, 0.05]
    # On CUDA the fused kernel is chosen (torch also has it for CPU tensors, which this uses).
    fused = make_optimizer(model, TrainConfig(optimizer="sgd"), torch.device("cuda"))
    assert type(fused) is torch.optim.SGD and fused.defaults["fused"]
    assert not make_optimizer(model, config, torch.device("cuda"), fused=False).defaults["fused"]


def test_fast_path_settings_are_operational_and_checked():
    plain = TrainConfig().identity()
    assert TrainConfig(compile=True, channels_last=False, cudnn_benchmark=True).identity() == plain
    assert TrainConfig().nan_check_every > 1  # no host sync every step by default
    with pytest.raises(ValueError, match="TrainConfig.compile must be True or False"):
        TrainConfig(compile="yes").check()
    with pytest.raises(ValueError, match=r"channels_last must be True or False or None"):
        TrainConfig(channels_last="auto").check()


def test_cudnn_benchmark_is_restored_after_the_fit():
    before = torch.backends.cudnn.benchmark
    with cudnn_benchmark(not before):
        assert torch.backends.cudnn.benchmark is (not before)
    assert torch.backends.cudnn.benchmark is before
    with pytest.raises(KeyError), cudnn_benchmark(True):
        raise KeyError("a failing fit")
    assert torch.backends.cudnn.benchmark is before
