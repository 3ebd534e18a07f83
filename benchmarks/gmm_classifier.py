"""Speed and peak memory of the GMM classifier's score computation and EM step.

Three ways to get the ``(N, C, M)`` component log-likelihoods of ``N`` features
in ``D`` dimensions:

* ``ours``: :func:`gmmseg_d2.modeling.gmm.diagonal_gaussian_log_likelihood`,
  the quadratic form expanded into one ``(N, 2D) @ (2D, C*M)`` product;
* ``naive``: broadcasting ``(x - mu) / sigma`` to ``(N, C*M, D)``, which is what
  the official implementation (and ``torch.distributions``) computes, without
  its chunking;
* ``gemm``: a bare ``(N, 2D) @ (2D, C*M)`` product of the same shape, the floor
  any exact method has to pay.

Each is timed forward and forward+backward (gradient w.r.t. the features).
Times are the minimum over rounds that interleave the three methods, so a
concurrent load on the machine affects them alike; ratios are within one run.
Peak memory is the growth of the process's peak RSS during one call (CPU, read
from /proc after resetting the high-water mark) or
``torch.cuda.max_memory_allocated`` (GPU), above the inputs.

The second part times the training-side work of
:class:`~gmmseg_d2.modeling.gmm.GaussianMixtureClassifier` at the official
memory size ``K = 32000``: one E-step + memory update and one M-step over a
full memory with every component to refit (the worst case; it runs every
``update_interval = 5`` steps).

Usage::

    python benchmarks/gmm_classifier.py                 # the full table
    python benchmarks/gmm_classifier.py --quick         # N = 16k, C = 150 only
    python benchmarks/gmm_classifier.py --device cuda   # on a GPU
    python benchmarks/gmm_classifier.py --threads 1     # on a CPU shared with other jobs
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier, diagonal_gaussian_log_likelihood
from measure import available_bytes, interleaved_min_times, peak_bytes  # benchmarks/measure.py

NUM_COMPONENTS, DIM = 5, 64
NAIVE_LIMIT_BYTES = 8 * 2**30


# ----------------------------------------------------------------- the methods


def naive_log_likelihood(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """(N, C, M) by broadcasting to (N, C*M, D): the formula as written."""
    num_classes, num_components, dim = means.shape
    mu = means.reshape(1, -1, dim)
    sigma = stds.reshape(1, -1, dim)
    z = (x[:, None, :] - mu) / sigma
    log_density = -0.5 * z.square().sum(-1) - sigma.log().sum(-1) - 0.5 * dim * math.log(2 * math.pi)
    return log_density.view(-1, num_classes, num_components)


def naive_bytes(n: int, num_classes: int, backward: bool) -> int:
    """Rough peak of the naive method: two (N, C*M, D) float32 temporaries forward, four with backward."""
    return (4 if backward else 2) * n * num_classes * NUM_COMPONENTS * DIM * 4


# ------------------------------------------------------------- score benchmark


def score_problem(n, num_classes, device):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(n, DIM, generator=g), dim=-1).to(device)
    means = F.normalize(torch.randn(num_classes, NUM_COMPONENTS, DIM, generator=g), dim=-1).to(device)
    stds = (0.1 + torch.rand(num_classes, NUM_COMPONENTS, DIM, generator=g)).to(device)
    features = torch.randn(n, 2 * DIM, generator=g).to(device)
    weights = torch.randn(2 * DIM, num_classes * NUM_COMPONENTS, generator=g).to(device)
    return x, means, stds, features, weights


def score_functions(x, means, stds, features, weights, backward: bool):
    def with_backward(compute, leaf):
        def run():
            leaf.grad = None
            out = compute(leaf.requires_grad_(True))
            out.sum().backward()
        return run

    if not backward:
        return {
            "ours": lambda: diagonal_gaussian_log_likelihood(x, means, stds),
            "gemm": lambda: features @ weights,
            "naive": lambda: naive_log_likelihood(x, means, stds),
        }
    return {
        "ours": with_backward(lambda leaf: diagonal_gaussian_log_likelihood(leaf, means, stds), x.clone()),
        "gemm": with_backward(lambda leaf: leaf @ weights, features.clone()),
        "naive": with_backward(lambda leaf: naive_log_likelihood(leaf, means, stds), x.clone()),
    }


def run_scores(sizes: List[int], class_counts: List[int], device, rounds: int) -> List[dict]:
    rows = []
    for n in sizes:
        for num_classes in class_counts:
            for backward in (False, True):
                problem = score_problem(n, num_classes, device)
                fns = score_functions(*problem, backward=backward)
                limit = NAIVE_LIMIT_BYTES
                if device.type == "cpu":
                    limit = min(limit, int(0.6 * available_bytes()))
                elif device.type == "cuda":
                    limit = min(limit * 8, int(0.6 * torch.cuda.mem_get_info()[0]))
                skip_naive = naive_bytes(n, num_classes, backward) > limit
                if skip_naive:
                    del fns["naive"]
                with torch.no_grad() if not backward else torch.enable_grad():
                    peaks = {name: peak_bytes(fn, device) for name, fn in fns.items()}
                    times = interleaved_min_times(
                        fns, {"ours": rounds, "gemm": rounds, "naive": max(2, rounds // 3)}, device
                    )
                row = dict(n=n, classes=num_classes, pass_="fwd+bwd" if backward else "fwd", times=times, peaks=peaks,
                           naive_skipped=skip_naive, naive_estimate=naive_bytes(n, num_classes, backward))
                print(format_score_row(row), flush=True)
                rows.append(row)
                del problem, fns
    return rows


def _ms(seconds: Optional[float]) -> str:
    return "skipped" if seconds is None else f"{1e3 * seconds:.1f}"


def _mib(num_bytes: Optional[int]) -> str:
    return "skipped" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def format_score_row(row: dict) -> str:
    t, p = row["times"], row["peaks"]
    naive_t, naive_p = t.get("naive"), p.get("naive")
    speedup = f"{naive_t / t['ours']:.1f}x" if naive_t else f"(naive needs ~{row['naive_estimate'] / 2**30:.0f} GiB)"
    memory_ratio = f"{naive_p / max(p['ours'], 1):.0f}x" if naive_p else "-"
    return (
        f"| {row['n'] // 1024}k | {row['classes']} | {row['pass_']} | {_ms(t['ours'])} | {_ms(t['gemm'])} | "
        f"{t['ours'] / t['gemm']:.2f} | {_ms(naive_t)} | {speedup} | {_mib(p['ours'])} | {_mib(naive_p)} | "
        f"{memory_ratio} |"
    )


SCORE_HEADER = (
    "| N | C | pass | ours ms | GEMM floor ms | ours / floor | naive ms | naive / ours | "
    "ours peak MiB | naive peak MiB | naive / ours memory |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


# ---------------------------------------------------------------- EM benchmark


def run_em(class_counts: List[int], n: int, memory_size: int, device, rounds: int) -> None:
    print("\n| C | K | memory MiB | score fwd ms | E-step + memory update ms | M-step (all components, full memory) ms |"
          " M-step per step (/5) ms |\n|---|---|---|---|---|---|---|")
    for num_classes in class_counts:
        memory_bytes = num_classes * NUM_COMPONENTS * memory_size * DIM * 4
        free = available_bytes() if device.type == "cpu" else torch.cuda.mem_get_info()[0]
        if memory_bytes > 0.6 * free:
            print(f"| {num_classes} | {memory_size} | {memory_bytes / 2**20:.0f} | skipped: the memory needs more than"
                  f" 60% of the {free / 2**30:.1f} GiB available |")
            continue
        torch.manual_seed(0)
        clf = GaussianMixtureClassifier(
            in_channels=DIM, num_classes=num_classes, memory_size=memory_size,
            memory_kind="ring",  # the official layout; benchmarks/gmm_memory_scale.py compares both kinds
        ).to(device)
        # A full memory of unit vectors, written class by class to avoid a second copy.
        for c in range(num_classes):
            clf.memory.features[c].normal_()
            clf.memory.features[c].div_(clf.memory.features[c].norm(dim=-1, keepdim=True))
        clf.memory.count.fill_(memory_size)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, DIM, generator=g).to(device)
        labels = torch.randint(0, num_classes, (n,), generator=g).to(device)
        with torch.no_grad():
            out = clf(x)
            # Label every sample with its predicted class so all take part: the
            # most work the E-step and the memory update can get.
            labels = out.class_logits.argmax(1)

        def score():
            clf(x)

        def e_step_and_push():
            clf.iteration.fill_(1)  # not an M-step step
            clf.em_step(out, labels)

        def m_step():
            clf.memory.pending.fill_(True)
            clf.maximization_step()

        with torch.no_grad():
            times = interleaved_min_times(
                {"score": score, "e": e_step_and_push, "m": m_step}, {"score": rounds, "e": rounds, "m": 2}, device
            )
        print(f"| {num_classes} | {memory_size} | {memory_bytes / 2**20:.0f} | {_ms(times['score'])} | "
              f"{_ms(times['e'])} | {_ms(times['m'])} | {_ms(times['m'] / 5)} |", flush=True)
        del clf, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only N = 16k, C = 150 and the EM at C = 19")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (naive: a third, at least 2)")
    parser.add_argument("--em-pixels", type=int, default=65536, help="samples per EM step")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [16384] if args.quick else [16384, 65536, 262144]
    class_counts = [150] if args.quick else [19, 150, 171]
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, M = {NUM_COMPONENTS}, "
          f"D = {DIM}\n\n{SCORE_HEADER}")
    run_scores(sizes, class_counts, device, args.rounds)
    run_em([19] if args.quick else [19, 150], args.em_pixels, 32000, device, args.rounds)


if __name__ == "__main__":
    main()
