"""The training commands as a user runs them: progress bars on, a real kill -9 and the same
command again, a blow-up, and arguments that must be refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from cxr_lib.cli import main
from cxr_lib.engine import runs
from cxr_lib.engine.config import DivergedWarning

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
# ViT-tiny/8 at 32 px on 25 training phantoms, batch 4: 6 steps an epoch
MAE = ["pretrain", "mae", "--profile", "smoke", "--image-size", "32", "--patch-size", "8",
       "--batch-size", "4", "--warmup-epochs", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "ph32"
    main(["data", "prepare", "--source", "phantom", "--count", "40", "--size", "32",
          "--out", str(out), "--workers", "1"])
    return out


def _cxr(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-exact resume needs the same threads
    return subprocess.Popen([sys.executable, "-m", "cxr_lib.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def _final_weights(root) -> dict:
    (run,) = root.glob("mae-*")
    assert runs.is_finished(run)
    return torch.load(run / runs.CHECKPOINT, weights_only=True)["model"]


def test_kill_9_then_the_same_command_resumes_to_the_same_weights(phantoms, tmp_path):
    command = [*MAE, "--data", str(phantoms), "--epochs", "10", "--checkpoint-every", "5"]
    killed = tmp_path / "killed"
    proc = _cxr(*command, "--runs", str(killed))
    deadline = time.monotonic() + 240
    while not list(killed.glob("mae-*/last.pt")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = killed.glob("mae-*")
    assert not runs.is_finished(run)  # killed mid-run, after its first checkpoint
    step = torch.load(run / runs.CHECKPOINT, weights_only=True)["state"]["step"]
    assert 0 < step < 60

    rerun = _cxr(*command, "--runs", str(killed))
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    assert f"trained {run}" in output and "Epoch 10/10" in output  # with its progress bars
    assert "Traceback" not in output

    main([*command, "--runs", str(tmp_path / "whole")])  # uninterrupted, one thread too
    resumed, reference = _final_weights(killed), _final_weights(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name, weights in reference.items():
        assert torch.equal(resumed[name], weights), name


def test_a_blow_up_ends_the_command_with_its_note_said_once(phantoms, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit, match=r"^cxr: error: the run diverged: its train loss "
                           r"rose from .* --base-lr"):
            # a rate that makes the loss rise yet stay finite (under torch 2.14 a rate of 600
            # reached NaN in the third epoch, the other way a run ends; 60 to 200 rise)
            main([*MAE, "--data", str(phantoms), "--epochs", "3", "--base-lr", "100",
                  "--runs", str(tmp_path)])
    assert not [w for w in seen if issubclass(w.category, DivergedWarning)]  # only the error
    assert "diverged" not in capsys.readouterr().err
    (run,) = tmp_path.glob("mae-*")
    assert runs.read_metrics(run)["status"] == "diverged"


@pytest.mark.parametrize("option, message", [
    (["--batch-size", "100000"], r"training images \(25\) do not fill one batch of 100000"),
    (["--crop-scale", "1.0", "0.5"], r"crop scale \(1, 0.5\) must be two area fractions"),
    (["--crop-scale", "0", "1"], r"crop scale \(0, 1\)"),
])
def test_settings_that_train_nothing_are_refused_before_any_run_folder(phantoms, tmp_path,
                                                                       option, message):
    with pytest.raises(SystemExit, match=r"^cxr: error: .*" + message):
        main([*MAE, "--data", str(phantoms), "--epochs", "1", "--runs", str(tmp_path / "runs"),
              *option])
    assert not (tmp_path / "runs").exists()


def test_a_truncated_checkpoint_of_a_finished_run_is_named(phantoms, tmp_path):
    command = [*MAE, "--data", str(phantoms), "--epochs", "1", "--runs", str(tmp_path)]
    main(command)
    (run,) = tmp_path.glob("mae-*")
    data = (run / runs.CHECKPOINT).read_bytes()
    (run / runs.CHECKPOINT).write_bytes(data[:len(data) // 3])
    with pytest.raises(SystemExit, match=rf"^cxr: error: {run}/last.pt: unreadable checkpoint"):
        main(command)


def test_seed_names_the_run_and_threads_do_not(phantoms, tmp_path, capsys):
    """--seed is part of the run's identity; --threads changes how, not what: the same run."""
    command = [*MAE, "--data", str(phantoms), "--epochs", "1", "--runs", str(tmp_path)]
    try:
        main([*command, "--seed", "3", "--threads", "2"])
        first = capsys.readouterr().out
        assert first.splitlines()[0] == "threads: 2" and torch.get_num_threads() == 2
        (run,) = tmp_path.glob("mae-*")
        assert json.loads((run / runs.CONFIG).read_text())["seed"] == 3
        main([*command, "--seed", "3", "--threads", "1"])
        again = capsys.readouterr().out
        assert again.splitlines()[0] == "threads: 1" and torch.get_num_threads() == 1
        assert f"loaded the finished run {run}" in again
        main([*command, "--seed", "4", "--threads", "1"])
        assert len(list(tmp_path.glob("mae-*"))) == 2  # another seed, another run
    finally:
        torch.set_num_threads(1)


