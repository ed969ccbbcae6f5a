"""GPU precision and host syncs of detection runs (issue 21 item 8): ``--allow-tf32`` is one switch that
bench/bench_table8.py shares, and the training loop's finiteness check can be read back less often."""

import math

import pytest
import torch

from detect.config import parse_config
from detect.fit import run_mapping_epochs
from detect.pipeline.base import cuda_precision, deterministic


def test_allow_tf32_is_set_for_the_run_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for allow in (False, True):
        cfg = parse_config(["--data", "/d", *(["--allow-tf32"] if allow else [])])
        assert cfg.allow_tf32 is allow
        with deterministic(cfg):
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (allow, allow)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(RuntimeError), cuda_precision(not before[0]):
        raise RuntimeError  # restored on errors too
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def _train_until_nan(nan_at: int, check_every: int | None) -> tuple[list[int], str]:
    """4 iterations per epoch, 3 epochs; the loss is NaN at global step ``nan_at``. Returns the steps whose
    update ran and the error message."""
    weight = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([weight], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    calls: list[int] = []
    updated: list[int] = []

    def batch_loss(_idx):
        calls.append(len(calls))
        loss = (weight ** 2).sum() * (math.nan if calls[-1] == nan_at else 1.0)
        return loss, loss.detach(), loss.detach()

    with pytest.raises(FloatingPointError) as err:
        run_mapping_epochs(opt, sched, 3, 4, 1, lambda _: torch.arange(4), batch_loss,
                           progress=lambda n: updated.append(len(calls) - 1), check_every=check_every)
    return updated, str(err.value)


def test_nonfinite_loss_on_the_cpu_stops_before_its_update():
    updated, msg = _train_until_nan(5, None)
    assert updated == [0, 1, 2, 3, 4] and msg == "non-finite loss at epoch 1, iteration 1"


def test_deferred_finiteness_check_names_the_first_bad_step():
    """Read back every 3 steps (as on an accelerator): steps 5 and 6 still run, the message names step 5."""
    updated, msg = _train_until_nan(5, 3)
    assert updated == [0, 1, 2, 3, 4, 5] and msg == "non-finite loss at epoch 1, iteration 1"
    updated, msg = _train_until_nan(6, 3)  # the epoch's end is a check point too (step 8 = 2 × 4)
    assert updated == [0, 1, 2, 3, 4, 5, 6, 7] and msg == "non-finite loss at epoch 1, iteration 2"
