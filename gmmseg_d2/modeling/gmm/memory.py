"""Per-(class, component) memories of recent features, and the moments the M-step reads.

(Long on purpose: both memory kinds share the subsample, the bookkeeping and
the M-step's reads, and their equivalence is what this module promises.)

The M-step of GMMSeg does not use the current batch alone: it fits every
component on the last ``K`` features Sinkhorn assigned to it (official ``K =
32000``). It needs only three moments of those ``K`` features: their number
``n``, their sum ``S1 = sum x`` and their sum of squares ``S2 = sum x^2``
(the mean direction is ``normalise(S1)``, the variance around it ``(S2 - 2 f
S1 + n f^2) / n``). Two memories provide them (``MODEL.GMM.MEMORY_KIND``):

* :class:`ClassComponentMemory` (``"ring"``, the official code's layout): a ring
  buffer of the ``K`` features themselves, ``C*M*K*D`` floats (9.8 GB in
  float32 for ADE20K at ``M = 8``, on every GPU and in every checkpoint).
* :class:`ClassComponentStatsMemory` (``"stats"``, the default of
  ``MODEL.GMM.MEMORY_KIND``): the features of each
  component, in the order they arrive, are cut into chunks of ``B``
  consecutive samples (``B`` = the per-step cap, 20 by default) and only each
  chunk's ``S1`` and ``S2`` are kept, in a ring of ``ceil(K / B) + 1``
  chunks: ``C*M*(ceil(K/B)+1)*2D`` floats, ``2/B`` of the ring's (about a
  tenth at ``B = 20``). The window is still the last ``K`` samples; only the
  oldest chunk can straddle its edge (see the class docstring for how that is
  handled and the bound on the error).

Both are buffers, so they are saved with the model and a resumed run
continues from the same memory. Writing a batch and computing the moments are
vectorised over classes and components, deterministic, and the same on every
rank that is fed the same features.

Two starts are available (``init``):

* ``"random"`` (the official code's): every slot of every component holds a
  random unit vector (a standard normal draw L2-normalised over ``D``), every
  component counts ``K`` valid samples and is marked pending, so the first
  M-step fits all of them to that noise (``sigma_d^2 ~ 1/D + f_d^2 + floor``
  around the fitted unit direction ``f``: ~0.2 at ``D = 64``); real
  features then push the random ones out, oldest first. Both kinds draw the
  same vectors from the same seed (the stats memory keeps their chunk sums).
* ``"empty"``: no valid sample; a component has statistics only once
  something was written to it.

Either way ``total_written`` counts the real features ever written, which is
what "this class has no data yet" means (``count`` cannot tell with random
slots).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassComponentMemory",
    "ClassComponentStatsMemory",
    "MEMORY_INITS",
    "MEMORY_KINDS",
    "build_class_component_memory",
    "direction_and_variance",
    "evenly_spaced_ranks",
    "ring_chunk_sums",
]

#: Values of the ``init`` argument of the memories.
MEMORY_INITS = ("random", "empty")
#: Values of ``kind`` in :func:`build_class_component_memory` (``MODEL.GMM.MEMORY_KIND``).
MEMORY_KINDS = ("ring", "stats")


def evenly_spaced_ranks(position: torch.Tensor, group_size: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Ranks of an evenly spaced subsample, elementwise.

    Picking ``take`` of ``group_size`` items evenly spaced from the first to the
    last means picking ranks ``floor(j * (group_size - 1) / (take - 1))`` for
    ``j = 0 .. take - 1``. The official code gets them from an int64
    ``torch.linspace``, which computes in floating point and sometimes rounds
    an exact integer down (19 * 42 / 38 = 21 becomes 20); here the division
    is exact integer arithmetic, so the picks never depend on the device.

    Args:
        position: ``(T,)`` the ``j`` of each picked item, ``0 <= j < take``.
        group_size: ``(T,)`` size of the group the item is picked from.
        take: ``(T,)`` number of items picked from that group (``<= group_size``).

    Returns:
        ``(T,)`` int64 rank of each picked item inside its group.
    """
    spread = (position * (group_size - 1)) // (take - 1).clamp_min(1)
    return torch.where(group_size > take, spread, position)


