"""The GPU paths of the pretraining loop (issue 21 part B), exercised on CPU: the device warp inside the
loop, deterministic settings, host–device synchronisations per step, activation checkpointing,
per-rank RNG. Multi-rank cases (FSDP2 EMA, DCP, one-rank process group) are in
``test_distributed_gpu_paths.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from test_distributed_utils import EXACT
from test_pretrain_utils import memory_table, single_thread, tiny_config  # noqa: F401

from pretrain.train import Trainer, configure_determinism


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "event" not in r}


def test_warp_on_auto_is_numpy_on_cpu_and_device_warp_trains_identically(tmp_path):
    """warp_on=auto means numpy on CPU; the device warp run through DevicePrefetcher inside the loop
    gives bit-identical losses (its crops are bit-identical on CPU torch)."""
    over = {**EXACT, "train.epoch_length": 3, "train.log_period": 1, "train.ckpt_period": 0}
    auto = Trainer(tiny_config(tmp_path / "auto", **over), table=memory_table(8))
    assert auto.warp == "numpy" and auto.dataset.warp == "numpy"
    auto.run()
    device = Trainer(tiny_config(tmp_path / "dev", **over, **{"aug.warp_on": "device"}), table=memory_table(8))
    assert device.warp == "device" and device.dataset.warp == "device"
    device.run()
    a, b = records(tmp_path / "auto"), records(tmp_path / "dev")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for it in a:
        for key in ("dino_local", "dino_global", "ibot", "total"):
            assert a[it][key] == b[it][key], (it, key)


def test_deterministic_sets_cublas_workspace_and_disables_autotuning(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        configure_determinism(False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark
        configure_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's value is kept
        configure_determinism(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(was)


def device_guarded(trainer: Trainer) -> Trainer:
    """Switch a CPU trainer to the CUDA path of the step: non-finite guard on the device, fused AdamW
    (which takes ``found_inf``), values read back only when the loop asks."""
    from pretrain.optim import build_optimizer

    cfg = trainer.cfg
    trainer.device_guard = True
    trainer.optimizer = build_optimizer(trainer.student.named_parameters(), trainer.vit_cfg.depth,
                                        cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                                        (cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), trainer.device, fused=True)
    return trainer


def test_device_guard_reads_the_host_once_per_logged_step_and_never_otherwise(tmp_path, monkeypatch):
    """A fake device hook: every way a tensor reaches the host (.item, .tolist, float(), int(), bool())
    is counted inside train_step. Logged steps: one .tolist(); the others: none."""
    cfg = tiny_config(tmp_path, **{"train.epoch_length": 7, "train.log_period": 3, "train.ckpt_period": 0})
    trainer = device_guarded(Trainer(cfg, table=memory_table(8)))
    counting = {"on": False}
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def hooked(self, *a, _real=real, _name=name, **k):
            if counting["on"]:
                reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, hooked)
    per_step: dict[int, list[str]] = {}
    step = trainer.train_step

    def counted(batch, it, read_back=True):
        reads.clear()
        counting["on"] = True
        try:
            return step(batch, it, read_back=read_back)
        finally:
            counting["on"] = False
            per_step[it] = list(reads)

    trainer.train_step = counted
    assert trainer.run()["status"] == "finished"
    logged = sorted(records(tmp_path))
    assert logged == [0, 3, 6]
    assert {it: per_step[it] for it in logged} == {it: ["tolist"] for it in logged}
    assert all(per_step[it] == [] for it in range(7) if it not in logged), per_step
    rec = records(tmp_path)[6]
    assert set(rec["grad_norm"]) == {"backbone", "dino_head"} and rec["teacher_distinct_prototypes"] >= 1


def test_device_guard_equals_the_host_guard(tmp_path):
    over = {"train.epoch_length": 3, "train.log_period": 1, "train.ckpt_period": 0}
    host = Trainer(tiny_config(tmp_path / "host", **over), table=memory_table(8))
    host.optimizer = device_guarded(host).optimizer  # same fused optimizer, host-side guard
    host.device_guard = False
    host.run()
    device_guarded(Trainer(tiny_config(tmp_path / "dev", **over), table=memory_table(8))).run()
    a, b = records(tmp_path / "host"), records(tmp_path / "dev")
    for it in range(3):
        for key in ("total", "teacher_entropy", "ibot_teacher_entropy", "teacher_distinct_prototypes"):
            assert a[it][key] == pytest.approx(b[it][key], rel=1e-5), (it, key)
        assert a[it]["grad_norm"] == pytest.approx(b[it]["grad_norm"], rel=1e-5)


def test_device_guard_skips_a_nonfinite_step_on_the_device(tmp_path):
    from test_pretrain_train import PoisonedBatches

    cfg = tiny_config(tmp_path, **{"train.on_nonfinite": "skip", "train.epoch_length": 5, "train.log_period": 4})
    trainer = device_guarded(Trainer(cfg, table=memory_table(6)))
    trainer.dataset = PoisonedBatches(trainer.dataset, 2)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    assert trainer.run()["status"] == "finished" and trainer.nonfinite_skipped == 1
    assert records(tmp_path)[4]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    assert all(torch.isfinite(v).all() for v in trainer.teacher.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in events if r.get("event") == "nonfinite"]
    assert [e["iteration"] for e in events] == [2] and "total" in events[0]["components"]


def test_device_guard_error_mode_names_the_bad_iteration(tmp_path):
    from test_pretrain_train import PoisonedBatches

    from pretrain.train import NonFiniteLossError

    cfg = tiny_config(tmp_path, **{"train.epoch_length": 6, "train.log_period": 5, "train.ckpt_period": 0})
    trainer = device_guarded(Trainer(cfg, table=memory_table(6)))
    trainer.dataset = PoisonedBatches(trainer.dataset, 2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*dino_local.* at iteration 2"):
        trainer.run()
    assert trainer.iteration == 5  # noticed at the next read-back (log step 5), the step itself skipped


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    """Student forward + backward with drop path, with and without train.activation_checkpointing."""
    from pretrain import parallel
    from pretrain.ssl_model import SSLModel

    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    plain = SSLModel(cfg.vit_config(), cfg)
    checkpointed = SSLModel(cfg.vit_config(), cfg)
    checkpointed.load_state_dict(plain.state_dict())
    parallel.checkpoint_activations(checkpointed.backbone.blocks)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    g = torch.randn(4, 1, 56, 56)
    loc = torch.randn(8, 1, 28, 28)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[:2, :5] = True
    idx = masks.flatten().nonzero().squeeze(1)
    results = []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(7)  # the same drop-path draws
        out = model(g, loc, masks, idx)
        loss = out["cls_logits"].logsumexp(-1).mean() + out["patch_logits"].square().mean()
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_training_with_activation_checkpointing_equals_without(tmp_path):
    over = {"train.epoch_length": 2, "train.log_period": 1, "train.ckpt_period": 0}
    Trainer(tiny_config(tmp_path / "a", **over), table=memory_table(8)).run()
    Trainer(tiny_config(tmp_path / "b", **over, **{"train.activation_checkpointing": "true"}),
            table=memory_table(8)).run()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    for it in (0, 1):
        assert a[it]["total"] == pytest.approx(b[it]["total"], rel=1e-6, abs=1e-7)


@pytest.mark.gpu
def test_cuda_step_without_read_back_never_synchronises(tmp_path):
    """On CUDA a step that does not read back runs under ``set_sync_debug_mode("error")``: any
    host–device synchronisation (item(), a pageable copy, a data-dependent shape) raises."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from pretrain.device_augment import DevicePrefetcher
    from pretrain.loader import build_loader

    cfg = tiny_config(tmp_path, **{"train.device": "cuda", "train.precision": "bf16", "train.epoch_length": 4})
    trainer = Trainer(cfg, table=memory_table(8))
    assert trainer.device_guard and trainer.warp == "device"
    batches = list(DevicePrefetcher(build_loader(trainer.dataset, 0, 4, 0), trainer.device, cfg.aug.interp,
                                    cfg.aug.edge_thresh))
    trainer.train_step(batches[0], 0, read_back=True)  # warm-up: lazy state (optimizer moments, caches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for it in (1, 2):
            assert trainer.train_step(batches[it], it, read_back=False) == {}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    metrics = trainer.train_step(batches[3], 3, read_back=True)
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("total", "teacher_entropy"))


@pytest.mark.gpu
def test_cuda_run_logs_event_timing_and_trains_with_the_device_warp(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    cfg = tiny_config(tmp_path, **{"train.device": "cuda", "train.epoch_length": 3, "train.log_period": 1,
                                   "train.ckpt_period": 0})
    trainer = Trainer(cfg, table=memory_table(8))
    assert trainer.warp == "device"
    assert trainer.run()["status"] == "finished"
    recs = records(tmp_path)
    assert sorted(recs) == [0, 1, 2]
    assert all(r["gpu_time_per_iteration"] > 0 for r in recs.values())
