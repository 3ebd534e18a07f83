"""The classifier seam: one protocol for every classifier, per pixel and per query.

A segmenter (FCN, DeepLabV3+, Mask2Former) ends in a classifier that turns
features into class logits. Everything else about the classifier (its
auxiliary losses, its non-gradient state such as a GMM's memory, its anomaly
score) stays behind the three methods of :class:`SegmentationClassifier`, so
that the segmenters build theirs by name (``MODEL.CLASSIFIER.NAME``) from
:data:`CLASSIFIER_REGISTRY` and know nothing else about it:

* ``forward(features) -> ClassifierOutput``: ``features`` are a per-pixel
  map ``(N, D, H, W)`` (``level="pixel"``) or query embeddings ``(B, Q, D)``
  (``level="query"``); ``output.class_logits`` has the same layout,
  ``(N, K, H, W)`` or ``(B, Q, K)``, and ``output.details`` whatever the
  classifier needs later (its own dataclass, or None).
* ``losses(output, labels, update=...) -> {name: loss}``: its own
  auxiliary losses, already weighted (the names are :attr:`loss_names`), on
  labels at the features' resolution (``(N, H, W)`` or ``(B, Q)``); with
  ``update=True`` it also takes its non-gradient step (memory and EM,
  prototype momentum), identical on every rank. A classifier with state
  all-gathers or all-reduces inside, so every rank must make the same calls.
* ``anomaly_score(output, output_size=None)``: higher = more anomalous, ``(N,
  H, W)`` (resized to ``output_size`` if given) or ``(B, Q)``. For queries
  it scores the real classes only, not "no object".

The cross-entropy on the class logits is the segmenter's (the per-pixel
head's ``loss_sem_seg``, Mask2Former's ``loss_ce``), the same for every
classifier.

A classifier registers itself with ``@CLASSIFIER_REGISTRY.register()`` and
provides ``from_config(cfg, *, in_channels, num_classes, level, ignore_value)``
returning its constructor's arguments (Detectron2's ``@configurable`` pattern);
:func:`build_classifier` calls it. Classifiers outside this package (e.g.
``projects/ProtoSeg``) register on import.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import Tensor, nn

from ..embedding import layer_norm_l2  # noqa: F401  (re-exported: the classifiers' shared embedding step)

__all__ = [
    "CLASSIFIER_LEVELS", "CLASSIFIER_REGISTRY", "QUERY_IGNORE_LABEL", "ClassifierOutput",
    "SegmentationClassifier", "build_classifier", "check_level", "concatenate_outputs", "layer_norm_l2",
]

class _NamedRegistry(Registry):
    """fvcore's Registry whose ``register`` also takes the name to register under.

    ``@CLASSIFIER_REGISTRY.register("gmm")``: config values are short names
    (``MODEL.CLASSIFIER.NAME: "gmm"``), not class names.
    """

    def register(self, obj: Any = None) -> Any:
        if isinstance(obj, str):
            name = obj

            def deco(cls: Any) -> Any:
                self._do_register(name, cls)
                return cls

            return deco
        return super().register(obj)


CLASSIFIER_REGISTRY = _NamedRegistry("CLASSIFIER")
CLASSIFIER_REGISTRY.__doc__ = """
Registry for the classifiers of segmentation heads (``MODEL.CLASSIFIER.NAME``).

