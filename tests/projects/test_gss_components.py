"""GSS (projects/GSS) components against closed forms and hand-made masks."""
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gss import (
    ConvInverse, DalleDVAE, GenerativeSemanticSegmentor, LatentPrior, LeastSquaresInverse, Maskige, MaskigeVQVAE,
    NearestColourInverse, SwinInverse, UnlabeledAreaHead, build_palette, fill_unlabelled, load_vqvae_weights,
    maximal_distance_guarantee, maximal_distance_palette, random_palette, save_vqvae, upsample_labels,
)
from gss.reconstruction import ConfusionMatrix, reconstruct_labels
from gss.vqvae import map_pixels, unmap_pixels, vqvae_training_losses
from tests.projects.conftest import GSS_ROOT


def _pairwise_distances(colours: np.ndarray) -> np.ndarray:
    colours = colours.astype(np.float64)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    return distances[np.triu_indices(len(colours), k=1)]


@pytest.mark.parametrize("num_classes", [2, 8, 19, 150])
def test_maximal_distance_palette_is_distinct_far_apart_and_seeded(num_classes):
    palette = maximal_distance_palette(num_classes + 1, seed=0)
    assert palette.shape == (num_classes + 1, 3) and palette.dtype == np.uint8
    guarantee = maximal_distance_guarantee(num_classes + 1)
    assert guarantee > 0
    assert _pairwise_distances(palette).min() >= guarantee
    # No colour is grey: the misaligned starts and the left-out grid points
    # keep every colour off the r = g = b axis.
    assert (palette.max(1).astype(int) - palette.min(1).astype(int)).min() > 0
    np.testing.assert_array_equal(palette, maximal_distance_palette(num_classes + 1, seed=0))
    assert not np.array_equal(palette, maximal_distance_palette(num_classes + 1, seed=1))


def test_maximal_distance_guarantee_for_ade20k_and_mosaic():
    # 151 colours: a 5 x 6 x 6 grid over 15..238 (steps 55.75 / 44.6), jitter 15 -> 14.6.
    assert maximal_distance_guarantee(151) == pytest.approx(223 / 5 - 30)
    # 9 colours: a 2 x 2 x 3 grid -> steps 223 and 111.5, minus 30.
    assert maximal_distance_guarantee(9) == pytest.approx(223 / 2 - 30)