def _probe_numbers(output: str) -> dict[str, float]:
    """{"val": mean AUC, "test": mean AUC} as `cxr probe` prints them."""
    return {line.split()[0]: float(line.split()[3]) for line in output.splitlines()
            if " mean AUC " in line}


def test_probe_scores_a_saved_encoder_as_the_trained_model_scores(phantoms, tmp_path, capsys):
    """`cxr probe` reads the file `--save` wrote: the AUCs of the encoder in memory, on the
    val and the test split, and a label share that fits on fewer patients."""
    from cxr_lib.cli import _mae_recipe_and_config, build_parser
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.mae import pretrain_mae
    from cxr_lib.methods.probe import mae_features, probe_cache

    saved = tmp_path / "encoder.pt"
    command = [*MAE, "--data", str(phantoms), "--epochs", "1", "--runs", str(tmp_path / "runs")]
    main([*command, "--save", str(saved), "--threads", "1"])
    capsys.readouterr()
    main(["probe", "--encoder", str(saved), "--data", str(phantoms), "--threads", "1"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "threads: 1" and lines[1].startswith(f"{saved} (MAE): linear probe")
    cache = open_cache(phantoms)
    train = cache.index.iloc[cache.split_indices("train")]
    assert f"fitted on {len(train)} train images of {train['patient'].nunique()} patients" in out
    _, recipe, config = _mae_recipe_and_config(build_parser().parse_args(command))
    pretrained = pretrain_mae(cache, recipe, config, tmp_path / "runs")
    assert pretrained.run.loaded_from_cache
    expected = probe_cache(mae_features(pretrained.mae), pretrained.augment.plain, cache,
                           cache.split_indices("train"), ("val", "test"))
    printed = _probe_numbers(out)
    assert printed == {s: round(expected[s].mean_auc, 4) for s in ("val", "test")}
    assert "per-finding AUC (%)" in out
    for finding, auc in expected["test"].per_finding.items():
        assert any(line.split()[0] == finding and float(line.split()[-1]) == round(auc * 100, 2)
                   for line in lines), finding

    main(["probe", "--encoder", str(saved), "--data", str(phantoms), "--threads", "1",
          "--train-fraction", "0.5", "--seed", "1"])
    half = capsys.readouterr().out
    patients = round(0.5 * train["patient"].nunique())
    assert f"images of {patients} patients (train fraction 0.5, seed 1)" in half


def test_probe_reads_a_saved_moco_backbone(phantoms, tmp_path, capsys):
    from cxr_lib.cli import _moco_recipe_and_config, build_parser
    from cxr_lib.data.cache import open_cache
    from cxr_lib.methods.moco import pretrain_moco
    from cxr_lib.methods.probe import probe_cache

    saved = tmp_path / "backbone.pt"
    command = ["pretrain", "moco", "--profile", "smoke", "--model", "resnet18", "--data",
               str(phantoms), "--batch-size", "8", "--queue-size", "16", "--runs",
               str(tmp_path / "runs")]
    main([*command, "--save", str(saved), "--threads", "1"])
    capsys.readouterr()
    main(["probe", "--encoder", str(saved), "--data", str(phantoms), "--threads", "1"])
    out = capsys.readouterr().out
    assert f"{saved} (MoCo resnet18): linear probe" in out
    cache = open_cache(phantoms)
    _, recipe, config, knn = _moco_recipe_and_config(build_parser().parse_args(command))
    pretrained = pretrain_moco(cache, recipe, config, tmp_path / "runs", knn=knn)
    assert pretrained.run.loaded_from_cache
    expected = probe_cache(pretrained.moco.encoder_q, pretrained.augment.plain, cache,
                           cache.split_indices("train"), ("val", "test"))
    assert _probe_numbers(out) == {s: round(expected[s].mean_auc, 4) for s in ("val", "test")}


def test_probe_refuses_what_is_not_a_saved_encoder(phantoms, tmp_path):
    probe = ["probe", "--data", str(phantoms), "--threads", "1", "--encoder"]
    with pytest.raises(SystemExit, match=r"^cxr: error: .*absent\.pt: weights file not found"):
        main([*probe, str(tmp_path / "absent.pt")])
    bare = tmp_path / "bare.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, bare)
    with pytest.raises(SystemExit, match=r"^cxr: error: .*bare\.pt: not an encoder file of "
                                         r"`save_encoder`"):
        main([*probe, str(bare)])
    with pytest.raises(SystemExit, match=r"^cxr: error: train_fraction must lie in \(0, 1\], "
                                         r"got 0\.0"):
        main([*probe, str(bare), "--train-fraction", "0"])