def direction_and_variance(
    count: torch.Tensor, total: torch.Tensor, total_square: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GMMSeg's M-step estimates from the moments of a component's memory.

    The mean direction is the L2-normalised sum; the variance is taken around
    that unit vector ``f`` (not around the arithmetic mean), dividing by the
    number of samples: ``(S2 - 2 f S1 + n f^2) / n``. The cancellation in the
    expansion costs ~1e-7 relative to ``E[x^2]``, far below the 1e-2 floor.

    Args:
        count: ``(*,)`` number of samples ``n`` (float; 0 gives zeros).
        total: ``(*, D)`` ``S1``; total_square: ``(*, D)`` ``S2``.

    Returns:
        ``(direction, variance)``, both ``(*, D)`` float32.
    """
    n = count.clamp_min(1).to(torch.float32)[..., None]
    unit = F.normalize(total, dim=-1)
    variance = ((total_square - 2.0 * unit * total + n * unit.square()) / n).clamp_min(0.0)
    has_samples = (count > 0)[..., None]
    return torch.where(has_samples, unit, 0.0), torch.where(has_samples, variance, 0.0)


def ring_chunk_sums(features: torch.Tensor, pointer: torch.Tensor, count: torch.Tensor, chunk_size: int
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """A ring memory's stored features as the chunk sums of a stats memory.

    The valid features of each component, oldest first (slots ``(pointer -
    count + i) mod K`` for ``i < count``), are cut into chunks of
    ``chunk_size``; the moments of the result are exactly the ring's.

    Args:
        features: ``(C, M, K, D)`` ring contents (any strides: read one class at a time).
        pointer: ``(C, M)`` next slot; count: ``(C, M)`` valid slots.
        chunk_size: ``B``.

    Returns:
        ``(chunk_sum, chunk_square_sum)``, each ``(C, M, ceil(K / B) + 1, D)`` float32
        (the last chunk row, the one being filled, is zero).
    """
    num_classes, num_components, capacity, dim = features.shape
    chunks = math.ceil(capacity / chunk_size) + 1
    padded = (chunks - 1) * chunk_size
    age_rank = torch.arange(capacity)
    pointer, count = pointer.long(), count.long()
    chunk_sum = torch.zeros(num_classes, num_components, chunks, dim)
    chunk_square_sum = torch.zeros_like(chunk_sum)
    for c in range(num_classes):  # one class at a time: no full-size temporary
        slot = (pointer[c, :, None] - count[c, :, None] + age_rank) % capacity  # (M, K)
        ordered = torch.gather(features[c].float(), 1, slot[..., None].expand(-1, -1, dim))
        ordered = ordered * (age_rank < count[c, :, None])[..., None]
        ordered = F.pad(ordered, (0, 0, 0, padded - capacity)).view(num_components, chunks - 1, chunk_size, dim)
        chunk_sum[c, :, :-1] = ordered.sum(dim=2)
        chunk_square_sum[c, :, :-1] = ordered.square().sum(dim=2)
    return chunk_sum, chunk_square_sum


class _MemoryBase(nn.Module):
    """What both memories share: bookkeeping buffers, the subsample, the M-step's reads.

    Buffers: ``count`` ``(C, M)`` int64 samples in the window (``<= K``; ``K``
    from the start with ``init="random"``); ``total_written`` ``(C, M)`` int64
    real features written so far (not capped); ``pending`` ``(C, M)`` bool,
    components written since the last :meth:`clear_pending` (all set at the
    start with ``init="random"``).
    """

    kind: str = ""

    def __init__(self, num_classes: int, num_components: int, capacity: int, dim: int,
                 max_new_per_component: int, init: str) -> None:
        super().__init__()
        if min(num_classes, num_components, capacity, dim) < 1:
            raise ValueError("num_classes, num_components, capacity and dim must be >= 1")
        if init not in MEMORY_INITS:
            raise ValueError(f"init must be one of {MEMORY_INITS}, got {init!r}")
        self.num_classes = num_classes
        self.num_components = num_components
        self.capacity = capacity
        self.dim = dim
        limit = capacity if max_new_per_component <= 0 else min(max_new_per_component, capacity)
        # Never more than K per step: a larger batch would overwrite itself.
        self.max_new_per_component = limit
        self.init = init
        random = init == "random"
        shape = (num_classes, num_components)
        self.register_buffer("count", torch.full(shape, capacity if random else 0, dtype=torch.long))
        self.register_buffer("total_written", torch.zeros(shape, dtype=torch.long))
        self.register_buffer("pending", torch.full(shape, random, dtype=torch.bool))

    @property
    def num_slots(self) -> int:
        """``C * M``: flat component indices are ``class * M + m``."""
        return self.num_classes * self.num_components

    def _random_unit_vectors(self):
        """Yield ``(M, K, D)`` random unit vectors per class, from torch's global CPU generator.

        Class by class, so no second copy of a ring memory is ever made; both
        kinds draw exactly the same numbers.
        """
        for _ in range(self.num_classes):
            yield F.normalize(torch.randn(self.num_components, self.capacity, self.dim), dim=-1)

    def _fill_legacy_total_written(self, state_dict, prefix) -> None:
        # Checkpoints written before ``total_written`` existed: their memories
        # started empty, so a component had received data iff its count > 0.
        # The count (<= K) stands in for the uncapped total; only "> 0" is read.
        written_key, count_key = prefix + "total_written", prefix + "count"
        if written_key not in state_dict and count_key in state_dict:
            state_dict[written_key] = torch.as_tensor(state_dict[count_key]).clone()

    def has_data(self) -> torch.Tensor:
        """``(C,)`` bool: the classes that have received at least one real feature."""
        return self.total_written.sum(dim=1) > 0

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, classes={self.num_classes}, components={self.num_components}, "
            f"capacity={self.capacity}, dim={self.dim}, max_new_per_component={self.max_new_per_component}, "
            f"init={self.init}"
        )

    def _plan_writes(self, features: torch.Tensor, components: torch.Tensor):
        """Which input rows a :meth:`push` writes, to which component, in which order.

        Features of a component are kept in input order; when a component gets
        more than ``max_new_per_component`` of them, an evenly spaced subsample
        of that many is taken.

        Returns:
            ``(take, written_component, position, source)``: ``(C*M,)`` int64
            features written per component; then, one entry per written
            feature, sorted by component and then input order, its flat
            component, its rank ``j`` among that component's written ones and
            its row in ``features``.
        """
        num_slots = self.num_slots
        if features.shape != (components.shape[0], self.dim):
            raise ValueError(f"features must be ({components.shape[0]}, {self.dim}), got {tuple(features.shape)}")
        per_component = torch.bincount(components, minlength=num_slots)
        if per_component.numel() > num_slots:
            raise ValueError(f"component index out of range [0, {num_slots})")
        take = per_component.clamp(max=self.max_new_per_component)
        # Members of a component become contiguous, in input order.
        order = torch.sort(components, stable=True).indices
        first_member = torch.cumsum(per_component, 0) - per_component
        written_component = torch.repeat_interleave(torch.arange(num_slots, device=take.device), take)
        first_written = torch.cumsum(take, 0) - take
        position = torch.arange(written_component.numel(), device=take.device) - first_written[written_component]
        rank = evenly_spaced_ranks(position, per_component[written_component], take[written_component])
        source = order[first_member[written_component] + rank]
        return take, written_component, position, source

    def _account(self, take: torch.Tensor) -> torch.Tensor:
        """Update ``count``, ``total_written`` and ``pending`` for ``(C*M,)`` new features."""
        written = take.view(self.num_classes, self.num_components)
        self.count.view(-1).copy_((self.count.view(-1) + take).clamp(max=self.capacity))
        self.total_written += written
        self.pending |= written > 0
        return written

    @torch.no_grad()
    def clear_pending(self) -> None:
        """Mark every component as fitted."""
        self.pending.zero_()

    def moments(self, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, S1, S2)`` of the selected components' window: ``(C, M)``, ``(C, M, D)``, ``(C, M, D)``.

        float32; zero where ``mask`` is unset or nothing is stored.
        """
        raise NotImplementedError

    @torch.no_grad()
    def statistics(self, mask: torch.Tensor, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean direction and per-dimension variance of the selected components' memory.

        Args:
            mask: ``(C, M)`` bool, the components wanted.
            kwargs: passed to :meth:`moments`.

        Returns:
            ``(direction, variance)``: both ``(C, M, D)`` float32 (see
            :func:`direction_and_variance`), zero where ``mask`` is unset or
            the component holds no sample.
        """
        return direction_and_variance(*self.moments(mask))


class ClassComponentMemory(_MemoryBase):
    """A ring buffer of ``K`` features for each of ``C x M`` components (``kind="ring"``).

    Buffers (all saved in the state dict), besides those of every memory
    (``count``, ``total_written``, ``pending``; see :class:`_MemoryBase`):
        ``features``: ``(C, M, K, D)`` stored features: random unit vectors
            (``init="random"``) or zeros (``"empty"``) where never written.
        ``pointer``: ``(C, M)`` int64, slot the next feature of a component
            goes to. Writing starts at slot 0, so with ``init="empty"`` slots
            ``[0, count)`` are the valid ones.

    Checkpoints from before ``total_written`` existed load with it set to
    their ``count`` (their memories all started empty).

    Args:
        num_classes: ``C``.
        num_components: ``M``.
        capacity: ``K``, slots per component.
        dim: ``D``, feature dimension.
        max_new_per_component: most features one :meth:`push` adds to a
            component; more are thinned by an evenly spaced subsample. ``<= 0``
            means no cap other than ``K``.
        dtype: storage dtype of ``features``. Moments are computed in float32.
        init: ``"random"`` or ``"empty"`` (see the module docstring). The random
            vectors are drawn from torch's global CPU generator at construction,
            so seeding torch before building the model makes them reproducible.
    """

    kind = "ring"

    def __init__(
        self,
        num_classes: int,
        num_components: int,
        capacity: int,
        dim: int,
        max_new_per_component: int = 20,
        dtype: torch.dtype = torch.float32,
        init: str = "random",
    ) -> None:
        super().__init__(num_classes, num_components, capacity, dim, max_new_per_component, init)
        features = torch.zeros(num_classes, num_components, capacity, dim, dtype=dtype)
        if init == "random":
            for per_class, vectors in zip(features, self._random_unit_vectors()):
                per_class.copy_(vectors)
        self.register_buffer("features", features)
        self.register_buffer("pointer", torch.zeros(num_classes, num_components, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "chunk_sum" in state_dict and prefix + "features" not in state_dict:
            raise ValueError(
                f"The checkpoint's GMM memory '{prefix.rstrip('.')}' is a 'stats' memory (per-chunk sums "
                f"of the features, not the features themselves), which cannot be turned back into the "
                f"per-sample ring buffer. Load it with MODEL.GMM.MEMORY_KIND stats."
            )
        self._fill_legacy_total_written(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dtype={self.features.dtype}"

    @torch.no_grad()
    def push(self, features: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """Write new features into their components' ring buffers.

        Each component's writes start at its pointer and wrap around at ``K``,
        overwriting the oldest features (see :meth:`_plan_writes` for which).

        Args:
            features: ``(n, D)`` finite features.
            components: ``(n,)`` int64 flat component index ``class * M + m``.

        Returns:
            ``(C, M)`` int64 number of features written to each component.
        """
        take, written_component, position, source = self._plan_writes(features, components)
        flat_pointer = self.pointer.view(-1)
        slot = (flat_pointer[written_component] + position) % self.capacity
        # (component, slot) pairs are unique since take <= K: a plain,
        # deterministic index_put.
        flat_features = self.features.view(self.num_slots, self.capacity, self.dim)
        flat_features[written_component, slot] = features[source].to(self.features.dtype)
        flat_pointer.copy_((flat_pointer + take) % self.capacity)
        return self._account(take)

    @torch.no_grad()
    def moments(
        self, mask: torch.Tensor, chunk_bytes: Optional[int] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, S1, S2)`` of the selected components' stored features.

        With ``init="random"`` all ``K`` slots are valid (random or real
        features, ``count = K``), as in the official code; with ``"empty"``
        never-written slots hold zeros and add nothing to either sum, so no
        masking is needed. The squares go through a small reused buffer, so
        the memory (40 MB per class at ``K = 32000``) is read without ever
        being copied.

        Args:
            mask: ``(C, M)`` bool, the components wanted. Components are read in
                blocks of consecutive ones; blocks without a wanted component
                are skipped.
            chunk_bytes: size of the float32 squares buffer (default: 32 MiB
                on CPU, where it stays cache- and page-warm, 512 MiB on GPU).
        """
        num_slots = self.num_slots
        if chunk_bytes is None:
            chunk_bytes = (32 if self.features.device.type == "cpu" else 512) * 2**20
        flat_features = self.features.view(num_slots, self.capacity, self.dim)
        flat_count = self.count.view(-1)
        total = flat_features.new_zeros((num_slots, self.dim), dtype=torch.float32)
        total_square = torch.zeros_like(total)
        rows = max(1, chunk_bytes // (4 * self.capacity * self.dim))
        starts = list(range(0, num_slots, rows))
        # One device sync for all blocks: which are wanted, and how many slots
        # each has to read (slots past a block's largest count were never written).
        wanted_count = torch.where(mask.reshape(-1), flat_count, 0)
        padded = F.pad(wanted_count, (0, len(starts) * rows - num_slots))
        block_used = padded.view(len(starts), rows).amax(dim=1)
        squares = None
        for start, used in zip(starts, block_used.tolist()):
            if used == 0:
                continue
            stop = min(start + rows, num_slots)
            block = flat_features[start:stop, :used]  # (r, used, D), a view
            if squares is None:
                squares = total.new_empty(rows * self.capacity * self.dim)
            block_squares = squares[: block.numel()].view(block.shape)
            torch.mul(block, block, out=block_squares)
            total[start:stop] = block.sum(dim=1, dtype=torch.float32)
            total_square[start:stop] = block_squares.sum(dim=1)
        selected = mask.reshape(-1)
        count = torch.where(selected, flat_count, 0).to(torch.float32)
        total = torch.where(selected[:, None], total, 0.0)
        total_square = torch.where(selected[:, None], total_square, 0.0)
        shape = (self.num_classes, self.num_components)
        return count.view(shape), total.view(*shape, self.dim), total_square.view(*shape, self.dim)


class ClassComponentStatsMemory(_MemoryBase):
    """The last ``K`` features of each component, kept as chunk sums (``kind="stats"``).

    A component's features, in the order they arrive (the same order and
    subsample as :class:`ClassComponentMemory` writes them), are numbered
    ``t = 0, 1, 2, ...``; feature ``t`` belongs to chunk ``t // B``. Per chunk
    only ``S1`` and ``S2`` are kept, in a ring of ``L = ceil(K / B) + 1``
    chunks (chunk ``q`` in row ``q % L``): the newest chunk, which may be
    partly filled, and the ``ceil(K / B)`` before it, enough to cover the
    last ``K`` features. Chunks span training steps: a component that gets 3
    features per step fills a chunk in 7 steps, and still has a ``K``-sample
    window.

    The window edge: the moments are those of the last ``K`` features, like
    the ring's. Every chunk lies wholly inside the window except possibly the
    oldest, of which only the newest ``k < B`` features belong to it; it
    enters with weight ``k / B`` (its features are exchangeable as far as the
    sums know). Versus the exact window, for features with ``|x_d| <= 1``
    (unit-norm embeddings) that changes ``S1_d`` by at most ``2 k (B - k) / B
    <= B / 2`` and ``S2_d`` by at most ``k (B - k) / B <= B / 4``, i.e. the
    window mean ``S1 / K`` by at most ``B / (2K)`` per dimension (3e-4 at
    ``B = 20, K = 32000``) and ``S2 / K`` by ``B / (4K)``; ``n`` is exact.
    The moments are exact (up to float rounding) whenever the window edge
    falls on a chunk boundary: when ``B`` divides ``K`` and a component's
    feature count so far is a multiple of ``B``, e.g. when every step writes
    exactly ``B`` features to it (a large class at the official per-step cap
    of 20), or before it ever wrapped.

    Buffers (all saved in the state dict), besides ``count``,
    ``total_written`` and ``pending`` (:class:`_MemoryBase`):
        ``chunk_sum``, ``chunk_square_sum``: ``(C, M, L, D)`` float32 ``S1``
            and ``S2`` of each chunk.
        ``filled``: ``(C, M)`` int64 features ever written into chunks,
            random start included (``K`` at the start with ``init="random"``).

    Size: ``C*M*L*2D`` floats, ``2 L / K`` of a float32 ring (``2/B`` plus a
    chunk): 0.98 GB instead of 9.8 GB for ADE20K's official shapes.

    A ring checkpoint (``features``, ``pointer``) loads into this memory by
    chunking its stored features oldest first: the moments are then exactly
    the ring's. The converse is impossible (the sums do not give back the
    features) and raises.

    Args:
        num_classes, num_components, capacity, dim, max_new_per_component,
        init: as :class:`ClassComponentMemory`.
        chunk_size: ``B``, features per chunk; ``<= 0`` means
            ``max_new_per_component`` (so that a step at the cap fills exactly
            one chunk). At most ``K``.
    """

    kind = "stats"

    def __init__(
        self,
        num_classes: int,
        num_components: int,
        capacity: int,
        dim: int,
        max_new_per_component: int = 20,
        init: str = "random",
        chunk_size: int = 0,
    ) -> None:
        super().__init__(num_classes, num_components, capacity, dim, max_new_per_component, init)
        chunk_size = self.max_new_per_component if chunk_size <= 0 else min(chunk_size, capacity)
        self.chunk_size = chunk_size
        self.num_chunks = math.ceil(capacity / chunk_size) + 1
        shape = (num_classes, num_components, self.num_chunks, dim)
        chunk_sum = torch.zeros(shape)
        chunk_square_sum = torch.zeros(shape)
        if init == "random":
            # The K random vectors are features 0..K-1: chunks 0..ceil(K/B)-1.
            padded = (self.num_chunks - 1) * chunk_size
            for per_class, per_class_square, vectors in zip(chunk_sum, chunk_square_sum,
                                                             self._random_unit_vectors()):
                vectors = F.pad(vectors, (0, 0, 0, padded - capacity))
                vectors = vectors.view(num_components, self.num_chunks - 1, chunk_size, dim)
                per_class[:, :-1] = vectors.sum(dim=2)
                per_class_square[:, :-1] = vectors.square().sum(dim=2)
        self.register_buffer("chunk_sum", chunk_sum)
        self.register_buffer("chunk_square_sum", chunk_square_sum)
        self.register_buffer("filled", self.count.clone())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunk_size={self.chunk_size}, chunks={self.num_chunks}"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._fill_legacy_total_written(state_dict, prefix)
        features_key = prefix + "features"
        if features_key in state_dict and prefix + "chunk_sum" not in state_dict:
            self._convert_ring_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _convert_ring_state(self, state_dict, prefix) -> None:
        """Replace a ring memory's ``features`` / ``pointer`` by this memory's buffers, in place."""
        features = torch.as_tensor(state_dict.pop(prefix + "features"))
        pointer = torch.as_tensor(state_dict.pop(prefix + "pointer"))
        count = torch.as_tensor(state_dict[prefix + "count"])
        num_classes, num_components, capacity, dim = features.shape
        if (num_classes, num_components, dim) != (self.num_classes, self.num_components, self.dim) or \
                capacity != self.capacity:
            raise ValueError(
                f"Cannot load the ring GMM memory '{prefix.rstrip('.')}' of shape {tuple(features.shape)} "
                f"(C, M, K, D) into a stats memory for C={self.num_classes}, M={self.num_components}, "
                f"K={self.capacity}, D={self.dim}: the shapes must match."
            )
        chunk_sum, chunk_square_sum = ring_chunk_sums(features, pointer, count, self.chunk_size)
        state_dict[prefix + "chunk_sum"] = chunk_sum
        state_dict[prefix + "chunk_square_sum"] = chunk_square_sum
        state_dict[prefix + "filled"] = count.clone()

    @torch.no_grad()
    def push(self, features: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
        """Add new features to their components' chunk sums.

        Args:
            features: ``(n, D)`` finite features.
            components: ``(n,)`` int64 flat component index ``class * M + m``.

        Returns:
            ``(C, M)`` int64 number of features written to each component.
        """
        take, written_component, position, source = self._plan_writes(features, components)
        if written_component.numel() > 0:
            chunk, chunks = self.chunk_size, self.num_chunks
            flat_filled = self.filled.view(-1)
            t = flat_filled[written_component] + position
            sequence = t // chunk
            # Runs of features going to the same (component, chunk): sorted by
            # component, then t, so every run is contiguous. A run touches a
            # distinct row since take <= K < L * B.
            key = written_component * (sequence.max() + 1) + sequence
            starts_run = torch.ones_like(key, dtype=torch.bool)
            starts_run[1:] = key[1:] != key[:-1]
            run = torch.cumsum(starts_run, 0) - 1
            num_runs = int(run[-1]) + 1
            # Summed over a dense (runs, B, D) block rather than with an atomic
            # scatter-add, so the result is deterministic on every device.
            dense = features.new_zeros((num_runs, chunk, self.dim), dtype=torch.float32)
            dense[run, t % chunk] = features[source].float()
            run_component = written_component[starts_run]
            run_row = sequence[starts_run] % chunks
            # A run that starts at its chunk's first feature starts the chunk:
            # the row's previous content (chunk q - L) is dropped.
            keep = (t[starts_run] % chunk != 0).to(torch.float32)[:, None]
            flat_sum = self.chunk_sum.view(self.num_slots, chunks, self.dim)
            flat_square = self.chunk_square_sum.view(self.num_slots, chunks, self.dim)
            flat_sum[run_component, run_row] = keep * flat_sum[run_component, run_row] + dense.sum(dim=1)
            flat_square[run_component, run_row] = keep * flat_square[run_component, run_row] + \
                dense.square().sum(dim=1)
            flat_filled += take
        return self._account(take)

    def window_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """How much of each chunk row lies in the window of the last ``K`` features.

        Returns:
            ``(in_window, share)``, both ``(C, M, L)`` float32: the number of
            the row's features inside the window (the newest chunk its ``r``
            features, the full ones before it ``B`` each until ``K`` is
            reached, the oldest one possibly a part ``k``; 0 for rows holding
            no chunk of the window), and the weight its sums get: 1 for a
            chunk wholly inside, ``k / B`` for the straddling one, else 0.
        """
        chunk, chunks, capacity = self.chunk_size, self.num_chunks, self.capacity
        filled = self.filled[..., None]  # (C, M, 1)
        newest = (filled - 1).clamp_min(0) // chunk
        newest_size = filled - newest * chunk  # r, 1..B (0 if empty)
        row = torch.arange(chunks, device=filled.device)
        age = (newest - row) % chunks  # 0 for the newest chunk
        exists = (age <= newest) & (filled > 0)
        # Features newer than this chunk's: none for the newest, r + (age - 1) B before.
        newer = torch.where(age == 0, 0, newest_size + (age - 1) * chunk)
        size = torch.where(age == 0, newest_size, chunk)
        in_window = torch.where(exists, torch.minimum(size, (capacity - newer).clamp_min(0)), 0)
        share = in_window.to(torch.float32) / size.clamp_min(1).to(torch.float32)
        return in_window.to(torch.float32), share

    @torch.no_grad()
    def moments(
        self, mask: torch.Tensor, block_components: int = 64
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, S1, S2)`` of the selected components' last ``K`` features (see the class docstring).

        Args:
            mask: ``(C, M)`` bool, the components wanted.
            block_components: components per weighted sum; blocks without a
                wanted component are not read (one device sync decides which).
        """
        in_window, share = self.window_weights()
        selected = mask.reshape(-1)
        flat_share = (share.view(self.num_slots, self.num_chunks) * selected[:, None]).unsqueeze(1)  # (CM, 1, L)
        count = (in_window.view(self.num_slots, self.num_chunks) * selected[:, None]).sum(dim=-1)
        flat_sum = self.chunk_sum.view(self.num_slots, self.num_chunks, self.dim)
        flat_square = self.chunk_square_sum.view(self.num_slots, self.num_chunks, self.dim)
        total = flat_sum.new_zeros(self.num_slots, self.dim)
        total_square = torch.zeros_like(total)
        starts = range(0, self.num_slots, block_components)
        padded = F.pad(selected, (0, len(starts) * block_components - self.num_slots))
        for start, wanted in zip(starts, padded.view(len(starts), block_components).any(dim=1).tolist()):
            if wanted:
                stop = min(start + block_components, self.num_slots)
                # (r, 1, L) @ (r, L, D): a batched product over views, no copy.
                total[start:stop] = torch.bmm(flat_share[start:stop], flat_sum[start:stop]).squeeze(1)
                total_square[start:stop] = torch.bmm(flat_share[start:stop], flat_square[start:stop]).squeeze(1)
        shape = (self.num_classes, self.num_components)
        return count.view(shape), total.view(*shape, self.dim), total_square.view(*shape, self.dim)


def build_class_component_memory(
    kind: str,
    num_classes: int,
    num_components: int,
    capacity: int,
    dim: int,
    max_new_per_component: int = 20,
    dtype: torch.dtype = torch.float32,
    init: str = "random",
    chunk_size: int = 0,
) -> _MemoryBase:
    """The memory of ``kind`` (``MODEL.GMM.MEMORY_KIND``): ``"ring"`` or ``"stats"``.

    ``dtype`` is the ring's storage dtype; the stats memory keeps float32 sums
    and refuses float16 (sums of squares in half precision would cancel).
    ``chunk_size`` is the stats memory's ``B``.
    """
    if kind == "ring":
        return ClassComponentMemory(num_classes, num_components, capacity, dim, max_new_per_component, dtype, init)
    if kind == "stats":
        if dtype != torch.float32:
            raise ValueError(
                f"MODEL.GMM.MEMORY_DTYPE {dtype} applies to the 'ring' memory only: the 'stats' memory "
                f"(MODEL.GMM.MEMORY_KIND, the default) stores float32 sums and is already ~B/2 times "
                f"smaller than a float32 ring. Use float32, or set MODEL.GMM.MEMORY_KIND ring."
            )
        return ClassComponentStatsMemory(num_classes, num_components, capacity, dim, max_new_per_component,
                                         init, chunk_size)
    raise ValueError(f"MODEL.GMM.MEMORY_KIND must be one of {MEMORY_KINDS}, got {kind!r}")