def test_fixed_and_random_palettes_are_validated():
    with pytest.raises(ValueError, match="K \\+ 1 = 3"):
        build_palette("fixed", 2, [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="same colour"):
        build_palette("fixed", 2, [[5, 5, 5], [5, 5, 5], [0, 0, 0]])
    with pytest.raises(ValueError, match="PALETTE_KIND"):
        build_palette("rainbow", 2)
    fixed = build_palette("fixed", 2, [[10, 20, 30], [40, 50, 60], [0, 0, 0]])
    np.testing.assert_array_equal(fixed, [[10, 20, 30], [40, 50, 60], [0, 0, 0]])
    random = random_palette(151, seed=3)
    assert len(np.unique(random, axis=0)) == 151


def test_maskige_paints_classes_and_ignore():
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    labels = torch.tensor([[[0, 1], [255, 1]]])
    maskige = Maskige(palette)(labels)
    assert maskige.shape == (1, 3, 2, 2)
    np.testing.assert_allclose(maskige[0, :, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(maskige[0, :, 0, 1], [0, 1, 0])
    np.testing.assert_allclose(maskige[0, :, 1, 0], [0, 0, 1])  # ignore colour


@pytest.mark.parametrize("kind", ["maximal_distance", "random", "official_ade20k"])
def test_nearest_colour_inverts_every_class_of_a_clean_maskige(kind):
    num_classes = 150
    if kind == "official_ade20k":
        from detectron2.config import get_cfg
        from gmmseg_d2.config import add_gmmseg_config
        from gss import add_gss_config

        cfg = get_cfg()
        add_gmmseg_config(cfg)
        add_gss_config(cfg)
        cfg.merge_from_file(os.path.join(GSS_ROOT, "configs", "ade20k", "gss_ff_swin_large_160k.yaml"))
        palette = build_palette("fixed", num_classes, cfg.MODEL.GSS.MASKIGE.PALETTE)
    else:
        palette = build_palette(kind, num_classes, seed=0)
    labels = torch.arange(num_classes).view(1, 10, 15)
    maskige = Maskige(palette)
    scores = NearestColourInverse(maskige.palette)(maskige(labels))
    assert scores.shape == (1, num_classes, 10, 15)
    torch.testing.assert_close(scores.argmax(1), labels)
    assert torch.equal(scores.sum(1), torch.ones(1, 10, 15))  # one-hot votes


def _least_squares_recovered(palette: np.ndarray) -> np.ndarray:
    """Independently: class k survives iff row k of beta pinv(beta) peaks at k."""
    beta = palette[:-1].astype(np.float64) / 255
    projection = beta @ np.linalg.pinv(beta)
    return projection.argmax(1) == np.arange(len(beta))


@pytest.mark.parametrize("num_classes", [3, 8, 150])
def test_least_squares_inverse_accuracy_on_clean_maskiges(num_classes):
    palette = maximal_distance_palette(num_classes + 1, seed=0)
    maskige = Maskige(palette)
    labels = torch.arange(num_classes).view(1, 1, num_classes)
    scores = LeastSquaresInverse(maskige.palette)(maskige(labels))
    recovered = (scores.argmax(1) == labels)[0, 0].numpy()
    np.testing.assert_array_equal(recovered, _least_squares_recovered(palette))
    # For K <= 3 the palette has full row rank and the pseudo-inverse is exact.
    # Beyond, the rank-3 map loses classes: measured 6 of 8 and 7 of 150
    # (seed 0); BENCHMARKS.md reports these.
    expected = {3: 3, 8: 6, 150: 7}[num_classes]
    assert recovered.sum() == expected


def test_label_upsampling_by_two_replicates_each_pixel():
    # One-hot bilinear x2 then argmax picks the nearest source pixel (weight
    # 9/16 against at most 7/16 for any other class), ignore included.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 7, 9), generator=generator)
    labels[0, 2:4, 3:6] = 255
    upsampled = upsample_labels(labels, 2, num_classes=5, ignore_value=255)
    assert upsampled.shape == (2, 14, 18)
    torch.testing.assert_close(upsampled, labels.repeat_interleave(2, 1).repeat_interleave(2, 2))
    with pytest.raises(ValueError, match="neither classes"):
        upsample_labels(torch.tensor([[[7]]]), 2, num_classes=5, ignore_value=255)


def test_fill_unlabelled_composes_ground_truth_and_guesses():
    labels = torch.tensor([[[0, 255, 2], [255, 255, 1]]])
    guesses = torch.tensor([[[3, 3, 3], [4, 0, 4]]])
    # c~ = M_u c_bar + (1 - M_u) c, M_u = 1 exactly at the 255s.
    expected = torch.tensor([[[0, 3, 2], [4, 0, 1]]])
    assert torch.equal(fill_unlabelled(labels, guesses), expected)


def test_vqvae_shapes_round_trip_and_file(tmp_path):
    torch.manual_seed(0)
    model = MaskigeVQVAE(vocab_size=64, code_dim=8, hidden=16)
    maskige = torch.rand(2, 3, 32, 48)
    tokens = model.encode(maskige)
    assert tokens.shape == (2, 4, 6) and tokens.dtype == torch.long
    assert 0 <= tokens.min() and tokens.max() < 64
    decoded = model.decode(tokens)
    assert decoded.shape == (2, 3, 32, 48) and 0 <= decoded.min() and decoded.max() <= 1
    with pytest.raises(ValueError, match="multiple of the VQ-VAE"):
        model.encode(torch.rand(1, 3, 30, 32))
    # Tokens are the nearest codebook entries of the encoder output.
    codes = model.encoder_output(maskige).permute(0, 2, 3, 1)
    nearest = torch.cdist(codes.reshape(-1, 8), model.codebook.weight).argmin(1).view(2, 4, 6)
    assert torch.equal(tokens, nearest)
    save_vqvae(model, str(tmp_path / "vqvae.pth"), extra={"palette": torch.zeros(3, 3, dtype=torch.uint8)})
    loaded = load_vqvae_weights(str(tmp_path / "vqvae.pth"))
    assert torch.equal(loaded.encode(maskige), tokens)
    with pytest.raises(FileNotFoundError, match="train_vqvae.py"):
        load_vqvae_weights(str(tmp_path / "missing.pth"))


def test_pixel_mapping_matches_dalle():
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(map_pixels(x), 0.8 * x + 0.1)
    torch.testing.assert_close(unmap_pixels(map_pixels(x)), x)
    dall_e = pytest.importorskip("dall_e", reason="the DALL-E package is installed by make setup")
    torch.testing.assert_close(map_pixels(x), dall_e.map_pixels(x))
    torch.testing.assert_close(unmap_pixels(x), dall_e.unmap_pixels(x))


def test_vqvae_training_reduces_reconstruction_error_and_uses_codes():
    torch.manual_seed(0)
    palette = maximal_distance_palette(5, seed=0)
    maskige = Maskige(palette)
    generator = torch.Generator().manual_seed(0)
    # Blocky masks: 4 classes on 8 x 8 cells of a 32 x 32 map.
    cells = torch.randint(0, 4, (16, 4, 4), generator=generator)
    batch = maskige(cells.repeat_interleave(8, 1).repeat_interleave(8, 2))
    model = MaskigeVQVAE(vocab_size=32, code_dim=8, hidden=16)

    def round_trip_error():
        return (model.decode(model.encode(batch)) - batch).abs().mean().item()

    start = round_trip_error()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        losses, _ = vqvae_training_losses(model, batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    # The mean absolute colour error starts at ~0.43 (seed 0) and falls by more than a quarter.
    assert round_trip_error() < 0.75 * start
    assert len(model.encode(batch).unique()) > 1


def test_dalle_dvae_loads_released_format(tmp_path):
    dall_e = pytest.importorskip("dall_e", reason="the DALL-E package is installed by make setup")
    torch.manual_seed(0)
    # The released files are whole pickled modules (torch.save(module)); a
    # small n_hid keeps the test fast, the format is the same.
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl")
    dvae = DalleDVAE.from_folder(str(tmp_path))
    for original, loaded in ((encoder, dvae.encoder), (decoder, dvae.decoder)):
        assert original.state_dict().keys() == loaded.state_dict().keys()
        for key, value in original.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
    maskige = torch.rand(1, 3, 32, 32)
    tokens = dvae.encode(maskige)
    assert tokens.shape == (1, 4, 4)
    assert torch.equal(tokens, encoder(dall_e.map_pixels(maskige)).argmax(1))
    decoded = dvae.decode(tokens)
    one_hot = F.one_hot(tokens, 512).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(decoded, dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3])))
    with pytest.raises(FileNotFoundError, match="encoder.pkl"):
        DalleDVAE.from_folder(str(tmp_path / "nowhere"))


def test_inverse_networks_map_maskiges_to_class_scores():
    palette = torch.rand(6, 3)
    maskige = torch.rand(2, 3, 16, 20)
    for inverse in (ConvInverse(palette, dim=8), SwinInverse(palette, dim=16, depth=2, heads=2, window=4)):
        assert inverse.trainable
        assert inverse(maskige).shape == (2, 5, 16, 20)


class _StubBackbone(torch.nn.Module):
    """Two levels at strides 4 and 8 from a fixed random projection of the image."""

    size_divisibility = 0

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.down = torch.nn.Conv2d(8, 16, 2, stride=2)

    def forward(self, x):
        res2 = self.stem(x)
        return {"res2": res2, "res3": self.down(res2)}


def _tiny_model(train_stage="prior", inverse=None, auxiliary=True, vocab_size=32):
    torch.manual_seed(0)
    palette = maximal_distance_palette(5, seed=0)
    maskige = Maskige(palette)
    return GenerativeSemanticSegmentor(
        backbone=_StubBackbone(), in_features=["res2", "res3"],
        prior=LatentPrior([8, 16], vocab_size, level_dim=8, embed_dim=16, swin_depth=1, swin_heads=2, swin_window=4,
                          hidden_dim=16, dropout=0.0),
        vqvae=MaskigeVQVAE(vocab_size=vocab_size, code_dim=8, hidden=16).eval(), maskige=maskige,
        inverse=inverse if inverse is not None else NearestColourInverse(maskige.palette),
        auxiliary=UnlabeledAreaHead([8, 16], 4, dim=8, grid_level=1) if auxiliary else None,
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0], num_classes=4, train_stage=train_stage,
        size_divisibility=32)


