"""The training engine on CPU: schedules, optimisers, exact resume after SIGKILL, the NaN
guard, the run cache, validation AUC with best weights, and refusals of bad input.

Tiny models on tiny in-memory tensors. Run as a script (`python test_train.py ROOT STEP`) this
file is the training process that the resume test kills with SIGKILL after step STEP.
"""

import dataclasses
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from fastai.callback.core import Callback
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, TensorDataset

from cxr_lib.engine import callbacks, runs
from cxr_lib.engine.config import DivergedWarning, TrainConfig, TrainingDiverged, rise_note
from cxr_lib.engine.fit import fit
from cxr_lib.engine.metrics import ValidAUC, masked_bce_loss, mean_auc, model_loss
from cxr_lib.engine.schedule import schedule_at, torch_one_cycle

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
THRESHOLDS = torch.tensor([120.0, 128.0, 136.0])  # three "findings" read off the image


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)  # [N, 1, 6, 6]
    y = (x.float().mean((1, 2, 3))[:, None] > THRESHOLDS).float()  # [N, 3]
    return x, y


def _loaders(n_train: int = 30, batch: int = 6, n_valid: int = 12):
    x, y = _data(n_train + n_valid)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=batch, shuffle=True)
    valid = DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=5)
    return train, valid


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(16, 3))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Noise, a flip and a gain: draws from torch, python and numpy RNGs, all restored."""
    x = x.float() / 255 + 0.05 * torch.randn(x.shape)
    if random.random() < 0.5:
        x = x.flip(-1)
    return x * float(np.random.uniform(0.9, 1.1))


def _fit(model, root, config, train=None, valid=None, cbs=(), **kw):
    if train is None:
        train, valid = _loaders()
    kw.setdefault("loss_func", masked_bce_loss)
    kw.setdefault("batch_tfm", _to_float)
    kw.setdefault("valid_tfm", _to_float)
    return fit(model, train, valid, config, root, "test", cbs=list(cbs), progress=False, **kw)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values(), strict=True))


class _Record(Callback):
    """Test probe: each step's group learning rates and first momentum, as the step sees them."""

    order = 50

    def before_fit(self):
        self.lrs, self.beta1 = [], []
        self.opt_type = type(self.learn.opt.opt)
        self.groups = [{k: v for k, v in g.items() if k != "params"} | {"n": len(g["params"])}
                       for g in self.learn.opt.opt.param_groups]

    def before_step(self):
        groups = self.learn.opt.opt.param_groups
        self.lrs.append([g["lr"] for g in groups])
        self.beta1.append(groups[0]["betas"][0] if "betas" in groups[0] else None)


# ----------------------------------------------------------------------------- schedules

def test_cosine_schedule_with_warmup_and_group_scales(tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=6, base_lr=0.1, warmup_epochs=1, min_lr=1e-4)
    model, rec = _model(), _Record()
    groups = [{"params": model[1].parameters(), "lr_scale": 0.5},
              {"params": model[4].parameters()}]
    train, _ = _loaders(n_train=24)  # 4 steps an epoch
    res = _fit(model, tmp_path, cfg, train, None, [rec], param_groups=groups)
    peak = 0.1 * 6 / 256
    assert cfg.lr == pytest.approx(peak)
    expected = []
    for step in range(12):
        t = step / 4
        lr = (peak * t if t < 1 else
              1e-4 + (peak - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - 1) / 2)))
        expected.append([0.5 * lr, lr])
    np.testing.assert_allclose(rec.lrs, expected, rtol=1e-12, atol=1e-15)
    assert rec.lrs[0] == [0.0, 0.0] and rec.lrs[4][1] == pytest.approx(peak)
    assert res.history["lr"].tolist() == pytest.approx([e[1] for e in expected[3::4]])
    assert res.history["valid_loss"].isna().all()  # no validation set given


def test_one_cycle_schedule(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=6, base_lr=0.1, schedule="one_cycle", pct_start=0.25)
    rec = _Record()
    train, _ = _loaders(n_train=24)  # 8 steps, the peak at step 2
    _fit(_model(), tmp_path, cfg, train, None, [rec])
    lrs = [g[0] for g in rec.lrs]
    assert lrs[0] == pytest.approx(cfg.lr / 25) and lrs[2] == pytest.approx(cfg.lr)
    assert lrs[0] < lrs[1] < lrs[2] and bool(np.all(np.diff(lrs[2:]) < 0))
    assert lrs[-1] < cfg.lr / 10
    assert rec.beta1[0] == pytest.approx(0.95) and rec.beta1[2] == pytest.approx(0.85)
    assert rec.beta1[-1] > 0.9


