"""The Gaussian-mixture classifier of GMMSeg, usable by any segmentation head.

(Long on purpose: a third of it is this docstring, the method and every
difference from the official code in one place.)

:class:`GaussianMixtureClassifier` replaces a head's final linear (or 1x1
conv) classifier. For every class ``c`` it keeps a mixture of ``M`` diagonal
Gaussians with uniform weights in a ``D``-dimensional embedding space, fitted
by Sinkhorn-regularised EM on a memory of recent features, and classifies by
Bayes' rule under a uniform class prior.

Usage from a head (shapes for ``N`` pixels or queries, ``C`` classes)::

    out = classifier(x)                 # x (N, C_in); any leading dims work
    out.embeddings                      # (N, D)     projection -> LayerNorm -> L2
    out.component_log_likelihood        # (N, C, M)  log N(e; mu_cm, sigma_cm)
    out.class_log_likelihood            # (N, C)     log p(e | c)
    out.class_logits                    # (N, C)     LayerNorm of the above: CE input
    loss = classifier.em_step(out, labels)   # labels (N,), ignore_value skipped
    score = classifier.anomaly_score(out)    # (N,)  -max_c log p(e | c)

A per-pixel head flattens ``(B, C_in, H, W)`` to ``(B*H*W, C_in)`` (e.g.
``einops.rearrange(f, "b c h w -> (b h w) c")``), resizes its labels to the
feature resolution with nearest interpolation and reshapes ``class_logits``
back. A Mask2Former head passes its ``(B, Q, 256)`` query embeddings, builds
the classifier with ``C + 1`` classes (the last is "no object"), and labels
every query with its matched class or ``C``.

Embedding (``embedding``): by default the official one, a bias-free 1x1
projection -> BatchNorm -> ReLU (mmcv's ``ConvModule`` order,
:class:`ConvBNReLUProjection`) -> LayerNorm -> L2; ``"linear"`` is a linear
layer with bias -> LayerNorm -> L2 (the query-level Mask2Former head's
embedding, and this classifier's only one before).

Training: the head puts its usual CE loss on ``class_logits`` and adds the
value of :meth:`~GaussianMixtureClassifier.em_step`, which, without gradient:

1. E-step: for each class, the component scores of its samples go through
   Sinkhorn-Knopp (:mod:`.sinkhorn`) and each sample gets one component.
   By default (``estep_samples="all"``, the official rule) every labelled
   sample takes part and gets its Sinkhorn component as CE target, while only
   the samples the model currently classifies correctly (argmax of
   ``class_logits`` == label) enter the memory. ``"correct"`` runs Sinkhorn
   on the correctly classified samples only (misclassified ones get their
   closest own-class component as target), so that the balanced split is
   computed on the samples that will be stored. ``memory_samples="all"``
   (with ``estep_samples="all"``) stores every labelled sample, which suits
   labels that are reliable by construction (Mask2Former's matched queries,
   see ``gmmseg_d2.modeling.gmm_mask_classification``).
   Memory start (``memory_init``): ``"random"`` (default, official) fills
   every slot with a random unit vector and makes the first M-step fit every
   component to that noise (the variance is taken around the fitted unit
   direction ``f``, so ``sigma_d^2 ~ 1/D + f_d^2 + 1e-2``: 0.16 to 0.2 and
   more at ``D = 64``), so no class starts tens of nats below the others:
   its pixels can be classified correctly, hence stored, from its first
   appearance on.
   ``"empty"`` starts with no features: a class is then refitted only once it
   stores one, keeps ``sigma = 1`` until then, scores tens of nats below any
   fitted class (the ``-sum log sigma`` term) and, with the correctness gate,
   would never be stored: locked out for good, which hits every class absent
   from the first batches (most of ADE20K's 150). ``bootstrap_empty_classes``
   (default off, as the official code, which needs none) is the remedy for
   that start: the samples of a class that has never stored a real feature
   all count as correct, so it is fitted to its own first features. It works
   with either start ("never stored a real feature" is tracked apart from
   the random slots).
2. Before that, the participating samples of all ranks are all-gathered, so
   every rank runs the same E-step on the same data and ends with the same
   memory and parameters, equal to one process fed the concatenated batch.
3. The memory takes at most ``max_samples_per_component`` new features per
   component (evenly spaced). By default it keeps only the chunk sums the
   M-step reads (:class:`~.memory.ClassComponentStatsMemory`, a tenth of the
   size); ``memory_kind="ring"`` keeps the features themselves, as the
   official code (:class:`~.memory.ClassComponentMemory`).
4. Every ``update_interval`` steps (counting from step 0, as the official
   code does) the M-step refits the components written since the last one
   (with ``memory_init="random"``, all of them the first time):
   ``mu <- normalise(m mu + (1 - m) normalise(sum memory))`` and
   ``sigma <- m_s sigma + (1 - m_s) sqrt(var + floor)``.
5. It returns ``contrastive_loss_weight`` x the cross-entropy of the ``C*M``
   component scores against the assigned component ``c * M + m``.

Samples whose embedding or scores are NaN/Inf are left out of all of this
(no memory slot, no CE target) and counted under ``gmm/nonfinite_samples`` in
the Detectron2 event storage when one is active. The loss value stays finite;
the dropped rows' own gradient is NaN through any loss (``NaN * 0``), the
head's CE included, so such a batch still needs the trainer's usual handling.
With the ``"conv_bn_relu"`` embedding in training, one non-finite input row
makes the batch statistics, hence every embedding of the batch and the
BatchNorm's running statistics, non-finite: the whole batch is dropped.

For the auxiliary outputs of a multi-layer decoder, ``em_step(out_l, labels_l,
update=False)`` gives the loss without touching the state (it still
all-gathers: every rank must make the same calls).

State: ``means``, ``stds``, the memory and the step counter ``iteration`` are
buffers (the BatchNorm's running statistics too), so checkpoints carry them
and a resumed run continues exactly. The GMM's buffers are kept equal across
ranks by construction (the BatchNorm's running statistics are per rank, as
for any BatchNorm under DDP without buffer broadcast); wrap the model in DDP with
``broadcast_buffers=False`` (Detectron2's default in ``create_ddp_model``),
otherwise DDP would copy the multi-GB memory from rank 0 on every forward.

Differences from the official implementation:

The defaults follow the official code in the E-step scope (Sinkhorn targets
for every labelled sample, memory for the correct ones), the memory start
(random unit vectors, all slots read by the M-step) and the embedding (conv ->
BN -> ReLU -> LayerNorm -> L2). What still differs:

* Sinkhorn runs on the samples of all ranks together (the official code runs
  it on each GPU's own pixels, then gathers the assignments), so the result
  does not depend on how a batch is split over GPUs.
* The M-step refits the components written since the previous M-step (the
  official code: every component of the classes in the current batch, which
  keeps moving a mean towards an unchanged memory). With the random start
  the first M-step fits every component of every class, present or not; the
  official code fits a class at the first M-step whose batch contains it.
  Either way a class gets fitted to its random slots (plus whatever own
  features it stored), so none stays at ``sigma = 1``, locked out.
* The BatchNorm of the embedding is per rank under DDP (official configs:
  SyncBN); see :class:`ConvBNReLUProjection`.
* The official head skips the projection when the head's channels already
  equal ``D``; here it is always there.
* The component CE marks "no target" with -100 rather than 255, since with
  ``C * M > 255`` (ADE20K: 750) component 255 is a real target.
* The log-likelihood is one matrix product rather than a chunked broadcast,
  and the evenly spaced subsample uses exact integer ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from einops import rearrange
from torch import nn

from ..embedding import layer_norm_l2
from .distributed import all_gather_rows
from .likelihood import diagonal_gaussian_log_likelihood
from .memory import MEMORY_INITS, MEMORY_KINDS, build_class_component_memory
from .sinkhorn import segmented_sinkhorn_assignment

__all__ = ["EMBEDDINGS", "GaussianMixtureClassifier", "GMMClassifierOutput", "ConvBNReLUProjection"]

#: Values of the ``embedding`` argument (``MODEL.GMM.EMBEDDING``).
EMBEDDINGS = ("conv_bn_relu", "linear")

# ignore_index of the component CE (see the module docstring).
_NO_TARGET = -100

_MEMORY_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class GMMClassifierOutput:
    """What :meth:`GaussianMixtureClassifier.forward` returns; ``*`` is the input's leading shape.

    Attributes:
        embeddings: ``(*, D)`` unit-norm embeddings, float32.
        component_log_likelihood: ``(*, C, M)`` log-density under each component.
        class_log_likelihood: ``(*, C)`` ``log p(x | c)``: max (default) or
            log-mean-exp of the component log-densities.
        class_logits: ``(*, C)`` LayerNorm of ``class_log_likelihood`` over
            classes; what a cross-entropy loss or a softmax consumes.
    """

    embeddings: torch.Tensor
    component_log_likelihood: torch.Tensor
    class_log_likelihood: torch.Tensor
    class_logits: torch.Tensor


class ConvBNReLUProjection(nn.Module):
    """The official embedding projection: 1x1 conv without bias -> BatchNorm -> ReLU.

    mmcv's ``ConvModule(C_in, D, kernel_size=1, norm_cfg=BN)`` on ``(B, C_in,
    H, W)`` maps every pixel by the same bias-free linear map, then normalises
    every channel with statistics over all ``B*H*W`` pixels. A bias-free
    ``nn.Linear`` on the ``(*, C_in)`` rows followed by ``BatchNorm1d`` over
    the flattened ``(N, D)`` rows computes exactly that, for any leading
    shape. The submodule names follow ``ConvModule`` (``conv``, ``bn``,
    ``activate``), so an official checkpoint maps key by key:
    ``projection.conv.weight`` is ``(D, C_in)`` here and ``(D, C_in, 1, 1)``
    there (a reshape), ``projection.bn.*`` match as they are.

    BatchNorm's batch statistics need more than one row in training
    (PyTorch raises otherwise, as for the official 2-D BatchNorm on a single
    pixel); evaluation uses the running statistics and takes any number.
    Under DDP this is a per-rank BatchNorm, where the official configs use
    SyncBN; ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` converts it
    (SyncBatchNorm accepts ``(N, D)`` inputs).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Linear(in_channels, out_channels, bias=False)
        self.bn = nn.BatchNorm1d(out_channels)
        self.activate = nn.ReLU()
        # ConvModule's initialisation: Kaiming normal (fan_out, ReLU) for the
        # conv, weight 1 and bias 0 for the norm (nn.BatchNorm1d's own).
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, C_in)`` -> ``(*, D)`` float32."""
        projected = self.conv(x)  # on the input's layout: no copy of x
        flat = projected.reshape(-1, projected.shape[-1])
        # Batch statistics in float32 even under autocast.
        with torch.autocast(device_type=flat.device.type, enabled=False):
            flat = self.activate(self.bn(flat.float()))
        return flat.reshape(projected.shape)


class GaussianMixtureClassifier(nn.Module):
    """Generative classifier: one Gaussian mixture per class, fitted by EM.

    Args:
        in_channels: ``C_in``, channels of the features to classify.
        num_classes: ``C`` (for a Mask2Former head: classes + 1 for "no object").
        embed_dim: ``D``, embedding dimension (paper: 64).
        num_components: ``M``, components per class (paper: 5).
        memory_size: ``K``, features kept per component (official: 32000).
        max_samples_per_component: most new features per component per step
            (official: 20); ``<= 0`` means up to ``K``.
        mean_momentum: ``m`` of the mean update (0.999).
        std_momentum: ``m_s`` of the std update (0: replace).
        variance_floor: added to the variance before the square root (1e-2).
        class_norm: LayerNorm over the ``C`` class log-likelihoods to make the
            logits (official code: True). False feeds the log-likelihoods to
            the CE directly (an ablation: their scale is tens of nats).
        update_interval: steps between M-steps (5).
        sinkhorn_epsilon: entropic regularisation of the E-step (0.05).
        sinkhorn_iterations: Sinkhorn rounds (3).
        contrastive_loss_weight: weight of the component CE (0.01).
        component_reduction: ``"max"`` (official code) or ``"logsumexp"`` (the
            mixture density the paper writes) to go from components to classes.
        estep_samples: ``"all"`` (official code: Sinkhorn on every labelled
            sample, each gets its Sinkhorn component as CE target) or
            ``"correct"`` (Sinkhorn on correctly classified samples only;
            misclassified ones get their best own-class component as CE target).
        memory_samples: ``"correct"`` (only correctly classified samples
            enter the memory, as the official code) or ``"all"`` (every sample
            that took part in the E-step; with ``estep_samples="correct"``
            those are the correct ones anyway).
        memory_init: ``"random"`` (official code: every memory slot starts as a
            random unit vector and counts for the M-step until overwritten;
            the first M-step fits every component to them) or ``"empty"``
            (nothing stored until the first real feature; see
            :class:`~.memory.ClassComponentMemory`).
        bootstrap_empty_classes: treat every labelled sample of a class that
            has never stored a real feature as correctly classified (see the
            module docstring). Off in the official code.
        embedding: ``"conv_bn_relu"`` (official: bias-free projection ->
            BatchNorm -> ReLU, :class:`ConvBNReLUProjection`, then LayerNorm ->
            L2) or ``"linear"`` (linear with bias -> LayerNorm -> L2; state-dict
            keys ``projection.weight`` / ``projection.bias``).
        memory_dtype: storage dtype of the ring memory (float32 or float16).
        memory_kind: ``"stats"`` (default: chunk sums of the window, all the
            M-step reads, ~``2 / max_samples_per_component`` of the ring's
            size; :class:`~.memory.ClassComponentStatsMemory`) or ``"ring"``
            (the official per-sample ring buffer,
            :class:`~.memory.ClassComponentMemory`).
        memory_chunk_size: features per chunk of the ``"stats"`` memory
            (``<= 0``: ``max_samples_per_component``).
        ignore_value: label of pixels/queries without a class (255).
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        embed_dim: int = 64,
        num_components: int = 5,
        memory_size: int = 32000,
        max_samples_per_component: int = 20,
        mean_momentum: float = 0.999,
        std_momentum: float = 0.0,
        variance_floor: float = 1e-2,
        class_norm: bool = True,
        update_interval: int = 5,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        contrastive_loss_weight: float = 0.01,
        component_reduction: str = "max",
        estep_samples: str = "all",
        memory_samples: str = "correct",
        memory_init: str = "random",
        bootstrap_empty_classes: bool = False,
        embedding: str = "conv_bn_relu",
        memory_dtype: torch.dtype = torch.float32,
        memory_kind: str = "stats",
        memory_chunk_size: int = 0,
        ignore_value: int = 255,
    ) -> None:
        super().__init__()
        if component_reduction not in ("max", "logsumexp"):
            raise ValueError(f"component_reduction must be 'max' or 'logsumexp', got {component_reduction!r}")
        if estep_samples not in ("correct", "all"):
            raise ValueError(f"estep_samples must be 'correct' or 'all', got {estep_samples!r}")
        if memory_samples not in ("correct", "all"):
            raise ValueError(f"memory_samples must be 'correct' or 'all', got {memory_samples!r}")
        if memory_init not in MEMORY_INITS:
            raise ValueError(f"memory_init must be one of {MEMORY_INITS}, got {memory_init!r}")
        if memory_kind not in MEMORY_KINDS:
            raise ValueError(f"memory_kind must be one of {MEMORY_KINDS}, got {memory_kind!r}")
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {update_interval}")
        if not (0.0 <= mean_momentum <= 1.0 and 0.0 <= std_momentum <= 1.0):
            raise ValueError("momenta must lie in [0, 1]")
        if variance_floor < 0:
            raise ValueError(f"variance_floor must be >= 0, got {variance_floor}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_components = num_components
        self.mean_momentum = mean_momentum
        self.std_momentum = std_momentum
        self.variance_floor = variance_floor
        self.update_interval = update_interval
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.contrastive_loss_weight = contrastive_loss_weight
        self.component_reduction = component_reduction
        self.estep_samples = estep_samples
        self.memory_samples = memory_samples
        self.memory_init = memory_init
        self.bootstrap_empty_classes = bootstrap_empty_classes
        self.embedding = embedding
        self.ignore_value = ignore_value

        # Embedding: projection -> LayerNorm -> L2 (the L2 step is in embed()).
        # "linear" keeps the keys projection.weight / projection.bias of the
        # checkpoints written before "conv_bn_relu" existed.
        if embedding == "conv_bn_relu":
            self.projection = ConvBNReLUProjection(in_channels, embed_dim)
        else:
            self.projection = nn.Linear(in_channels, embed_dim)
            nn.init.trunc_normal_(self.projection.weight, std=0.02)
            nn.init.zeros_(self.projection.bias)
        self.embedding_norm = nn.LayerNorm(embed_dim)
        # LayerNorm over the C class log-likelihoods gives the logits.
        self.class_norm = nn.LayerNorm(num_classes) if class_norm else nn.Identity()

        means = torch.empty(num_classes, num_components, embed_dim)
        nn.init.trunc_normal_(means, std=0.02)
        self.register_buffer("means", F.normalize(means, dim=-1))
        self.register_buffer("stds", torch.ones(num_classes, num_components, embed_dim))
        # Training steps taken by em_step(update=True); drives the M-step schedule.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))
        self.memory = build_class_component_memory(
            memory_kind, num_classes, num_components, memory_size, embed_dim, max_samples_per_component,
            memory_dtype, init=memory_init, chunk_size=memory_chunk_size,
        )

    @classmethod
    def from_config(cls, cfg, in_channels: int, num_classes: int) -> dict:
        gmm = cfg.MODEL.GMM
        if gmm.MEMORY_DTYPE not in _MEMORY_DTYPES:
            raise ValueError(f"MODEL.GMM.MEMORY_DTYPE must be one of {sorted(_MEMORY_DTYPES)}")
        return {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "embed_dim": gmm.EMBED_DIM,
            "num_components": gmm.NUM_COMPONENTS,
            "memory_size": gmm.MEMORY_SIZE,
            "max_samples_per_component": gmm.MAX_SAMPLES_PER_COMPONENT,
            "mean_momentum": gmm.MEAN_MOMENTUM,
            "std_momentum": gmm.STD_MOMENTUM,
            "variance_floor": gmm.VARIANCE_FLOOR,
            "class_norm": gmm.CLASS_NORM,
            "update_interval": gmm.UPDATE_INTERVAL,
            "sinkhorn_epsilon": gmm.SINKHORN_EPSILON,
            "sinkhorn_iterations": gmm.SINKHORN_ITERATIONS,
            "contrastive_loss_weight": gmm.CONTRASTIVE_LOSS_WEIGHT,
            "component_reduction": gmm.COMPONENT_REDUCTION,
            "estep_samples": gmm.E_STEP_SAMPLES,
            "memory_init": gmm.MEMORY_INIT,
            "bootstrap_empty_classes": gmm.BOOTSTRAP_EMPTY_CLASSES,
            "embedding": gmm.EMBEDDING,
            "memory_dtype": _MEMORY_DTYPES[gmm.MEMORY_DTYPE],
            "memory_kind": gmm.MEMORY_KIND,
            "memory_chunk_size": gmm.MEMORY_CHUNK_SIZE,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def extra_repr(self) -> str:
        return (
            f"classes={self.num_classes}, components={self.num_components}, reduction={self.component_reduction}, "
            f"estep_samples={self.estep_samples}, memory_samples={self.memory_samples}, "
            f"memory_init={self.memory_init}, bootstrap_empty_classes={self.bootstrap_empty_classes}, "
            f"embedding={self.embedding}, update_interval={self.update_interval}"
        )

    # ------------------------------------------------------------------ forward

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, C_in)`` features -> ``(*, D)`` unit-norm float32 embeddings.

        ``"conv_bn_relu"``: bias-free projection, BatchNorm (batch statistics
        in training), ReLU, LayerNorm, L2. ``"linear"``: projection with bias,
        LayerNorm, L2.
        """
        return layer_norm_l2(self.projection(x), self.embedding_norm)

    def classify(self, embeddings: torch.Tensor) -> GMMClassifierOutput:
        """Score ``(*, D)`` embeddings against every component and class."""
        leading = embeddings.shape[:-1]
        flat = embeddings.reshape(-1, self.embed_dim)
        components = diagonal_gaussian_log_likelihood(flat, self.means, self.stds)  # (N, C, M)
        with torch.autocast(device_type=components.device.type, enabled=False):
            if self.component_reduction == "max":
                classes = components.amax(dim=-1)
            else:
                # Uniform mixture weights 1/M.
                classes = torch.logsumexp(components, dim=-1) - math.log(self.num_components)
            logits = self.class_norm(classes)
        return GMMClassifierOutput(
            embeddings=embeddings,
            component_log_likelihood=components.reshape(*leading, self.num_classes, self.num_components),
            class_log_likelihood=classes.reshape(*leading, self.num_classes),
            class_logits=logits.reshape(*leading, self.num_classes),
        )

    def forward(self, x: torch.Tensor) -> GMMClassifierOutput:
        """Embed and score ``(*, C_in)`` features; see :class:`GMMClassifierOutput`."""
        return self.classify(self.embed(x))

    @staticmethod
    def anomaly_score(outputs: GMMClassifierOutput) -> torch.Tensor:
        """``-max_c log p(x | c)`` per sample, ``(*,)``: high means unlike every class."""
        return -outputs.class_log_likelihood.amax(dim=-1)

    # ----------------------------------------------------------------- training

    def em_step(self, outputs: GMMClassifierOutput, labels: torch.Tensor, *, update: bool = True) -> torch.Tensor:
        """One training step of the EM; returns the weighted component CE.

        Args:
            outputs: this step's :meth:`forward` output for ``N`` samples.
            labels: ``(*,)`` int class of each sample, ``ignore_value`` for none.
            update: write the memory, run the M-step when due and advance the
                step counter. ``False`` only computes the loss (e.g. for the
                auxiliary outputs of a multi-layer decoder); the E-step still
                all-gathers, so all ranks must make the same calls.

        Returns:
            Scalar ``contrastive_loss_weight * CE(component scores, assigned
            component)``, averaged over samples with a target; 0 (still
            attached to the graph) when there are none.
        """
        num_samples = labels.numel()
        labels = labels.reshape(num_samples).long()
        components = outputs.component_log_likelihood.reshape(num_samples, self.num_classes, self.num_components)
        targets, new_features, new_slots = self._expectation(
            outputs.embeddings.reshape(num_samples, self.embed_dim),
            components,
            outputs.class_logits.reshape(num_samples, self.num_classes),
            labels,
        )
        if update:
            self.memory.push(new_features, new_slots)
            if int(self.iteration) % self.update_interval == 0:
                self.maximization_step()
            self.iteration += 1
        return self.contrastive_loss(components, targets)

    def contrastive_loss(self, component_log_likelihood: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Weighted CE of ``(N, C, M)`` scores against ``(N,)`` flat targets (-100: none)."""
        scores = rearrange(component_log_likelihood, "n c m -> n (c m)")
        has_target = targets != _NO_TARGET
        # Summed and divided by the count rather than averaged, so that a batch
        # without targets gives 0 (attached to the graph) instead of 0/0.
        total = F.cross_entropy(scores, targets, ignore_index=_NO_TARGET, reduction="sum")
        return self.contrastive_loss_weight * total / has_target.sum().clamp_min(1)

    @torch.no_grad()
    def _expectation(
        self, embeddings: torch.Tensor, components: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E-step on all ranks' samples.

        Args:
            embeddings: ``(N, D)``; components: ``(N, C, M)``; logits: ``(N, C)``;
            labels: ``(N,)``.

        Returns:
            ``(targets, features, slots)``: ``(N,)`` flat component target of
            each local sample (-100 for none); the ``(n, D)`` features of every
            rank's correctly classified samples and their ``(n,)`` flat
            component indices, for the memory.
        """
        num_samples = labels.shape[0]
        dim, num_components = self.embed_dim, self.num_components
        labelled = labels != self.ignore_value
        if bool(((labels < 0) | (labels >= self.num_classes))[labelled].any()):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}) or equal ignore_value={self.ignore_value}"
            )
        safe_labels = torch.where(labelled, labels, torch.zeros_like(labels))
        own_scores = torch.gather(
            components.detach(), 1, safe_labels.view(num_samples, 1, 1).expand(num_samples, 1, num_components)
        ).squeeze(1)  # (N, M): scores of each sample's own class
        # A row sum is finite iff every entry is (the values are far from
        # overflowing: unit-norm embeddings, LayerNorm logits, log-densities),
        # and a sum is a cheaper reduction than all().
        finite = (
            torch.isfinite(embeddings.sum(dim=1))
            & torch.isfinite(logits.sum(dim=1))
            & torch.isfinite(own_scores.sum(dim=1))
        )
        self._log_nonfinite(num_samples - int(finite.sum()))
        usable = labelled & finite
        correct = usable & (logits.argmax(dim=1) == labels)
        if self.bootstrap_empty_classes:
            # A class that never stored a real feature: with an empty memory it
            # has never been fitted (stds 1, tens of nats below every fitted
            # class), so none of its samples could ever be classified
            # correctly. Counting its samples as correct lets it into the
            # memory once. The memory is identical on all ranks, so they all
            # agree on this.
            empty_class = ~self.memory.has_data()  # (C,)
            correct = correct | (usable & empty_class[safe_labels])
        takes_part = correct if self.estep_samples == "correct" else usable
        local = torch.nonzero(takes_part).squeeze(1)

        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        # One gather for everything: labels and flags are exact in float32.
        packed = torch.cat(
            [
                embeddings[local].to(dtype),
                own_scores[local].to(dtype),
                labels[local].to(dtype)[:, None],
                correct[local].to(dtype)[:, None],
            ],
            dim=1,
        )
        gathered, offset = all_gather_rows(packed)
        all_features = gathered[:, :dim]
        all_scores = gathered[:, dim : dim + num_components]
        all_labels = gathered[:, dim + num_components].long()
        all_correct = gathered[:, dim + num_components + 1] > 0.5
        assigned = segmented_sinkhorn_assignment(
            all_scores, all_labels, self.sinkhorn_iterations, self.sinkhorn_epsilon
        )

        # Samples outside the Sinkhorn (misclassified, in "correct" mode) are
        # pulled towards the closest component of their own class.
        no_target = torch.full_like(labels, _NO_TARGET)
        targets = torch.where(usable, labels * num_components + own_scores.argmax(dim=1), no_target)
        targets[local] = labels[local] * num_components + assigned[offset : offset + local.numel()]

        if self.memory_samples == "all":
            to_memory = torch.arange(all_labels.shape[0], device=all_labels.device)
        else:
            to_memory = torch.nonzero(all_correct).squeeze(1)
        slots = all_labels[to_memory] * num_components + assigned[to_memory]
        return targets, all_features[to_memory], slots

    @staticmethod
    def _log_nonfinite(count: int) -> None:
        """Record how many samples were dropped for NaN/Inf, if an event storage is active."""
        try:
            storage = get_event_storage()
        except AssertionError:  # no EventStorage: not inside a Detectron2 trainer
            return
        storage.put_scalar("gmm/nonfinite_samples", count, smoothing_hint=False)

    @torch.no_grad()
    def maximization_step(self) -> None:
        """Refit the components written since the last M-step from their memory.

        With ``memory_init="random"`` every component is pending at the start,
        so the first M-step fits all of them to their random slots.
        """
        refit = self.memory.pending & (self.memory.count > 0)  # (C, M)
        self.memory.clear_pending()
        if not bool(refit.any()):
            return
        direction, variance = self.memory.statistics(refit)
        m, m_s = self.mean_momentum, self.std_momentum
        new_means = F.normalize(m * self.means + (1.0 - m) * direction, dim=-1)
        new_stds = m_s * self.stds + (1.0 - m_s) * torch.sqrt(variance + self.variance_floor)
        refit = refit.unsqueeze(-1)
        self.means.copy_(torch.where(refit, new_means, self.means))
        self.stds.copy_(torch.where(refit, new_stds, self.stds))
