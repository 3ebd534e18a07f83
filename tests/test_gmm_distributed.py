"""Two gloo processes end with bit-identical GMM state, equal to one process on the concatenated data."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gmmseg_d2.modeling.gmm import GMMClassifierOutput, GaussianMixtureClassifier, all_gather_rows

IN_CHANNELS, NUM_CLASSES, STEPS, WORLD_SIZE = 12, 5, 6, 2


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_classifier(memory_kind: str = "ring") -> GaussianMixtureClassifier:
    torch.manual_seed(0)
    return GaussianMixtureClassifier(
        memory_kind=memory_kind,
        memory_chunk_size=4,  # stats: chunks span steps and straddle the window edge
        in_channels=IN_CHANNELS,
        num_classes=NUM_CLASSES,
        embed_dim=8,
        num_components=3,
        memory_size=20,
        max_samples_per_component=6,  # the cap bites, so subsampling order matters
        update_interval=2,
        mean_momentum=0.8,
    )


def rank_batch(step: int, rank: int):
    """Different data, of a different size, on every rank; rank 1 has no labels at step 2."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = 150 + 80 * rank
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = 255
    if step == 2 and rank == 1:
        labels[:] = 255
    centers = torch.randn(NUM_CLASSES, IN_CHANNELS, generator=torch.Generator().manual_seed(7))
    x = centers[labels.clamp(max=NUM_CLASSES - 1)] + 0.7 * torch.randn(n, IN_CHANNELS, generator=g)
    return x, labels


def _worker(rank: int, port: int, out_dir: str, memory_kind: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        # The helper itself: rows of every rank, in rank order, and this rank's offset.
        rows = torch.full((rank + 1, 2), float(rank))
        gathered, offset = all_gather_rows(rows)
        assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]] and offset == rank
        clf = build_classifier(memory_kind)
        losses = []
        for step in range(STEPS):
            x, labels = rank_batch(step, rank)
            losses.append(clf.em_step(clf(x), labels).detach())
        torch.save({"state": clf.state_dict(), "losses": losses}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def concatenate(outputs):
    return GMMClassifierOutput(*[torch.cat(parts) for parts in zip(*[
        (o.embeddings, o.component_log_likelihood, o.class_log_likelihood, o.class_logits) for o in outputs
    ])])


@pytest.mark.parametrize("memory_kind", ["ring", "stats"])
def test_two_ranks_match_each_other_and_a_single_process(tmp_path, memory_kind):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), memory_kind), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    # One process fed both ranks' batches, concatenated in rank order. The
    # forward runs per rank-sized chunk so its float results are those the
    # ranks computed; the EM sees the concatenation.
    single = build_classifier(memory_kind)
    for step in range(STEPS):
        batches = [rank_batch(step, r) for r in range(WORLD_SIZE)]
        outputs = [single(x) for x, _ in batches]
        single.em_step(concatenate(outputs), torch.cat([labels for _, labels in batches]))
    expected = single.state_dict()

    assert int(expected["iteration"]) == STEPS and int(expected["memory.total_written"].sum()) > 0
    assert int(expected["memory.total_written"].max()) > 20  # some ring wrapped around
    # The embedding's BatchNorm keeps per-rank running statistics (no SyncBN;
    # the single process updates them once per chunk): all the rest is shared.
    per_rank = {k for k in expected if k.startswith("projection.bn.") and not k.endswith(("weight", "bias"))}
    assert per_rank == {"projection.bn.running_mean", "projection.bn.running_var", "projection.bn.num_batches_tracked"}
    assert not torch.equal(results[0]["state"]["projection.bn.running_mean"],
                           results[1]["state"]["projection.bn.running_mean"])
    for result in results:
        assert result["state"].keys() == expected.keys()
        for key, value in expected.items():
            if key not in per_rank:
                assert torch.equal(result["state"][key], value), key
    # Different data per rank, hence different local losses: the identity of
    # the state is not a trivial consequence of identical inputs.
    assert not torch.equal(results[0]["losses"][0], results[1]["losses"][0])
