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

#: The options as they were before the official behaviour became the default.
OLD_DEFAULTS = dict(estep_samples="correct", memory_init="empty", bootstrap_empty_classes=True, embedding="linear")


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
        # These tests read the stored features, i.e. the ring memory; the
        # default "stats" memory has its own (tests/test_gmm_memory_stats.py).
        memory_kind="ring",
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


def projection_weight(clf):
    """The projection matrix of either embedding."""
    return clf.projection.conv.weight if clf.embedding == "conv_bn_relu" else clf.projection.weight


# ----------------------------------------------------------------- construction


def test_from_config_defaults_and_overrides():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    gmm = cfg.MODEL.GMM
    # the paper defaults.
    assert (gmm.EMBED_DIM, gmm.NUM_COMPONENTS, gmm.MEMORY_SIZE, gmm.MAX_SAMPLES_PER_COMPONENT) == (64, 5, 32000, 20)
    assert (gmm.MEAN_MOMENTUM, gmm.STD_MOMENTUM, gmm.VARIANCE_FLOOR, gmm.UPDATE_INTERVAL) == (0.999, 0.0, 1e-2, 5)
    assert (gmm.SINKHORN_EPSILON, gmm.SINKHORN_ITERATIONS, gmm.CONTRASTIVE_LOSS_WEIGHT) == (0.05, 3, 0.01)
    assert gmm.COMPONENT_REDUCTION == "max"
    # The official head's behaviour (see the classifier's module docstring).
    assert (gmm.E_STEP_SAMPLES, gmm.MEMORY_INIT, gmm.BOOTSTRAP_EMPTY_CLASSES, gmm.EMBEDDING) == (
        "all", "random", False, "conv_bn_relu")
    gmm.MEMORY_SIZE = 10
    default = GaussianMixtureClassifier(cfg, in_channels=32, num_classes=3)
    assert (default.estep_samples, default.memory_samples, default.memory_init, default.bootstrap_empty_classes,
            default.embedding) == ("all", "correct", "random", False, "conv_bn_relu")
    assert default.projection.conv.in_features == 32 and default.memory.count.min() == 10
    # The memory keeps the chunk sums the M-step reads (the ring is an option).
    assert gmm.MEMORY_KIND == "stats" and default.memory.kind == "stats"
    assert default.memory.chunk_size == 10  # the per-step cap (20), capped at K = 10
    gmm.MEMORY_SIZE = 100
    gmm.NUM_COMPONENTS = 2
    gmm.EMBED_DIM = 12
    gmm.COMPONENT_REDUCTION = "logsumexp"
    gmm.E_STEP_SAMPLES = "correct"
    gmm.MEMORY_INIT = "empty"
    gmm.BOOTSTRAP_EMPTY_CLASSES = True
    gmm.EMBEDDING = "linear"
    gmm.MEMORY_DTYPE = "float16"
    gmm.MEMORY_KIND = "ring"
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    clf = GaussianMixtureClassifier(cfg, in_channels=32, num_classes=7)
    assert clf.memory.features.shape == (7, 2, 100, 12) and clf.memory.features.dtype == torch.float16
    assert clf.means.shape == clf.stds.shape == (7, 2, 12)
    assert clf.projection.in_features == 32
    assert (clf.component_reduction, clf.estep_samples, clf.ignore_value) == ("logsumexp", "correct", 254)
    assert (clf.memory_init, clf.bootstrap_empty_classes, clf.embedding) == ("empty", True, "linear")
    assert clf.memory.count.sum() == 0 and clf.memory.features.abs().sum() == 0
    assert torch.allclose(clf.means.norm(dim=-1), torch.ones(7, 2)) and torch.equal(clf.stds, torch.ones(7, 2, 12))
    for key, value in (("MEMORY_DTYPE", "bfloat16"), ("MEMORY_INIT", "zeros"), ("EMBEDDING", "mlp"),
                       ("E_STEP_SAMPLES", "some"), ("MEMORY_KIND", "queue")):
        bad = cfg.clone()
        bad.MODEL.GMM[key] = value
        with pytest.raises(ValueError):
            GaussianMixtureClassifier(bad, in_channels=32, num_classes=7)


def test_state_dict_holds_the_whole_gmm_state():
    keys = set(make_classifier().state_dict())
    for name in ("means", "stds", "iteration", "memory.features", "memory.pointer", "memory.count", "memory.pending",
                 "memory.total_written", "projection.bn.running_mean", "projection.bn.running_var"):
        assert name in keys


