"""The trainer end to end on the §16 tiny config (CPU, fp32, in-memory or folder data)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pretrain_utils import memory_table, single_thread, tiny_config, write_depth_folder  # noqa: F401

from pretrain.train import NonFiniteLossError, Trainer, main, train
from shared.checkpoint import load_checkpoint

LN64 = math.log(64)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps(run: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in read_metrics(run) if "event" not in r}


def test_three_iterations_finite_with_sane_initial_values(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.stop_at_iteration": 3})
    result = train(cfg, table=memory_table(8))
    assert result["status"] == "stopped" and result["iteration"] == 3
    records = steps(tmp_path)
    assert sorted(records) == [0, 1, 2]
    for r in records.values():
        for key in ("dino_local", "dino_global", "ibot", "koleo", "total"):
            assert math.isfinite(r[key]), key
        assert r["koleo"] >= -2 * math.log(2) - 1e-6  # each of the two crops ≥ −ln 2
    first = records[0]
    # iBOT: half of the global crops are masked, so the mean masked-crop CE is 2·L_iBOT.
    assert abs(2 * first["ibot"] - LN64) <= 1.5
    # DINO at initialisation: LayerScale 1e-5 makes every cls token (student and teacher, every crop)
    # the same vector, so the CE is H(softmax(t/τ_t), softmax(t/τ_s)) of one logit vector t: with a
    # 16-d bottleneck that is ≈ 1.4 (below ln K − 1.5); it can never exceed ln K + 1.5.
    pair_ce_local = first["dino_local"] * 18 / 16
    pair_ce_global = first["dino_global"] * 18 / 2
    assert 0 < pair_ce_local <= LN64 + 1.5 and 0 < pair_ce_global <= LN64 + 1.5
    assert first["lr"] == 0.0 and first["teacher_temp"] == pytest.approx(0.04)
    for key in ("grad_norm", "teacher_entropy", "teacher_distinct_prototypes", "data_passes", "time_per_iteration",
                "data_time", "peak_memory_mb", "wd", "momentum", "last_layer_lr"):
        assert key in first, key
    assert (tmp_path / "config.yaml").is_file()


def test_initial_ce_terms_near_ln_k_with_a_wide_bottleneck(tmp_path):
    # With the paper's 256-d bottleneck the prototype cosines are small and every CE term at
    # iteration 0 is within ±1.5 nat of ln K (dino_depth.md §12).
    cfg = tiny_config(tmp_path, **{"dino.head_bottleneck_dim": 256, "train.stop_at_iteration": 1})
    train(cfg, table=memory_table(8))
    first = steps(tmp_path)[0]
    assert abs(first["dino_local"] * 18 / 16 - LN64) <= 1.5
    assert abs(first["dino_global"] * 18 / 2 - LN64) <= 1.5
    assert abs(2 * first["ibot"] - LN64) <= 1.5


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    out.update({f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()})
    out["center.dino"] = trainer.dino_targets.center
    out["center.ibot"] = trainer.ibot_targets.center
    for name, value in trainer.optimizer.state.items():
        for key, tensor in value.items():
            out[f"opt.{id(name)}.{key}"] = tensor
    return out


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_resume_is_bit_exact(tmp_path, centering):
    table = memory_table(10)
    extra = {"train.epoch_length": 6, "train.centering": centering, "optim.warmup_epochs": 0.5}
    straight = Trainer(tiny_config(tmp_path / "straight", **extra), table=table)
    straight.run()

    first = Trainer(tiny_config(tmp_path / "split", **extra, **{"train.stop_at_iteration": 3}), table=table)
    assert first.run()["status"] == "stopped"
    second = Trainer(tiny_config(tmp_path / "split", **extra), table=table)  # auto-resume from latest
    assert second.iteration == 3
    assert second.run()["status"] == "finished"

    a, b = straight.student.state_dict(), second.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = straight.teacher.state_dict(), second.teacher.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(straight.dino_targets.center, second.dino_targets.center)
    assert torch.equal(straight.ibot_targets.center, second.ibot_targets.center)
    ra, rb = steps(tmp_path / "straight"), steps(tmp_path / "split")
    assert sorted(ra) == sorted(rb) == list(range(6))
    for it in range(6):
        for key in ("dino_local", "dino_global", "ibot", "koleo", "total", "grad_norm"):
            assert ra[it][key] == rb[it][key], (it, key)


def test_checkpoint_contents_pruning_and_latest(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.epoch_length": 5, "train.ckpt_period": 1, "train.keep": 2})
    train(cfg, table=memory_table(6))
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint_*.pth"))
    assert ckpts == ["checkpoint_00000004.pth", "checkpoint_00000005.pth"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint_00000005.pth"
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "checkpoint_00000005.pth")  # weights_only=True
    for key in ("format_version", "iteration", "config", "student", "teacher", "centers", "optimizer", "rng",
                "data_state", "metrics_tail", "arch", "input_norm", "train_meta"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 5
    assert ckpt["config"]["runtime"] == {"global_batch_size": 4, "world_size": 1}
    assert ckpt["data_state"]["position"] == 20 and ckpt["data_state"]["seed"] == 0
    assert "backbone.blocks.0.attn.qkv.weight" in ckpt["optimizer"]["state"]  # keyed by name
    assert (tmp_path / "dinodepth.pth").is_file() and (tmp_path / "dinodepth.pth.sha256").is_file()


def test_signal_checkpoints_then_stops(tmp_path):
    def send_signal(trainer, metrics):
        if trainer.iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    previous = signal.getsignal(signal.SIGUSR1)
    cfg = tiny_config(tmp_path)
    result = train(cfg, table=memory_table(6), on_iteration_end=send_signal)
    assert result["status"] == "preempted" and result["iteration"] == 3
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "checkpoint_00000003.pth"
    assert signal.getsignal(signal.SIGUSR1) == previous  # handlers restored


class PoisonedBatches(torch.utils.data.Dataset):
    """The trainer's batches, with NaN global crops at one iteration."""

    def __init__(self, inner, iteration: int) -> None:
        self.inner, self.iteration = inner, iteration

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, it: int) -> dict:
        batch = self.inner[it]
        if it == self.iteration:
            batch["global_crops"] = torch.full_like(batch["global_crops"], float("nan"))
        return batch


