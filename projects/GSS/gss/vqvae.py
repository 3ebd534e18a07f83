"""Discrete autoencoders of maskiges: the DALL-E dVAE (official) and a small VQ-VAE trained here.

Both have one interface, :class:`MaskigeAutoencoder`:

* ``encode(maskige (N, 3, H, W) in [0, 1]) -> tokens (N, H/8, W/8)``: the
  maskige enters as ``0.8·x + 0.1`` (DALL-E's ``map_pixels``), tokens are the
  argmax of the encoder's code logits;
* ``decode(tokens (N, h, w)) -> maskige (N, 3, 8h, 8w) in [0, 1]``: one-hot
  tokens through the decoder, then ``unmap_pixels(sigmoid(out[:, :3]))``.

The DALL-E weights (``encoder.pkl`` / ``decoder.pkl``, 8192 codes) cannot be
fetched at run time; :class:`MaskigeVQVAE` is a VQ-VAE of the same interface
that ``projects/GSS/tools/train_vqvae.py`` trains on a dataset's maskiges in
minutes (:func:`vqvae_training_losses`).
"""
import os
from typing import Dict, Optional, Tuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

__all__ = [
    "LOGIT_LAPLACE_EPS", "DalleDVAE", "MaskigeAutoencoder", "MaskigeVQVAE", "build_vqvae", "load_vqvae_weights",
    "map_pixels", "save_vqvae", "unmap_pixels", "vqvae_training_losses",
]

# DALL-E's logit-Laplace margin: images live in [eps, 1 - eps] inside the dVAE.
LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [0.1, 0.9], the dVAE's input range (``0.8·x + 0.1``)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class MaskigeAutoencoder(nn.Module):
    """Interface: ``encode`` (maskige → tokens), ``decode`` (tokens → maskige); ``vocab_size``, ``downsample``."""

    vocab_size: int
    downsample: int = 8

    def code_logits(self, maskige: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, vocab_size, H/8, W/8)``."""
        raise NotImplementedError

    def decoder_output(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` tokens → the decoder's raw output ``(N, ≥3, 8h, 8w)`` (first 3: colour logits)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        height, width = maskige.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"maskige size {height}x{width} is not a multiple of the VQ-VAE's downsampling "
                             f"{self.downsample}")
        return self.code_logits(maskige).argmax(1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return unmap_pixels(torch.sigmoid(self.decoder_output(tokens)[:, :3].float()))


class DalleDVAE(MaskigeAutoencoder):
    """The DALL-E dVAE (package ``dall_e``; 8192 codes, downsampling 8), frozen.

    ``encoder`` / ``decoder`` are ``dall_e.Encoder`` / ``dall_e.Decoder``
    modules; :meth:`from_folder` loads the released ``encoder.pkl`` /
    ``decoder.pkl`` (whole pickled modules, as OpenAI distributes them).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.vocab_size = encoder.vocab_size
        if decoder.vocab_size != self.vocab_size:
            raise ValueError(f"encoder has {self.vocab_size} codes, decoder {decoder.vocab_size}")

    @classmethod
    def from_folder(cls, folder: str) -> "DalleDVAE":
        """Load ``folder/encoder.pkl`` and ``folder/decoder.pkl`` (the released files)."""
        import dall_e  # noqa: F401  (the pickles name its classes)

        modules = []
        for name in ("encoder.pkl", "decoder.pkl"):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"DALL-E dVAE file {path} not found. MODEL.GSS.VQVAE.WEIGHTS must be a folder holding the "
                    "released encoder.pkl and decoder.pkl (https://cdn.openai.com/dall-e/encoder.pkl and "
                    "decoder.pkl, downloaded by you), or use MODEL.GSS.VQVAE.NAME 'maskige' with a VQ-VAE "
                    "trained by projects/GSS/tools/train_vqvae.py")
            # The released files are pickled modules, not state dicts: loading
            # them runs pickle, so only point WEIGHTS at files you trust.
            with open(path, "rb") as handle:
                modules.append(torch.load(handle, map_location="cpu", weights_only=False))
        return cls(*modules)

    def code_logits(self, maskige: torch.Tensor) -> torch.Tensor:
        return self.encoder(map_pixels(maskige).float())

    def decoder_output(self, tokens: torch.Tensor) -> torch.Tensor:
        one_hot = F.one_hot(tokens.long(), self.vocab_size).permute(0, 3, 1, 2).float()
        return self.decoder(one_hot)