@pytest.mark.parametrize("epochs, per_epoch", [(2, 4), (3, 7), (1, 1)])
def test_torch_one_cycle_is_torchs_one_cycle_lr_step_by_step(epochs, per_epoch):
    """torch's own scheduler, stepped as a training loop steps it, sets the lr and Adam's beta1
    of every optimizer step: a peak between two steps (at 2 x 4 x 0.3 - 1 = 1.4), and a run of
    a single step."""
    cfg = TrainConfig(epochs=epochs, batch_size=64, base_lr=4e-4, schedule="torch_one_cycle",
                      pct_start=0.3)
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=epochs,
                                                steps_per_epoch=per_epoch)
    for step in range(epochs * per_epoch):
        group = opt.param_groups[0]
        ours = schedule_at(cfg, step, per_epoch)
        assert ours == pytest.approx((group["lr"], group["betas"][0]), rel=1e-12, abs=1e-18)
        opt.step()
        sched.step()


def test_torch_one_cycle_takes_a_rise_ending_at_step_0_as_done():
    """pct_start x total = 1 ends the rise at step 0, where torch divides by zero."""
    assert torch_one_cycle(1.0, 0.25, 0, 4) == (1.0, 0.85)


@pytest.mark.parametrize("name, torch_type", [("adamw", torch.optim.AdamW),
                                              ("adam", torch.optim.Adam),
                                              ("sgd", torch.optim.SGD)])
def test_optimizers_and_weight_decay_groups(tmp_path, name, torch_type):
    rec = _Record()
    train, _ = _loaders(n_train=12)
    _fit(_model(), tmp_path, TrainConfig(optimizer=name, batch_size=6), train, None, [rec])
    assert rec.opt_type is torch_type
    decay = {g["weight_decay"]: g["n"] for g in rec.groups}
    assert decay == {0.0: 2, 0.05: 2}  # biases free of weight decay, weights at 0.05
    if name == "sgd":
        assert {g["momentum"] for g in rec.groups} == {0.9}
    else:
        assert {g["betas"] for g in rec.groups} == {(0.9, 0.95)}


# ----------------------------------------------------------------------------- exact resume

RESUME = TrainConfig(epochs=3, batch_size=6, base_lr=0.5, warmup_epochs=1, checkpoint_every=2,
                     keep_best="valid_auc")


class _KillAt(Callback):
    """Test-only: SIGKILL this process right after optimizer step `kill_step` (and its
    checkpoint, when one falls there)."""

    order = 95

    def __init__(self, kill_step: int) -> None:
        self.kill_step = kill_step

    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


class _Crash(Exception):
    pass


class _CrashAt(_KillAt):
    def after_batch(self):
        if self.learn.training and self.learn.train_iter == self.kill_step:
            raise _Crash(f"crash after step {self.kill_step}")


def _resume_fit(root: Path, cbs=()):
    """3 epochs x 5 shuffled batches, dropout, random augmentation, checkpoints every 2 steps."""
    model = _model()
    res = _fit(model, root, RESUME, cbs=[ValidAUC(), *cbs], batch_tfm=_augment)
    return model, res


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _resume_fit(tmp_path_factory.mktemp("reference"))


def _assert_same_run(resumed, reference):
    (model, res), (ref_model, ref) = resumed, reference
    assert not res.loaded_from_cache
    assert _same_weights(model, ref_model)  # the best epoch's weights (keep_best)
    final, ref_final = (torch.load(r.path / "last.pt", weights_only=True) for r in (res, ref))
    for name, weights in ref_final["model"].items():
        assert torch.equal(final["model"][name], weights), name
    assert final["state"]["step"] == 15
    for col in ("epoch", "step", "lr", "valid_loss", "valid_auc"):
        assert res.history[col].tolist() == ref.history[col].tolist(), col
    assert np.allclose(res.history["train_loss"], ref.history["train_loss"], rtol=1e-6)
    assert res.metrics["best_epoch"] == ref.metrics["best_epoch"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), "7"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (run,) = tmp_path.glob("test-*")
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert (state["step"], state["epoch"], state["batch"]) == (6, 1, 1)  # not step 7
    assert not runs.is_finished(run) and len(runs.read_history(run)) == 1
    resumed = _resume_fit(tmp_path)
    assert resumed[1].resumed_from_step == 6 and resumed[1].path == run
    _assert_same_run(resumed, reference)
    assert runs.is_finished(run)