def _batch(generator, size=32, with_ignore=True):
    records = []
    for _ in range(2):
        cells = torch.randint(0, 4, (size // 8, size // 8), generator=generator)
        label = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)
        if with_ignore:
            label[:4, :4] = 255  # one whole token patch (4 x 4 label pixels at upsampling 2)
            label[8:10, 8:12] = 255  # half of another
        records.append({"image": torch.rand(3, size, size, generator=generator) * 255, "sem_seg": label})
    return records


def test_token_targets_grid_and_ignored_patches():
    model = _tiny_model().train()
    records = _batch(torch.Generator().manual_seed(0))
    labels = torch.stack([record["sem_seg"] for record in records])
    features = model.features(torch.stack([record["image"] for record in records]))
    tokens, upsampled, aux_logits = model.token_targets(labels, features)
    assert upsampled.shape == (2, 64, 64) and aux_logits.shape == (2, 4, 64, 64)
    assert tokens.shape == (2, 8, 8)  # 1/4 of the 32 x 32 input
    ignored = tokens == model.vqvae.vocab_size
    # Only the fully unlabelled patch is ignored; the half-labelled one is not.
    expected = torch.zeros(2, 8, 8, dtype=torch.bool)
    expected[:, 0, 0] = True
    assert torch.equal(ignored, expected)
    # The tokens are the VQ-VAE's of the composite maskige.
    composite = fill_unlabelled(upsampled, aux_logits.argmax(1))
    reference = model.vqvae.encode(model.maskige(composite))
    assert torch.equal(tokens[~ignored], reference[~ignored])


def test_latent_prior_loss_decreases_on_a_tiny_batch():
    model = _tiny_model().train()
    records = _batch(torch.Generator().manual_seed(1))
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in model.vqvae.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    history = []
    for _ in range(25):
        losses = model(records)
        assert set(losses) == {"loss_prior", "loss_aux"}
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append(losses["loss_prior"].item())
    # Measured: 2.80 -> 1.79 (seed 0).
    assert history[-1] < 0.75 * history[0]


def test_posterior_stage_trains_only_the_inverse_and_inference_outputs():
    palette = torch.as_tensor(maximal_distance_palette(5, seed=0), dtype=torch.float32) / 255
    with pytest.raises(ValueError, match="nothing to learn"):
        _tiny_model(train_stage="posterior")
    model = _tiny_model(train_stage="posterior", inverse=ConvInverse(palette, dim=8)).train()
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"inverse"}
    assert not model.backbone.training and not model.prior.training and model.inverse.training
    losses = model(_batch(torch.Generator().manual_seed(2)))
    assert set(losses) == {"loss_inverse"} and losses["loss_inverse"].requires_grad
    model.eval()
    records = _batch(torch.Generator().manual_seed(3), with_ignore=False)
    records[0]["height"], records[0]["width"] = 48, 40
    outputs = model(records)
    assert outputs[0]["sem_seg"].shape == (4, 48, 40) and outputs[0]["anomaly_score"].shape == (48, 40)
    assert outputs[1]["sem_seg"].shape == (4, 32, 32)
    assert 0 <= outputs[1]["anomaly_score"].min() and outputs[1]["anomaly_score"].max() <= 1