# ---------------------------------------------------------------------- forward


@pytest.mark.parametrize("reduction", ["max", "logsumexp"])
def test_forward_scores(reduction):
    clf = make_classifier(component_reduction=reduction, embedding="linear")
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
    assert 0.1 < correct[labels != 255].float().mean() < 0.95  # both kinds of samples present
    flat = out.component_log_likelihood.reshape(300, 12)
    keep = targets != -100
    expected = 0.01 * F.cross_entropy(flat[keep], targets[keep])
    loss = clf.em_step(out, labels)
    torch.testing.assert_close(loss, expected)
    # Only correctly classified samples enter the memory, at their component.
    to_memory = correct & (labels != 255)
    expected_counts = torch.bincount(targets[to_memory], minlength=12).view(4, 3)
    assert torch.equal(clf.memory.total_written, expected_counts)
    for slot in range(12):
        c, m = divmod(slot, 3)
        n = int(expected_counts[c, m])
        torch.testing.assert_close(clf.memory.features[c, m, :n], out.embeddings.detach()[to_memory & (targets == slot)])
    loss.backward()
    assert projection_weight(clf).grad is not None and torch.isfinite(projection_weight(clf).grad).all()


@pytest.mark.parametrize("build", ["constructor", "config"])
def test_default_e_step_is_the_official_rule(build):
    """By default every labelled sample, misclassified ones included, gets its
    per-class Sinkhorn component as CE target; only the correctly classified
    ones are stored (no bootstrap, although every class is new)."""
    if build == "constructor":
        torch.manual_seed(0)
        clf = GaussianMixtureClassifier(in_channels=IN_CHANNELS, num_classes=4, embed_dim=8, num_components=3,
                                        memory_size=500, max_samples_per_component=1000,
                                        memory_kind="ring")  # the stored features are read below
    else:
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        cfg.merge_from_list(["MODEL.GMM.EMBED_DIM", "8", "MODEL.GMM.NUM_COMPONENTS", "3", "MODEL.GMM.MEMORY_SIZE",
                             "500", "MODEL.GMM.MAX_SAMPLES_PER_COMPONENT", "1000", "MODEL.GMM.MEMORY_KIND", "ring"])
        torch.manual_seed(0)
        clf = GaussianMixtureClassifier(cfg, in_channels=IN_CHANNELS, num_classes=4)
    x, labels = make_batch(300)
    out = clf(x)
    targets, correct = independent_targets(out, labels, 3, "all")
    targets_correct_only, _ = independent_targets(out, labels, 3, "correct")
    labelled = labels != 255
    wrong = labelled & ~correct
    assert wrong.sum() > 50 and (labelled & correct).sum() > 20
    # The two rules give different targets on this batch: the check below
    # fails if the E-step ran on the correct samples only.
    assert (targets[wrong] != targets_correct_only[wrong]).sum() > 10
    flat = out.component_log_likelihood.reshape(300, 12)
    expected = 0.01 * F.cross_entropy(flat[labelled], targets[labelled])
    torch.testing.assert_close(clf.em_step(out, labels), expected)
    # The memory: the correctly classified samples at their Sinkhorn component, nothing else.
    stored = labelled & correct
    expected_counts = torch.bincount(targets[stored], minlength=12).view(4, 3)
    assert torch.equal(clf.memory.total_written, expected_counts)
    for slot in range(12):
        c, m = divmod(slot, 3)
        n = int(expected_counts[c, m])
        torch.testing.assert_close(clf.memory.features[c, m, :n], out.embeddings.detach()[stored & (targets == slot)])


def test_maximization_step_against_numpy():
    clf = make_classifier(mean_momentum=0.7, std_momentum=0.25, variance_floor=0.02, memory_init="empty")
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


