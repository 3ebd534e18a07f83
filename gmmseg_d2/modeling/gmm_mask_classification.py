"""GMMSeg's generative mask classifier in Mask2Former (the paper).

With ``MODEL.MASK_FORMER.CLASSIFIER: "gmm"`` the transformer decoder's class
head ``sem_seg_head.predictor.class_embed`` is a
:class:`QueryGaussianMixtureClassifier`: the normalised decoder output
``(B, Q, HIDDEN_DIM)`` goes through the GMM embedding (linear -> LayerNorm ->
L2 to ``MODEL.GMM.EMBED_DIM``, whatever the per-pixel ``MODEL.GMM.EMBEDDING``)
and is scored against ``C + 1`` Gaussian mixtures, the last one "no object".
One classifier serves every decoder layer, as the official linear head does.
Its class logits (LayerNorm of the class log-likelihoods) are the decoder's
``pred_logits``, so the Hungarian matching cost, the ``eos_coef``-weighted
CE, deep supervision and the semantic inference ``sum_q softmax(logits_q)[:C]
sigmoid(mask_q)`` use them unchanged; the classifier's full output rides
along as ``pred_gmm``.

EM at query level (:class:`GMMSetCriterion`, the only place it happens):
after matching, every query of a layer gets an EM label

* its matched target's class ``c`` (one per class present in the image:
  semantic targets are one mask per class);
* ``C`` ("no object") for a random subset of the unmatched queries: per image
  ``ceil(GMM_NO_OBJECT_RATIO x matched)`` of them (at least 1, at most all;
  ``GMM_NO_OBJECT_RATIO < 0``: all), so that "no object" does not outnumber the
  classes in the E-step and the component loss (Q = 100 against ~10 matches);
* "ignore" for the rest.

Then, once per training step, ``em_step(final layer, update=True)`` runs the
Sinkhorn E-step on the labelled queries of all ranks (all-gathered), writes
them to their class's memory (a matched query of class ``c`` to class ``c``'s
components, a sampled unmatched one to the "no object" mixture), runs the
M-step every ``MODEL.GMM.UPDATE_INTERVAL`` steps and
returns the component contrastive loss ``loss_gmm_component`` (already
multiplied by ``MODEL.GMM.CONTRASTIVE_LOSS_WEIGHT``, so its ``weight_dict``
entry is 1). With deep supervision every auxiliary layer also gets
``loss_gmm_component_{i}`` from ``em_step(layer i, update=False)``: the loss
without any state change. Reason: the shared classifier scores every layer's
queries, and the class CE alone pulls a query only towards the best component
of its class; the Sinkhorn-balanced component targets are what spreads a
class's queries over its components, and deep supervision exists precisely so
that the early layers meet the same objective as the last. The cost is small
at query level (each call sees ``B x Q`` samples, not ``B x H x W``).
``GMM_MEMORY_LAYERS: "all"`` instead feeds the queries of every layer to one
``em_step(update=True)`` and reports a single ``loss_gmm_component``.

Which labelled queries are stored (``GMM_MEMORY_SAMPLES``): by default
(``"labelled"``) all of them, whether the GMM classifies them correctly or not,
unlike the per-pixel model, which stores only correctly classified pixels.
A matched query's label is reliable by construction (the matching chose it,
mostly on its mask), and the correctness filter locks classes out at query
level: a component is refitted only once it holds features, its std then
drops from 1 to ~0.1-0.2, and a class whose components are still at std 1
scores some 50-100 nats below any fitted class for *every* embedding (the
``-sum log sigma`` term), so it is never predicted, never "correct", never
stored. With few samples per class and step (one matched query per class and
image) that happened on the mosaic to "no object" (and one class): in the
20-step run of tests/test_gmm_mask_former.py their memories stayed empty and
the CE (weighted, summed over the 4 layers) stayed at chance, 17.4 -> 19.0,
with ``"correct"``; it fell 17.4 -> 8.7 with ``"labelled"`` (softmax head:
17.1 -> 11.3). ``"correct"`` remains available.

Memory start: ``MODEL.MASK_FORMER.GMM_MEMORY_INIT`` (default ``"empty"``,
with ``GMM_BOOTSTRAP_EMPTY_CLASSES`` on), not the per-pixel
``MODEL.GMM.MEMORY_INIT`` (default ``"random"``, the official per-pixel
start). Matched queries are few per step (about one per class and image), so
random slots would make up most of a 5000-slot query memory, and bias every
M-step, for thousands of iterations; the official code has no query-level
model to follow here.

Distributed training: every ``em_step`` all-gathers, so every rank must make
the same calls. The number of calls depends only on the config (1 + the
auxiliary layers, or 1), never on the data: a rank whose images have no
target still calls with all labels "ignore" (its loss is 0, attached to the
graph).

Initialising from an official (softmax) Mask2Former checkpoint
(``MODEL.WEIGHTS model_final_xxx.pkl``): everything loads but the class head.
The checkpoint's ``sem_seg_head.predictor.class_embed.weight`` ``(C + 1, 256)``
and ``.bias`` ``(C + 1,)`` (the linear head) are dropped by
:meth:`QueryGaussianMixtureClassifier._load_from_state_dict`, which logs them
and keeps their names in ``skipped_checkpoint_keys``; Detectron2's
checkpointer then reports the GMM's own keys (``class_embed.projection.*``,
``embedding_norm.*``, ``class_norm.*``, ``means``, ``stds``, ``iteration``,
``memory.*``) as not found in the checkpoint. The GMM starts fresh: a random
projection (std 0.02), identity LayerNorms, means random unit vectors, stds 1,
an empty memory (``GMM_MEMORY_INIT`` "empty"). What the first EM updates then
do:

* with all stds 1, ``log p(e | c) = const + max_m e . mu_cm`` (unit vectors),
  so the class logits are LayerNorm-ed cosine similarities to random
  prototypes: the matching's class cost is noise at first and the (loaded)
  mask costs decide the matching;
* the CE (and the component CE) trains the projection to map each class's
  queries towards that class's random means, while the matched queries fill
  their classes' memories from the first step;
* the M-step (at step 0, then every ``UPDATE_INTERVAL``) replaces the stds of
  the components written so far (``STD_MOMENTUM 0``) by the spread of their
  few features plus the 1e-2 floor (0.10 for a component holding one
  feature, 0.12-0.15 on average after a few M-steps on the mosaic): those
  components sharpen at once, while the means move only ``1 - MEAN_MOMENTUM``
  (0.1 % at 0.999) of the way to the data per M-step. For the first
  thousands of iterations the head is therefore close to a fixed
  random-prototype classifier with learned spreads; a short fine-tuning
  schedule should lower ``MEAN_MOMENTUM`` (the mosaic config uses 0.9).

Resume: the memory, means, stds and step counter are buffers of the decoder's
``class_embed``, so checkpoints carry them and ``--resume`` continues exactly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from detectron2.config import configurable

from .criterion import Indices, SetCriterion
from .gmm import GaussianMixtureClassifier, GMMClassifierOutput

__all__ = [
    "GMM_MEMORY_LAYERS", "MASK_CLASSIFIERS", "QUERY_IGNORE_LABEL", "GMMSetCriterion",
    "QueryGaussianMixtureClassifier", "build_mask_classification_criterion", "build_query_class_head",
    "query_em_labels",
]

logger = logging.getLogger(__name__)

#: Values of ``MODEL.MASK_FORMER.CLASSIFIER``.
MASK_CLASSIFIERS = ("softmax", "gmm")
#: Values of ``MODEL.MASK_FORMER.GMM_MEMORY_LAYERS``.
GMM_MEMORY_LAYERS = ("last", "all")
#: EM label of a query that takes no part in the EM step.
QUERY_IGNORE_LABEL = -1


class QueryGaussianMixtureClassifier(GaussianMixtureClassifier):
    """The GMM classifier as the transformer decoder's class head.

    Same computation as :class:`GaussianMixtureClassifier` (its forward maps
    ``(B, Q, hidden)`` to a :class:`GMMClassifierOutput` with ``(B, Q, C + 1)``
    logits); it adds the loading rule for softmax checkpoints and its own
    defaults for the arguments in :attr:`QUERY_DEFAULTS` (the per-pixel
    defaults follow the official per-pixel head; there is no official
    query-level model).
    """

    #: Parameter names of Mask2Former's linear class head, relative to ``class_embed``.
    SOFTMAX_HEAD_KEYS = ("weight", "bias")
    #: Defaults that differ from the per-pixel classifier's, used when the
    #: classifier is built from explicit arguments. Linear embedding (the paper:
    #: query heads use linear -> LN -> L2; a BatchNorm over ~B x Q queries of
    #: very different kinds, mostly "no object", is no per-pixel statistic);
    #: empty memory with the bootstrap (see MODEL.MASK_FORMER.GMM_MEMORY_INIT).
    QUERY_DEFAULTS = {"embedding": "linear", "memory_init": "empty", "bootstrap_empty_classes": True}

    def __init__(self, *args, **kwargs) -> None:
        if not args:  # explicit arguments; a cfg as first argument goes through from_config
            kwargs = {**self.QUERY_DEFAULTS, **kwargs}
        super().__init__(*args, **kwargs)
        #: Checkpoint keys of a softmax class head dropped by the last load.
        self.skipped_checkpoint_keys: List[str] = []

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        skipped = [prefix + name for name in self.SOFTMAX_HEAD_KEYS if prefix + name in state_dict]
        if skipped:
            shapes = ", ".join(f"{key} {tuple(state_dict[key].shape)}" for key in skipped)
            for key in skipped:
                state_dict.pop(key)
            logger.warning(
                f"Loading a softmax Mask2Former checkpoint into the GMM mask classifier "
                f"(MODEL.MASK_FORMER.CLASSIFIER 'gmm'): skipped its linear class head: {shapes}. "
                f"The GMM class head '{prefix.rstrip('.')}' starts fresh (random projection, means "
                f"random unit vectors, stds 1, its initial memory); its keys are reported as not found in "
                f"the checkpoint. See gmmseg_d2.modeling.gmm_mask_classification for the first EM updates."
            )
        self.skipped_checkpoint_keys = skipped
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def build_query_class_head(cfg, kind: Optional[str] = None) -> nn.Module:
    """The decoder's class head for ``MODEL.MASK_FORMER.CLASSIFIER`` (or ``kind``).

    ``"softmax"``: Mask2Former's ``nn.Linear(HIDDEN_DIM, C + 1)``. ``"gmm"``: a
    :class:`QueryGaussianMixtureClassifier` from ``MODEL.GMM.*`` over ``C + 1``
    mixtures, with ``MODEL.MASK_FORMER.GMM_MEMORY_SIZE`` slots per component,
    ``GMM_MEMORY_INIT`` and ``GMM_BOOTSTRAP_EMPTY_CLASSES`` in place of the
    per-pixel ``MODEL.GMM.MEMORY_INIT`` / ``BOOTSTRAP_EMPTY_CLASSES``, the
    ``"linear"`` embedding whatever ``MODEL.GMM.EMBEDDING`` says, and
    :data:`QUERY_IGNORE_LABEL` as its ignore label.
    """
    kind = cfg.MODEL.MASK_FORMER.CLASSIFIER if kind is None else kind
    hidden_dim = cfg.MODEL.MASK_FORMER.HIDDEN_DIM
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1
    if kind == "softmax":
        return nn.Linear(hidden_dim, num_classes)
    if kind == "gmm":
        kwargs = GaussianMixtureClassifier.from_config(cfg, in_channels=hidden_dim, num_classes=num_classes)
        kwargs["memory_size"] = cfg.MODEL.MASK_FORMER.GMM_MEMORY_SIZE
        kwargs["ignore_value"] = QUERY_IGNORE_LABEL
        kwargs["memory_init"] = cfg.MODEL.MASK_FORMER.GMM_MEMORY_INIT
        kwargs["bootstrap_empty_classes"] = cfg.MODEL.MASK_FORMER.GMM_BOOTSTRAP_EMPTY_CLASSES
        # MODEL.GMM.EMBEDDING is a per-pixel key (its default, the official
        # conv -> BN -> ReLU, is a per-pixel head's); query heads always embed
        # with linear -> LayerNorm -> L2 (the paper), so old checkpoints keep
        # their class_embed.projection.{weight,bias} keys.
        kwargs["embedding"] = "linear"
        samples = cfg.MODEL.MASK_FORMER.GMM_MEMORY_SAMPLES
        if samples == "labelled":
            kwargs.update(estep_samples="all", memory_samples="all")
        elif samples != "correct":
            raise ValueError(f"MODEL.MASK_FORMER.GMM_MEMORY_SAMPLES must be 'labelled' or 'correct', got {samples!r}")
        return QueryGaussianMixtureClassifier(**kwargs)
    raise ValueError(f"Unknown MODEL.MASK_FORMER.CLASSIFIER {kind!r}; choose one of {MASK_CLASSIFIERS}")


def query_em_labels(indices: Indices, targets: Sequence[Dict[str, Tensor]], num_queries: int,
                    num_classes: int, no_object_ratio: float) -> Tensor:
    """EM label of every query of one decoder layer, ``(B, Q)`` int64 on the CPU.

    Matched queries get their target's class, a random subset of the unmatched
    ones ``num_classes`` ("no object"; see the module docstring for the subset
    size), the others :data:`QUERY_IGNORE_LABEL`. The subset is drawn with
    the global CPU generator, so seeding torch makes it reproducible.
    """
    labels = torch.full((len(indices), num_queries), QUERY_IGNORE_LABEL, dtype=torch.int64)
    for b, ((query_idx, target_idx), target) in enumerate(zip(indices, targets)):
        query_idx = query_idx.cpu()
        labels[b, query_idx] = target["labels"].cpu()[target_idx.cpu()]
        unmatched = torch.ones(num_queries, dtype=torch.bool)
        unmatched[query_idx] = False
        candidates = torch.nonzero(unmatched).squeeze(1)
        if no_object_ratio < 0:
            take = candidates.numel()
        else:
            take = min(candidates.numel(), max(1, math.ceil(no_object_ratio * query_idx.numel())))
        if take < candidates.numel():
            candidates = candidates[torch.randperm(candidates.numel())[:take]].sort().values
        labels[b, candidates] = num_classes
    return labels


@dataclass
class _LayerRecord:
    final: bool
    gmm: GMMClassifierOutput
    labels: Tensor


def _concatenate(outputs: Sequence[GMMClassifierOutput]) -> GMMClassifierOutput:
    return GMMClassifierOutput(**{
        name: torch.cat([getattr(o, name) for o in outputs], dim=0)
        for name in ("embeddings", "component_log_likelihood", "class_log_likelihood", "class_logits")
    })


class GMMSetCriterion(SetCriterion):
    """:class:`SetCriterion` plus GMMSeg's EM step on the matched queries.

    Adds the loss group ``"gmm"``; returns, besides the parent's losses,
    ``loss_gmm_component`` and (``GMM_MEMORY_LAYERS "last"`` with deep
    supervision) ``loss_gmm_component_{i}`` for every auxiliary layer. See the
    module docstring for the labels and the call pattern.

    The classifier is the decoder's ``class_embed``; the criterion keeps a
    plain reference to it (not a submodule), so its parameters and buffers
    appear once in the state dict, under ``sem_seg_head.predictor.class_embed``.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        *,
        classifier: GaussianMixtureClassifier,
        memory_layers: str = "last",
        no_object_ratio: float = 1.0,
        aux_component_loss: bool = True,
    ):
        """
        Args:
            classifier: the decoder's GMM class head (``C + 1`` classes).
            memory_layers: ``"last"`` or ``"all"`` (see the module docstring).
            no_object_ratio: unmatched queries labelled "no object" per
                matched query and image (``< 0``: all of them).
            aux_component_loss: with ``"last"``, also compute
                ``loss_gmm_component_{i}`` on every auxiliary output.
            Others: as :class:`SetCriterion`.
        """
        super().__init__(num_classes, matcher, weight_dict, eos_coef, losses, num_points, oversample_ratio,
                         importance_sample_ratio)
        if not isinstance(classifier, GaussianMixtureClassifier):
            raise TypeError(f"GMMSetCriterion needs the decoder's GaussianMixtureClassifier, got {type(classifier)}")
        if classifier.num_classes != num_classes + 1:
            raise ValueError(f"the GMM class head has {classifier.num_classes} mixtures; expected num_classes + 1 "
                             f"= {num_classes + 1} (the last one 'no object')")
        if memory_layers not in GMM_MEMORY_LAYERS:
            raise ValueError(f"MODEL.MASK_FORMER.GMM_MEMORY_LAYERS must be one of {GMM_MEMORY_LAYERS}, "
                             f"got {memory_layers!r}")
        # A plain attribute, not a submodule: the decoder owns the classifier.
        object.__setattr__(self, "_classifier", classifier)
        self.memory_layers = memory_layers
        self.no_object_ratio = no_object_ratio
        self.aux_component_loss = aux_component_loss
        self._records: List[_LayerRecord] = []
        self._final_outputs: Optional[Dict] = None

    @property
    def classifier(self) -> GaussianMixtureClassifier:
        return self._classifier

    @classmethod
    def from_config(cls, cfg, classifier: GaussianMixtureClassifier, matcher: Optional[nn.Module] = None) -> Dict:
        args = super().from_config(cfg, matcher=matcher)
        mask_former = cfg.MODEL.MASK_FORMER
        args["losses"] = list(args["losses"]) + ["gmm"]
        memory_layers = mask_former.GMM_MEMORY_LAYERS
        aux = bool(mask_former.DEEP_SUPERVISION) and memory_layers == "last"
        # em_step's loss already carries MODEL.GMM.CONTRASTIVE_LOSS_WEIGHT.
        args["weight_dict"]["loss_gmm_component"] = 1.0
        if aux:
            for i in range(mask_former.DEC_LAYERS - 1):
                args["weight_dict"][f"loss_gmm_component_{i}"] = 1.0
        args.update(classifier=classifier, memory_layers=memory_layers,
                    no_object_ratio=mask_former.GMM_NO_OBJECT_RATIO, aux_component_loss=aux)
        return args

    def loss_functions(self):
        functions = dict(super().loss_functions())
        functions["gmm"] = self.record_em_labels
        return functions

    def record_em_labels(self, outputs: Dict, targets: Sequence[Dict], indices: Indices,
                         num_masks: float) -> Dict[str, Tensor]:
        """Loss group ``"gmm"``: label this layer's queries from its matching.

        Returns no loss itself; :meth:`forward` runs the EM step on the
        recorded layers once all of them are matched.
        """
        del num_masks
        if "pred_gmm" not in outputs:
            raise KeyError("GMMSetCriterion: the predictions have no 'pred_gmm'; the decoder's class head must be "
                           "the GMM classifier (MODEL.MASK_FORMER.CLASSIFIER 'gmm')")
        gmm = outputs["pred_gmm"]
        labels = query_em_labels(indices, targets, outputs["pred_logits"].shape[1], self.num_classes,
                                 self.no_object_ratio)
        self._records.append(_LayerRecord(outputs is self._final_outputs, gmm,
                                          labels.to(outputs["pred_logits"].device)))
        return {}

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        self._records = []
        # The parent computes the final layer's losses on ``outputs`` itself
        # and the auxiliary ones on the ``aux_outputs`` entries: identity tells them apart.
        self._final_outputs = outputs
        try:
            losses = super().forward(outputs, targets)
            records = self._records
        finally:
            self._records, self._final_outputs = [], None
        if "gmm" in self.losses:
            losses.update(self.em_losses(records))
        return losses

    def em_losses(self, records: Sequence[_LayerRecord]) -> Dict[str, Tensor]:
        """The EM calls of one training step: always the same number, whatever the data."""
        final = [r for r in records if r.final]
        aux = [r for r in records if not r.final]
        if len(final) != 1:
            raise RuntimeError(f"GMMSetCriterion: expected one final prediction, recorded {len(final)}")
        classifier = self.classifier
        if self.memory_layers == "all":
            layers = final + aux
            merged = _concatenate([r.gmm for r in layers])
            labels = torch.cat([r.labels for r in layers], dim=0)
            return {"loss_gmm_component": classifier.em_step(merged, labels, update=True)}
        losses = {"loss_gmm_component": classifier.em_step(final[0].gmm, final[0].labels, update=True)}
        if self.aux_component_loss:
            for i, record in enumerate(aux):
                losses[f"loss_gmm_component_{i}"] = classifier.em_step(record.gmm, record.labels, update=False)
        return losses

    def extra_repr(self) -> str:
        return (super().extra_repr() + f",\nmemory_layers={self.memory_layers}, "
                f"no_object_ratio={self.no_object_ratio}, aux_component_loss={self.aux_component_loss}")


def build_mask_classification_criterion(cfg, sem_seg_head: nn.Module) -> SetCriterion:
    """:class:`SetCriterion` for the softmax head, :class:`GMMSetCriterion` on the
    decoder's ``class_embed`` for the GMM."""
    kind = cfg.MODEL.MASK_FORMER.CLASSIFIER
    if kind == "softmax":
        return SetCriterion(cfg)
    if kind != "gmm":
        raise ValueError(f"Unknown MODEL.MASK_FORMER.CLASSIFIER {kind!r}; choose one of {MASK_CLASSIFIERS}")
    classifier = getattr(getattr(sem_seg_head, "predictor", None), "class_embed", None)
    if not isinstance(classifier, GaussianMixtureClassifier):
        raise ValueError("MODEL.MASK_FORMER.CLASSIFIER 'gmm' needs a transformer decoder whose class_embed is "
                         f"the GMM classifier (MultiScaleMaskedTransformerDecoder); got {type(classifier)}")
    return GMMSetCriterion(cfg, classifier=classifier)