def test_reconstruction_through_an_identity_like_autoencoder_is_exact():
    class BlockCodes(MaskigeVQVAE):
        """Tokens = class of each 8 x 8 block (a perfect code for block-constant masks)."""

        def __init__(self, maskige):
            super().__init__(vocab_size=4, code_dim=3, hidden=4)
            self.palette = maskige.palette[:-1]

        def code_logits(self, x):
            pooled = F.avg_pool2d(x, 8)
            return -torch.cdist(pooled.permute(0, 2, 3, 1), self.palette[None]).permute(0, 3, 1, 2)

        def decoder_output(self, tokens):
            colours = self.palette[tokens].permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
            return torch.logit(map_pixels(colours))

    maskige = Maskige(maximal_distance_palette(5, seed=0))
    cells = torch.randint(0, 4, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    labels = cells.repeat_interleave(4, 1).repeat_interleave(4, 2)
    reconstructed = reconstruct_labels(labels, BlockCodes(maskige), maskige, NearestColourInverse(maskige.palette))
    assert torch.equal(reconstructed, labels)
    confusion = ConfusionMatrix(4).update_all([(reconstructed, labels)])
    assert confusion.metrics()["mIoU"] == pytest.approx(100.0)
    confusion = ConfusionMatrix(2).update_all([(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 255]))])
    # IoU class 0: 1 / 2, class 1: 1 / 2 -> 50; pixel accuracy 2 / 3.
    assert confusion.metrics() == pytest.approx({"mIoU": 50.0, "pACC": 200 / 3})