def test_random_memory_start_and_first_m_step_fits_every_component():
    """The default start: K random unit vectors per component, all read by the
    first M-step, which fits every component of every class to them."""
    dim = 64
    clf = make_classifier(embed_dim=dim, memory_size=500)
    memory = clf.memory
    assert memory.init == "random" and memory.features.abs().sum() > 0
    torch.testing.assert_close(memory.features.norm(dim=-1), torch.ones(4, 3, 500))
    assert (memory.count == 500).all() and memory.pending.all() and memory.total_written.sum() == 0
    means_before = clf.means.clone()
    assert torch.equal(clf.stds, torch.ones_like(clf.stds))
    x, labels = make_batch(100)
    labels[labels == 3] = 255  # class 3 absent: fitted all the same
    clf.em_step(clf(x), labels)  # step 0: an M-step
    assert not memory.pending.any()
    # Official estimator on all K slots (the step wrote a few real features too).
    stored = memory.features.double()
    direction = F.normalize(stored.sum(dim=2), dim=-1)
    expected_std = ((stored - direction[:, :, None]).square().mean(dim=2) + 1e-2).sqrt()
    torch.testing.assert_close(clf.stds.double(), expected_std, rtol=1e-4, atol=1e-5)
    expected_means = F.normalize(0.9 * means_before.double() + 0.1 * direction, dim=-1)
    torch.testing.assert_close(clf.means.double(), expected_means, rtol=1e-4, atol=1e-5)
    # Noise fit: per dimension sigma^2 ~ 1/D + f_d^2 + 1e-2 around the unit
    # direction f, i.e. rms sqrt(2/D + 1e-2) = 0.20, nowhere near 1.
    assert ((1 / dim + 1e-2) ** 0.5 - 0.01 < clf.stds[3]).all() and (clf.stds[3] < 0.5).all()
    rms = clf.stds[3].square().mean().sqrt().item()
    assert rms == pytest.approx((2 / dim + 1e-2) ** 0.5, rel=0.05)
    # "empty" keeps the old start: zeros, nothing valid, nothing refitted.
    empty = make_classifier(embed_dim=dim, memory_size=500, memory_init="empty")
    assert empty.memory.features.abs().sum() == 0 and empty.memory.count.sum() == 0
    assert not empty.memory.pending.any()
    empty.maximization_step()
    assert torch.equal(empty.stds, torch.ones_like(empty.stds))


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
    out = clf(x)  # (updates BatchNorm's running statistics)
    before = state(clf)
    loss = clf.em_step(out, labels, update=False)
    assert loss > 0
    assert_same_state(before, state(clf))


# ------------------------------------------------------------------ edge cases


def test_absent_classes_keep_their_components():
    clf = make_classifier(update_interval=1, **OLD_DEFAULTS)
    x, labels = make_batch(300)
    labels[(labels == 1) | (labels == 3)] = 255
    means_before, stds_before = clf.means.clone(), clf.stds.clone()
    loss = clf.em_step(clf(x), labels)
    assert torch.isfinite(loss)
    assert clf.memory.count[[1, 3]].sum() == 0
    assert torch.equal(clf.means[[1, 3]], means_before[[1, 3]]) and torch.equal(clf.stds[[1, 3]], stds_before[[1, 3]])
    assert not torch.equal(clf.means[[0, 2]], means_before[[0, 2]])


@pytest.mark.parametrize("memory_init", ["random", "empty"])
def test_class_with_fewer_samples_than_components(memory_init):
    clf = make_classifier(num_components=5, update_interval=1, memory_init=memory_init,
                          bootstrap_empty_classes=True)
    x, labels = make_batch(200)
    labels[labels == 2] = 255
    labels[:2] = 2  # two samples of class 2 for five components
    out = clf(x)
    loss = clf.em_step(out, labels)
    assert torch.isfinite(loss)
    # Class 2 had no data: both samples seed it (bootstrap), whether
    # classified correctly or not.
    assert int(clf.memory.total_written[2].sum()) == 2
    assert torch.isfinite(clf.means).all() and torch.isfinite(clf.stds).all()


@pytest.mark.parametrize("embedding", ["conv_bn_relu", "linear"])
def test_all_ignore_batch(embedding):
    # With an empty start: the random one's first M-step would refit everything.
    clf = make_classifier(memory_init="empty", embedding=embedding)
    x, _ = make_batch(100)
    labels = torch.full((100,), 255)
    out = clf(x)
    before = state(clf)  # after the forward, which updates BatchNorm's running statistics
    loss = clf.em_step(out, labels)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(projection_weight(clf).grad, torch.zeros_like(projection_weight(clf)))
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
    assert clf.memory.total_written.sum() > 0
    assert torch.isfinite(clf.means).all() and torch.isfinite(clf.stds).all()
    assert torch.allclose(clf.means.norm(dim=-1), torch.ones(num_classes, num_components))
    if num_components == 1:  # a single component: the CE over C*1 scores
        out = clf(x)
        keep = labels != 255
        expected = 0.01 * F.cross_entropy(out.component_log_likelihood.reshape(150, -1)[keep], labels[keep])
        torch.testing.assert_close(clf.em_step(out, labels, update=False), expected)