def test_nonfinite_loss_stops_with_the_component_and_keeps_the_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.ckpt_period": 1})
    trainer = Trainer(cfg, table=memory_table(6))
    trainer.dataset = PoisonedBatches(trainer.dataset, 3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .*dino_local.* at iteration 3"):
        trainer.run()
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == "checkpoint_00000003.pth"
    ckpt = load_checkpoint(tmp_path / "checkpoints" / latest)
    assert all(torch.isfinite(v).all() for v in ckpt["student"].values())
    events = [r for r in read_metrics(tmp_path) if r.get("event") == "nonfinite"]
    assert events and events[0]["iteration"] == 3


def test_nonfinite_skip_mode_counts_and_continues(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.on_nonfinite": "skip", "train.epoch_length": 5})
    trainer = Trainer(cfg, table=memory_table(6))
    trainer.dataset = PoisonedBatches(trainer.dataset, 2)
    result = trainer.run()
    assert result["status"] == "finished" and trainer.nonfinite_skipped == 1
    assert steps(tmp_path)[4]["nonfinite_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_cli_on_a_folder_source(tmp_path):
    data = write_depth_folder(tmp_path / "depth", n=6)
    run = tmp_path / "run"
    args = ["--config", str(Path(__file__).resolve().parents[1] / "configs/pretrain/tiny_cpu.yaml"),
            f"train.output_dir={run}", f"data.glob={data}/*.npy", "train.stop_at_iteration=2", "train.num_workers=0",
            "train.progress=false", "train.batch_size_per_gpu=2", "train.eval_period=0"]
    assert main(args) == 0
    assert (run / "checkpoints" / "latest").is_file()
    assert main(args[:-4] + ["train.stop_at_iteration=3", "train.num_workers=0", "train.progress=false",
                             "train.batch_size_per_gpu=2"]) == 0  # resumes from 2
    assert sorted(steps(run)) == [0, 1, 2]


def test_image_mode_trains_exports_and_writes_pca_images(tmp_path):
    from PIL import Image

    from pretrain.export import load_dinodepth

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray((rng.random((60, 70, 3)) * 255).astype(np.uint8)).save(folder / f"img_{i}.png")
    cfg = tiny_config(tmp_path / "run", **{"data.modality": "image", "data.glob": f"{folder}/*.png",
                                           "student.in_chans": 3, "train.epoch_length": 2, "train.eval_period": 2,
                                           "train.eval_num_images": 2, "image_aug.mean": "[0.5, 0.4, 0.3]",
                                           "image_aug.std": "[0.2]"})
    result = train(cfg)
    assert result["status"] == "finished"
    model, norm = load_dinodepth(tmp_path / "run" / "dinodepth.pth")
    assert model.cfg.in_chans == 3
    assert norm == {"modality": "image", "in_chans": 3, "scale": 255.0, "max_normalize": True,
                    "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}
    pngs = sorted((tmp_path / "run" / "eval").glob("pca_*.png"))
    assert pngs and Image.open(pngs[-1]).size == (2 * 56, 2 * 56)


def test_resume_refuses_a_changed_sample_table_unless_allowed(tmp_path):
    from shared.checkpoint import CheckpointError

    cfg = tiny_config(tmp_path, **{"train.stop_at_iteration": 1})
    train(cfg, table=memory_table(6))
    with pytest.raises(CheckpointError, match="sample table changed"):
        Trainer(tiny_config(tmp_path), table=memory_table(6, seed=50))
    trainer = Trainer(tiny_config(tmp_path), table=memory_table(6, seed=50), allow_data_change=True)
    assert trainer.iteration == 1
    assert Trainer(tiny_config(tmp_path), table=memory_table(6, seed=50), resume=False).iteration == 0


def test_training_steps_reduce_the_loss_on_a_tiny_dataset(tmp_path):
    # A fixed, input-dependent teacher (momentum 1, no LayerScale) with Sinkhorn-Knopp targets (no
    # center state): the student's DINO + iBOT cross-entropy must go down within 20 steps.
    cfg = tiny_config(tmp_path, **{
        "train.epoch_length": 20, "student.layerscale": "null", "student.drop_path_rate": 0,
        "teacher.momentum_teacher": 1.0, "train.centering": "sinkhorn_knopp", "dino.koleo_loss_weight": 0,
        "optim.base_lr": 1e-3, "optim.min_lr": 1e-3, "optim.scaling_rule": "none", "optim.warmup_epochs": 0,
        "optim.freeze_last_layer_epochs": 0, "teacher.warmup_teacher_temp_epochs": 0})
    train(cfg, table=memory_table(4))
    records = steps(tmp_path)
    ce = [records[i]["dino_local"] + records[i]["dino_global"] + records[i]["ibot"] for i in range(20)]
    assert np.mean(ce[-3:]) < np.mean(ce[:3]) - 1.0, ce
