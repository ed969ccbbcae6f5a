"""ModMap networks, pair enumeration, step counts and the OneCycle schedule (modmap.md §6–§8, §22)."""

import math

import pytest
import torch

from detect.fit import TrainSettings, batch_plan, fit_modmap, make_optimizer, total_training_steps
from detect.model import FeatureMapper, ModMap, ViewModulator, count_parameters, training_pairs


@pytest.mark.parametrize("n_views, dim, expected", [(12, 768, 201_344), (12, 384, 102_272),
                                                     (36, 768, 207_488), (36, 384, 108_416)])
def test_modulator_parameter_counts(n_views, dim, expected):
    assert count_parameters(ViewModulator(n_views, dim)) == expected


def test_modulator_with_classes_widens_first_layer():
    mod = ViewModulator(36, 384, n_classes=8)
    assert mod.fc1.in_features == 2 * 36 + 8
    assert count_parameters(mod) == 108_416 + 8 * 128


@pytest.mark.parametrize("n_classes", [0, 3])
def test_modulator_is_identity_at_init(n_classes):
    torch.manual_seed(0)
    mod = ViewModulator(5, 16, hidden=32, n_classes=n_classes)
    feats = torch.randn(4, 10, 16)
    src = torch.tensor([0, 1, 4, 2])
    tgt = torch.tensor([3, 1, 0, 2])
    cls = torch.tensor([0, 2, 1, 0]) if n_classes else None
    out = mod(feats, src, tgt, cls)
    assert torch.equal(out, feats)  # exactly, not approximately


def test_modulator_conditions_on_both_views_after_training_step():
    torch.manual_seed(0)
    mod = ViewModulator(3, 8, hidden=16)
    with torch.no_grad():
        mod.fc2.weight.normal_()
    feats = torch.randn(1, 4, 8)
    a = mod(feats, torch.tensor([0]), torch.tensor([1]))
    b = mod(feats, torch.tensor([1]), torch.tensor([0]))
    assert not torch.allclose(a, b)  # ordered pairs: (s, t) != (t, s)


def test_modulator_rejects_bad_inputs():
    mod = ViewModulator(4, 8)
    with pytest.raises(ValueError, match="source_view"):
        mod(torch.zeros(1, 2, 8), torch.tensor([4]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        mod(torch.zeros(1, 2, 7), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class_id"):
        ViewModulator(4, 8, n_classes=2)(torch.zeros(1, 2, 8), torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("in_dim, out_dim, expected", [(768, 384, 996_864), (384, 768, 997_248)])
def test_mapper_parameter_counts_and_shapes(in_dim, out_dim, expected):
    m = FeatureMapper(in_dim, out_dim)
    assert count_parameters(m) == expected
    assert (m.fc1.out_features, m.fc2.out_features, m.fc3.out_features) == (576, 576, out_dim)
    assert m(torch.zeros(2, 3, 5, in_dim)).shape == (2, 3, 5, out_dim)


def test_mapper_has_no_norm_dropout_or_residual():
    m = FeatureMapper(6, 4)
    kinds = {type(x).__name__ for x in m.modules()} - {"FeatureMapper"}
    assert kinds == {"Linear", "GELU"}


def test_training_pairs_all_ordered_incl_self():
    pairs = training_pairs(5)
    assert pairs.shape == (25, 2)
    as_set = {tuple(p) for p in pairs.tolist()}
    assert as_set == {(s, t) for s in range(5) for t in range(5)}
    assert training_pairs(5, "vc_cfm").tolist() == [[t, t] for t in range(5)]
    assert training_pairs(5, "cfm").tolist() == [[t, t] for t in range(5)]


@pytest.mark.parametrize("n_views, iters, total, warmup", [(12, 3, 600, 60), (36, 27, 5400, 540)])
def test_step_counts_match_spec_table(n_views, iters, total, warmup):
    s = TrainSettings()
    epochs, it, steps = total_training_steps(n_views, s)
    assert (epochs, it, steps) == (200, iters, total)
    assert round(s.pct_start * steps) == warmup


def test_small_pair_sets_still_train_one_batch():
    assert batch_plan(25, 48) == (25, 1)  # N = 5: the authors' loader would yield zero iterations
    assert batch_plan(144, 48) == (48, 3)
    assert batch_plan(100, 48) == (48, 2)  # drop_last


def test_match_steps_for_same_view_variants():
    s = TrainSettings(variant="vc_cfm", match_steps=True)
    assert total_training_steps(12, s)[2] == 600
    assert total_training_steps(12, TrainSettings(variant="vc_cfm"))[2] == 200


def test_onecycle_schedule_values():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, TrainSettings(), total_steps=600)
    lrs = []
    for _ in range(600):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 2e-5, rel_tol=1e-9)
    assert max(lrs) == pytest.approx(5e-4, rel=1e-9)
    assert int(torch.tensor(lrs).argmax()) in (59, 60)  # peak after 10 % of the steps
    assert lrs[-1] == pytest.approx(2e-9, rel=1e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_fit_with_five_views_reduces_loss():
    torch.manual_seed(0)
    image = torch.randn(5, 16, 12)
    depth = torch.randn(5, 16, 8)
    records = []
    model = fit_modmap(image, depth, TrainSettings(epochs=30, lr_max=5e-3, modulator_hidden=16),
                       log=records.append)
    assert len(records) == 30 and all(r["steps"] == i + 1 for i, r in enumerate(records))
    assert records[-1]["loss"] < records[0]["loss"]
    assert not model.training


def test_fit_is_deterministic():
    torch.manual_seed(1)
    image, depth = torch.randn(3, 8, 6), torch.randn(3, 8, 4)
    s = TrainSettings(epochs=3, batch_size=4, modulator_hidden=8)
    a = fit_modmap(image, depth, s)
    b = fit_modmap(image, depth, s)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_foreground_loss_mask_ignores_invalid_target_tokens():
    torch.manual_seed(0)
    image, depth = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    valid = torch.tensor([[True] * 3 + [False] * 3] * 2)
    from detect.fit import pair_loss

    model = ModMap(2, 4, 4, hidden=8)
    pairs = training_pairs(2)
    base, _, _ = pair_loss(model, image, depth, pairs, valid)
    depth2 = depth.clone()
    depth2[:, 3:] = torch.randn(2, 3, 4)  # change only invalid tokens
    image2 = image.clone()
    image2[:, 3:] = 5.0
    # predictions of valid tokens depend only on valid source tokens (token-wise networks)
    again, _, _ = pair_loss(model, image2, depth2, pairs, valid)
    assert torch.allclose(base, again)