def test_nonfinite_embeddings_are_dropped_and_counted():
    # The linear embedding keeps a NaN input row to its own embedding; see
    # the next test for the BatchNorm one.
    clf = make_classifier(update_interval=1, embedding="linear")
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
    assert int(clf.memory.total_written.sum()) > 0


def test_nonfinite_input_poisons_the_whole_batch_through_batchnorm():
    """conv_bn_relu in training: one NaN feature makes the batch statistics,
    hence every embedding, NaN; the EM drops them all and stays finite."""
    clf = make_classifier(update_interval=1)
    x, labels = make_batch(50)
    x[0, 0] = float("nan")
    out = clf(x)
    assert not torch.isfinite(out.embeddings).any()
    before = {k: v for k, v in state(clf).items() if not k.startswith("projection.bn.")}
    with EventStorage() as storage:
        loss = clf.em_step(out, labels)
        assert storage.latest()["gmm/nonfinite_samples"][0] == 50
    assert loss.item() == 0.0 and clf.memory.total_written.sum() == 0
    assert torch.isfinite(clf.memory.features).all() and torch.isfinite(clf.stds).all()
    after = {k: v for k, v in state(clf).items() if not k.startswith("projection.bn.")}
    after.pop("iteration"), before.pop("iteration")
    # Only the M-step of the random start ran (pending from construction).
    for key in ("memory.features", "memory.count", "memory.pointer", "memory.total_written"):
        assert torch.equal(before[key], after[key]), key


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


@pytest.mark.parametrize("memory_init", ["empty", "random"])
@pytest.mark.parametrize("bootstrap", [False, True])
def test_class_first_seen_after_the_first_m_steps_with_frozen_features(bootstrap, memory_init):
    """A class absent from the first batches, with features that do not learn
    (no gradient step). Locked out only with the empty start and no
    bootstrap: its stds stay 1, none of its samples is ever classified
    correctly, so none is stored. With the bootstrap its first samples seed
    its memory, under either start. With the random start alone its
    components are fitted to noise (sigma ~0.2) at step 0, broad enough to
    beat the other classes' tight components on its own data (far from
    theirs), so its samples are classified correctly and stored as soon as
    they come: the official start needs no bootstrap."""
    # D = 64 as in the paper: the -sum log sigma gap between fitted (sigma ~0.1)
    # and unfitted (sigma = 1) components grows with D.
    clf = make_classifier(update_interval=1, embed_dim=64, bootstrap_empty_classes=bootstrap,
                          memory_init=memory_init)
    with torch.no_grad():
        for step in range(6):
            x, labels = make_batch(300, seed=step)
            labels[labels == 3] = 255
            clf.em_step(clf(x), labels)
        assert clf.memory.total_written[3].sum() == 0
        if memory_init == "empty":
            assert clf.memory.count[3].sum() == 0 and torch.equal(clf.stds[3], torch.ones_like(clf.stds[3]))
        else:  # fitted to the random slots by the first M-step
            assert (clf.memory.count[3] == 64).all() and bool((clf.stds[3] < 0.5).all())
        for step in range(6, 12):
            x, labels = make_batch(300, seed=step)
            clf.em_step(clf(x), labels)
        x, labels = make_batch(600, seed=100)
        predicted = clf(x).class_logits.argmax(dim=1)
    recall = (predicted[labels == 3] == 3).float().mean().item()
    labelled = labels != 255
    accuracy = (predicted[labelled] == labels[labelled]).float().mean().item()
    if bootstrap or memory_init == "random":
        assert clf.memory.total_written[3].sum() > 0 and bool((clf.stds[3] < 1).all())
        assert recall > 0.9 and accuracy > 0.9, (recall, accuracy)
    else:
        assert clf.memory.total_written[3].sum() == 0 and torch.equal(clf.stds[3], torch.ones_like(clf.stds[3]))
        assert recall == 0.0