def test_crash_at_an_epoch_end_then_resume_is_bit_identical(tmp_path, reference):
    with pytest.raises(_Crash):
        _resume_fit(tmp_path, [_CrashAt(11)])
    resumed = _resume_fit(tmp_path)
    assert resumed[1].resumed_from_step == 10  # the checkpoint due at step 10 ended epoch 1
    _assert_same_run(resumed, reference)


@pytest.mark.parametrize("bars", ["console", "notebook"])
def test_resume_with_the_progress_display_on(tmp_path, reference, monkeypatch, bars):
    """A user's run shows its bars; resuming one entered the epoch bar at a later epoch and
    failed at once ('ConsoleProgressBar' object has no attribute 'start_t')."""
    from fastprogress import fastprogress

    if bars == "notebook":  # the HTML bars, as a chapter shows them, into a stand-in display
        import IPython.display

        class Shown:
            def update(self, obj):
                self.last = obj

        monkeypatch.setattr(IPython.display, "display", lambda *a, **k: Shown())
        monkeypatch.setattr(callbacks, "master_bar", fastprogress.NBMasterBar)
        monkeypatch.setattr(callbacks, "progress_bar", fastprogress.NBProgressBar)
    with pytest.raises(_Crash):
        _resume_fit(tmp_path, [_CrashAt(11)])
    model = _model()
    train_dl, valid_dl = _loaders()
    res = fit(model, train_dl, valid_dl, RESUME, tmp_path, "test", cbs=[ValidAUC()],
              loss_func=masked_bce_loss, batch_tfm=_augment, valid_tfm=_to_float)
    assert res.resumed_from_step == 10
    _assert_same_run((model, res), reference)


def test_an_epoch_end_checkpoints_once_its_minutes_have_passed(tmp_path, reference):
    """Step checkpoints alone left a short run with nothing to resume from."""
    config = dataclasses.replace(RESUME, checkpoint_every=1000, checkpoint_minutes=1e-9)
    with pytest.raises(_Crash):
        _fit(_model(), tmp_path, config, cbs=[ValidAUC(), _CrashAt(8)], batch_tfm=_augment)
    model = _model()
    res = _fit(model, tmp_path, config, cbs=[ValidAUC()], batch_tfm=_augment)
    assert res.resumed_from_step == 5  # the end of epoch 0, not the start
    _assert_same_run((model, res), reference)


# ----------------------------------------------------------------------------- NaN guard

class _PlantNaN:
    """A train batch transform that makes the inputs of step `at` (1-based) NaN."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = _to_float(x)
        return x * math.nan if self.calls == self.at else x


@pytest.mark.parametrize("every, message", [(1, "at step 5"), (4, "between steps 5 and 6")])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, every, message):
    cfg = TrainConfig(epochs=2, batch_size=6, checkpoint_every=2, nan_check_every=every)
    with pytest.raises(TrainingDiverged) as info:
        _fit(_model(), tmp_path, cfg, batch_tfm=_PlantNaN(5))
    err = info.value
    assert message in str(err) and "nan" in str(err) and "learning rate" in str(err)
    assert "Exception occured" not in str(err)  # fastai's callback wrapper is peeled off
    assert err.run is not None and not runs.is_finished(err.run)
    ckpt = torch.load(err.run / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


# ----------------------------------------------------------------------------- run cache

def test_a_nan_before_any_checkpoint_says_there_is_none(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=6, checkpoint_every=100, nan_check_every=1)
    with pytest.raises(TrainingDiverged) as info:
        _fit(_model(), tmp_path, cfg, batch_tfm=_PlantNaN(2))
    message = str(info.value)
    assert "No checkpoint" in message and "untouched" not in message
    assert "--grad-clip" in message and "--base-lr" in message


class _BlowUp:
    """A train batch transform that scales the inputs up 10x more every step from `at`."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return _to_float(x) * 10.0 ** max(0, self.calls - self.at + 1)


def test_a_finite_blow_up_is_recorded_as_diverged(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=6, base_lr=0.5)
    with pytest.warns(DivergedWarning, match="diverged: its train loss rose from"):
        res = _fit(_model(), tmp_path, cfg, batch_tfm=_BlowUp(6))
    assert all(math.isfinite(v) for v in res.history["train_loss"])
    assert res.metrics["status"] == "diverged" and "--base-lr" in res.metrics["diverged"]
    assert runs.is_finished(res.path)  # finished: a rerun loads it and says so again
    with pytest.warns(DivergedWarning, match="diverged"):
        again = _fit(_model(), tmp_path, cfg, batch_tfm=_BlowUp(6))
    assert again.loaded_from_cache and again.metrics["status"] == "diverged"
    calm = _fit(_model(), tmp_path / "calm", cfg)
    assert calm.metrics["status"] == "done" and "diverged" not in calm.metrics


