"""GaussianMixtureClassifier: scores, E-step targets, M-step, edge cases, checkpoints."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.gmm import (
    GaussianMixtureClassifier,
    GMMClassifierOutput,
    diagonal_gaussian_log_likelihood,
    sinkhorn_assignment,
)


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


IN_CHANNELS = 16


def make_classifier(seed=0, **overrides) -> GaussianMixtureClassifier:
    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=IN_CHANNELS,
        num_classes=4,
        embed_dim=8,
        num_components=3,
        memory_size=64,
        max_samples_per_component=10,
        update_interval=2,
        mean_momentum=0.9,
    )
    kwargs.update(overrides)
    return GaussianMixtureClassifier(**kwargs)


def make_batch(n, num_classes=4, seed=0, ignore_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_fraction] = 255
    # Class-dependent features, so that a fair share is classified correctly.
    centers = torch.randn(num_classes, IN_CHANNELS, generator=torch.Generator().manual_seed(99))
    x = centers[labels.clamp(max=num_classes - 1)] + 0.5 * torch.randn(n, IN_CHANNELS, generator=g)
    return x, labels


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------- construction


def test_from_config_defaults_and_overrides():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    gmm = cfg.MODEL.GMM
    # DESIGN §1.1 defaults.
    assert (gmm.EMBED_DIM, gmm.NUM_COMPONENTS, gmm.MEMORY_SIZE, gmm.MAX_SAMPLES_PER_COMPONENT) == (64, 5, 32000, 20)
    assert (gmm.MEAN_MOMENTUM, gmm.STD_MOMENTUM, gmm.VARIANCE_FLOOR, gmm.UPDATE_INTERVAL) == (0.999, 0.0, 1e-2, 5)
    assert (gmm.SINKHORN_EPSILON, gmm.SINKHORN_ITERATIONS, gmm.CONTRASTIVE_LOSS_WEIGHT) == (0.05, 3, 0.01)
    assert gmm.COMPONENT_REDUCTION == "max"
    gmm.MEMORY_SIZE = 100
    gmm.NUM_COMPONENTS = 2
    gmm.EMBED_DIM = 12
    gmm.COMPONENT_REDUCTION = "logsumexp"
    gmm.E_STEP_SAMPLES = "all"
    gmm.MEMORY_DTYPE = "float16"
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    clf = GaussianMixtureClassifier(cfg, in_channels=32, num_classes=7)
    assert clf.memory.features.shape == (7, 2, 100, 12) and clf.memory.features.dtype == torch.float16
    assert clf.means.shape == clf.stds.shape == (7, 2, 12)
    assert clf.projection.in_features == 32
    assert (clf.component_reduction, clf.estep_samples, clf.ignore_value) == ("logsumexp", "all", 254)
    assert torch.allclose(clf.means.norm(dim=-1), torch.ones(7, 2)) and torch.equal(clf.stds, torch.ones(7, 2, 12))
    gmm.MEMORY_DTYPE = "bfloat16"
    with pytest.raises(ValueError):
        GaussianMixtureClassifier(cfg, in_channels=32, num_classes=7)


def test_state_dict_holds_the_whole_gmm_state():
    keys = set(make_classifier().state_dict())
    for name in ("means", "stds", "iteration", "memory.features", "memory.pointer", "memory.count", "memory.pending"):
        assert name in keys


# ---------------------------------------------------------------------- forward


@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
def test_forward_scores(reduction):
    clf = make_classifier(component_reduction=reduction)
    with torch.no_grad():
        clf.stds.uniform_(0.2, 1.0)
    x = torch.randn(2, 5, IN_CHANNELS)
    out = clf(x)
    assert isinstance(out, GMMClassifierOutput)
    assert out.embeddings.shape == (2, 5, 8)
    assert out.component_log_likelihood.shape == (2, 5, 4, 3)
    assert out.class_log_likelihood.shape == out.class_logits.shape == (2, 5, 4)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(2, 5))
    expected_embeddings = F.normalize(F.layer_norm(F.linear(x, clf.projection.weight, clf.projection.bias), (8,)), dim=-1)
    torch.testing.assert_close(out.embeddings, expected_embeddings)
    flat = out.embeddings.reshape(10, 8)
    components = diagonal_gaussian_log_likelihood(flat, clf.means, clf.stds)
    torch.testing.assert_close(out.component_log_likelihood.reshape(10, 4, 3), components)
    if reduction == "max":
        classes = components.max(-1).values
    else:  # log of the uniform mixture density sum_m N(x; mu_m, sigma_m) / M
        classes = components.double().exp().mean(-1).log().float()
    torch.testing.assert_close(out.class_log_likelihood.reshape(10, 4), classes, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.class_logits.reshape(10, 4), F.layer_norm(classes, (4,)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clf.anomaly_score(out), -out.class_log_likelihood.max(-1).values)
    assert clf.anomaly_score(out).shape == (2, 5)


def test_forward_under_autocast_is_fp32():
    clf = make_classifier()
    x = torch.randn(30, IN_CHANNELS)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = clf(x)
    for t in (out.embeddings, out.component_log_likelihood, out.class_log_likelihood, out.class_logits):
        assert t.dtype == torch.float32
    torch.testing.assert_close(
        out.component_log_likelihood, diagonal_gaussian_log_likelihood(out.embeddings, clf.means, clf.stds)
    )


# ------------------------------------------------------------------- EM, losses


def independent_targets(out, labels, num_components, mode):
    """E-step targets recomputed class by class with the single-class sinkhorn_assignment."""
    components = out.component_log_likelihood.detach()
    correct = out.class_logits.argmax(1) == labels
    targets = torch.full_like(labels, -100)
    for c in labels.unique().tolist():
        if c == 255:
            continue
        members = labels == c
        own = components[:, c, :]
        targets[members] = c * num_components + own[members].argmax(1)
        part = members & correct if mode == "correct" else members
        if part.any():
            targets[part] = c * num_components + sinkhorn_assignment(own[part])[1]
    return targets, correct


@pytest.mark.parametrize("mode", ["correct", "all"])
def test_em_step_loss_and_memory_against_class_by_class_computation(mode):
    # Without the bootstrap, which would count every sample of this first
    # step as correct (all memories are empty); it has its own test.
    clf = make_classifier(estep_samples=mode, max_samples_per_component=1000, memory_size=500,
                          bootstrap_empty_classes=False)
    x, labels = make_batch(300)
    out = clf(x)
    targets, correct = independent_targets(out, labels, 3, mode)
    assert 0.2 < correct[labels != 255].float().mean() < 0.95  # both kinds of samples present
    flat = out.component_log_likelihood.reshape(300, 12)
    keep = targets != -100
    expected = 0.01 * F.cross_entropy(flat[keep], targets[keep])
    loss = clf.em_step(out, labels)
    torch.testing.assert_close(loss, expected)
    # Only correctly classified samples enter the memory, at their component.
    to_memory = correct & (labels != 255)
    expected_counts = torch.bincount(targets[to_memory], minlength=12).view(4, 3)
    assert torch.equal(clf.memory.count, expected_counts)
    for slot in range(12):
        c, m = divmod(slot, 3)
        n = int(expected_counts[c, m])
        torch.testing.assert_close(clf.memory.features[c, m, :n], out.embeddings.detach()[to_memory & (targets == slot)])
    loss.backward()
    assert clf.projection.weight.grad is not None and torch.isfinite(clf.projection.weight.grad).all()


def test_maximization_step_against_numpy():
    clf = make_classifier(mean_momentum=0.7, std_momentum=0.25, variance_floor=0.02)
    g = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(200, 8, generator=g), dim=-1)
    slots = torch.randint(0, 6, (200,), generator=g)  # classes 0 and 1 only
    clf.memory.push(features, slots)
    means_before, stds_before = clf.means.clone(), clf.stds.clone()
    clf.maximization_step()
    for slot in range(12):
        c, m = divmod(slot, 3)
        if slot >= 6:  # nothing written: untouched
            assert torch.equal(clf.means[c, m], means_before[c, m]) and torch.equal(clf.stds[c, m], stds_before[c, m])
            continue
        stored = features[slots == slot].numpy()[-10:]  # cap of 10 per push: evenly spaced subsample
        n = (slots == slot).sum().item()
        if n > 10:
            stored = features[slots == slot].numpy()[[j * (n - 1) // 9 for j in range(10)]]
        direction = stored.sum(0) / np.linalg.norm(stored.sum(0))
        mean = 0.7 * means_before[c, m].numpy() + 0.3 * direction
        np.testing.assert_allclose(clf.means[c, m].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
        std = 0.25 * stds_before[c, m].numpy() + 0.75 * np.sqrt(((stored - direction) ** 2).mean(0) + 0.02)
        np.testing.assert_allclose(clf.stds[c, m].numpy(), std, rtol=1e-5, atol=1e-6)
    assert not clf.memory.pending.any()
    # A second M-step with no new features changes nothing.
    means_after = clf.means.clone()
    clf.maximization_step()
    assert torch.equal(clf.means, means_after)


def test_m_step_runs_every_update_interval_from_step_zero():
    clf = make_classifier(update_interval=3)
    changed = []
    for step in range(7):
        x, labels = make_batch(200, seed=step)
        before = clf.means.clone()
        clf.em_step(clf(x), labels)
        changed.append(not torch.equal(before, clf.means))
    assert changed == [True, False, False, True, False, False, True]
    assert int(clf.iteration) == 7


def test_update_false_changes_nothing():
    clf = make_classifier()
    x, labels = make_batch(200)
    clf.em_step(clf(x), labels)  # some state first
    before = state(clf)
    loss = clf.em_step(clf(x), labels, update=False)
    assert loss > 0
    assert_same_state(before, state(clf))


# ------------------------------------------------------------------ edge cases


def test_absent_classes_keep_their_components():
    clf = make_classifier(update_interval=1)
    x, labels = make_batch(300)
    labels[(labels == 1) | (labels == 3)] = 255
    means_before, stds_before = clf.means.clone(), clf.stds.clone()
    loss = clf.em_step(clf(x), labels)
    assert torch.isfinite(loss)
    assert clf.memory.count[[1, 3]].sum() == 0
    assert torch.equal(clf.means[[1, 3]], means_before[[1, 3]]) and torch.equal(clf.stds[[1, 3]], stds_before[[1, 3]])
    assert not torch.equal(clf.means[[0, 2]], means_before[[0, 2]])


def test_class_with_fewer_samples_than_components():
    clf = make_classifier(num_components=5, update_interval=1, estep_samples="all")
    x, labels = make_batch(200)
    labels[labels == 2] = 255
    labels[:2] = 2  # two samples of class 2 for five components
    out = clf(x)
    loss = clf.em_step(out, labels)
    assert torch.isfinite(loss)
    # Class 2's memory was empty: both samples seed it (bootstrap), whether
    # classified correctly or not.
    assert int(clf.memory.count[2].sum()) == 2
    assert torch.isfinite(clf.means).all() and torch.isfinite(clf.stds).all()


def test_all_ignore_batch():
    clf = make_classifier()
    x, _ = make_batch(100)
    labels = torch.full((100,), 255)
    before = state(clf)
    out = clf(x)
    loss = clf.em_step(out, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(clf.projection.weight.grad, torch.zeros_like(clf.projection.weight))
    after = state(clf)
    assert int(after.pop("iteration")) == int(before.pop("iteration")) + 1
    assert_same_state(before, after)


@pytest.mark.parametrize("num_classes,num_components", [(4, 1), (1, 3), (1, 1)])
def test_single_component_and_single_class(num_classes, num_components):
    clf = make_classifier(num_classes=num_classes, num_components=num_components, update_interval=1)
    for step in range(3):
        x, labels = make_batch(150, num_classes=num_classes, seed=step)
        out = clf(x)
        assert out.component_log_likelihood.shape == (150, num_classes, num_components)
        loss = clf.em_step(out, labels)
        assert torch.isfinite(loss)
        loss.backward()
    assert clf.memory.count.sum() > 0
    assert torch.isfinite(clf.means).all() and torch.isfinite(clf.stds).all()
    assert torch.allclose(clf.means.norm(dim=-1), torch.ones(num_classes, num_components))
    if num_components == 1:  # a single component: the CE over C*1 scores
        out = clf(x)
        keep = labels != 255
        expected = 0.01 * F.cross_entropy(out.component_log_likelihood.reshape(150, -1)[keep], labels[keep])
        torch.testing.assert_close(clf.em_step(out, labels, update=False), expected)


def test_nonfinite_embeddings_are_dropped_and_counted():
    clf = make_classifier(update_interval=1, estep_samples="all")
    x, labels = make_batch(200)
    labels[:20] = 0
    x[:5] = float("nan")
    x[5:8, 3] = float("inf")
    out = clf(x)
    assert not torch.isfinite(out.embeddings[:8]).all()
    with EventStorage() as storage:
        loss = clf.em_step(out, labels)
        assert storage.latest()["gmm/nonfinite_samples"][0] == 8
    assert torch.isfinite(loss)
    # The NaN does not spread to the other samples' gradients. (The dropped
    # rows' own gradient is NaN * 0 through any loss, as for the head's CE.)
    (grad,) = torch.autograd.grad(loss, out.embeddings)
    assert torch.isfinite(grad[8:]).all() and grad[8:].abs().sum() > 0
    assert torch.isfinite(clf.memory.features).all() and torch.isfinite(clf.means).all()
    assert torch.isfinite(clf.stds).all()
    # Without an event storage it just carries on.
    assert torch.isfinite(clf.em_step(clf(x), labels))
    assert int(clf.memory.count.sum()) > 0


def test_invalid_labels_raise():
    clf = make_classifier()
    x, labels = make_batch(50)
    labels[0] = 4
    with pytest.raises(ValueError):
        clf.em_step(clf(x), labels)


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_resume_continues_exactly(tmp_path):
    batches = [make_batch(300, seed=s) for s in range(8)]

    def train(clf, steps):
        losses = []
        for x, labels in steps:
            losses.append(clf.em_step(clf(x), labels).detach())
        return losses

    uninterrupted = make_classifier(update_interval=3)
    train(uninterrupted, batches[:5])
    DetectionCheckpointer(uninterrupted, save_dir=str(tmp_path)).save("step5")
    saved = state(uninterrupted)
    expected_losses = train(uninterrupted, batches[5:])

    resumed = make_classifier(seed=123, update_interval=3)  # different initial weights and buffers
    assert not torch.equal(resumed.means, uninterrupted.means)
    DetectionCheckpointer(resumed, save_dir=str(tmp_path)).resume_or_load(str(tmp_path / "step5.pth"))
    assert_same_state(state(resumed), saved)  # every buffer came back
    assert int(resumed.iteration) == 5
    resumed_losses = train(resumed, batches[5:])
    assert all(torch.equal(a, b) for a, b in zip(resumed_losses, expected_losses))
    assert_same_state(state(resumed), state(uninterrupted))
    # The M-step at step 6 ran in both (6 % 3 == 0): the check covers a refit.
    assert int(uninterrupted.iteration) == 8


@pytest.mark.parametrize("bootstrap", [False, True])
def test_class_first_seen_after_the_first_m_steps_gets_fitted_only_with_bootstrap(bootstrap):
    """A class absent from the first batches: without the bootstrap its memory
    stays empty (its samples are never classified correctly, so never stored)
    and it is never predicted; with it, its first samples seed its memory and
    it is then recognised like the others."""
    # D = 64 as in the paper: the -sum log sigma gap between fitted (sigma ~0.1)
    # and unfitted (sigma = 1) components grows with D.
    clf = make_classifier(update_interval=1, embed_dim=64, bootstrap_empty_classes=bootstrap)
    with torch.no_grad():
        for step in range(6):
            x, labels = make_batch(300, seed=step)
            labels[labels == 3] = 255
            clf.em_step(clf(x), labels)
        assert clf.memory.count[3].sum() == 0 and torch.equal(clf.stds[3], torch.ones_like(clf.stds[3]))
        for step in range(6, 12):
            x, labels = make_batch(300, seed=step)
            clf.em_step(clf(x), labels)
        x, labels = make_batch(600, seed=100)
        predicted = clf(x).class_logits.argmax(dim=1)
    recall = (predicted[labels == 3] == 3).float().mean().item()
    labelled = labels != 255
    accuracy = (predicted[labelled] == labels[labelled]).float().mean().item()
    if bootstrap:
        assert clf.memory.count[3].sum() > 0 and bool((clf.stds[3] < 1).all())
        assert recall > 0.9 and accuracy > 0.9, (recall, accuracy)
    else:
        assert clf.memory.count[3].sum() == 0 and torch.equal(clf.stds[3], torch.ones_like(clf.stds[3]))
        assert recall == 0.0
