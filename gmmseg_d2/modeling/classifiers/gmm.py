"""GMMSeg's Gaussian-mixture classifier behind the seam (``MODEL.CLASSIFIER.NAME: "gmm"``).

:class:`GMMClassifier` is :class:`~gmmseg_d2.modeling.gmm.GaussianMixtureClassifier`
(the algorithm and every difference from the official code are documented
there) with the seam's layouts: ``(N, D, H, W)`` maps at pixel level,
``(B, Q, D)`` queries at query level. Its state-dict keys are the
algorithm's own (``projection.*``, ``embedding_norm.*``, ``class_norm.*``,
``means``, ``stds``, ``iteration``, ``memory.*``), under the head's
``predictor.`` (per-pixel) or the decoder's ``class_embed.`` (Mask2Former).

Losses: ``loss_gmm_component``, the Sinkhorn-balanced component CE of the EM
step, already multiplied by ``MODEL.GMM.CONTRASTIVE_LOSS_WEIGHT``. With
``update=True`` the EM step writes the memory and runs the M-step every
``MODEL.GMM.UPDATE_INTERVAL`` steps. Anomaly score: ``-max_c log p(x|c)``
(per query: over the ``C`` real classes, not "no object").

**Query level** (GMMSeg in Mask2Former). ``C + 1`` mixtures, the last one "no
object"; one classifier serves every decoder layer, as the official linear
head does. The Mask2Former criterion labels the queries after matching
(:func:`~gmmseg_d2.modeling.criterion.query_class_labels`): matched ones
with their target's class, a random subset of the unmatched ones "no object"
(``MODEL.CLASSIFIER.QUERY.NO_OBJECT_RATIO``), the rest ignored. The values
that differ from the per-pixel model live under ``MODEL.GMM.QUERY``:

* ``MEMORY_SIZE`` (5000 instead of 32000). A class gets at most one matched
  query per image, so at batch 16 a frequent class brings ~3 features per
  component and step; 5000 slots keep about the per-pixel memory's
  1600-iteration window.
* ``MEMORY_SAMPLES`` ``"labelled"``: every labelled query goes through the
  Sinkhorn E-step and into the memory, correct or not. A matched query's
  label is reliable by construction (the matching chose it, mostly on its
  mask), and the correctness gate locks classes out at query level: a class
  whose components still have ``sigma = 1`` scores 50-100 nats below any
  fitted class for every embedding, is never predicted, never "correct",
  never stored. On the mosaic "no object" and one class stayed empty for 20
  steps with ``"correct"`` (class CE at chance, 17.4 -> 19.0); with
  ``"labelled"`` it fell 17.4 -> 8.7 (softmax head: 17.1 -> 11.3).
* ``MEMORY_INIT`` ``"empty"`` with ``BOOTSTRAP_EMPTY_CLASSES`` on: random
  slots would make up most of a query memory (few matched queries per step)
  and bias every M-step for thousands of iterations. The official code has
  no query-level model to follow.
* ``EMBEDDING`` ``"linear"`` (linear -> LayerNorm -> L2, the paper's query
  head): a BatchNorm over ~B x Q queries, mostly "no object", is no
  per-pixel statistic.
* ``MAX_SAMPLES_PER_COMPONENT`` (20, as per pixel).

Initialising from a softmax Mask2Former checkpoint: its linear class head
``class_embed.weight (C + 1, 256)`` / ``.bias`` is dropped with a warning
(names kept in ``skipped_checkpoint_keys``) and the GMM starts fresh: random
projection, identity LayerNorms, random unit means, stds 1, an empty memory.
With all stds 1, ``log p(e|c) = const + max_m e . mu_cm``: the class logits
start as LayerNorm-ed cosine similarities to random prototypes, so the
(loaded) mask costs decide the matching at first; the M-step then sharpens
the components written so far at once (``STD_MOMENTUM 0``), while the means
move only ``1 - MEAN_MOMENTUM`` of the way per M-step, so a short
fine-tuning schedule should lower ``MEAN_MOMENTUM`` (the mosaic configs use
0.9).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..gmm import GaussianMixtureClassifier
from .base import CLASSIFIER_REGISTRY, QUERY_IGNORE_LABEL, ClassifierOutput, SegmentationClassifier, check_level

__all__ = ["GMMClassifier", "QUERY_MEMORY_SAMPLES"]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.GMM.QUERY.MEMORY_SAMPLES``.
QUERY_MEMORY_SAMPLES = ("labelled", "correct")


@CLASSIFIER_REGISTRY.register("gmm")
class GMMClassifier(GaussianMixtureClassifier, SegmentationClassifier):
    """The Gaussian-mixture classifier on ``(N, D, H, W)`` maps or ``(B, Q, D)`` queries.

    Args:
        level: ``"pixel"`` or ``"query"``.
        kwargs: :class:`~gmmseg_d2.modeling.gmm.GaussianMixtureClassifier`'s
            arguments; at query level those of :attr:`QUERY_DEFAULTS` default
            to the query head's values.
    """

    loss_names = ("loss_gmm_component",)
    #: Parameter names of Mask2Former's linear class head, relative to ``class_embed``.
    SOFTMAX_HEAD_KEYS = ("weight", "bias")
    #: Constructor defaults of the query level (see the module docstring).
    QUERY_DEFAULTS = {"embedding": "linear", "memory_init": "empty", "bootstrap_empty_classes": True,
                      "memory_samples": "all", "memory_size": 5000, "ignore_value": QUERY_IGNORE_LABEL}

    def __init__(self, *, level: str = "pixel", **kwargs) -> None:
        check_level(level)
        if level == "query":
            kwargs = {**self.QUERY_DEFAULTS, **kwargs}
        super().__init__(**kwargs)
        self.level = level
        #: Checkpoint keys of a softmax class head dropped by the last load.
        self.skipped_checkpoint_keys: List[str] = []

    @classmethod
    def from_config(cls, cfg, *, in_channels: int, num_classes: int, level: str, ignore_value: int) -> Dict:
        kwargs = GaussianMixtureClassifier.from_config(cfg, in_channels=in_channels, num_classes=num_classes)
        kwargs.update(level=level, ignore_value=ignore_value)
        if level == "query":
            query = cfg.MODEL.GMM.QUERY
            if query.MEMORY_SAMPLES not in QUERY_MEMORY_SAMPLES:
                raise ValueError(f"MODEL.GMM.QUERY.MEMORY_SAMPLES must be one of {QUERY_MEMORY_SAMPLES}, "
                                 f"got {query.MEMORY_SAMPLES!r}")
            kwargs.update(
                memory_size=query.MEMORY_SIZE,
                max_samples_per_component=query.MAX_SAMPLES_PER_COMPONENT,
                memory_init=query.MEMORY_INIT,
                bootstrap_empty_classes=query.BOOTSTRAP_EMPTY_CLASSES,
                embedding=query.EMBEDDING,
                ignore_value=QUERY_IGNORE_LABEL,
            )
            if query.MEMORY_SAMPLES == "labelled":
                kwargs.update(estep_samples="all", memory_samples="all")
            else:
                # "correct": the per-pixel rule, set explicitly, since QUERY_DEFAULTS
                # would otherwise store every labelled query.
                kwargs.update(memory_samples="correct")
        return kwargs

    def extra_repr(self) -> str:
        return f"level={self.level}, " + super().extra_repr()

    def forward(self, features: Tensor) -> ClassifierOutput:
        """``(N, D, H, W)`` or ``(B, Q, D)`` features -> logits in the same layout.

        ``details`` is the algorithm's :class:`~gmmseg_d2.modeling.gmm.GMMClassifierOutput`,
        channels last: ``(N, H, W, ...)`` or ``(B, Q, ...)``.
        """
        if self.level == "pixel":
            details = super().forward(rearrange(features, "n d h w -> n h w d"))
            return ClassifierOutput(rearrange(details.class_logits, "n h w k -> n k h w"), details)
        details = super().forward(features)
        return ClassifierOutput(details.class_logits, details)

    def losses(self, outputs: ClassifierOutput, labels: Tensor, *, update: bool) -> Dict[str, Tensor]:
        return {"loss_gmm_component": self.em_step(outputs.details, labels, update=update)}

    def anomaly_score(self, outputs: ClassifierOutput, output_size: Optional[Tuple[int, int]] = None) -> Tensor:
        """``-max_c log p(x | c)``: ``(N, H, W)`` (bilinearly resized to
        ``output_size``) or ``(B, Q)`` over the real classes."""
        log_likelihood = outputs.details.class_log_likelihood.float()
        if self.level == "query":
            return -log_likelihood[..., :-1].amax(dim=-1)
        score = -log_likelihood.amax(dim=-1)
        if output_size is not None and tuple(score.shape[-2:]) != tuple(output_size):
            # The score is resized, not the densities' arguments, so it stays a
            # smooth map of -log p(x|c) at feature resolution.
            score = F.interpolate(score[:, None], size=output_size, mode="bilinear", align_corners=False)[:, 0]
        return score

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        skipped = []
        if self.level == "query":
            skipped = [prefix + name for name in self.SOFTMAX_HEAD_KEYS if prefix + name in state_dict]
        if skipped:
            shapes = ", ".join(f"{key} {tuple(state_dict[key].shape)}" for key in skipped)
            for key in skipped:
                state_dict.pop(key)
            logger.warning(
                f"Loading a softmax Mask2Former checkpoint into the GMM class head (MODEL.CLASSIFIER.NAME "
                f"'gmm'): skipped its linear class head: {shapes}. The GMM class head '{prefix.rstrip('.')}' "
                f"starts fresh (random projection, means random unit vectors, stds 1, its initial memory); its "
                f"keys are reported as not found in the checkpoint. See gmmseg_d2.modeling.classifiers.gmm."
            )
        self.skipped_checkpoint_keys = skipped
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
