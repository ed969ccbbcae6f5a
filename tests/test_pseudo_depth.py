"""Depth-Anything-V2 pseudo-depth: tiny random model loaded through --model <dir>, shards, resume, bad images."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import depth_anything
from data_prep.depth_anything import ModelUnavailableError, load_depth_anything
from data_prep.pseudo_depth import main, pseudo_depth
from data_prep.shards import decode_npy, load_manifest
from tests.test_rgb_sources import make_mvtec_ad, make_visa


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The ≈7.8k-parameter DepthAnything of data_formats.md §6, saved like a hub download."""
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(image_size=32, patch_size=16, num_channels=3, hidden_size=4, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=8, out_indices=[1, 2],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=4, patch_size=16,
                                 neck_hidden_sizes=[2, 2], fusion_hidden_size=6)
    model = DepthAnythingForDepthEstimation(config).eval()
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=True, ensure_multiple_of=16)
    folder = tmp_path_factory.mktemp("tiny_da")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _read_shards(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (decode_npy(v["depth.npy"]), json.loads(v["json"])) for k, v in samples.items()}


def test_tiny_model_loads_from_local_folder_and_predicts_mixed_sizes(tiny_model_dir):
    runner = load_depth_anything(str(tiny_model_dir), device="cpu")
    assert runner.model_id == str(tiny_model_dir) and runner.dtype_name == "fp32"
    a = runner.preprocess(Image.new("RGB", (64, 48)))
    b = runner.preprocess(Image.new("RGB", (40, 80)))
    assert a.shape != b.shape  # different processed shapes: must never share a batch
    out = runner.predict(torch_stack([a, a]))
    assert out.shape == (2, *a.shape[-2:]) and out.dtype == np.float32 and (out >= 0).all()


def torch_stack(tensors):
    import torch

    return torch.stack(tensors)


def test_shards_metadata_and_mixed_size_batching(tmp_path, tiny_model_dir):
    root = tmp_path / "mvtec_ad"
    make_mvtec_ad(root)
    Image.new("RGB", (48, 24)).save(root / "bottle/train/good/002.png")  # another size in the same run
    out = tmp_path / "shards"
    summary = pseudo_depth("mvtec_ad", root, out, model=str(tiny_model_dir), batch_size=3, workers=0,
                           progress=False, save_preview_n=2)
    assert summary["ok"] and summary["written"] == 5 and summary["skipped"] == 0
    samples = _read_shards(out)
    assert set(samples) == {"mvtec_ad/bottle/train/good_000", "mvtec_ad/bottle/train/good_001",
                            "mvtec_ad/bottle/train/good_002", "mvtec_ad/grid/train/good_000",
                            "mvtec_ad/grid/train/good_001"}
    depth, meta = samples["mvtec_ad/bottle/train/good_002"]
    assert meta["kind"] == "rel_disparity" and meta["unit"] is None and meta["orig_hw"] == [24, 48]
    assert meta["pseudo"]["model_id"] == str(tiny_model_dir) and meta["pseudo"]["transformers_version"]
    assert meta["pseudo"]["input_hw"] == list(depth.shape) == meta["stored_hw"]
    assert meta["resize"]["method"] == "da_processed" and np.isfinite(depth).all() and (depth >= 0).all()
    manifest = load_manifest(out)
    assert manifest["sources"]["mvtec_ad"]["counts"]["total"] == 5
    assert len(list((out / "previews").glob("*.png"))) == 2

    # Same predictions whether an image is batched with others or alone.
    runner = load_depth_anything(str(tiny_model_dir), device="cpu")
    alone = runner.predict(runner.preprocess(Image.open(root / "bottle/train/good/000.png").convert("RGB"))[None])[0]
    np.testing.assert_allclose(samples["mvtec_ad/bottle/train/good_000"][0], alone, rtol=1e-5, atol=1e-6)


def test_original_resolution_output_and_resume(tmp_path, tiny_model_dir):
    root = tmp_path / "visa"
    csv = make_visa(root)
    out = tmp_path / "shards"
    kwargs = dict(model=str(tiny_model_dir), splits="all", da_output="original", visa_split_csv=csv,
                  shard_max_count=2, workers=0, progress=False)
    first = pseudo_depth("visa", root, out, **kwargs)
    assert first["written"] == 6 and len(first["shards"]) == 3
    depth, meta = next(iter(_read_shards(out).values()))
    assert depth.shape == (16, 20) and meta["stored_hw"] == meta["orig_hw"] == [16, 20]
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = pseudo_depth("visa", root, out, **kwargs)  # everything done: nothing recomputed
    assert again["written"] == 0 and {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_truncated_image_is_skipped_counted_and_reported(tmp_path, tiny_model_dir):
    root = tmp_path / "mvtec_ad"
    make_mvtec_ad(root)
    bad = root / "grid/train/good/001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "shards"
    code = main(["--source", "mvtec_ad", "--root", str(root), "--out", str(out), "--model", str(tiny_model_dir),
                 "--workers", "0", "--no-progress"])
    assert code == 1  # a failed input is a failed check: non-zero exit, but the rest is written
    entry = load_manifest(out)["sources"]["mvtec_ad"]
    assert entry["counts"]["total"] == 3
    assert [s["rel_path"] for s in entry["skipped"]] == ["grid/train/good/001.png"]
    assert "unreadable image" in entry["skipped"][0]["reason"]


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setattr(depth_anything, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="--local-dir ./models/Depth-Anything-V2-Small-hf"):
        load_depth_anything("depth-anything/Depth-Anything-V2-Small-hf", device="cpu")


def test_bad_root_is_a_clear_cli_error(tmp_path, tiny_model_dir, capsys):
    code = main(["--source", "mvtec_loco", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                 "--model", str(tiny_model_dir)])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_default_model_agrees_in_code_help_and_docs():
    """One default Depth-Anything-V2 size (Large, data_formats.md §6) in the code, --help and the docs."""
    from pathlib import Path

    from data_prep.depth_anything import DEFAULT_MODEL
    from data_prep.pseudo_depth import build_parser

    assert DEFAULT_MODEL == "depth-anything/Depth-Anything-V2-Large-hf"
    parser = build_parser()
    assert parser.get_default("model") == DEFAULT_MODEL
    # argparse wraps at hyphens too: compare without whitespace
    assert f"default{DEFAULT_MODEL}" in "".join(parser.format_help().split())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "data_prep.md").read_text()
    assert f"default `{DEFAULT_MODEL}`" in docs
