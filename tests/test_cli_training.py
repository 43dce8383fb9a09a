"""The training commands as a user runs them: progress bars on, a real kill -9 and the same
command again, a blow-up, and arguments that must be refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cxr_lib.cli import main
from cxr_lib.engine import runs

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
    command = [*MAE, "--data", str(phantoms), "--epochs", "20", "--checkpoint-every", "10"]
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
    assert 0 < step < 120

    rerun = _cxr(*command, "--runs", str(killed))
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    assert f"trained {run}" in output and "Epoch 20/20" in output  # with its progress bars
    assert "Traceback" not in output

    main([*command, "--runs", str(tmp_path / "whole")])  # uninterrupted, one thread too
    resumed, reference = _final_weights(killed), _final_weights(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name, weights in reference.items():
        assert torch.equal(resumed[name], weights), name


def test_a_blow_up_ends_the_command_with_its_note(phantoms, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^cxr: error: the run diverged: its train loss rose "
                       r"from .* --base-lr"):
        main([*MAE, "--data", str(phantoms), "--epochs", "3", "--base-lr", "600",
              "--runs", str(tmp_path)])
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