@pytest.mark.parametrize("first, last, diverged", [
    (0.69, 0.2, False), (0.69, 0.69 * 4, False), (0.69, 0.69 * 4.01, True),
    (3.18, 322953.0, True), (None, 5.0, False), (0.0, 5.0, False), (math.nan, 5.0, False),
    (0.69, math.nan, False)])
def test_rise_note(first, last, diverged):
    note = rise_note(first, last)
    assert (note is not None) == diverged
    if diverged:
        assert note.startswith("the run diverged: its train loss rose from") and "4x" in note


class _Unsafe:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_damaged_checkpoint_of_a_finished_run_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(epochs=1, batch_size=6)
    run = _fit(_model(), tmp_path, cfg).path
    good = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"last\.pt: unreadable checkpoint .*delete the run"):
        _fit(_model(), tmp_path, cfg)
    torch.save({"model": _Unsafe()}, run / "last.pt")  # a pickle that would run a command
    with pytest.raises(ValueError, match=r"last\.pt: unreadable checkpoint") as info:
        _fit(_model(), tmp_path, cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "pwned").exists()


def test_finished_run_is_loaded_and_force_retrains(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=6, base_lr=0.5, checkpoint_every=100)
    first_model = _model()
    first = _fit(first_model, tmp_path, cfg)
    assert not first.loaded_from_cache and first.resumed_from_step is None
    assert list(first.history.columns) == ["epoch", "step", "train_loss", "valid_loss", "lr",
                                           "images_per_s", "elapsed_s"]
    assert (first.history["images_per_s"] > 0).all() and first.metrics["status"] == "done"

    cached_model = _model(seed=1)
    cached = _fit(cached_model, tmp_path, cfg)
    assert cached.loaded_from_cache and cached.path == first.path
    assert _same_weights(cached_model, first_model)
    assert np.allclose(cached.history.to_numpy(), first.history.to_numpy())
    assert cached.metrics == runs.read_metrics(first.path)

    forced_model = _model()
    forced = _fit(forced_model, tmp_path, cfg, force=True)
    assert not forced.loaded_from_cache and _same_weights(forced_model, first_model)

    (first.path / "metrics.json").unlink()  # killed after the final checkpoint, before this
    finishing_model = _model(seed=2)
    finishing = _fit(finishing_model, tmp_path, cfg)
    assert finishing.resumed_from_step == 10 and len(finishing.history) == 2
    assert _same_weights(finishing_model, first_model) and runs.is_finished(first.path)

    other = _fit(_model(), tmp_path, TrainConfig(**{**vars(cfg), "extra": {"model": "b"}}))
    assert other.path != first.path and not other.loaded_from_cache
    assert len(runs.list_runs(tmp_path, "test")) == 2


def test_operational_settings_do_not_enter_the_hash():
    a = TrainConfig(checkpoint_every=1, nan_check_every=1).identity()
    assert a == TrainConfig(checkpoint_every=50, nan_check_every=20).identity()
    assert a != TrainConfig(base_lr=1e-3).identity()
    assert TrainConfig(base_lr=1e-3, batch_size=512).lr == pytest.approx(2e-3)


# ----------------------------------------------------------------------------- metrics, losses

def test_validation_auc_and_best_weights(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=6, base_lr=2.0, keep_best="valid_auc")
    model = _model()
    res = _fit(model, tmp_path, cfg, cbs=[ValidAUC()])
    aucs = res.history["valid_auc"]
    assert aucs.between(0, 1).all()
    assert res.metrics["best_valid_auc"] == pytest.approx(aucs.max())
    assert res.metrics["best_epoch"] == int(aucs.idxmax())
    x, y = _data(42)
    model.eval()
    with torch.no_grad():
        scores = model(_to_float(x[30:])).numpy()  # the returned model holds the best epoch
    by_hand = np.mean([roc_auc_score(y[30:, j], scores[:, j]) for j in range(3)])
    assert by_hand == pytest.approx(aucs.max(), abs=1e-9)