@pytest.mark.parametrize("memory_init", ["random", "empty"])
def test_bootstrap_stores_a_new_class_once_under_either_start(memory_init):
    """Bootstrap on: the first batch with a class stores all its samples (up to
    the cap), misclassified ones included; later batches only the correct ones."""
    clf = make_classifier(memory_init=memory_init, bootstrap_empty_classes=True, update_interval=1000,
                          max_samples_per_component=1000, memory_size=500)
    x, labels = make_batch(300)
    labels[labels == 2] = 255
    clf.em_step(clf(x), labels)  # class 2 absent: no data
    assert clf.memory.total_written[2].sum() == 0 and clf.memory.has_data().tolist() == [True, True, False, True]
    x, labels = make_batch(300, seed=1)
    out = clf(x)
    before = clf.memory.total_written.clone()
    correct = out.class_logits.argmax(1) == labels
    clf.em_step(out, labels)
    new = clf.memory.total_written - before
    assert (labels == 2).sum() > (correct & (labels == 2)).sum()  # some of class 2 misclassified
    assert int(new[2].sum()) == int((labels == 2).sum())  # all of class 2 stored
    for c in (0, 1, 3):  # the other classes: only their correct samples
        assert int(new[c].sum()) == int((correct & (labels == c)).sum()), c
    x, labels = make_batch(300, seed=2)
    out = clf(x)
    before = clf.memory.total_written.clone()
    correct = out.class_logits.argmax(1) == labels
    clf.em_step(out, labels)
    new = clf.memory.total_written - before
    assert int(new[2].sum()) == int((correct & (labels == 2)).sum()) < int((labels == 2).sum())


# -------------------------------------------------------------------- embedding


