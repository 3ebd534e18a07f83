"""ProtoSeg's prototype classifier (projects/ProtoSeg): Algorithm 1, PPC / PPD, the momentum
update, the official-code options, anomaly score, warm-up, state, two gloo ranks, layouts."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from einops import rearrange

from gmmseg_d2.modeling.classifiers.base import CLASSIFIER_REGISTRY, ClassifierOutput, build_classifier
from gmmseg_d2.modeling.gmm.sinkhorn import segmented_sinkhorn_transport_plan

from protoseg import PrototypeClassifier, add_protoseg_config

from .conftest import PROTOSEG_ROOT, REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN_CHANNELS = 6


def make_classifier(level: str = "pixel", seed: int = 0, **kwargs) -> PrototypeClassifier:
    torch.manual_seed(seed)
    args = dict(in_channels=IN_CHANNELS, num_classes=4, level=level, embed_dim=8, num_prototypes=3)
    args.update(kwargs)
    return PrototypeClassifier(**args)


def numpy_algorithm1(scores: np.ndarray, kappa: float, iterations: int) -> np.ndarray:
    """The paper's Algorithm 1 for one class, line by line: ``scores`` (n, M) = X^T P."""
    plan = np.exp(scores.T / kappa)  # (M, n): exp(P^T X / kappa), no max subtracted
    plan /= plan.sum()
    num_prototypes, n = plan.shape
    for _ in range(iterations):
        plan /= plan.sum(axis=1, keepdims=True)
        plan /= num_prototypes
        plan /= plan.sum(axis=0, keepdims=True)
        plan /= n
    plan *= n
    return plan.T


