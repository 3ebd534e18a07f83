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

    def __init__(self, num_slots, capacity, dim, cap, initial=None):
        # ``initial``: the (num_slots, K, D) random start, every slot valid.
        self.store = torch.zeros(num_slots, capacity, dim) if initial is None else initial.clone()
        self.pointer = [0] * num_slots
        self.count = [0 if initial is None else capacity] * num_slots
        self.written = [0] * num_slots
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
            self.written[slot] += members.shape[0]


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


@pytest.mark.parametrize("init", ["random", "empty"])
@pytest.mark.parametrize("cap", [3, 7, 0])
def test_push_matches_loop_reference(cap, init):
    num_classes, num_components, capacity, dim = 4, 3, 10, 5
    memory = ClassComponentMemory(num_classes, num_components, capacity, dim, max_new_per_component=cap, init=init)
    initial = memory.features.view(12, capacity, dim) if init == "random" else None
    reference = LoopRingBuffers(num_classes * num_components, capacity, dim, memory.max_new_per_component, initial)
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
        assert memory.total_written.view(-1).tolist() == reference.written
    assert memory.total_written.max() > capacity  # the test did wrap around
    assert memory.total_written.min() == 0  # and left a component unwritten


def test_cap_never_exceeds_capacity_and_pending_flags():
    memory = ClassComponentMemory(2, 2, 4, 3, max_new_per_component=100, init="empty")
    assert not memory.pending.any()
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
    memory = ClassComponentMemory(3, 2, 50, 6, max_new_per_component=0, init="empty")
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
    memory = ClassComponentMemory(1, 1, 8, 4, dtype=torch.float16, init="empty")
    features = F.normalize(torch.randn(5, 4), dim=-1)
    memory.push(features, torch.zeros(5, dtype=torch.long))
    assert memory.features.dtype == torch.float16
    direction, variance = memory.statistics(torch.ones(1, 1, dtype=torch.bool))
    assert direction.dtype == variance.dtype == torch.float32
    unit = F.normalize(features.sum(0), dim=0)
    torch.testing.assert_close(direction[0, 0], unit, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(variance[0, 0], (features - unit).square().mean(0), rtol=1e-2, atol=1e-3)


def test_random_init_is_unit_vectors_from_the_global_rng_and_counts_every_slot():
    torch.manual_seed(3)
    memory = ClassComponentMemory(3, 2, 40, 6)  # the default: the official random start
    assert memory.init == "random"
    torch.testing.assert_close(memory.features.norm(dim=-1), torch.ones(3, 2, 40))
    assert memory.count.tolist() == [[40, 40]] * 3 and memory.pointer.sum() == 0
    assert memory.pending.all() and memory.total_written.sum() == 0 and not memory.has_data().any()
    # Reproducible from torch's seed, different for another seed; the slots
    # are not all one vector.
    torch.manual_seed(3)
    assert torch.equal(ClassComponentMemory(3, 2, 40, 6).features, memory.features)
    torch.manual_seed(4)
    assert not torch.equal(ClassComponentMemory(3, 2, 40, 6).features, memory.features)
    assert memory.features.view(-1, 6).std(dim=0).min() > 0.2
    # float16 storage gets the same vectors, rounded.
    torch.manual_seed(3)
    half = ClassComponentMemory(3, 2, 40, 6, dtype=torch.float16)
    torch.testing.assert_close(half.features.float(), memory.features, rtol=1e-3, atol=1e-3)
    # The statistics read all K slots, random ones included, until overwritten.
    mask = torch.ones(3, 2, dtype=torch.bool)
    direction, variance = memory.statistics(mask)
    stored = memory.features.double()
    unit = F.normalize(stored.sum(dim=2), dim=-1)
    torch.testing.assert_close(direction.double(), unit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variance.double(), (stored - unit[:, :, None]).square().mean(dim=2), rtol=1e-4, atol=1e-6)
    features = F.normalize(torch.randn(5, 6), dim=-1)
    memory.push(features, torch.full((5,), 3))  # class 1, component 1
    assert torch.equal(memory.features[1, 1, :5], features) and memory.count[1, 1] == 40
    assert memory.total_written[1, 1] == 5 and memory.has_data().tolist() == [False, True, False]
    with pytest.raises(ValueError, match="init"):
        ClassComponentMemory(1, 1, 4, 2, init="zeros")


def test_checkpoint_without_total_written_loads_from_count():
    """State dicts from before ``total_written`` existed (empty starts) load; it comes from ``count``."""
    old = ClassComponentMemory(2, 2, 8, 3, init="empty")
    old.push(F.normalize(torch.randn(6, 3), dim=-1), torch.tensor([0, 0, 0, 3, 3, 3]))
    state = {k: v.clone() for k, v in old.state_dict().items() if k != "total_written"}
    assert set(state) == {"features", "pointer", "count", "pending"}
    memory = ClassComponentMemory(2, 2, 8, 3, init="empty")
    result = memory.load_state_dict(state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(memory.total_written, old.count) and memory.has_data().tolist() == [True, True]
    assert torch.equal(memory.features, old.features) and torch.equal(memory.count, old.count)
    # Inside a model, under a prefix, and with the buffer present it is taken as is.
    parent = torch.nn.Module()
    parent.memory = ClassComponentMemory(2, 2, 8, 3, init="empty")
    parent.load_state_dict({"memory." + k: v for k, v in state.items()})
    assert torch.equal(parent.memory.total_written, old.count)
    full = old.state_dict()
    full["total_written"] = torch.tensor([[7, 0], [0, 9]])
    memory.load_state_dict(full)
    assert memory.total_written.tolist() == [[7, 0], [0, 9]]
