"""The "stats" GMM memory: the ring's M-step moments from chunk sums, in a tenth of the space."""
import io

import pytest
import torch
import torch.nn.functional as F

from gmmseg_d2.modeling.gmm import (
    ClassComponentMemory,
    ClassComponentStatsMemory,
    GaussianMixtureClassifier,
    build_class_component_memory,
    direction_and_variance,
)

C, M, K, D = 3, 2, 60, 8


def _pair(init: str, chunk: int, capacity: int = K, max_new: int = 0):
    """A ring and a stats memory with the same random start (same seed)."""
    max_new = max_new or chunk
    torch.manual_seed(5)
    ring = ClassComponentMemory(C, M, capacity, D, max_new, init=init)
    torch.manual_seed(5)
    stats = ClassComponentStatsMemory(C, M, capacity, D, max_new, init=init, chunk_size=chunk)
    return ring, stats


def _unit(n: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=generator), dim=-1)


def _constant_count_step(generator: torch.Generator, per_component: int):
    """Every component gets exactly ``per_component`` features, in shuffled order."""
    components = torch.arange(C * M).repeat_interleave(per_component)
    components = components[torch.randperm(components.numel(), generator=generator)]
    return _unit(components.numel(), generator), components


def _irregular_step(generator: torch.Generator):
    """Classes appear irregularly: any number of features for any subset of components."""
    n = int(torch.randint(0, 60, (1,), generator=generator))
    return _unit(n, generator), torch.randint(0, C * M, (n,), generator=generator)


ALL = torch.ones(C, M, dtype=torch.bool)


def _moments_differ(ring, stats, mask=ALL):
    (n_r, s1_r, s2_r), (n_s, s1_s, s2_s) = ring.moments(mask), stats.moments(mask)
    assert torch.equal(n_r, n_s)  # the window size is always exact
    return float((s1_r - s1_s).abs().max()), float((s2_r - s2_s).abs().max())