def random_unit(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def numpy_layer_norm_argmax(scores: np.ndarray) -> np.ndarray:
    """Prediction of a fresh mask_norm (weight 1, bias 0): a LayerNorm keeps the order."""
    return scores.argmax(axis=-1)


# ---------------------------------------------------------------- Algorithm 1


def test_core_sinkhorn_without_max_abs_scaling_is_algorithm_1():
    g = torch.Generator().manual_seed(0)
    sizes = {0: 1, 1: 2, 2: 7, 3: 40}
    segments = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    segments = segments[torch.randperm(segments.numel(), generator=g)]  # classes interleaved
    num_prototypes = 5
    scores = (2 * torch.rand(segments.numel(), num_prototypes, generator=g, dtype=torch.float64) - 1)

    plan = segmented_sinkhorn_transport_plan(scores, segments, 3, 0.05, scale_by_max_abs=False)
    scaled = segmented_sinkhorn_transport_plan(scores, segments, 3, 0.05, scale_by_max_abs=True)
    scaling_changes_something = False
    for c in sizes:
        rows = (segments == c).nonzero().squeeze(1)
        expected = numpy_algorithm1(scores[rows].numpy(), 0.05, 3)
        np.testing.assert_allclose(plan[rows].numpy(), expected, rtol=1e-10, atol=1e-14)
        assert np.array_equal(plan[rows].argmax(1).numpy(), expected.argmax(1))
        scaling_changes_something |= not np.allclose(scaled[rows].numpy(), expected, atol=1e-6)
    # GMMSeg's max-abs scaling is a different algorithm (the option matters).
    assert scaling_changes_something

    # The classifier's clustering reads each sample's own-class similarities.
    clf = make_classifier(num_classes=4, num_prototypes=num_prototypes)
    similarities = (2 * torch.rand(segments.numel(), 4, num_prototypes, generator=g) - 1)
    similarities[torch.arange(segments.numel()), segments] = scores.float()
    clustered = clf.online_clustering(similarities, segments)
    for c in sizes:
        rows = (segments == c).nonzero().squeeze(1)
        expected = numpy_algorithm1(scores.float()[rows].double().numpy(), 0.05, 3)
        np.testing.assert_allclose(clustered[rows].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert np.array_equal(clustered[rows].argmax(1).numpy(), expected.argmax(1))


def test_single_sample_of_a_class_gets_a_uniform_plan_hence_the_first_prototype():
    """Algorithm 1 with n = 1: the sample constraint makes the row uniform whatever the scores."""
    clf = make_classifier(num_classes=2, num_prototypes=4)
    similarities = torch.tensor([[[0.1, 0.9, -0.3, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    plan = clf.online_clustering(similarities, torch.tensor([0]))
    torch.testing.assert_close(plan, torch.full((1, 4), 0.25))
    assert int(plan.argmax(1)) == 0


# ---------------------------------------------------------------- PPC / PPD


def _angles_case():
    """D = 2, K = 2 classes x M = 2 prototypes at 0/90 and 180/270 degrees; samples 10 degrees off."""
    clf = make_classifier("query", num_classes=2, num_prototypes=2, embed_dim=2, ppc_weight=0.5, ppd_weight=2.0)
    degrees = torch.tensor([[0.0, 90.0], [180.0, 270.0]])
    clf.prototypes.copy_(torch.stack([torch.cos(torch.deg2rad(degrees)), torch.sin(torch.deg2rad(degrees))], -1))
    sample_degrees = torch.tensor([10.0, 80.0, 190.0, 260.0, 45.0])
    embeddings = torch.stack([torch.cos(torch.deg2rad(sample_degrees)), torch.sin(torch.deg2rad(sample_degrees))], -1)
    labels = torch.tensor([[0, 0, 1, 1, -1]])
    return clf, embeddings[None], labels, sample_degrees


def test_ppc_and_ppd_against_hand_computed_values():
    clf, embeddings, labels, sample_degrees = _angles_case()
    losses = clf.losses(clf.classify(embeddings), labels, update=False)

    # Sinkhorn sends the samples at 10/80 degrees to class 0's prototypes 0/1
    # and those at 190/260 to class 1's: flat targets 0, 1, 2, 3.
    prototype_degrees = [0.0, 90.0, 180.0, 270.0]
    ppc = ppd = 0.0
    for sample, target in zip(sample_degrees[:4].tolist(), range(4)):
        cosines = [math.cos(math.radians(sample - p)) for p in prototype_degrees]
        ppc += -cosines[target] + math.log(sum(math.exp(c) for c in cosines))
        ppd += (1.0 - cosines[target]) ** 2
    assert losses["loss_ppc"].item() == pytest.approx(0.5 * ppc / 4, rel=1e-6)
    assert losses["loss_ppd"].item() == pytest.approx(2.0 * ppd / 4, rel=1e-5)
    assert losses["loss_ppd"].item() == pytest.approx(2.0 * (1 - math.cos(math.radians(10))) ** 2, rel=1e-5)


def test_no_labelled_sample_gives_zero_losses_attached_to_the_graph():
    clf = make_classifier("query")
    features = torch.randn(2, 5, IN_CHANNELS)
    before = clf.prototypes.clone()
    losses = clf.losses(clf(features), torch.full((2, 5), -1), update=True)
    for value in losses.values():
        assert value.item() == 0.0 and value.requires_grad
    assert torch.equal(clf.prototypes, before) and int(clf.iteration) == 1


# ---------------------------------------------------------------- update


def test_momentum_update_is_gated_by_correctness_and_matches_the_formula():
    gamma, num_classes, num_prototypes, dim = 0.7, 3, 4, 8
    clf = make_classifier(num_classes=num_classes, num_prototypes=num_prototypes, embed_dim=dim, gamma=gamma)
    g = torch.Generator().manual_seed(3)
    embeddings = random_unit(g, 2, 4, 5, dim)
    labels = torch.randint(0, num_classes, (2, 4, 5), generator=g)
    labels[torch.rand(2, 4, 5, generator=g) < 0.1] = 255
    prototypes = clf.prototypes.double().numpy().copy()
    before = clf.prototypes.clone()

    clf.losses(clf.classify(embeddings), labels, update=True)

    e = embeddings.reshape(-1, dim).double().numpy()
    y = labels.reshape(-1).numpy()
    similarities = np.einsum("nd,kmd->nkm", e, prototypes)
    predicted = numpy_layer_norm_argmax(similarities.max(axis=2))
    assigned = np.full(len(y), -1)
    for c in range(num_classes):
        rows = np.nonzero(y == c)[0]
        assigned[rows] = numpy_algorithm1(similarities[rows, c], 0.05, 3).argmax(1)
    expected, ungated = prototypes.copy(), prototypes.copy()
    kinds = set()
    for c in range(num_classes):
        for m in range(num_prototypes):
            members = (y == c) & (assigned == m)
            correct = members & (predicted == y)
            kinds.add((bool(correct.any()), bool((members & ~correct).any())))
            for target, rows in ((expected, correct), (ungated, members)):
                if rows.any():
                    direction = e[rows].sum(0) / np.linalg.norm(e[rows].sum(0))
                    moved = gamma * prototypes[c, m] + (1 - gamma) * direction
                    target[c, m] = moved / np.linalg.norm(moved)
    # The case covers: a prototype with correct and misclassified samples, one
    # with misclassified samples only, and one with correct samples only.
    assert {(True, True), (False, True), (True, False)} <= kinds

    np.testing.assert_allclose(clf.prototypes.double().numpy(), expected, atol=1e-6)
    assert np.abs(ungated - expected).max() > 1e-2  # the gate is what the test checks
    untouched = torch.from_numpy(np.all(expected == prototypes, axis=-1))
    assert bool(untouched.any())
    assert torch.equal(clf.prototypes[untouched], before[untouched])  # bit for bit
    assert not torch.equal(clf.prototypes[~untouched], before[~untouched])


def test_update_false_and_eval_forward_leave_the_state_alone():
    clf = make_classifier()
    x = torch.randn(2, IN_CHANNELS, 3, 4)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    clf.losses(clf(x), torch.randint(0, 4, (2, 3, 4)), update=False)
    clf.eval()
    clf(x)
    assert all(torch.equal(v, before[k]) for k, v in clf.state_dict().items())


# ---------------------------------------------------------------- the official-code options


def _manual_embedding(clf: PrototypeClassifier, x: torch.Tensor, l2_dim: int) -> torch.Tensor:
    """The official head on (N, C, H, W): 1x1 conv, ReLU, 1x1 conv, F.normalize(dim=l2_dim), then feat_norm."""
    hidden = F.conv2d(x, clf.projection.hidden.weight[:, :, None, None], clf.projection.hidden.bias)
    projected = F.conv2d(F.relu(hidden), clf.projection.output.weight[:, :, None, None], clf.projection.output.bias)
    rows = rearrange(F.normalize(projected, dim=l2_dim), "n d h w -> n h w d")
    return F.normalize(F.layer_norm(rows, (clf.embed_dim,), clf.feat_norm.weight, clf.feat_norm.bias), dim=-1)


def test_width_axis_l2_is_the_official_normalisation_over_the_nchw_width():
    width, channels = make_classifier(l2_axis="width"), make_classifier(l2_axis="channels")
    with torch.no_grad():  # a non-trivial LayerNorm, so that the first L2's effect shows
        for clf in (width, channels):
            clf.feat_norm.weight.copy_(torch.linspace(0.5, 2.0, clf.embed_dim))
            clf.feat_norm.bias.copy_(torch.linspace(-0.3, 0.3, clf.embed_dim))
    x = torch.randn(2, IN_CHANNELS, 3, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(width.embed(x), _manual_embedding(width, x, l2_dim=-1))
    torch.testing.assert_close(channels.embed(x), _manual_embedding(channels, x, l2_dim=1))
    assert (width.embed(x) - channels.embed(x)).abs().max() > 0.05
    with pytest.raises(ValueError, match="pixel level only"):
        make_classifier("query", l2_axis="width")


def test_gumbel_update_assignment_mostly_disagrees_with_argmax_and_leaves_ppc_ppd_alone():
    g = torch.Generator().manual_seed(4)
    clf = make_classifier("query", num_classes=3, num_prototypes=10, embed_dim=16)
    labels = torch.randint(0, 3, (3000,), generator=g)
    similarities = clf.classify(random_unit(g, 3000, 16)).details.similarities
    plan = clf.online_clustering(similarities, labels)
    torch.manual_seed(0)
    agreement = (clf.gumbel_assignment(plan) == plan.argmax(1)).float().mean().item()
    # A hard gumbel sample of rows close to one-hot: e / (e + 9) = 0.23 at M = 10.
    assert 0.1 < agreement < 0.4

    argmax_clf = make_classifier("query", update_assignment="argmax")
    gumbel_clf = make_classifier("query", update_assignment="gumbel")
    features = torch.randn(4, 30, IN_CHANNELS, generator=g)
    query_labels = torch.randint(0, 4, (4, 30), generator=g)
    torch.manual_seed(1)
    expected = argmax_clf.losses(argmax_clf(features), query_labels, update=True)
    torch.manual_seed(1)
    got = gumbel_clf.losses(gumbel_clf(features), query_labels, update=True)
    for name in ("loss_ppc", "loss_ppd"):
        assert torch.equal(got[name], expected[name])
    assert not torch.equal(gumbel_clf.prototypes, argmax_clf.prototypes)


# ---------------------------------------------------------------- anomaly score


def test_pixel_anomaly_score_is_the_negative_best_cosine_resized():
    clf = make_classifier()
    x = torch.randn(2, IN_CHANNELS, 3, 4)
    out = clf(x)
    cosines = torch.einsum("nhwd,kmd->nhwkm", clf.embed(x), F.normalize(clf.prototypes, dim=-1))
    expected = -cosines.flatten(3).amax(-1)
    torch.testing.assert_close(clf.anomaly_score(out), expected)
    resized = clf.anomaly_score(out, output_size=(7, 9))
    torch.testing.assert_close(
        resized, F.interpolate(expected[:, None], size=(7, 9), mode="bilinear", align_corners=False)[:, 0])


def test_query_anomaly_score_excludes_no_object():
    clf = make_classifier("query", num_classes=3)  # 2 classes + "no object"
    embeddings = random_unit(torch.Generator().manual_seed(5), 2, 4, clf.embed_dim)
    clf.prototypes[-1, 0] = embeddings[0, 0]  # query (0, 0) sits on a "no object" prototype
    out = clf.classify(embeddings)
    score = clf.anomaly_score(out)
    assert score.shape == (2, 4)
    real = embeddings @ rearrange(F.normalize(clf.prototypes[:-1], dim=-1), "k m d -> d (k m)")
    torch.testing.assert_close(score, -real.amax(-1))
    assert out.details.similarities[0, 0].max() == pytest.approx(1.0, abs=1e-6)
    assert score[0, 0] > -0.99


# ---------------------------------------------------------------- warm-up


def test_warm_up_gives_zero_losses_and_no_update_until_warmup_iters():
    clf = make_classifier("query", warmup_iters=2)
    reference = make_classifier("query")  # same initial state, no warm-up
    g = torch.Generator().manual_seed(6)
    features = torch.randn(3, 12, IN_CHANNELS, generator=g)
    labels = torch.randint(0, 4, (3, 12), generator=g)
    initial = clf.prototypes.clone()
    for step in range(2):
        losses = clf.losses(clf(features), labels, update=True)
        assert all(v.item() == 0.0 and v.requires_grad for v in losses.values())
        assert torch.equal(clf.prototypes, initial) and int(clf.iteration) == step + 1
        if step == 0:  # update=False does not count as a step
            clf.losses(clf(features), labels, update=False)
            assert int(clf.iteration) == 1
    losses = clf.losses(clf(features), labels, update=True)
    expected = reference.losses(reference(features), labels, update=True)
    assert losses["loss_ppc"].item() > 0 and losses["loss_ppd"].item() > 0
    for name in clf.loss_names:
        assert torch.equal(losses[name], expected[name])
    assert torch.equal(clf.prototypes, reference.prototypes) and not torch.equal(clf.prototypes, initial)
    assert int(clf.iteration) == 3


# ---------------------------------------------------------------- state


@pytest.mark.parametrize("update_assignment", ["argmax", "gumbel"])
def test_state_dict_round_trip_continues_bit_exactly(update_assignment):
    kwargs = dict(projection="conv_bn_relu", update_assignment=update_assignment, gamma=0.9)
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(2, IN_CHANNELS, 4, 5, generator=g), torch.randint(0, 4, (2, 4, 5), generator=g))
               for _ in range(4)]
    original = make_classifier(**kwargs)
    for step, (x, labels) in enumerate(batches[:2]):
        torch.manual_seed(step)
        original.losses(original(x), labels, update=True)
    copy = make_classifier(seed=1, **kwargs)
    assert not torch.equal(copy.prototypes, original.prototypes)
    copy.load_state_dict(original.state_dict())
    assert {"prototypes", "iteration", "projection.norm.running_mean"} <= set(original.state_dict())

    for step, (x, labels) in enumerate(batches[2:], start=2):
        results = []
        for clf in (original, copy):
            torch.manual_seed(step)
            out = clf(x)
            results.append((out.class_logits, clf.losses(out, labels, update=True)))
        assert torch.equal(results[0][0], results[1][0])
        for name in original.loss_names:
            assert torch.equal(results[0][1][name], results[1][1][name])
    for key, value in original.state_dict().items():
        assert torch.equal(value, copy.state_dict()[key]), key
    assert int(copy.iteration) == 4


# ---------------------------------------------------------------- two gloo ranks

WORLD_SIZE, STEPS = 2, 3
CRAFTED = dict(num_classes=3, num_prototypes=2, embed_dim=16, gamma=0.5)


def pixel_rank_batch(step: int, rank: int):
    """Different data, of a different size, per rank; rank 1 has no labels at step 1."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(2 + rank, IN_CHANNELS, 3, 4, generator=g)
    labels = torch.randint(0, 4, (2 + rank, 3, 4), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.2] = 255
    if step == 1 and rank == 1:
        labels[:] = 255
    return x, labels


def crafted_rank_batch(step: int, rank: int):
    """Query embeddings close to the initial prototypes, different counts per rank and step.

    Every prototype gets 1-3 samples of its own class (classified correctly,
    and assigned to it by Sinkhorn on any split of the batch); every class
    also gets one sample sitting on another class's prototype (misclassified:
    gated out of the update), and two samples are ignored. Rank 1 has no
    labels at step 1.
    """
    prototypes = make_classifier("query", **CRAFTED).prototypes
    num_classes, num_prototypes, dim = prototypes.shape
    g = torch.Generator().manual_seed(10 * step + rank)
    rows, labels = [], []
    for c in range(num_classes):
        for m in range(num_prototypes):
            count = 1 + (c + m + step + 2 * rank) % 3
            rows.append(prototypes[c, m] + 0.03 * torch.randn(count, dim, generator=g))
            labels += [c] * count
        rows.append(prototypes[(c + 1) % num_classes, 0] + 0.03 * torch.randn(1, dim, generator=g))
        labels.append(c)
    rows.append(torch.randn(2, dim, generator=g))
    labels += [-1, -1]
    embeddings, labels = torch.cat(rows), torch.tensor(labels)
    order = torch.randperm(labels.numel(), generator=g)
    labels = labels[order]
    if step == 1 and rank == 1:
        labels[:] = -1
    return F.normalize(embeddings[order], dim=-1)[None], labels[None]


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for assignment in ("argmax", "gumbel"):
            clf = make_classifier(update_assignment=assignment, gamma=0.9)
            torch.manual_seed(100 + rank)  # the ranks draw different gumbel noise
            losses = []
            for step in range(STEPS):
                x, labels = pixel_rank_batch(step, rank)
                losses.append(clf.losses(clf(x), labels, update=True)["loss_ppc"].detach())
            results[assignment] = {"prototypes": clf.prototypes, "iteration": clf.iteration, "losses": losses}
        clf = make_classifier("query", **CRAFTED)
        for step in range(STEPS):
            embeddings, labels = crafted_rank_batch(step, rank)
            clf.losses(clf.classify(embeddings), labels, update=True)
        results["crafted"] = {"prototypes": clf.prototypes}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_end_with_identical_prototypes_equal_to_one_process(tmp_path):
    """Bit-identical prototypes on both ranks; equal (up to summation order) to one process.

    One process fed both ranks' samples runs Sinkhorn on their union, the
    ranks on their own halves: the plans differ in general, hence the PPC /
    PPD targets and the update. The update equals the single process's
    exactly when every correctly classified sample gets the same prototype
    on its rank as in the union, which the crafted batches ensure (checked
    below); misclassified samples may be assigned differently, but do not
    move prototypes.
    """
    mp.spawn(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    initial = make_classifier().prototypes
    for assignment in ("argmax", "gumbel"):
        first, second = (r[assignment] for r in results)
        assert torch.equal(first["prototypes"], second["prototypes"]), assignment
        assert int(first["iteration"]) == int(second["iteration"]) == STEPS
        assert not torch.equal(first["prototypes"], initial)
        assert not torch.equal(first["losses"][0], second["losses"][0])  # different data per rank
    assert not torch.equal(results[0]["argmax"]["prototypes"], results[0]["gumbel"]["prototypes"])

    single = make_classifier("query", **CRAFTED)
    initial = single.prototypes.clone()
    for step in range(STEPS):
        batches = [crafted_rank_batch(step, r) for r in range(WORLD_SIZE)]
        union_embeddings = torch.cat([e for e, _ in batches], dim=1)
        union_labels = torch.cat([y for _, y in batches], dim=1)
        union_out = single.classify(union_embeddings)
        # Precondition: correct samples get the same prototype per rank and in the union.
        similarities, flat_labels = union_out.details.similarities[0], union_labels[0]
        labelled = flat_labels >= 0
        correct = labelled & (union_out.class_logits[0].argmax(-1) == flat_labels)
        union_plan = torch.full(flat_labels.shape, -1)
        union_plan[labelled] = single.online_clustering(similarities[labelled], flat_labels[labelled]).argmax(1)
        rank_plan = torch.full(flat_labels.shape, -1)
        start = 0
        for _, labels in batches:
            rows = torch.arange(start, start + labels.shape[1])
            own = rows[labels[0] >= 0]
            if own.numel():
                rank_plan[own] = single.online_clustering(similarities[own], flat_labels[own]).argmax(1)
            start += labels.shape[1]
        assert bool(correct.any()) and bool((labelled & ~correct).any())
        assert torch.equal(rank_plan[correct], union_plan[correct])
        single.losses(union_out, union_labels, update=True)

    for result in results:
        torch.testing.assert_close(result["crafted"]["prototypes"], single.prototypes, atol=1e-6, rtol=0)
    assert torch.equal(results[0]["crafted"]["prototypes"], results[1]["crafted"]["prototypes"])
    assert (single.prototypes - initial).abs().max() > 1e-2


# ---------------------------------------------------------------- layout, shapes, gradients


def test_class_logits_layout_and_shapes_at_both_levels():
    pixel = make_classifier()
    x = torch.randn(2, IN_CHANNELS, 3, 5)
    out = pixel(x)
    assert out.class_logits.shape == (2, 4, 3, 5)
    assert out.details.embeddings.shape == (2, 3, 5, 8)
    assert out.details.similarities.shape == (2, 3, 5, 4, 3)
    assert out.details.class_scores.shape == (2, 3, 5, 4)
    torch.testing.assert_close(out.details.embeddings.norm(dim=-1), torch.ones(2, 3, 5))
    torch.testing.assert_close(out.details.class_scores, out.details.similarities.amax(-1))

    # The same weights at query level: every pixel is classified as a query on its own.
    query = make_classifier("query", seed=1)
    query.load_state_dict(pixel.state_dict())
    query_out = query(rearrange(x, "n c h w -> n (h w) c"))
    assert query_out.class_logits.shape == (2, 15, 4)
    torch.testing.assert_close(rearrange(out.class_logits, "n k h w -> n (h w) k"), query_out.class_logits)
    single = query(x[1, :, 2, 4][None, None])
    torch.testing.assert_close(single.class_logits[0, 0], out.class_logits[1, :, 2, 4])
    torch.testing.assert_close(out.class_logits[1, :, 2, 4],
                               F.layer_norm(out.details.class_scores[1, 2, 4], (4,)))


@pytest.mark.parametrize("level", ["pixel", "query"])
def test_gradient_reaches_the_projection_through_ce_and_through_ppc_ppd(level):
    clf = make_classifier(level)
    g = torch.Generator().manual_seed(8)
    if level == "pixel":
        x, labels = torch.randn(2, IN_CHANNELS, 3, 4, generator=g), torch.randint(0, 4, (2, 3, 4), generator=g)
    else:
        x, labels = torch.randn(2, 6, IN_CHANNELS, generator=g), torch.randint(0, 4, (2, 6), generator=g)
    assert "prototypes" not in dict(clf.named_parameters()) and not clf.prototypes.requires_grad

    out = clf(x)
    logits = out.class_logits if level == "pixel" else rearrange(out.class_logits, "b q k -> b k q")
    F.cross_entropy(logits, labels).backward()
    for param in (clf.projection.hidden.weight, clf.projection.output.weight, clf.feat_norm.weight,
                  clf.mask_norm.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    clf.zero_grad(set_to_none=True)

    for name in clf.loss_names:
        out = clf(x)
        clf.losses(out, labels, update=False)[name].backward()
        for param in (clf.projection.hidden.weight, clf.projection.output.weight, clf.feat_norm.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert clf.mask_norm.weight.grad is None  # PPC / PPD read the raw cosines
        clf.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- config and registry


def test_config_defaults_registry_and_from_config():
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_protoseg_config(cfg)
    proto = cfg.MODEL.PROTO
    assert (proto.NUM_PROTOTYPES, proto.EMBED_DIM, proto.GAMMA, proto.SINKHORN_EPSILON,
            proto.SINKHORN_ITERATIONS, proto.PPC_WEIGHT, proto.PPD_WEIGHT, proto.WARMUP_ITERS) == (
        10, 720, 0.999, 0.05, 3, 0.01, 0.01, 0)
    assert (proto.L2_AXIS, proto.UPDATE_ASSIGNMENT, proto.PROJECTION) == ("channels", "argmax", "conv_relu")

    assert CLASSIFIER_REGISTRY.get("prototype") is PrototypeClassifier
    proto.EMBED_DIM, proto.NUM_PROTOTYPES = 16, 4
    query = build_classifier(cfg, in_channels=IN_CHANNELS, num_classes=5, level="query", ignore_value=255,
                             name="prototype")
    assert isinstance(query, PrototypeClassifier)
    assert query.ignore_value == -1 and query.prototypes.shape == (5, 4, 16)
    pixel = PrototypeClassifier(cfg, in_channels=IN_CHANNELS, num_classes=5, level="pixel", ignore_value=255)
    assert pixel.ignore_value == 255 and pixel.level == "pixel"
    assert isinstance(pixel(torch.randn(1, IN_CHANNELS, 2, 2)), ClassifierOutput)


CONFIGS = ["mosaic/fcn_R18_proto.yaml", "mosaic/maskformer2_R18_proto.yaml", "textures/fcn_R18_proto.yaml",
           "textures/deeplabv3plus_R18_proto.yaml", "textures/maskformer2_R18_proto.yaml",
           "ade20k/fcn_R101_proto.yaml", "cityscapes/fcn_R101_proto.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_project_configs_name_existing_bases_and_keys(name):
    """Each config bases a softmax config under configs/ and sets only MODEL.PROTO keys that exist.

    (Loading them through setup_cfg needs the core configs' MODEL.CLASSIFIER.NAME.)
    """
    from detectron2.config import get_cfg

    path = os.path.join(PROTOSEG_ROOT, "configs", name)
    with open(path) as f:
        config = yaml.safe_load(f)
    base = os.path.normpath(os.path.join(os.path.dirname(path), config["_BASE_"]))
    assert base.startswith(os.path.join(REPO_ROOT, "configs")) and base.endswith("_softmax.yaml")
    assert os.path.isfile(base)
    assert config["MODEL"]["CLASSIFIER"]["NAME"] == "prototype"
    cfg = get_cfg()
    add_protoseg_config(cfg)
    for key in config["MODEL"].get("PROTO", {}):
        assert key in cfg.MODEL.PROTO, key
    assert name.split("/")[0] in config["OUTPUT_DIR"] and config["OUTPUT_DIR"].endswith("_proto")
