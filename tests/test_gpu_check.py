"""The GPU check (.ci/gpu) runs whole on the CPU at its stand-in sizes, so that the one call a
lent GPU allows does not fail on a typo. It runs in a copy of the project (the samples linked),
so its chapter and caches stay out of this checkout's build/."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

from cxr_lib.book.profiles import repo_root

ROOT = repo_root()


def _project_copy(repo):
    ignore = shutil.ignore_patterns("__pycache__", "samples", "chapters")
    for folder in (".ci", "cxr_lib", "notebooks", "profiles", "book", "tests"):
        shutil.copytree(ROOT / folder, repo / folder, ignore=ignore)
    (repo / "cxr_lib" / "data" / "samples").symlink_to(ROOT / "cxr_lib" / "data" / "samples")
    for name in ("_config.yml", "_toc.yml", "pyproject.toml"):
        shutil.copy2(ROOT / name, repo / name)
    return repo


def test_the_gpu_check_runs_every_step_and_brings_back_each_result(tmp_path):
    repo, out = _project_copy(tmp_path / "repo"), tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_TINY": "1",
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(repo / ".ci" / "gpu")], env=env, capture_output=True,
                          text=True, timeout=900)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0 and "== done in" in proc.stdout, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json", "bench.md", "chapters.tar.gz", "chapters.txt", "cuda-tests.txt",
        "device.txt", "log.txt"]  # at most 8 files come back from a device call
    assert "torch " in (out / "device.txt").read_text()
    assert "5 skipped" in (out / "cuda-tests.txt").read_text()  # no CUDA here: all marked
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["png_dir"].endswith("nih-cxr14-fullres/images")
    tasks = {row["task"] for row in report["tasks"]}
    assert tasks == {"mae_vit_s", "mae_vit_s_8b", "finetune_vit_s", "finetune_densenet121",
                     "moco_densenet121"}
    assert "| mae_vit_s | ours |" in (out / "bench.md").read_text()
    number, seconds, status = (out / "chapters.txt").read_text().split()
    assert (number, status) == ("1", "0") and int(seconds) > 0
    with tarfile.open(out / "chapters.tar.gz") as tar:
        assert "chapters/01_data_curation.ipynb" in tar.getnames()