The registered object is a :class:`SegmentationClassifier` subclass with a
``from_config(cfg, *, in_channels, num_classes, level, ignore_value)``
classmethod.
"""

#: ``"pixel"``: features ``(N, D, H, W)``; ``"query"``: ``(B, Q, D)`` with the
#: last of the ``K`` classes being Mask2Former's "no object".
CLASSIFIER_LEVELS = ("pixel", "query")

#: Label of a query that takes no part in a classifier's own losses and
#: state update (Mask2Former's criterion labels queries; see
#: :func:`gmmseg_d2.modeling.criterion.query_class_labels`). Query labels run
#: over ``[0, C]`` (``C`` = "no object"), so the dataset's ignore value could
#: be a real label; -1 never is.
QUERY_IGNORE_LABEL = -1

# Where a classifier that a project registers comes from, for the error
# message of an unknown name (the core never imports a project).
_PROJECT_CLASSIFIERS = {"prototype": "projects/ProtoSeg/train_net.py (or `import protoseg`)"}


@dataclass
class ClassifierOutput:
    """What a :class:`SegmentationClassifier` returns.

    Attributes:
        class_logits: ``(N, K, H, W)`` (pixel level) or ``(B, Q, K)`` (query
            level); what the segmenter's cross-entropy and softmax read.
        details: classifier-specific outputs for its losses and anomaly score
            (a dataclass whose tensors share the features' leading dimension,
            or None).
    """

    class_logits: Tensor
    details: Any = None


def check_level(level: str) -> None:
    if level not in CLASSIFIER_LEVELS:
        raise ValueError(f"classifier level must be one of {CLASSIFIER_LEVELS}, got {level!r}")


class SegmentationClassifier(nn.Module):
    """Base class of the classifiers behind the seam (see the module docstring).

    Subclasses set :attr:`level` in their constructor and implement
    :meth:`forward` and :meth:`anomaly_score`; those with their own losses
    set :attr:`loss_names` and override :meth:`losses`.
    """

    #: Names of the (already weighted) losses :meth:`losses` returns.
    loss_names: Tuple[str, ...] = ()
    #: ``"pixel"`` or ``"query"``.
    level: str = "pixel"

    def forward(self, features: Tensor) -> ClassifierOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(features)")

    def losses(self, outputs: ClassifierOutput, labels: Tensor, *, update: bool) -> Dict[str, Tensor]:
        """The classifier's own losses (none by default) and, when ``update``, its state update.

        Args:
            outputs: this step's :meth:`forward` output.
            labels: ``(N, H, W)`` labels at the features' resolution (pixel
                level; the head's ignore value for none) or ``(B, Q)`` query
                labels in ``[0, C]`` (:data:`QUERY_IGNORE_LABEL` for none).
            update: take the non-gradient step (False for the auxiliary
                predictions of a multi-layer decoder).
        """
        del outputs, labels, update
        return {}

    def anomaly_score(self, outputs: ClassifierOutput,
                      output_size: Optional[Tuple[int, int]] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} must implement anomaly_score(outputs)")


def build_classifier(cfg, *, in_channels: int, num_classes: int, level: str,
                     ignore_value: int, name: Optional[str] = None) -> SegmentationClassifier:
    """The classifier ``MODEL.CLASSIFIER.NAME`` (or ``name``) from ``in_channels`` to ``num_classes``.

    Args:
        level: ``"pixel"`` or ``"query"`` (``num_classes`` then counts "no object").
        ignore_value: label a pixel-level classifier skips (the head's
            ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``); query-level classifiers get
            :data:`QUERY_IGNORE_LABEL`.
    """
    check_level(level)
    name = cfg.MODEL.CLASSIFIER.NAME if name is None else name
    if name not in CLASSIFIER_REGISTRY:
        registered = sorted(key for key, _ in CLASSIFIER_REGISTRY)
        hint = ""
        if name in _PROJECT_CLASSIFIERS:
            hint = f"; '{name}' is registered by {_PROJECT_CLASSIFIERS[name]}: train with that script"
        raise KeyError(f"Unknown MODEL.CLASSIFIER.NAME {name!r}; registered classifiers: {registered}{hint}")
    cls = CLASSIFIER_REGISTRY.get(name)
    return cls(**cls.from_config(cfg, in_channels=in_channels, num_classes=num_classes, level=level,
                                 ignore_value=ignore_value))


def concatenate_outputs(outputs: Sequence[ClassifierOutput]) -> ClassifierOutput:
    """Outputs of several forwards (e.g. decoder layers) as one, along the first dimension.

    ``details`` must be None or a dataclass of tensors, all concatenated along dim 0.
    """
    details = [o.details for o in outputs]
    if all(d is None for d in details):
        merged: Any = None
    else:
        first = details[0]
        if not dataclasses.is_dataclass(first):
            raise TypeError(f"cannot concatenate classifier details of type {type(first).__name__}")
        merged = type(first)(**{
            field.name: torch.cat([getattr(d, field.name) for d in details], dim=0)
            for field in dataclasses.fields(first)
        })
    return ClassifierOutput(torch.cat([o.class_logits for o in outputs], dim=0), merged)

