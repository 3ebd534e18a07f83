"""ProtoSeg's prototype classifier behind gmmseg_d2's classifier seam (``MODEL.CLASSIFIER.NAME: "prototype"``).

Zhou et al., "Rethinking Semantic Segmentation: A Prototype View", CVPR 2022;
official code tfzhou/ProtoSeg (``HRNet_W48_Proto`` in lib/models/nets/hrnet.py,
``distributed_sinkhorn`` in lib/models/modules/sinkhorn.py, ``PPC`` / ``PPD``
in lib/loss/loss_proto.py).

Every class ``c`` of the ``K`` keeps ``M`` non-learnable prototypes, unit
vectors ``p_cm`` in a ``D``-dimensional embedding space. A sample (pixel or
query) is classified by its nearest prototype:

1. embedding ``x``: projection (1x1 conv -> ReLU -> 1x1 conv), L2 over the
   channels (or, as the official code, over the image width: ``l2_axis``),
   LayerNorm(D) -> L2 (``feat_norm``);
2. cosine similarities ``s_cm = x . p_cm`` to every prototype, class score
   ``max_m s_cm``, and ``class_logits = LayerNorm_K(class scores)``
   (``mask_norm``); no temperature anywhere. The segmenter's CE is on these
   logits.

Training (:meth:`PrototypeClassifier.losses`, on labels at the features'
resolution):

3. online clustering: for every class, all its labelled samples of the batch
   (this rank's) are split over the class's ``M`` prototypes by Algorithm 1
   (Sinkhorn-Knopp on ``exp(s / kappa)``, :func:`~gmmseg_d2.modeling.gmm.sinkhorn.segmented_sinkhorn_transport_plan`
   with ``scale_by_max_abs=False``); the argmax of the plan is each sample's
   prototype;
4. ``loss_ppc``: CE over all ``K*M`` similarities (temperature 1) against that
   prototype; ``loss_ppd``: mean ``(1 - s_assigned)^2``; both weighted;
5. with ``update=True`` (after warm-up, without gradient), the samples the
   model classifies correctly (argmax of ``class_logits`` == label) move the
   prototypes they are assigned to:
   ``p <- normalise(gamma p + (1 - gamma) normalise(sum of their embeddings))``;
   prototypes with no correctly classified sample stay as they are.

Distributed training: clustering and losses run on each rank's own samples
(as the official code). For the update every rank sums its correctly
classified embeddings per prototype, together with their counts, and one
all-reduce (sum) of those sums and counts gives every rank the totals of all
ranks; every rank then applies the same update to the same prototypes, so
they stay identical without a broadcast. (The official code updates the
prototypes on every rank from its own samples and then averages the ranks'
updated prototypes.) The update is that of one process that clustered each
rank's samples on its own and summed them all.

State: ``prototypes (K, M, D)`` and ``iteration`` (steps taken with
``update=True``) are buffers, so checkpoints carry them and a resumed run
continues exactly. Every difference from the official code is listed in
``projects/ProtoSeg/README.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import configurable
from einops import rearrange
from torch import Tensor, nn

from gmmseg_d2.modeling.classifiers.base import (
    CLASSIFIER_REGISTRY, QUERY_IGNORE_LABEL, ClassifierOutput, SegmentationClassifier, check_level, layer_norm_l2,
)
from gmmseg_d2.modeling.gmm.distributed import world_size
from gmmseg_d2.modeling.gmm.sinkhorn import segmented_sinkhorn_transport_plan

__all__ = ["L2_AXES", "PROJECTIONS", "UPDATE_ASSIGNMENTS", "PrototypeClassifier", "PrototypeDetails",
           "ProjectionHead"]

#: Values of ``l2_axis`` (``MODEL.PROTO.L2_AXIS``).
L2_AXES = ("channels", "width")
#: Values of ``update_assignment`` (``MODEL.PROTO.UPDATE_ASSIGNMENT``).
UPDATE_ASSIGNMENTS = ("argmax", "gumbel")
#: Values of ``projection`` (``MODEL.PROTO.PROJECTION``).
PROJECTIONS = ("conv_relu", "conv_bn_relu")

# Temperature of the official gumbel sample. A hard gumbel-softmax sample is
# argmax(logits + gumbel noise) whatever the temperature; kept for the call.
_GUMBEL_TAU = 0.5


@dataclass
class PrototypeDetails:
    """What :meth:`PrototypeClassifier.forward` keeps besides the logits, channels last.

    ``*`` is ``(N, H, W)`` at pixel level, ``(B, Q)`` at query level.

    Attributes:
        embeddings: ``(*, D)`` unit-norm embeddings (float32).
        similarities: ``(*, K, M)`` cosine similarity to every prototype.
        class_scores: ``(*, K)`` ``max_m`` of the similarities, before ``mask_norm``.
    """

    embeddings: Tensor
    similarities: Tensor
    class_scores: Tensor


class ProjectionHead(nn.Module):
    """The official projection on channels-last rows: ``(*, C_in) -> (*, D)``.

    ``"conv_relu"``: 1x1 conv -> ReLU -> 1x1 conv, both convs with bias, hidden
    width ``C_in``: the ``ProjectionHead`` of the official
    lib/models/modules/contrast.py, which is the one ``HRNet_W48_Proto`` runs
    (hrnet.py imports projection.py's ``ProjectionHead`` and then contrast.py's
    under the same name). ``"conv_bn_relu"``: BatchNorm between the first conv
    and the ReLU (projection.py's ``"convmlp"``), its statistics over all rows
    of the batch, in float32. A 1x1 conv on ``(B, C, H, W)`` is a linear map
    of every pixel's channels: ``nn.Linear`` on ``(B, H, W, C)`` computes the
    same, with the same default initialisation (fan-in ``C_in``), and also
    serves ``(B, Q, C)`` queries. The L2 step of the official head is the
    classifier's (see ``l2_axis``).
    """

    def __init__(self, in_channels: int, out_channels: int, *, batch_norm: bool = False) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_channels, in_channels)
        self.norm = nn.BatchNorm1d(in_channels) if batch_norm else None
        self.activation = nn.ReLU()
        self.output = nn.Linear(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``(*, C_in)`` -> ``(*, D)``."""
        hidden = self.hidden(x)
        if self.norm is not None:
            flat = hidden.reshape(-1, hidden.shape[-1])
            with torch.autocast(device_type=flat.device.type, enabled=False):
                flat = self.norm(flat.float())
            hidden = flat.reshape(hidden.shape)
        return self.output(self.activation(hidden))


@CLASSIFIER_REGISTRY.register("prototype")
class PrototypeClassifier(SegmentationClassifier):
    """Nearest-prototype classifier with Sinkhorn online clustering and momentum prototypes.

    See the module docstring for the method, the distributed scheme and the
    state.

    Args:
        in_channels: ``C_in``, channels of the features.
        num_classes: ``K`` (query level: the classes + "no object", last).
        level: ``"pixel"`` (features ``(N, C_in, H, W)``) or ``"query"``
            (``(B, Q, C_in)``).
        embed_dim: ``D`` (official: 720).
        num_prototypes: ``M`` per class (10).
        gamma: momentum of the prototype update (0.999).
        sinkhorn_epsilon: ``kappa`` of Algorithm 1 (0.05).
        sinkhorn_iterations: Sinkhorn rounds (3).
        ppc_weight: weight of ``loss_ppc`` (0.01).
        ppd_weight: weight of ``loss_ppd`` (paper 0.01; official Cityscapes 0.001).
        warmup_iters: steps with ``update=True`` during which :meth:`losses`
            returns zero PPC / PPD and leaves the prototypes alone (0).
        l2_axis: ``"channels"`` or ``"width"`` (official; pixel level only):
            the axis of the L2 normalisation after the projection.
        update_assignment: ``"argmax"`` or ``"gumbel"`` (official): which
            prototype a correctly classified sample moves.
        projection: ``"conv_relu"`` (official model) or ``"conv_bn_relu"``;
            see :class:`ProjectionHead`.
        ignore_value: label of samples without a class; default the
            level's (255 per pixel, :data:`QUERY_IGNORE_LABEL` per query).
    """

    loss_names = ("loss_ppc", "loss_ppd")

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        level: str = "pixel",
        embed_dim: int = 720,
        num_prototypes: int = 10,
        gamma: float = 0.999,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        ppc_weight: float = 0.01,
        ppd_weight: float = 0.01,
        warmup_iters: int = 0,
        l2_axis: str = "channels",
        update_assignment: str = "argmax",
        projection: str = "conv_relu",
        ignore_value: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_level(level)
        if l2_axis not in L2_AXES:
            raise ValueError(f"MODEL.PROTO.L2_AXIS must be one of {L2_AXES}, got {l2_axis!r}")
        if l2_axis == "width" and level != "pixel":
            raise ValueError("MODEL.PROTO.L2_AXIS 'width' normalises over the width of a (N, D, H, W) map: "
                             "pixel level only; queries have no width")
        if update_assignment not in UPDATE_ASSIGNMENTS:
            raise ValueError(f"MODEL.PROTO.UPDATE_ASSIGNMENT must be one of {UPDATE_ASSIGNMENTS}, "
                             f"got {update_assignment!r}")
        if projection not in PROJECTIONS:
            raise ValueError(f"MODEL.PROTO.PROJECTION must be one of {PROJECTIONS}, got {projection!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"MODEL.PROTO.GAMMA must lie in [0, 1], got {gamma}")
        if num_prototypes < 1 or embed_dim < 1:
            raise ValueError("num_prototypes and embed_dim must be >= 1")
        if warmup_iters < 0:
            raise ValueError(f"MODEL.PROTO.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        self.level = level
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.num_prototypes = num_prototypes
        self.gamma = gamma
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.ppc_weight = ppc_weight
        self.ppd_weight = ppd_weight
        self.warmup_iters = warmup_iters
        self.l2_axis = l2_axis
        self.update_assignment = update_assignment
        self.projection_kind = projection
        if ignore_value is None:
            ignore_value = 255 if level == "pixel" else QUERY_IGNORE_LABEL
        self.ignore_value = ignore_value

        self.projection = ProjectionHead(in_channels, embed_dim, batch_norm=projection == "conv_bn_relu")
        self.feat_norm = nn.LayerNorm(embed_dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        # The official initialisation (timm's trunc_normal_, std 0.02, cut at
        # +-2: nothing is cut at this std), stored on the unit sphere.
        prototypes = torch.empty(num_classes, num_prototypes, embed_dim)
        nn.init.trunc_normal_(prototypes, std=0.02)
        self.register_buffer("prototypes", F.normalize(prototypes, dim=-1))
        # Steps taken with update=True; ends the warm-up.
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, cfg, *, in_channels: int, num_classes: int, level: str, ignore_value: int) -> Dict:
        proto = cfg.MODEL.PROTO
        return {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "level": level,
            "embed_dim": proto.EMBED_DIM,
            "num_prototypes": proto.NUM_PROTOTYPES,
            "gamma": proto.GAMMA,
            "sinkhorn_epsilon": proto.SINKHORN_EPSILON,
            "sinkhorn_iterations": proto.SINKHORN_ITERATIONS,
            "ppc_weight": proto.PPC_WEIGHT,
            "ppd_weight": proto.PPD_WEIGHT,
            "warmup_iters": proto.WARMUP_ITERS,
            "l2_axis": proto.L2_AXIS,
            "update_assignment": proto.UPDATE_ASSIGNMENT,
            "projection": proto.PROJECTION,
            # Query labels mark "none" with QUERY_IGNORE_LABEL (the dataset's
            # ignore value can be a real query label in [0, C]).
            "ignore_value": ignore_value if level == "pixel" else QUERY_IGNORE_LABEL,
        }

    def extra_repr(self) -> str:
        return (f"level={self.level}, classes={self.num_classes}, prototypes={self.num_prototypes}, "
                f"embed_dim={self.embed_dim}, gamma={self.gamma}, l2_axis={self.l2_axis}, "
                f"update_assignment={self.update_assignment}, projection={self.projection_kind}, "
                f"warmup_iters={self.warmup_iters}")

    # ------------------------------------------------------------------ forward

    def embed(self, features: Tensor) -> Tensor:
        """``(N, C_in, H, W)`` or ``(B, Q, C_in)`` -> unit-norm float32 ``(N, H, W, D)`` or ``(B, Q, D)``."""
        rows = rearrange(features, "n c h w -> n h w c") if self.level == "pixel" else features
        projected = self.projection(rows)
        with torch.autocast(device_type=projected.device.type, enabled=False):
            # "width": dim 2 of (N, H, W, D) is dim -1 of the official (N, D, H, W).
            axis = 2 if self.l2_axis == "width" else -1
            projected = F.normalize(projected.float(), dim=axis)
        return layer_norm_l2(projected, self.feat_norm)

    def current_prototypes(self) -> Tensor:
        """``(K, M, D)`` prototypes on the unit sphere (normalised again, as the official forward does)."""
        return F.normalize(self.prototypes.float(), dim=-1)

    def classify(self, embeddings: Tensor) -> ClassifierOutput:
        """Unit-norm channels-last embeddings ``(*, D)`` -> logits in the level's layout and details."""
        num_classes = self.num_classes
        prototypes = rearrange(self.current_prototypes(), "k m d -> d (k m)")
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            similarities = rearrange(embeddings.float() @ prototypes, "... (k m) -> ... k m", k=num_classes)
            class_scores = similarities.amax(dim=-1)
            logits = self.mask_norm(class_scores)
        if self.level == "pixel":
            logits = rearrange(logits, "n h w k -> n k h w")
        return ClassifierOutput(logits, PrototypeDetails(embeddings, similarities, class_scores))

    def forward(self, features: Tensor) -> ClassifierOutput:
        """``(N, C_in, H, W) -> (N, K, H, W)`` or ``(B, Q, C_in) -> (B, Q, K)`` logits, with
        :class:`PrototypeDetails`."""
        return self.classify(self.embed(features))

    # ----------------------------------------------------------------- training

    def losses(self, outputs: ClassifierOutput, labels: Tensor, *, update: bool) -> Dict[str, Tensor]:
        """Weighted ``loss_ppc`` and ``loss_ppd`` and, with ``update``, the prototype update.

        Args:
            outputs: this step's :meth:`forward` output.
            labels: ``(N, H, W)`` or ``(B, Q)`` labels in ``[0, K)``, or
                ``ignore_value``.
            update: move the prototypes (after warm-up) and count the step.
                Every rank must pass the same value: the update all-reduces.

        Returns:
            ``{"loss_ppc", "loss_ppd"}``, scalars averaged over the labelled
            samples; 0 (attached to the graph) with no labelled sample or
            during warm-up.
        """
        details: PrototypeDetails = outputs.details
        num_classes, num_prototypes = self.num_classes, self.num_prototypes
        if tuple(labels.shape) != tuple(details.class_scores.shape[:-1]):
            raise ValueError(f"labels must have the features' leading shape "
                             f"{tuple(details.class_scores.shape[:-1])}, got {tuple(labels.shape)}")
        similarities = details.similarities.reshape(-1, num_classes, num_prototypes)
        labels = labels.reshape(-1).long()

        if int(self.iteration) < self.warmup_iters:
            # The official model skips prototype learning entirely while
            # iters < warmup_iters: no PPC / PPD, no update.
            if update:
                self.iteration += 1
            zero = similarities.sum() * 0.0
            return {"loss_ppc": zero, "loss_ppd": zero.clone()}

        labelled = torch.nonzero(labels != self.ignore_value).squeeze(1)
        class_of = labels[labelled]
        if bool(((class_of < 0) | (class_of >= num_classes)).any()):
            raise ValueError(f"labels must be in [0, {num_classes}) or equal ignore_value={self.ignore_value}")
        labelled_similarities = similarities[labelled]  # (n, K, M)
        plan = self.online_clustering(labelled_similarities.detach(), class_of)
        targets = class_of * num_prototypes + plan.argmax(dim=1)
        ppc, ppd = self.prototype_losses(labelled_similarities, targets)

        if update:
            logits = outputs.class_logits
            if self.level == "pixel":
                logits = rearrange(logits, "n k h w -> n h w k")
            correct = logits.detach().reshape(-1, num_classes)[labelled].argmax(dim=1) == class_of
            if self.update_assignment == "gumbel":
                slots = class_of * num_prototypes + self.gumbel_assignment(plan)
            else:
                slots = targets
            embeddings = details.embeddings.reshape(-1, self.embed_dim)[labelled]
            self.momentum_update(embeddings.detach(), slots, correct)
            self.iteration += 1
        return {"loss_ppc": self.ppc_weight * ppc, "loss_ppd": self.ppd_weight * ppd}

    @torch.no_grad()
    def online_clustering(self, similarities: Tensor, labels: Tensor) -> Tensor:
        """Algorithm 1 for every class on its own samples: the ``(n, M)`` transport plan.

        Args:
            similarities: ``(n, K, M)`` cosine similarities of labelled samples.
            labels: ``(n,)`` their classes.

        Returns:
            ``(n, M)`` plan over each sample's own-class prototypes (rows sum
            to 1); its row argmax is the sample's prototype.
        """
        index = labels.reshape(-1, 1, 1).expand(-1, 1, self.num_prototypes)
        own_class = torch.gather(similarities, 1, index).squeeze(1)  # (n, M)
        return segmented_sinkhorn_transport_plan(
            own_class, labels, self.sinkhorn_iterations, self.sinkhorn_epsilon, scale_by_max_abs=False
        )

    @staticmethod
    def gumbel_assignment(plan: Tensor) -> Tensor:
        """The official update's prototype: a hard gumbel-softmax sample of the plan used as logits, ``(n,)``.

        Draws from the global torch RNG (reseeded per step and rank by the
        trainer's IterationSeedHook). The ranks draw differently; their sums
        are all-reduced, so the prototypes still end identical.
        """
        if plan.shape[0] == 0:
            return plan.new_zeros((0,), dtype=torch.long)
        return F.gumbel_softmax(plan, tau=_GUMBEL_TAU, hard=True).argmax(dim=1)

    def prototype_losses(self, similarities: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        """Unweighted PPC and PPD of ``(n, K, M)`` similarities against ``(n,)`` flat targets ``c*M + m``."""
        scores = rearrange(similarities, "n k m -> n (k m)")
        # Sums divided by the count, so that no labelled sample gives 0
        # (attached to the graph) rather than 0/0.
        count = max(int(targets.numel()), 1)
        ppc = F.cross_entropy(scores, targets, reduction="sum") / count
        assigned = torch.gather(scores, 1, targets[:, None]).squeeze(1)
        ppd = (1.0 - assigned).pow(2).sum() / count
        return ppc, ppd

    @torch.no_grad()
    def momentum_update(self, embeddings: Tensor, slots: Tensor, correct: Tensor) -> None:
        """Move every prototype that got a correctly classified sample (on any rank).

        Args:
            embeddings: ``(n, D)`` unit embeddings of this rank's labelled samples.
            slots: ``(n,)`` flat prototype ``c*M + m`` of each.
            correct: ``(n,)`` bool, the model's prediction equals the label.

        ``p <- normalise(gamma p + (1 - gamma) normalise(s))`` with ``s`` the
        sum over all ranks of the correct embeddings assigned to ``p``.
        """
        num_slots = self.num_classes * self.num_prototypes
        dim = self.embed_dim
        weight = correct.to(torch.float32)
        # Misclassified rows are zeroed (the official gate), then summed per
        # prototype by an order-deterministic segment sum over the rows
        # sorted by prototype (index_add_ uses atomics on GPUs).
        gated = embeddings.float() * weight[:, None]
        order = torch.sort(slots, stable=True).indices
        per_slot = torch.bincount(slots, minlength=num_slots)
        packed = torch.cat([gated, weight[:, None]], dim=1)[order]
        totals = torch.segment_reduce(packed, "sum", lengths=per_slot, axis=0)  # (K*M, D + 1)
        if world_size() > 1:
            dist.all_reduce(totals)
        sums, counts = totals[:, :dim], totals[:, dim]

        previous = self.prototypes.reshape(num_slots, dim)
        current = F.normalize(previous.float(), dim=-1)
        moved = F.normalize(self.gamma * current + (1.0 - self.gamma) * F.normalize(sums, dim=-1), dim=-1)
        updated = torch.where((counts > 0)[:, None], moved.to(previous.dtype), previous)
        self.prototypes.copy_(updated.reshape_as(self.prototypes))

    # ------------------------------------------------------------------ anomaly

    def anomaly_score(self, outputs: ClassifierOutput, output_size: Optional[Tuple[int, int]] = None) -> Tensor:
        """``-max_{c, m} cos(x, p_cm)``: high = far from every prototype.

        The similarities are taken before ``mask_norm``: the LayerNorm over
        classes would make the score relative to the other classes, while the
        cosine to the nearest prototype says how close the sample is to any
        known class at all. Pixel level: ``(N, H, W)``, the score bilinearly
        resized to ``output_size`` when given. Query level: ``(B, Q)``, over
        the ``C`` real classes' prototypes (not "no object", the last class).
        """
        similarities = outputs.details.similarities.float()
        if self.level == "query":
            return -similarities[..., :-1, :].amax(dim=(-2, -1))
        score = -similarities.amax(dim=(-2, -1))
        if output_size is not None and tuple(score.shape[-2:]) != tuple(output_size):
            score = F.interpolate(score[:, None], size=output_size, mode="bilinear", align_corners=False)[:, 0]
        return score
