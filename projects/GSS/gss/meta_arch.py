"""``GenerativeSemanticSegmentor``: segmentation as image-conditioned maskige generation (GSS, CVPR 2023)."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from gmmseg_d2.modeling.meta_arch.per_pixel_segmentor import per_pixel_outputs_for_record
from gmmseg_d2.modeling.sliding_window import (
    blend_sliding_windows, sliding_window_args_from_config, validated_sliding_window_settings,
)

from .inverse import MaskigeInverse, build_inverse
from .latent_prior import LatentPrior, UnlabeledAreaHead
from .maskige import Maskige, build_palette, upsample_labels
from .vqvae import MaskigeAutoencoder, build_vqvae

__all__ = ["TRAIN_STAGES", "GenerativeSemanticSegmentor", "fill_unlabelled"]

TRAIN_STAGES = ("prior", "posterior")


@META_ARCH_REGISTRY.register()
class GenerativeSemanticSegmentor(nn.Module):
    """Image → VQ-VAE tokens of its maskige → decoded maskige → classes.

    Training, stage ``"prior"`` (GSS-FF; stage II of the paper): the labels
    ``(N, H, W)`` are upsampled ×``label_upsample`` (one-hot, bilinear,
    argmax); ignored pixels take the unlabeled-area branch's argmax (if
    enabled); the maskige of that map is encoded by the frozen VQ-VAE, and
    the latent prior learns those tokens (cross-entropy; a token is ignored
    where its whole ``8 × 8`` patch is unlabelled). Losses: ``loss_prior``,
    ``loss_aux``.

    Training, stage ``"posterior"`` (GSS-FT / FT-W): everything but the
    learned inverse is frozen; the maskige decoded from the prior's argmax
    tokens goes through the inverse, cross-entropy against the labels.
    Loss: ``loss_inverse``.

    Inference: ``{"sem_seg": (K, height, width), "anomaly_score": (height,
    width)}`` per image. ``sem_seg`` is the inverse's class scores (one-hot
    votes for the nearest-colour inverse), resized to the input;
    ``anomaly_score`` is ``1 -`` the prior's largest code probability at the
    pixel's token (a token-level MSP, not a method of the paper: given so
    that the anomaly evaluator can score GSS beside the other models).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        prior: LatentPrior,
        vqvae: MaskigeAutoencoder,
        maskige: Maskige,
        inverse: MaskigeInverse,
        auxiliary: Optional[UnlabeledAreaHead],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        num_classes: int,
        ignore_value: int = 255,
        train_stage: str = "prior",
        label_upsample: int = 2,
        prior_loss_weight: float = 0.8,
        aux_loss_weight: float = 0.2,
        size_divisibility: int = 32,
        sliding_window: bool = False,
        window_size: Union[int, Sequence[int]] = (768, 768),
        window_stride: Union[int, Sequence[int]] = (512, 512),
        window_blending: str = "uniform",
        gaussian_sigma: float = 0.125,
        windows_per_batch: int = 8,
    ):
        """
        Args:
            backbone: any Detectron2 backbone; ``in_features`` its outputs the
                prior and the auxiliary read, finest (stride 4) first.
            prior: features → code logits on the finest level's grid.
            vqvae: the frozen maskige autoencoder (downsampling 8).
            maskige: the palette map X (``num_classes + 1`` colours).
            inverse: X⁻¹; must be ``trainable`` for ``train_stage "posterior"``.
            auxiliary: the unlabeled-area branch, or None.
            train_stage: "prior" or "posterior" (see the class docstring).
            label_upsample: labels are upsampled by this factor before
                encoding, so that ``8 / label_upsample`` is the prior's stride.
            size_divisibility: inputs are padded to a multiple of this
                (at least the backbone's own).
            sliding_window, window_*, gaussian_sigma, windows_per_batch: the
                core's ``TEST.SLIDING_WINDOW`` settings.
        """
        super().__init__()
        if train_stage not in TRAIN_STAGES:
            raise ValueError(f"Unknown MODEL.GSS.TRAIN_STAGE {train_stage!r}; choose one of {TRAIN_STAGES}")
        if train_stage == "posterior" and not inverse.trainable:
            raise ValueError(f"MODEL.GSS.TRAIN_STAGE 'posterior' trains the inverse X^-1, but "
                             f"{type(inverse).__name__} has nothing to learn; set MODEL.GSS.INVERSE.NAME "
                             "'conv' (GSS-FT) or 'swin' (GSS-FT-W)")
        if maskige.num_classes != num_classes:
            raise ValueError(f"the palette has {maskige.num_classes} class colours, the model {num_classes} classes")
        if vqvae.downsample % label_upsample:
            raise ValueError(f"MODEL.GSS.LABEL_UPSAMPLE {label_upsample} must divide the VQ-VAE's "
                             f"downsampling {vqvae.downsample}")
        self.backbone = backbone
        self.in_features = list(in_features)
        self.prior = prior
        self.vqvae = vqvae
        self.maskige = maskige
        self.inverse = inverse
        self.auxiliary = auxiliary
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.train_stage = train_stage
        self.label_upsample = label_upsample
        self.prior_loss_weight = prior_loss_weight
        self.aux_loss_weight = aux_loss_weight
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.token_stride = vqvae.downsample // label_upsample
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.sliding_window = sliding_window
        if sliding_window:
            self.window_size, self.window_stride = validated_sliding_window_settings(
                window_size, window_stride, window_blending, gaussian_sigma, windows_per_batch)
        self.window_blending, self.gaussian_sigma, self.windows_per_batch = (
            window_blending, gaussian_sigma, windows_per_batch)
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        gss = cfg.MODEL.GSS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [name for name in gss.IN_FEATURES if name not in shapes]
        if missing:
            raise ValueError(f"MODEL.GSS.IN_FEATURES {missing} are not outputs of the backbone "
                             f"({sorted(shapes)}); set the backbone's OUT_FEATURES to include them")
        in_channels = [shapes[name].channels for name in gss.IN_FEATURES]
        palette = build_palette(gss.MASKIGE.PALETTE_KIND, gss.NUM_CLASSES, gss.MASKIGE.PALETTE,
                                seed=gss.MASKIGE.SEED, low=gss.MASKIGE.LOW, high=gss.MASKIGE.HIGH,
                                jitter=gss.MASKIGE.JITTER)
        maskige = Maskige(palette)
        if gss.VQVAE.NAME == "maskige" and not gss.VQVAE.WEIGHTS and not cfg.MODEL.WEIGHTS:
            raise ValueError("MODEL.GSS.VQVAE.WEIGHTS is empty and MODEL.WEIGHTS gives no checkpoint to take the "
                             "VQ-VAE from: train one first (python projects/GSS/tools/train_vqvae.py "
                             "--config-file CFG --output vqvae.pth) and set MODEL.GSS.VQVAE.WEIGHTS vqvae.pth")
        vqvae = build_vqvae(cfg)
        trained_palette = getattr(vqvae, "trained_palette", None)
        if trained_palette is not None and not torch.equal(torch.as_tensor(trained_palette),
                                                           torch.as_tensor(palette).to(trained_palette.dtype)):
            raise ValueError(f"the VQ-VAE {gss.VQVAE.WEIGHTS} was trained on another palette than MODEL.GSS.MASKIGE "
                             "gives; use the MASKIGE settings it was trained with, or train it again")
        prior = LatentPrior(
            in_channels, vqvae.vocab_size, level_dim=gss.PRIOR.LEVEL_DIM, embed_dim=gss.PRIOR.EMBED_DIM,
            swin_depth=gss.PRIOR.SWIN_DEPTH, swin_heads=gss.PRIOR.SWIN_HEADS, swin_window=gss.PRIOR.SWIN_WINDOW,
            swin_mlp_ratio=gss.PRIOR.SWIN_MLP_RATIO, hidden_dim=gss.PRIOR.HIDDEN_DIM, dropout=gss.PRIOR.DROPOUT,
            norm=gss.PRIOR.NORM)
        auxiliary = (UnlabeledAreaHead(in_channels, gss.NUM_CLASSES, dim=gss.AUX.DIM, grid_level=gss.AUX.GRID_LEVEL,
                                       norm=gss.PRIOR.NORM)
                     if gss.AUX.ENABLED else None)
        return {
            "backbone": backbone,
            "in_features": gss.IN_FEATURES,
            "prior": prior,
            "vqvae": vqvae,
            "maskige": maskige,
            "inverse": build_inverse(cfg, maskige.palette),
            "auxiliary": auxiliary,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "num_classes": gss.NUM_CLASSES,
            "ignore_value": gss.IGNORE_VALUE,
            "train_stage": gss.TRAIN_STAGE,
            "label_upsample": gss.LABEL_UPSAMPLE,
            "prior_loss_weight": gss.PRIOR_LOSS_WEIGHT,
            "aux_loss_weight": gss.AUX.LOSS_WEIGHT,
            **sliding_window_args_from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _frozen_modules(self) -> List[nn.Module]:
        """Modules without gradient and kept in eval mode during training."""
        frozen = [self.vqvae]
        if self.train_stage == "posterior":
            frozen += [self.backbone, self.prior] + ([self.auxiliary] if self.auxiliary is not None else [])
        elif not self.inverse.trainable:
            frozen.append(self.inverse)
        return frozen

    def train(self, mode: bool = True) -> "GenerativeSemanticSegmentor":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # ----------------------------------------------------------------- pieces
    def features(self, images: torch.Tensor) -> List[torch.Tensor]:
        outputs = self.backbone(images)
        return [outputs[name] for name in self.in_features]

    def code_logits(self, features: List[torch.Tensor], image_size: Tuple[int, int]) -> torch.Tensor:
        """The prior's ``(N, vocab, H/s, W/s)`` logits, ``s`` the token stride; checks the grids agree."""
        logits = self.prior(features)
        expected = (image_size[0] // self.token_stride, image_size[1] // self.token_stride)
        if tuple(logits.shape[-2:]) != expected:
            raise ValueError(f"the prior's grid {tuple(logits.shape[-2:])} (size of MODEL.GSS.IN_FEATURES[0] "
                             f"'{self.in_features[0]}') is not the token grid {expected} of a {image_size} input "
                             f"(stride 8 / MODEL.GSS.LABEL_UPSAMPLE = {self.token_stride}); the first feature "
                             "must have that stride")
        return logits

    def token_targets(self, labels: torch.Tensor, features: List[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Stage-II targets from labels ``(N, H, W)``.

        Returns ``(tokens (N, h, w), upsampled labels (N, uH, uW), auxiliary
        logits (N, K, uH, uW) or None)``; ``tokens`` hold ``vocab_size``
        (ignored) where the whole patch of a token is unlabelled.
        """
        upsampled = upsample_labels(labels, self.label_upsample, self.num_classes, self.ignore_value)
        labelled = upsampled != self.ignore_value
        aux_logits = None
        composite = upsampled
        if self.auxiliary is not None:
            aux_logits = F.interpolate(self.auxiliary(features), size=upsampled.shape[-2:], mode="bilinear",
                                       align_corners=False)
            composite = fill_unlabelled(upsampled, aux_logits.detach().argmax(1), self.ignore_value)
        with torch.no_grad():
            tokens = self.vqvae.encode(self.maskige(composite))
            patch = self.vqvae.downsample
            has_label = F.max_pool2d(labelled[:, None].float(), kernel_size=patch, stride=patch)[:, 0] > 0
            tokens = torch.where(has_label, tokens, torch.full_like(tokens, self.vqvae.vocab_size))
        return tokens, upsampled, aux_logits

    def decode(self, code_logits: torch.Tensor) -> torch.Tensor:
        """Argmax tokens → the decoded maskige ``(N, 3, 8h, 8w)`` in [0, 1]."""
        return self.vqvae.decode(code_logits.argmax(1))

    # ---------------------------------------------------------------- forward
    def _normalised(self, batched_inputs: List[Dict]) -> List[torch.Tensor]:
        return [(record["image"].to(self.device) - self.pixel_mean) / self.pixel_std for record in batched_inputs]

    def forward(self, batched_inputs: List[Dict]):
        images = self._normalised(batched_inputs)
        if not self.training:
            return self.inference(batched_inputs, images)
        if "sem_seg" not in batched_inputs[0]:
            raise ValueError("Training inputs need a 'sem_seg' target; use a dataset with sem_seg_file_name "
                             "and a semantic dataset mapper (INPUT.DATASET_MAPPER_NAME 'per_pixel_semantic')")
        images = ImageList.from_tensors(images, self.size_divisibility)
        labels = ImageList.from_tensors([record["sem_seg"].to(self.device) for record in batched_inputs],
                                        self.size_divisibility, self.ignore_value).tensor
        image_size = tuple(images.tensor.shape[-2:])
        if self.train_stage == "posterior":
            with torch.no_grad():
                maskige = self.decode(self.code_logits(self.features(images.tensor), image_size))
            scores = F.interpolate(self.inverse(maskige), size=labels.shape[-2:], mode="bilinear",
                                   align_corners=False)
            return {"loss_inverse": F.cross_entropy(scores, labels.long(), ignore_index=self.ignore_value)}

        features = self.features(images.tensor)
        code_logits = self.code_logits(features, image_size)
        tokens, upsampled, aux_logits = self.token_targets(labels, features)
        losses = {"loss_prior": self.prior_loss_weight * _cross_entropy_or_zero(
            code_logits, tokens, ignore_index=self.vqvae.vocab_size)}
        if aux_logits is not None:
            losses["loss_aux"] = self.aux_loss_weight * _cross_entropy_or_zero(
                aux_logits, upsampled.long(), ignore_index=self.ignore_value)
        return losses

    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Padded normalised images ``(N, 3, H, W)`` → ``(scores (N, K, H, W), anomaly (N, H, W))``."""
        image_size = tuple(images.shape[-2:])
        code_logits = self.code_logits(self.features(images), image_size)
        scores = F.interpolate(self.inverse(self.decode(code_logits)), size=image_size, mode="bilinear",
                               align_corners=False)
        code_confidence = code_logits.softmax(1).amax(1, keepdim=True)
        anomaly = 1 - F.interpolate(code_confidence, size=image_size, mode="bilinear", align_corners=False)[:, 0]
        return scores, anomaly

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict], images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        results = []
        if self.sliding_window:
            for record, image in zip(batched_inputs, images):
                def predict_windows(crops: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
                    height, width = crops[0].shape[-2:]
                    padded = ImageList.from_tensors(crops, self.size_divisibility).tensor
                    scores, anomaly = self.predict(padded)
                    return [(scores[i, :, :height, :width], anomaly[i, :height, :width]) for i in range(len(crops))]

                blended = blend_sliding_windows(image, predict_windows, self.window_size, self.window_stride,
                                                self.window_blending, self.gaussian_sigma, self.windows_per_batch)
                results.append(per_pixel_outputs_for_record(record, blended["sem_seg"], blended["anomaly_score"],
                                                            tuple(image.shape[-2:])))
            return results
        batch = ImageList.from_tensors(images, self.size_divisibility)
        scores, anomaly = self.predict(batch.tensor)
        return [per_pixel_outputs_for_record(record, scores[index], anomaly[index], image_size)
                for index, (record, image_size) in enumerate(zip(batched_inputs, batch.image_sizes))]


def fill_unlabelled(labels: torch.Tensor, guesses: torch.Tensor, ignore_value: int = 255) -> torch.Tensor:
    """``c~ = M_u·c_bar + (1 - M_u)·c``: labels ``(N, H, W)``, ignored pixels (``M_u = 1``) from ``guesses``."""
    return torch.where(labels == ignore_value, guesses.to(labels.dtype), labels)


def _cross_entropy_or_zero(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over non-ignored targets; 0 (with gradient) when every target is ignored."""
    if not (targets != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)