@pytest.mark.parametrize("validates", [True, False])
def test_epoch_table_shows_losses_metrics_and_lr_only(tmp_path, monkeypatch, validates):
    written = []

    class Recording(callbacks.master_bar):
        def write(self, line, table=False):
            written.append(list(line))
            super().write(line, table=table)

    monkeypatch.setattr(callbacks, "master_bar", Recording)
    loaders = _loaders()
    res = fit(_model(), loaders[0], loaders[1] if validates else None,
              TrainConfig(epochs=2, batch_size=6), tmp_path, "test", loss_func=masked_bce_loss,
              batch_tfm=_to_float, valid_tfm=_to_float, cbs=[ValidAUC()] if validates else [])
    header = (["epoch", "train_loss", "valid_loss", "valid_auc", "lr"] if validates
              else ["epoch", "train_loss", "lr"])
    assert written[0] == header and len(written) == 3  # a header, then one row an epoch
    assert [row[0] for row in written[1:]] == ["0", "1"]
    assert written[2][1] == f"{res.history['train_loss'].iloc[1]:.6g}"
    assert {"images_per_s", "elapsed_s", "step"} <= set(res.history)  # kept in the history


def test_mean_auc_skips_unstated_and_one_class_findings():
    targets = np.array([[0, 1, 1], [1, 1, np.nan], [0, 1, 0], [1, 1, np.nan], [np.nan, 1, 1]])
    scores = np.array([[0.1, 0.5, 0.9], [0.8, 0.2, 0.0], [0.3, 0.1, 0.2], [0.2, 0.7, 5.0],
                       [9.0, 0.3, 0.4]])
    mean, per = mean_auc(scores, targets)
    assert per[0] == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.8, 0.3, 0.2]))
    assert math.isnan(per[1])  # every image positive: AUC undefined
    assert per[2] == pytest.approx(roc_auc_score([1, 0, 1], [0.9, 0.2, 0.4]))
    assert mean == pytest.approx((per[0] + per[2]) / 2)


def test_masked_bce_ignores_unstated_findings():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    targets = torch.tensor([[1.0, math.nan], [0.0, 1.0]])
    known = nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert masked_bce_loss(logits, targets).item() == pytest.approx(known.item())


class _TinyMAE(nn.Module):
    """Masks half the pixels and reconstructs them: forward returns (loss, pred, mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(36, 8), nn.Linear(8, 36)

    def forward(self, imgs: torch.Tensor):
        x = imgs.flatten(1)  # [B, 36]
        mask = (torch.rand_like(x) < 0.5).float()  # [B, 36], 1 = hidden
        pred = self.dec(torch.relu(self.enc(x * (1 - mask))))  # [B, 36]
        loss = ((pred - x) ** 2 * mask).sum() / mask.sum()
        return loss, pred, mask


def test_model_that_returns_its_own_loss(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, batch_size=6, base_lr=5.0, warmup_epochs=1)
    res = _fit(_TinyMAE(), tmp_path, cfg, loss_func=model_loss)
    losses = res.history["train_loss"]
    assert losses.iloc[-1] < 0.5 * losses.iloc[0]
    assert res.history["valid_loss"].notna().all()


# ----------------------------------------------------------------------------- bad input

def test_bad_input_is_refused_clearly(tmp_path):
    train, valid = _loaders(n_train=12)
    with pytest.raises(ValueError, match="loss_func"):
        fit(_model(), train, valid, TrainConfig(), tmp_path, loss_func=None)
    with pytest.raises(ValueError, match="train_dl has no batches"):
        fit(_model(), [], None, TrainConfig(), tmp_path, loss_func=masked_bce_loss)
    with pytest.raises(TypeError, match=r"valid_dl must be an iterable .* with len\(\)"):
        fit(_model(), train, (b for b in valid), TrainConfig(), tmp_path,
            loss_func=masked_bce_loss)
    with pytest.raises(ValueError, match="TrainConfig.schedule must be one of"):
        TrainConfig(schedule="cos").check()
    with pytest.raises(ValueError, match="TrainConfig.epochs must be positive"):
        TrainConfig(epochs=0).check()
    with pytest.raises(ValueError, match="keep_best='valid_auc'.*ValidAUC"):
        _fit(_model(), tmp_path, TrainConfig(keep_best="valid_auc"))
    x, _ = _data(12)
    with pytest.raises(ValueError, match=r"\(inputs, targets\) tuples"):
        _fit(_model(), tmp_path, TrainConfig(batch_size=6),
             DataLoader(TensorDataset(x), batch_size=6), None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'bf16' needs a CUDA device"):
            _fit(_model(), tmp_path, TrainConfig(precision="bf16"))


if __name__ == "__main__":  # the process that the resume test kills
    torch.set_num_threads(1)
    _resume_fit(Path(sys.argv[1]), [_KillAt(int(sys.argv[2]))])
    sys.exit("the kill callback should have ended this process")