@pytest.mark.parametrize("init", ["random", "empty"])
def test_constant_count_stream_gives_the_rings_moments(init):
    # B = 6 features per component per step and B divides K: every window
    # edge falls on a chunk boundary, so the moments are the ring's up to
    # float rounding, at every step, also after the ring wrapped many times.
    ring, stats = _pair(init, chunk=6)
    generator = torch.Generator().manual_seed(0)
    for step in range(120):
        features, components = _constant_count_step(generator, 6)
        assert torch.equal(ring.push(features, components), stats.push(features, components))
        ds1, ds2 = _moments_differ(ring, stats)
        assert ds1 < 1e-5 and ds2 < 1e-5, (step, ds1, ds2)
        direction_r, variance_r = ring.statistics(ALL)
        direction_s, variance_s = stats.statistics(ALL)
        torch.testing.assert_close(direction_s, direction_r, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(variance_s, variance_r, atol=1e-6, rtol=1e-5)
    assert int(ring.total_written.min()) > 10 * K
    for name in ("count", "total_written", "pending"):
        assert torch.equal(getattr(ring, name), getattr(stats, name)), name


def test_irregular_stream_stays_within_the_documented_bound():
    # Up to 7 features per step per component, chunks of B = 5: chunks span
    # steps and the oldest one straddles the window edge. The documented
    # bound for unit-norm features: |dS1_d| <= B/2, |dS2_d| <= B/4.
    chunk = 5
    ring, stats = _pair("random", chunk=chunk, max_new=7)
    generator = torch.Generator().manual_seed(1)
    worst = [0.0, 0.0]
    exact_steps = 0
    for _ in range(400):
        features, components = _irregular_step(generator)
        ring.push(features, components)
        stats.push(features, components)
        ds1, ds2 = _moments_differ(ring, stats)
        assert ds1 <= chunk / 2 + 1e-5 and ds2 <= chunk / 4 + 1e-5
        worst = [max(worst[0], ds1), max(worst[1], ds2)]
        exact_steps += ds1 < 1e-5
    # The approximation is real here (so the bound is what is tested, not a
    # stream on which both happen to agree).
    assert worst[0] > 1e-2 and worst[1] > 1e-2
    assert exact_steps < 400


def test_window_weights_cover_exactly_the_last_K_features():
    stats = ClassComponentStatsMemory(1, 1, capacity=10, dim=2, max_new_per_component=4, init="empty",
                                      chunk_size=4)
    assert stats.num_chunks == 4  # ceil(10 / 4) + 1
    # filled -> (features of each row in the window, weight of each row's sums)
    for total, expected_in_window, expected_share in [
        (3, [3, 0, 0, 0], [1, 0, 0, 0]),        # one partial chunk
        (9, [4, 4, 1, 0], [1, 1, 1, 0]),        # chunks 0, 1 full, chunk 2 holds 1
        (13, [1, 4, 4, 1], [0.25, 1, 1, 1]),    # 1 (newest, row 3) + 4 + 4 + 1 of chunk 0's 4
        (16, [0, 2, 4, 4], [0, 0.5, 1, 1]),     # chunk 0 outside, half of chunk 1 inside
        (18, [2, 0, 4, 4], [1, 0, 1, 1]),       # chunk 4 wrapped into row 0; edge on a boundary
    ]:
        stats.filled.fill_(total)
        in_window, share = stats.window_weights()
        assert int(in_window.sum()) == min(total, 10)
        assert in_window.flatten().tolist() == expected_in_window, total
        assert share.flatten().tolist() == expected_share, total


def test_a_ring_checkpoint_loads_into_either_kind_with_the_same_moments():
    ring, _ = _pair("random", chunk=6)
    generator = torch.Generator().manual_seed(2)
    for _ in range(17):  # wrapped, pointer mid-buffer, random and real slots mixed
        ring.push(*_irregular_step(generator))
    state = ring.state_dict()
    for kind in ("ring", "stats"):
        memory = build_class_component_memory(kind, C, M, K, D, 6, init="empty", chunk_size=6)
        result = memory.load_state_dict(dict(state), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        ds1, ds2 = _moments_differ(ring, memory)
        assert ds1 < 1e-5 and ds2 < 1e-5, kind
        for name in ("count", "total_written", "pending"):
            assert torch.equal(getattr(memory, name), getattr(ring, name))
    # The converted memory then follows the ring within the bound.
    converted = build_class_component_memory("stats", C, M, K, D, 6, init="empty", chunk_size=6)
    converted.load_state_dict(dict(state))
    for _ in range(50):
        features, components = _irregular_step(generator)
        ring.push(features, components)
        converted.push(features, components)
        ds1, ds2 = _moments_differ(ring, converted)
        assert ds1 <= 3 + 1e-5 and ds2 <= 1.5 + 1e-5


def test_a_stats_checkpoint_refuses_to_load_into_a_ring():
    _, stats = _pair("empty", chunk=6)
    ring = ClassComponentMemory(C, M, K, D, 6, init="empty")
    with pytest.raises(ValueError, match="MEMORY_KIND stats"):
        ring.load_state_dict(stats.state_dict())


def test_stats_memory_is_at_most_an_eighth_of_the_official_ring():
    # ADE20K at the official shapes: C = 150, M = 8, K = 32000, D = 64.
    with torch.device("meta"):
        stats = ClassComponentStatsMemory(150, 8, 32000, 64, 20, init="empty")
    stats_bytes = sum(b.numel() * b.element_size() for b in stats.buffers())
    ring_bytes = 150 * 8 * 32000 * 64 * 4
    assert stats_bytes <= ring_bytes / 8
    assert stats_bytes == pytest.approx(ring_bytes * 2 * 1601 / 32000, rel=1e-3)  # 2 L / K of it
    with pytest.raises(ValueError, match="float32"):
        build_class_component_memory("stats", 2, 2, 10, 4, dtype=torch.float16)


def test_direction_and_variance_against_the_definition():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, D, generator=generator, dtype=torch.float64)
    direction, variance = direction_and_variance(
        torch.tensor(40.0), x.sum(0).float(), x.square().sum(0).float()
    )
    unit = F.normalize(x.sum(0), dim=0)
    torch.testing.assert_close(direction, unit.float())
    torch.testing.assert_close(variance, (x - unit).square().mean(0).float(), rtol=1e-5, atol=1e-6)
    empty_direction, empty_variance = direction_and_variance(torch.tensor(0.0), torch.zeros(D), torch.zeros(D))
    assert empty_direction.abs().sum() == 0 and empty_variance.abs().sum() == 0


def _classifier(kind: str) -> GaussianMixtureClassifier:
    torch.manual_seed(0)
    return GaussianMixtureClassifier(
        in_channels=6, num_classes=4, embed_dim=8, num_components=2, memory_size=24,
        max_samples_per_component=4, update_interval=2, mean_momentum=0.5, memory_kind=kind,
        # Every labelled sample is stored, so that each component of these
        # large classes gets the cap of 4 at every step (see the tests).
        memory_samples="all",
    )


def _batch(step: int):
    generator = torch.Generator().manual_seed(step)
    labels = torch.randint(0, 4, (200,), generator=generator)
    centers = torch.randn(4, 6, generator=torch.Generator().manual_seed(99))
    return centers[labels] + 0.5 * torch.randn(200, 6, generator=generator), labels


def test_classifier_m_step_with_stats_matches_ring_on_capped_steps():
    # Large classes: every component receives the cap (4) each step, the
    # stats chunk is 4, so the M-steps see the ring's moments.
    ring, stats = _classifier("ring"), _classifier("stats")
    assert isinstance(stats.memory, ClassComponentStatsMemory)
    for step in range(12):
        x, labels = _batch(step)
        for clf in (ring, stats):
            clf.em_step(clf(x), labels)
        assert int(ring.memory.total_written.min()) == 4 * (step + 1)  # the cap, every step
        torch.testing.assert_close(stats.means, ring.means, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stats.stds, ring.stds, atol=1e-5, rtol=1e-5)
    assert int(stats.memory.total_written.min()) > 24  # the windows wrapped


def test_stats_classifier_resumes_bit_for_bit():
    straight = _classifier("stats")
    for step in range(10):
        x, labels = _batch(step)
        straight.em_step(straight(x), labels)
    first = _classifier("stats")
    for step in range(5):
        x, labels = _batch(step)
        first.em_step(first(x), labels)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = _classifier("stats")
    torch.manual_seed(1234)  # a different global RNG state must not matter
    resumed.load_state_dict(torch.load(buffer))
    for step in range(5, 10):
        x, labels = _batch(step)
        resumed.em_step(resumed(x), labels)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_a_ring_classifier_checkpoint_loads_into_a_stats_classifier():
    ring = _classifier("ring")
    for step in range(7):
        x, labels = _batch(step)
        ring.em_step(ring(x), labels)
    stats = _classifier("stats")
    result = stats.load_state_dict(ring.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    mask = torch.ones(4, 2, dtype=torch.bool)
    for got, want in zip(stats.memory.moments(mask), ring.memory.moments(mask)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Training goes on from there exactly as the ring does at the cap.
    for step in range(7, 11):
        x, labels = _batch(step)
        for clf in (ring, stats):
            clf.em_step(clf(x), labels)
    torch.testing.assert_close(stats.means, ring.means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.stds, ring.stds, atol=1e-5, rtol=1e-5)


def test_the_query_head_takes_the_memory_kind_and_keeps_the_rings_moments():
    from tests.test_gmm_mask_former import GMM_CONFIG, _cfg, _query_head

    heads = {}
    for kind in ("ring", "stats"):
        torch.manual_seed(0)
        heads[kind] = _query_head(_cfg(GMM_CONFIG, "MODEL.GMM.MEMORY_KIND", kind,
                                       "MODEL.GMM.QUERY.MEMORY_SIZE", "40"))
    assert all(head.level == "query" and head.memory.capacity == 40 for head in heads.values())
    assert isinstance(heads["stats"].memory, ClassComponentStatsMemory)
    assert isinstance(heads["ring"].memory, ClassComponentMemory)
    num_classes = heads["ring"].num_classes  # C + 1 ("no object")
    generator = torch.Generator().manual_seed(0)
    for step in range(30):
        # A few matched queries per class per step: chunks span many steps.
        queries = torch.randn(24, heads["ring"].in_channels, generator=generator)
        labels = torch.randint(0, num_classes, (24,), generator=generator)
        for head in heads.values():
            head.losses(head(queries), labels, update=True)  # the seam's call: the EM step
        torch.testing.assert_close(heads["stats"].means, heads["ring"].means, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(heads["stats"].stds, heads["ring"].stds, atol=1e-5, rtol=1e-5)
    # Before any window wraps the chunks hold exactly the ring's samples.
    assert int(heads["ring"].memory.total_written.max()) <= 40
    assert int(heads["ring"].memory.total_written.sum()) > 100
