import pytest
import torch
from torch import nn

from cxr_lib.engine.inference import eval_mode


def test_eval_mode_switches_dropout_off_and_gives_the_mode_back_even_after_an_error():
    net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    x = torch.ones(8, 4)
    with eval_mode(net) as same:
        assert same is net and not net.training
        assert torch.equal(net(x), net(x))  # no dropout: deterministic
    assert net.training
    net.eval()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert not net.training  # the mode it had, not training
    net.train()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training
