
import pytest
import torch
from fastai.torch_core import default_device, defaults
from samples import sample

from cxr_lib.chapters.setup import (
    ChapterClock,
    chapter_cache,
    chapter_dataset,
    image_noun,
    images_used,
    ran_on,
)
from cxr_lib.device import resolve_device


def test_resolve_device_names_the_device_and_refuses_a_missing_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_auto_after_cpu_takes_the_gpu_again_when_there_is_one():
    """fastai keeps the device process-wide: 'cpu' must not stick to a later 'auto'."""
    resolve_device("cpu")
    assert defaults.use_cuda is False and default_device() == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    assert resolve_device("auto") == expected == default_device()
    assert defaults.use_cuda is None


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_numbered_gpu_becomes_the_one_fastai_trains_on():
    assert resolve_device("cuda:1") == torch.device("cuda", 1) == default_device()
    torch.cuda.set_device(0)


def test_chapters_draw_phantoms_without_a_data_root_and_share_one_cache(tmp_path):
    dataset = chapter_dataset(None, n_phantoms=24, phantom_size=32, seed=1)
    assert dataset.name == "phantom" and len(dataset) == 24
    first = chapter_cache(tmp_path, dataset, 32)
    again = chapter_cache(tmp_path, chapter_dataset(None, n_phantoms=24, phantom_size=32, seed=1),
                          32)
    assert first.path == again.path == tmp_path / "cache" / "phantom-32"
    assert (first.images[:] == again.images[:]).all()


def test_chapters_read_the_real_sample_when_a_data_root_is_given():
    root = sample("nih-cxr14-sample")
    dataset = chapter_dataset(root, n_phantoms=10, phantom_size=32)
    assert dataset.name == "chestxray14" and len(dataset) == 621


def test_a_chapter_says_which_images_it_ran_on(tmp_path):
    phantoms = chapter_cache(tmp_path, chapter_dataset(None, n_phantoms=6, phantom_size=32), 16)
    assert images_used(phantoms, None) == (
        "6 synthetic chest phantoms, cached at 16 px — drawn, not X-rays")
    nih = sample("nih-cxr14-sample")
    real = chapter_cache(tmp_path, chapter_dataset(nih, n_phantoms=6, phantom_size=32), 16)
    assert images_used(real, nih) == (
        f"{len(real):,} NIH ChestX-ray14, adult chest X-rays (the samples shipped with the "
        "project), cached at 16 px")
    assert images_used(real, tmp_path).endswith("adult chest X-rays, cached at 16 px")


def test_an_empty_cache_has_no_images_to_name(tmp_path, monkeypatch):
    cache = chapter_cache(tmp_path, chapter_dataset(None, n_phantoms=6, phantom_size=32), 16)
    monkeypatch.setattr(cache, "index", cache.index.iloc[:0])
    with pytest.raises(ValueError, match="holds no images"):
        images_used(cache)


def test_a_chapter_says_how_long_it_ran_and_on_what(monkeypatch):
    clock = ChapterClock()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    words = clock.words(torch.device("cpu"))
    assert words["ran_on"] == "the CPU (1 thread)" and words["run_time"].endswith(" s")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert ran_on(torch.device("cpu")) == "the CPU (2 threads)"
    clock.started -= 125
    assert clock.words(torch.device("cpu"))["run_time"] == "2 min 05 s"


def test_a_figure_calls_phantoms_phantoms(tmp_path, monkeypatch):
    cache = chapter_cache(tmp_path, chapter_dataset(None, n_phantoms=6, phantom_size=32), 16)
    assert image_noun(cache) == "phantom"
    real = cache.index.assign(source="chestxray14")
    monkeypatch.setattr(cache, "index", real)
    assert image_noun(cache) == "X-ray"
    monkeypatch.setattr(cache, "index", real.assign(source=["chestxray14", "phantom"] * 3))
    assert image_noun(cache) == "image"
