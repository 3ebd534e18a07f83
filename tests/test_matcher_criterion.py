"""HungarianMatcher and SetCriterion against hand-computed costs and losses."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import CfgNode as CN

import gmmseg_d2.modeling.criterion as criterion_module
from gmmseg_d2.modeling.criterion import SetCriterion
from gmmseg_d2.modeling.matcher import HungarianMatcher

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pixel_centres(height, width):
    """``(H * W, 2)`` normalised ``(x, y)`` centres of every pixel, row-major.

    ``point_sample`` (grid_sample, align_corners=False) returns exactly the
    pixel values at these points, which makes the point-sampled losses exact.
    """
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                            indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


class PixelCentreMatcher(HungarianMatcher):
    """Compares masks at every pixel centre of an ``H x W`` grid instead of at random points."""

    def __init__(self, grid, **kwargs):
        super().__init__(num_points=grid[0] * grid[1], **kwargs)
        self.grid = grid

    def sample_point_coords(self, device):
        return pixel_centres(*self.grid)[None].to(device)


class PixelCentreCriterion(SetCriterion):
    """Mask losses at every pixel centre of an ``H x W`` grid."""

    def __init__(self, grid, **kwargs):
        super().__init__(num_points=grid[0] * grid[1], oversample_ratio=3.0, importance_sample_ratio=0.75,
                         **kwargs)
        self.grid = grid

    def sample_point_coords(self, mask_logits):
        return pixel_centres(*self.grid)[None].expand(mask_logits.shape[0], -1, -1).to(mask_logits)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def reference_bce(logits, target):
    """Mean binary cross-entropy over the pixels, in plain Python floats."""
    values = [-(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))
              for x, t in zip(logits.flatten().tolist(), target.flatten().tolist())]
    return sum(values) / len(values)


def reference_dice(logits, target):
    s = [sigmoid(x) for x in logits.flatten().tolist()]
    t = target.flatten().tolist()
    return 1 - (2 * sum(a * b for a, b in zip(s, t)) + 1) / (sum(s) + sum(t) + 1)


def reference_cost(logits, masks, labels, target_masks, w_class, w_mask, w_dice):
    probs = torch.softmax(logits.double(), -1)
    return torch.tensor([[w_class * -probs[q, labels[t]].item()
                          + w_mask * reference_bce(masks[q], target_masks[t])
                          + w_dice * reference_dice(masks[q], target_masks[t])
                          for t in range(len(labels))] for q in range(len(logits))], dtype=torch.float64)


def brute_force_assignment(cost):
    """Least-cost injective map targets -> queries by enumeration: ``{query: target}``."""
    num_queries, num_targets = cost.shape
    best = min(itertools.permutations(range(num_queries), num_targets),
               key=lambda qs: sum(cost[q, t].item() for t, q in enumerate(qs)))
    return {q: t for t, q in enumerate(best)}


def as_pairs(indices):
    query_idx, target_idx = indices
    return dict(zip(query_idx.tolist(), target_idx.tolist()))


# ----------------------------------------------------------------------------- matcher


def hand_made_case():
    """3 queries, 2 targets on a 2x2 image, classes {0, 1} + no object.

    Query 0 looks like target 1 (class 1, bottom row), query 2 like target 0
    (class 0, top row), query 1 like nothing. Optimal: q0 -> t1, q2 -> t0.
    """
    logits = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    masks = torch.tensor([[[-2.0, -2.0], [2.0, 2.0]],
                          [[-3.0, -3.0], [-3.0, -3.0]],
                          [[2.0, 2.0], [-2.0, -1.0]]])
    labels = torch.tensor([0, 1])
    target_masks = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    return logits, masks, labels, target_masks


def test_matcher_cost_matrix_and_assignment_on_a_hand_made_case():
    logits, masks, labels, target_masks = hand_made_case()
    matcher = PixelCentreMatcher((2, 2), cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    cost = matcher.cost_matrix(logits, masks, labels, target_masks)
    expected = reference_cost(logits, masks, labels, target_masks, 2.0, 5.0, 5.0)
    torch.testing.assert_close(cost.double(), expected, rtol=1e-6, atol=1e-6)
    # One entry fully by hand: q1 (uniform logits, all -3) vs t0 (top row).
    s = sigmoid(-3.0)
    bce = (2 * -math.log(s) + 2 * -math.log(1 - s)) / 4
    dice = 1 - (2 * 2 * s + 1) / (4 * s + 2 + 1)
    assert cost[1, 0].item() == pytest.approx(2 * (-1 / 3) + 5 * bce + 5 * dice, rel=1e-6)

    indices = matcher({"pred_logits": logits[None], "pred_masks": masks[None]},
                      [{"labels": labels, "masks": target_masks}])
    assert len(indices) == 1
    query_idx, target_idx = indices[0]
    assert query_idx.dtype == torch.int64 and target_idx.dtype == torch.int64
    assert query_idx.tolist() == [0, 2] and target_idx.tolist() == [1, 0]


def test_matcher_finds_the_global_optimum_where_greedy_fails():
    # Class cost only: greedy takes q0 -> t0 (p = .5) and leaves q1 -> t1 (p = .05);
    # the optimum is q0 -> t1 (.45) + q1 -> t0 (.45).
    probs = torch.tensor([[0.50, 0.45, 0.05], [0.45, 0.05, 0.50]])
    masks = torch.zeros(2, 2, 2)
    matcher = PixelCentreMatcher((2, 2), cost_class=1.0, cost_mask=0.0, cost_dice=0.0)
    indices = matcher({"pred_logits": probs.log()[None], "pred_masks": masks[None]},
                      [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(2, 2, 2)}])
    assert as_pairs(indices[0]) == {0: 1, 1: 0}


def test_matcher_agrees_with_brute_force_on_random_costs():
    g = torch.Generator().manual_seed(3)
    matcher = PixelCentreMatcher((3, 4), cost_class=2.0, cost_mask=5.0, cost_dice=5.0)
    for _ in range(5):
        logits = torch.randn(5, 4, generator=g) * 2
        masks = torch.randn(5, 3, 4, generator=g) * 3
        labels = torch.randint(0, 3, (3,), generator=g)
        target_masks = (torch.rand(3, 3, 4, generator=g) > 0.5).float()
        expected = brute_force_assignment(reference_cost(logits, masks, labels, target_masks, 2.0, 5.0, 5.0))
        indices = matcher({"pred_logits": logits[None], "pred_masks": masks[None]},
                          [{"labels": labels, "masks": target_masks}])
        assert as_pairs(indices[0]) == expected


def test_permuting_the_queries_permutes_the_match():
    g = torch.Generator().manual_seed(0)
    batch, queries = 2, 7
    logits = torch.randn(batch, queries, 5, generator=g)
    masks = torch.randn(batch, queries, 6, 8, generator=g) * 2
    targets = [{"labels": torch.tensor([3, 0, 2]), "masks": (torch.rand(3, 24, 32, generator=g) > 0.5).float()},
               {"labels": torch.tensor([1, 1]), "masks": (torch.rand(2, 24, 32, generator=g) > 0.5).float()}]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)  # random points

    torch.manual_seed(11)
    original = matcher({"pred_logits": logits, "pred_masks": masks}, targets)
    perm = torch.randperm(queries, generator=g)
    torch.manual_seed(11)  # same random points
    permuted = matcher({"pred_logits": logits[:, perm], "pred_masks": masks[:, perm]}, targets)
    for b in range(batch):
        assert len(original[b][0]) == len(targets[b]["labels"])
        # Permuted query i is original query perm[i].
        mapped = {perm[q].item(): t for q, t in as_pairs(permuted[b]).items()}
        assert mapped == as_pairs(original[b])


def test_matcher_handles_images_without_targets_and_rejects_bad_input():
    matcher = HungarianMatcher(num_points=16)
    outputs = {"pred_logits": torch.randn(1, 4, 3), "pred_masks": torch.randn(1, 4, 5, 5)}
    query_idx, target_idx = matcher(outputs, [{"labels": torch.zeros(0, dtype=torch.long),
                                               "masks": torch.zeros(0, 20, 20)}])[0]
    assert query_idx.numel() == 0 and target_idx.numel() == 0
    with pytest.raises(ValueError, match="same T"):
        matcher(outputs, [{"labels": torch.tensor([0, 1]), "masks": torch.zeros(1, 20, 20)}])
    outputs["pred_masks"][0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        matcher(outputs, [{"labels": torch.tensor([0]), "masks": torch.ones(1, 20, 20)}])
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(cost_class=0, cost_mask=0, cost_dice=0)


# ----------------------------------------------------------------------------- criterion


def make_criterion(grid=(2, 2), num_classes=2, eos_coef=0.1, weight_dict=None):
    return PixelCentreCriterion(
        grid, num_classes=num_classes, eos_coef=eos_coef, losses=["labels", "masks"], weight_dict=weight_dict or {},
        matcher=PixelCentreMatcher(grid, cost_class=2.0, cost_mask=5.0, cost_dice=5.0),
    )


def test_loss_ce_is_the_eos_weighted_mean_of_the_query_nlls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, generator=g)  # 2 classes + no object
    targets = [{"labels": torch.tensor([1, 0]), "masks": torch.zeros(2, 2, 2)},
               {"labels": torch.tensor([1]), "masks": torch.zeros(1, 2, 2)}]
    # Image 0: q2 -> t0 (class 1), q0 -> t1 (class 0); image 1: q1 -> t0 (class 1).
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))]
    criterion = make_criterion(eos_coef=0.1)
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_masks=3.0)["loss_ce"]

    classes = [[0, 2, 1], [2, 1, 2]]  # 2 = no object
    numerator = denominator = 0.0
    for b in range(2):
        for q in range(3):
            row = logits[b, q].tolist()
            nll = math.log(sum(math.exp(v) for v in row)) - row[classes[b][q]]
            weight = 0.1 if classes[b][q] == 2 else 1.0
            numerator += weight * nll
            denominator += weight
    assert loss.item() == pytest.approx(numerator / denominator, rel=1e-6)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])
    assert "empty_weight" in criterion.state_dict()  # official checkpoints hold criterion.empty_weight


def test_mask_losses_in_closed_form():
    # One matched mask, logits 0 everywhere, target one pixel of four:
    # BCE = log 2 at every pixel; Dice = 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5.
    criterion = make_criterion()
    outputs = {"pred_masks": torch.zeros(1, 2, 2, 2)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])}]
    losses = criterion.loss_masks(outputs, targets, [(torch.tensor([1]), torch.tensor([0]))], num_masks=1.0)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses["loss_dice"].item() == pytest.approx(0.5, rel=1e-6)
    losses = criterion.loss_masks(outputs, targets, [(torch.tensor([1]), torch.tensor([0]))], num_masks=4.0)
    assert losses["loss_dice"].item() == pytest.approx(0.125, rel=1e-6)


def test_mask_losses_match_independent_sums_over_matched_pairs():
    g = torch.Generator().manual_seed(1)
    pred_masks = torch.randn(2, 4, 3, 4, generator=g) * 2
    targets = [{"labels": torch.tensor([0, 1, 1]), "masks": (torch.rand(3, 3, 4, generator=g) > 0.5).float()},
               {"labels": torch.tensor([0]), "masks": (torch.rand(1, 3, 4, generator=g) > 0.5).float()}]
    indices = [(torch.tensor([0, 2, 3]), torch.tensor([2, 0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    criterion = make_criterion(grid=(3, 4))
    losses = criterion.loss_masks({"pred_masks": pred_masks}, targets, indices, num_masks=2.5)
    pairs = [(0, 0, 2), (0, 2, 0), (0, 3, 1), (1, 1, 0)]
    bce = sum(reference_bce(pred_masks[b, q], targets[b]["masks"][t]) for b, q, t in pairs) / 2.5
    dice = sum(reference_dice(pred_masks[b, q], targets[b]["masks"][t]) for b, q, t in pairs) / 2.5
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(dice, rel=1e-5)


def test_targets_of_different_sizes_are_zero_padded_in_match_order():
    two_masks = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    targets = [{"labels": torch.tensor([0, 1]), "masks": two_masks},
               {"labels": torch.tensor([0]), "masks": torch.full((1, 3, 2), 3.0)}]
    indices = [(torch.tensor([0, 4]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    matched = SetCriterion._matched_target_masks(targets, indices)
    expected = torch.zeros(3, 3, 3)
    expected[0, :2, :3] = 2.0
    expected[1, :2, :3] = 1.0
    expected[2, :3, :2] = 3.0
    assert torch.equal(matched, expected)


def test_forward_normalises_by_num_masks_and_supervises_every_aux_output():
    g = torch.Generator().manual_seed(2)

    def prediction():
        return {"pred_logits": torch.randn(2, 4, 3, generator=g), "pred_masks": torch.randn(2, 4, 2, 2, generator=g)}

    final, aux = prediction(), [prediction(), prediction()]
    outputs = dict(final, aux_outputs=aux)
    targets = [{"labels": torch.tensor([0, 1]), "masks": (torch.rand(2, 2, 2, generator=g) > 0.5).float()},
               {"labels": torch.tensor([1]), "masks": (torch.rand(1, 2, 2, generator=g) > 0.5).float()}]
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    assert set(losses) == {f"{name}{suffix}" for name in ("loss_ce", "loss_mask", "loss_dice")
                           for suffix in ("", "_0", "_1")}

    # The final prediction's losses, from its own matching and num_masks = 3 targets.
    indices = criterion.matcher(final, targets)
    expected = criterion.loss_labels(final, targets, indices, 3.0)
    expected.update(criterion.loss_masks(final, targets, indices, 3.0))
    pairs = [(b, q, t) for b, (qs, ts) in enumerate(indices) for q, t in zip(qs.tolist(), ts.tolist())]
    bce = sum(reference_bce(final["pred_masks"][b, q], targets[b]["masks"][t]) for b, q, t in pairs) / 3
    assert losses["loss_mask"].item() == pytest.approx(bce, rel=1e-5)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-6)
    # Each auxiliary output: the same losses computed on it alone (own matching).
    for i, aux_out in enumerate(aux):
        alone = criterion(aux_out, targets)
        for name in ("loss_ce", "loss_mask", "loss_dice"):
            assert losses[f"{name}_{i}"].item() == pytest.approx(alone[name].item(), rel=1e-6)
    assert losses["loss_ce_0"].item() != pytest.approx(losses["loss_ce"].item())


def test_num_masks_is_averaged_over_ranks(monkeypatch):
    # Simulate a second rank holding 5 targets: the all-reduce adds them and the
    # world size divides, so num_masks = (1 + 5) / 2 = 3 on this rank.
    monkeypatch.setattr(criterion_module.dist, "is_available", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", lambda t: t.add_(5.0))
    monkeypatch.setattr(criterion_module, "get_world_size", lambda: 2)
    criterion = make_criterion()
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 2, 2)}
    targets = [{"labels": torch.tensor([0]), "masks": torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])}]
    losses = criterion(outputs, targets)
    assert losses["loss_dice"].item() == pytest.approx(0.5 / 3, rel=1e-6)
    assert losses["loss_mask"].item() == pytest.approx(math.log(2) / 3, rel=1e-6)


def test_batch_without_targets_gives_zero_mask_losses_with_a_graph():
    criterion = make_criterion()
    pred_logits = torch.randn(2, 3, 3, requires_grad=True)
    pred_masks = torch.randn(2, 3, 2, 2, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 2, 2)}
    losses = criterion({"pred_logits": pred_logits, "pred_masks": pred_masks}, [empty, empty])
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    # Every query is "no object": plain CE towards the last class (weights all eos_coef cancel).
    expected = F.cross_entropy(pred_logits.detach().reshape(-1, 3), torch.full((6,), 2))
    assert losses["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(losses.values()).backward()
    assert pred_masks.grad is not None and pred_logits.grad is not None


def test_uncertainty_sampling_prefers_points_near_the_decision_boundary():
    # Logits are a horizontal ramp from -10 to 10: uncertainty is highest at x = 0.5.
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher(num_points=16), weight_dict={}, eos_coef=0.1,
                             losses=["masks"], num_points=300, oversample_ratio=3.0, importance_sample_ratio=1.0)
    ramp = torch.linspace(-10, 10, 64).expand(2, 1, 8, 64)
    torch.manual_seed(0)
    points = criterion.sample_point_coords(ramp)
    assert points.shape == (2, 300, 2) and points.min() >= 0 and points.max() <= 1
    # Oversampling 3x and keeping the most uncertain third: |x - 0.5| mostly below ~1/6
    # (the zero padding of grid_sample at the top/bottom edge lets a few others in).
    distance = (points[..., 0] - 0.5).abs()
    assert distance.mean() < 0.1 and distance.quantile(0.95) < 0.2
    criterion.importance_sample_ratio = 0.0
    uniform = criterion.sample_point_coords(ramp)
    assert (uniform[..., 0] - 0.5).abs().mean() > 0.2  # ~0.25 for uniform points


def test_criterion_from_config_mirrors_the_official_meta_architecture():
    cfg = CN()
    cfg.MODEL = CN()
    cfg.MODEL.SEM_SEG_HEAD = CN({"NUM_CLASSES": 150})
    cfg.MODEL.MASK_FORMER = CN({
        "DEEP_SUPERVISION": True, "NO_OBJECT_WEIGHT": 0.1, "CLASS_WEIGHT": 2.0, "MASK_WEIGHT": 5.0,
        "DICE_WEIGHT": 5.0, "DEC_LAYERS": 10, "TRAIN_NUM_POINTS": 12544, "OVERSAMPLE_RATIO": 3.0,
        "IMPORTANCE_SAMPLE_RATIO": 0.75,
    })
    criterion = SetCriterion(cfg)
    assert criterion.num_classes == 150 and criterion.losses == ["labels", "masks"]
    assert criterion.empty_weight.shape == (151,) and criterion.empty_weight[-1].item() == pytest.approx(0.1)
    assert (criterion.num_points, criterion.oversample_ratio, criterion.importance_sample_ratio) == (12544, 3.0, 0.75)
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_mask, matcher.cost_dice, matcher.num_points) == (2.0, 5.0, 5.0, 12544)
    # 9 auxiliary predictions (DEC_LAYERS - 1), each with the main weights.
    assert len(criterion.weight_dict) == 3 * 10
    assert criterion.weight_dict["loss_mask_8"] == 5.0 and criterion.weight_dict["loss_ce_0"] == 2.0
    assert "loss_ce_9" not in criterion.weight_dict
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = False
    assert SetCriterion(cfg).weight_dict == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


def test_criterion_rejects_bad_targets_and_logits():
    criterion = make_criterion()
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 2, 2)}
    with pytest.raises(ValueError, match="outside"):
        criterion(outputs, [{"labels": torch.tensor([255]), "masks": torch.zeros(1, 2, 2)}])
    with pytest.raises(KeyError, match="'labels' and 'masks'"):
        criterion(outputs, [{"labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="num_classes \\+ 1"):
        criterion({"pred_logits": torch.zeros(1, 2, 5), "pred_masks": torch.zeros(1, 2, 2, 2)},
                  [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 2, 2)}])
    with pytest.raises(ValueError, match="no targets"):
        criterion(outputs, None)
    with pytest.raises(ValueError, match="unknown losses"):
        make_criterion().__class__((2, 2), num_classes=2, eos_coef=0.1, losses=["boxes"], weight_dict={},
                                   matcher=HungarianMatcher(num_points=4))