class _ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class MaskigeVQVAE(MaskigeAutoencoder):
    """A small VQ-VAE (van den Oord et al., 2017) of maskiges, with DALL-E's interface.

    Encoder: three stride-2 4×4 convs (ReLU) widening to ``hidden/4``,
    ``hidden/2``, ``hidden`` channels, two residual blocks at 1/8, a 1×1 conv
    to ``code_dim``; a position's code is its nearest codebook vector (code
    logits: negative squared distances). Decoder: the mirror image, with
    stride-2 transposed convs and a 1×1 conv to 3 colour logits. Maskiges are
    piecewise constant, so narrow full-resolution layers suffice; the width
    sits at 1/8, where it is cheap. No normalisation layers, so the frozen
    model behaves the same in train and eval mode.
    """

    def __init__(self, vocab_size: int = 512, code_dim: int = 32, hidden: int = 64):
        super().__init__()
        if hidden % 4:
            raise ValueError(f"MODEL.GSS.VQVAE.HIDDEN_DIM must be a multiple of 4, got {hidden}")
        self.vocab_size = vocab_size
        widths = [3, hidden // 4, hidden // 2, hidden]
        layers = []
        for in_dim, out_dim in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(in_dim, out_dim, 4, stride=2, padding=1), nn.ReLU()]
        layers += [_ResidualBlock(hidden), _ResidualBlock(hidden), nn.ReLU(), nn.Conv2d(hidden, code_dim, 1)]
        self.encoder = nn.Sequential(*layers)
        self.codebook = nn.Embedding(vocab_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        layers = [nn.Conv2d(code_dim, hidden, 3, padding=1), _ResidualBlock(hidden), _ResidualBlock(hidden)]
        for in_dim, out_dim in zip(widths[:0:-1], widths[-2:0:-1] + [widths[1]]):
            layers += [nn.ReLU(), nn.ConvTranspose2d(in_dim, out_dim, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(widths[1], 3, 1)]
        self.decoder = nn.Sequential(*layers)
        self.hidden = hidden
        # He initialisation: PyTorch's default shrinks the signal at every one
        # of the ~12 ReLU layers, and the decoder's output starts (and stays
        # for hundreds of steps) nearly constant.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def encoder_output(self, maskige: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → continuous codes ``(N, code_dim, H/8, W/8)``."""
        return self.encoder(map_pixels(maskige))

    def _negative_squared_distances(self, codes: torch.Tensor) -> torch.Tensor:
        flat = rearrange(codes, "n d h w -> (n h w) d")
        codebook = self.codebook.weight
        distances = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + (codebook ** 2).sum(1)[None]
        height, width = codes.shape[-2:]
        return rearrange(-distances, "(n h w) v -> n v h w", h=height, w=width)

    def code_logits(self, maskige: torch.Tensor) -> torch.Tensor:
        return self._negative_squared_distances(self.encoder_output(maskige))

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors ``(N, code_dim, h, w)`` → colour logits ``(N, 3, 8h, 8w)``."""
        return self.decoder(codes)

    def decoder_output(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(rearrange(self.codebook(tokens.long()), "n h w d -> n d h w"))


def vqvae_training_losses(model: MaskigeVQVAE, maskige: torch.Tensor, commitment: float = 0.25
                          ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """One VQ-VAE training step's losses on maskiges ``(N, 3, H, W)`` in [0, 1], and the tokens used.

    ``loss_reconstruction``: binary cross-entropy of the decoder's colour
    logits against the mapped maskige (in [0.1, 0.9]; a Bernoulli stand-in for
    DALL-E's logit-Laplace likelihood), straight-through gradient to the encoder;
    ``loss_codebook``: ``|sg(z) - e|²``; ``loss_commitment``: ``β·|z - sg(e)|²``.
    """
    codes = model.encoder_output(maskige)
    tokens = model._negative_squared_distances(codes).argmax(1)
    quantised = rearrange(model.codebook(tokens), "n h w d -> n d h w")
    straight_through = codes + (quantised - codes).detach()
    colour_logits = model.decode_codes(straight_through)
    losses = {
        "loss_reconstruction": F.binary_cross_entropy_with_logits(colour_logits, map_pixels(maskige)),
        "loss_codebook": F.mse_loss(quantised, codes.detach()),
        "loss_commitment": commitment * F.mse_loss(codes, quantised.detach()),
    }
    return losses, tokens


def save_vqvae(model: MaskigeVQVAE, path: str, extra: Optional[Dict] = None) -> None:
    """Write ``{"model": state_dict, "vqvae": hyper-parameters, **extra}`` atomically."""
    from gmmseg_d2.engine.checkpointer import atomic_write_bytes

    payload = {
        "model": model.state_dict(),
        "vqvae": {"vocab_size": model.vocab_size, "code_dim": model.codebook.embedding_dim,
                  "hidden": model.hidden},
        **(extra or {}),
    }
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def load_vqvae_weights(path: str) -> MaskigeVQVAE:
    """A :class:`MaskigeVQVAE` from a file :func:`save_vqvae` wrote."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VQ-VAE weights {path} not found (MODEL.GSS.VQVAE.WEIGHTS). Train them first: "
            "python projects/GSS/tools/train_vqvae.py --config-file CFG --output PATH")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if "vqvae" not in payload or "model" not in payload:
        raise ValueError(f"{path} is not a file of projects/GSS/tools/train_vqvae.py (keys {sorted(payload)})")
    model = MaskigeVQVAE(**payload["vqvae"])
    model.load_state_dict(payload["model"])
    # The palette it was trained on (uint8 (K + 1, 3)), if the file records it:
    # a model must paint its maskiges with the same colours.
    model.trained_palette = payload.get("palette")
    return model


def build_vqvae(cfg) -> MaskigeAutoencoder:
    """``MODEL.GSS.VQVAE`` → the frozen autoencoder (weights loaded, no gradient)."""
    spec = cfg.MODEL.GSS.VQVAE
    if spec.NAME == "dalle":
        model: MaskigeAutoencoder = DalleDVAE.from_folder(spec.WEIGHTS)
    elif spec.NAME == "maskige":
        if spec.WEIGHTS:
            model = load_vqvae_weights(spec.WEIGHTS)
        else:
            # Untrained: only for building a model whose checkpoint (MODEL.WEIGHTS) carries the VQ-VAE.
            model = MaskigeVQVAE(spec.VOCAB_SIZE, spec.CODE_DIM, spec.HIDDEN_DIM)
    else:
        raise ValueError(f"Unknown MODEL.GSS.VQVAE.NAME {spec.NAME!r}; choose 'dalle' or 'maskige'")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()