def reference_embeddings(clf, x, training):
    """F.linear -> F.batch_norm -> relu -> layer_norm -> normalize, from the module's tensors."""
    bn = clf.projection.bn
    projected = F.linear(x, clf.projection.conv.weight)
    flat = projected.reshape(-1, projected.shape[-1])
    if training:  # batch statistics (biased variance)
        mean, var = flat.mean(0), flat.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    normed = (flat - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    ln = clf.embedding_norm
    out = F.layer_norm(F.relu(normed), (flat.shape[-1],), ln.weight, ln.bias, ln.eps)
    return F.normalize(out, dim=-1).reshape(projected.shape)


def test_default_embedding_is_conv_bn_relu_layernorm_l2():
    clf = make_classifier()
    assert clf.embedding == "conv_bn_relu"
    projection = clf.projection
    assert isinstance(projection.conv, torch.nn.Linear) and projection.conv.bias is None
    assert isinstance(projection.bn, torch.nn.BatchNorm1d) and isinstance(projection.activate, torch.nn.ReLU)
    keys = {k for k in clf.state_dict() if k.startswith("projection.")}
    # The official ConvModule's keys (its conv weight is (D, C_in, 1, 1)).
    assert keys == {"projection.conv.weight", "projection.bn.weight", "projection.bn.bias",
                    "projection.bn.running_mean", "projection.bn.running_var", "projection.bn.num_batches_tracked"}
    assert projection.conv.weight.shape == (8, IN_CHANNELS)
    # ConvModule's Kaiming init (fan_out = D, ReLU): std sqrt(2 / 8) = 0.5.
    assert projection.conv.weight.std().item() == pytest.approx(0.5, rel=0.2)

    g = torch.Generator().manual_seed(5)
    x = 2.0 * torch.randn(3, 7, IN_CHANNELS, generator=g) + 1.0
    # Training: batch statistics over all 21 rows, running statistics updated.
    clf.train()
    expected = reference_embeddings(clf, x, training=True)
    out = clf(x)
    torch.testing.assert_close(out.embeddings, expected, rtol=1e-5, atol=1e-6)
    assert out.embeddings.shape == (3, 7, 8)
    flat = F.linear(x, projection.conv.weight).reshape(-1, 8)
    torch.testing.assert_close(projection.bn.running_mean, 0.1 * flat.mean(0))
    torch.testing.assert_close(projection.bn.running_var, 0.9 + 0.1 * flat.var(0, unbiased=True))
    # The same rows on any leading shape: BatchNorm2d's statistics over (B, H, W).
    torch.testing.assert_close(clf.embed(x.reshape(21, IN_CHANNELS)), expected.reshape(21, 8), rtol=1e-5, atol=1e-6)
    # What a 1x1 conv + BatchNorm2d + ReLU gives on the (B, C, H, W) map.
    conv_map = F.conv2d(x.permute(2, 0, 1)[None], projection.conv.weight[:, :, None, None])
    bn2d = F.relu(F.batch_norm(conv_map, None, None, projection.bn.weight, projection.bn.bias, training=True))
    torch.testing.assert_close(F.relu(projection.bn(flat)).detach(), bn2d[0].permute(1, 2, 0).reshape(21, 8).detach(),
                               rtol=1e-5, atol=1e-5)
    # A single row has no batch statistics: PyTorch refuses, as for the 2-D BatchNorm.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        clf(x[0, :1])
    # Evaluation: running statistics, any number of rows.
    clf.eval()
    with torch.no_grad():
        torch.testing.assert_close(clf(x).embeddings, reference_embeddings(clf, x, training=False),
                                   rtol=1e-5, atol=1e-6)
        single = clf(x[0, :1]).embeddings
    torch.testing.assert_close(single, reference_embeddings(clf, x[0, :1], training=False), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single.norm(dim=-1), torch.ones(1))
    # Gradients reach the projection and the BatchNorm's affine parameters.
    clf.train()
    x, labels = make_batch(80)
    clf.em_step(clf(x), labels).backward()
    for p in (projection.conv.weight, projection.bn.weight, projection.bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_linear_embedding_keeps_the_old_keys_and_computation():
    clf = make_classifier(embedding="linear")
    keys = {k for k in clf.state_dict() if k.startswith("projection.")}
    assert keys == {"projection.weight", "projection.bias"}
    assert isinstance(clf.projection, torch.nn.Linear)
    x = torch.randn(20, IN_CHANNELS)
    expected = F.normalize(F.layer_norm(F.linear(x, clf.projection.weight, clf.projection.bias), (8,)), dim=-1)
    torch.testing.assert_close(clf(x).embeddings, expected)
    with pytest.raises(ValueError, match="embedding"):
        make_classifier(embedding="mlp")


def test_old_checkpoint_loads_into_the_old_options(tmp_path):
    """A state dict from before the new defaults (linear embedding, empty memory,
    no ``memory.total_written``) loads into a classifier built with those
    options, through Detectron2's checkpointer too, and training continues as
    it would have."""
    old = make_classifier(**OLD_DEFAULTS)
    for step in range(3):
        x, labels = make_batch(200, seed=step)
        old.em_step(old(x), labels)
    legacy = {k: v.clone() for k, v in old.state_dict().items() if k != "memory.total_written"}
    assert "projection.weight" in legacy and "memory.count" in legacy
    torch.save({"model": legacy}, tmp_path / "legacy.pth")

    loaded = make_classifier(seed=7, **OLD_DEFAULTS)
    result = loaded.load_state_dict(legacy)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(loaded.memory.total_written, old.memory.count)
    assert_same_state(state(loaded), state(old))

    checkpointed = make_classifier(seed=8, **OLD_DEFAULTS)
    incompatible = DetectionCheckpointer(checkpointed)._load_model(torch.load(tmp_path / "legacy.pth"))
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == []
    assert_same_state(state(checkpointed), state(old))
    x, labels = make_batch(200, seed=10)
    expected = old.em_step(old(x), labels)
    assert torch.equal(checkpointed.em_step(checkpointed(x), labels), expected)
    assert_same_state(state(checkpointed), state(old))
    # It does not fit the new default embedding: the keys differ.
    with pytest.raises(RuntimeError, match="projection"):
        make_classifier(memory_init="empty").load_state_dict(legacy)


def test_class_norm_off_feeds_log_likelihoods_as_logits():
    torch.manual_seed(0)
    clf = GaussianMixtureClassifier(in_channels=6, num_classes=3, embed_dim=4, num_components=2,
                                    memory_size=8, class_norm=False)
    out = clf(torch.randn(10, 6))
    assert torch.equal(out.class_logits, out.class_log_likelihood)
    assert not any(name.startswith("class_norm") for name in clf.state_dict())
    with_norm = GaussianMixtureClassifier(in_channels=6, num_classes=3, embed_dim=4, num_components=2,
                                          memory_size=8)
    out = with_norm(torch.randn(10, 6))
    assert torch.allclose(out.class_logits.mean(dim=-1), torch.zeros(10), atol=1e-5)
