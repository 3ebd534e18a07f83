"""EM through the real E-step, memory and M-step recovers a known mixture."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier, diagonal_gaussian_log_likelihood

DIM, NUM_CLASSES, NUM_COMPONENTS = 8, 2, 3


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TrueMixture:
    """2 classes x 3 diagonal components in D = 8, means on the unit sphere.

    Within a class the components are far apart (random directions, ~1.4
    apart); each class-1 component sits 0.3 from a class-0 one, so the classes
    overlap and the Bayes-optimal accuracy is ~93-97 %, not 100 %.
    """

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        base = F.normalize(torch.randn(NUM_COMPONENTS, DIM, generator=g), dim=-1)
        offset = 0.3 * F.normalize(torch.randn(NUM_COMPONENTS, DIM, generator=g), dim=-1)
        self.means = torch.stack([base, F.normalize(base + offset, dim=-1)])  # (C, M, D)
        self.stds = 0.06 + 0.06 * torch.rand(NUM_CLASSES, NUM_COMPONENTS, DIM, generator=g)

    def sample(self, n, g):
        """Labelled samples, renormalised to the sphere as the embedding is."""
        c = torch.randint(0, NUM_CLASSES, (n,), generator=g)
        m = torch.randint(0, NUM_COMPONENTS, (n,), generator=g)
        x = self.means[c, m] + self.stds[c, m] * torch.randn(n, DIM, generator=g)
        return F.normalize(x, dim=-1), c

    def bayes_predict(self, x):
        """argmax_c of the true mixture density (uniform class prior and weights)."""
        return torch.logsumexp(diagonal_gaussian_log_likelihood(x, self.means, self.stds), -1).argmax(1)


def farthest_point_init(x, labels):
    """Per class, M samples spread out by farthest-point traversal: (C, M, D)."""
    init = []
    for c in range(NUM_CLASSES):
        members = x[labels == c]
        chosen = [members[0]]
        for _ in range(NUM_COMPONENTS - 1):
            distance = torch.cdist(members, torch.stack(chosen)).min(1).values
            chosen.append(members[distance.argmax()])
        init.append(torch.stack(chosen))
    return torch.stack(init)


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_em_recovers_a_known_mixture(seed):
    truth = TrueMixture(100 + seed)
    test_x, test_y = truth.sample(20000, torch.Generator().manual_seed(1))
    bayes_accuracy = (truth.bayes_predict(test_x) == test_y).float().mean().item()
    assert 0.9 < bayes_accuracy < 0.99  # a problem where the comparison means something

    clf = GaussianMixtureClassifier(
        in_channels=DIM,
        num_classes=NUM_CLASSES,
        embed_dim=DIM,
        num_components=NUM_COMPONENTS,
        memory_size=2000,
        max_samples_per_component=100,
        mean_momentum=0.5,  # the paper's 0.999 needs thousands of steps
        update_interval=1,
        # The paper's 1e-2 floor adds sigma = 0.1 in quadrature to these
        # sigma ~ 0.09 components; the test checks the estimator, so a floor
        # far below the true variances.
        variance_floor=1e-4,
    )
    # GMMSeg's random init relies on the network learning features around the
    # components; with fixed features EM needs a data-dependent start, and the
    # E-step's "correctly classified" gate would otherwise keep a component
    # that starts in the other class's territory there.
    init_x, init_y = truth.sample(2048, torch.Generator().manual_seed(2))
    clf.means.copy_(F.normalize(farthest_point_init(init_x, init_y), dim=-1))
    initial_means = clf.means.clone()

    g = torch.Generator().manual_seed(3)
    for _ in range(120):
        x, y = truth.sample(1024, g)
        clf.em_step(clf.classify(x), y)

    for c in range(NUM_CLASSES):
        distance = torch.cdist(clf.means[c], truth.means[c])
        rows, cols = linear_sum_assignment(distance.numpy())
        assert distance[rows, cols].max() < 0.05, distance
        # The start was not already the answer.
        assert torch.cdist(initial_means[c], truth.means[c])[rows, cols].max() > 0.1
        relative_std_error = (clf.stds[c][rows] - truth.stds[c][cols]).abs() / truth.stds[c][cols]
        assert relative_std_error.mean() < 0.2

    fitted_accuracy = (clf.classify(test_x).class_logits.argmax(1) == test_y).float().mean().item()
    assert fitted_accuracy > bayes_accuracy - 0.01, (fitted_accuracy, bayes_accuracy)
