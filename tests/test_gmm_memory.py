"""ClassComponentMemory against a plain per-component Python ring buffer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmmseg_d2.modeling.gmm import ClassComponentMemory, evenly_spaced_ranks


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LoopRingBuffers:
    """The official code's update, one component at a time, in Python integers."""

    def __init__(self, num_slots, capacity, dim, cap):
        self.store = torch.zeros(num_slots, capacity, dim)
        self.pointer = [0] * num_slots
        self.count = [0] * num_slots
        self.capacity, self.cap = capacity, cap

    def push(self, features, components):
        for slot in range(self.store.shape[0]):
            members = features[components == slot]
            n = members.shape[0]
            if n == 0:
                continue
            if n > self.cap:
                step = max(self.cap - 1, 1)
                members = members[[j * (n - 1) // step for j in range(self.cap)]]
            for row in members:
                self.store[slot, self.pointer[slot]] = row
                self.pointer[slot] = (self.pointer[slot] + 1) % self.capacity
            self.count[slot] = min(self.count[slot] + members.shape[0], self.capacity)


def test_evenly_spaced_ranks():
    for n in range(1, 60):
        for take in range(1, n + 1):
            j = torch.arange(take)
            ours = evenly_spaced_ranks(j, torch.full_like(j, n), torch.full_like(j, take))
            # Distinct, increasing, from the first to the last (when take > 1) ...
            assert ours[0] == 0 and (take == 1 or ours[-1] == n - 1)
            assert (ours[1:] > ours[:-1]).all()
            # ... and the official torch.linspace(dtype=int64) up to its float
            # rounding (it gives 20 for 19 * 42 / 38 = 21 exactly).
            official = torch.linspace(0, n - 1, take, dtype=torch.int64)
            assert (ours - official).abs().max() <= 1, (n, take)


@pytest.mark.parametrize("cap", [3, 7, 0])
def test_push_matches_loop_reference(cap):
    num_classes, num_components, capacity, dim = 4, 3, 10, 5
    memory = ClassComponentMemory(num_classes, num_components, capacity, dim, max_new_per_component=cap)
    reference = LoopRingBuffers(num_classes * num_components, capacity, dim, memory.max_new_per_component)
    g = torch.Generator().manual_seed(cap)
    for step in range(12):
        n = int(torch.randint(0, 40, (1,), generator=g))
        # Skewed component frequencies: some overflow the cap, some are absent.
        components = (torch.rand(n, generator=g) ** 2 * 9).long()
        features = torch.randn(n, dim, generator=g)
        written = memory.push(features, components)
        reference.push(features, components)
        expected_written = torch.bincount(components, minlength=12).clamp(max=memory.max_new_per_component)
        assert torch.equal(written.view(-1), expected_written)
        assert torch.equal(memory.features.view(12, capacity, dim), reference.store), step
        assert memory.pointer.view(-1).tolist() == reference.pointer
        assert memory.count.view(-1).tolist() == reference.count
    assert memory.count.max() == capacity  # the test did wrap around


def test_cap_never_exceeds_capacity_and_pending_flags():
    memory = ClassComponentMemory(2, 2, 4, 3, max_new_per_component=100)
    assert memory.max_new_per_component == 4
    components = torch.tensor([1, 1, 1, 1, 1, 1, 3])
    features = torch.arange(21, dtype=torch.float32).view(7, 3)
    memory.push(features, components)
    assert memory.pending.tolist() == [[False, True], [False, True]]
    # 6 features for component 1, 4 slots: ranks linspace(0, 5, 4) = 0, 1, 3, 5.
    assert torch.equal(memory.features[0, 1], features[[0, 1, 3, 5]])
    memory.clear_pending()
    assert not memory.pending.any()
    with pytest.raises(ValueError):
        memory.push(features, torch.full((7,), 4))


def test_statistics_match_direct_numpy_computation():
    memory = ClassComponentMemory(3, 2, 50, 6, max_new_per_component=0)
    g = torch.Generator().manual_seed(0)
    pushed = {k: [] for k in range(6)}
    for n in (30, 40):  # component 0 overflows and wraps; others stay partial
        components = torch.randint(0, 5, (n,), generator=g)  # component 5 never written
        components[: n // 2] = 0
        features = F.normalize(torch.randn(n, 6, generator=g), dim=-1)
        memory.push(features, components)
        for k in range(6):
            pushed[k].extend(features[components == k].numpy())
    mask = torch.zeros(3, 2, dtype=torch.bool)
    mask.view(-1)[[0, 2, 4]] = True  # the first component of every class
    direction, variance = memory.statistics(mask, chunk_bytes=1)  # one component per chunk
    for k in (0, 2, 4):
        c, m = divmod(k, 2)
        stored = np.array(pushed[k][-50:])  # a ring of 50 keeps the last 50
        unit = stored.sum(0) / np.linalg.norm(stored.sum(0))
        np.testing.assert_allclose(direction[c, m].numpy(), unit, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(variance[c, m].numpy(), ((stored - unit) ** 2).mean(0), rtol=1e-4, atol=1e-7)
    # Chunks without a wanted component are not read.
    assert direction[~mask].abs().sum() == 0
    # The chunk size does not change the result.
    direction_all, variance_all = memory.statistics(mask)
    torch.testing.assert_close(direction_all[mask], direction[mask])
    torch.testing.assert_close(variance_all[mask], variance[mask])


def test_float16_storage():
    memory = ClassComponentMemory(1, 1, 8, 4, dtype=torch.float16)
    features = F.normalize(torch.randn(5, 4), dim=-1)
    memory.push(features, torch.zeros(5, dtype=torch.long))
    assert memory.features.dtype == torch.float16
    direction, variance = memory.statistics(torch.ones(1, 1, dtype=torch.bool))
    assert direction.dtype == variance.dtype == torch.float32
    unit = F.normalize(features.sum(0), dim=0)
    torch.testing.assert_close(direction[0, 0], unit, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(variance[0, 0], (features - unit).square().mean(0), rtol=1e-2, atol=1e-3)
