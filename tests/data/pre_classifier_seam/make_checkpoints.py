"""Writes the checkpoints of tests/test_classifier_checkpoints.py.

They were written by the code of commit ccf0766, the last one before the
classifier seam (``MODEL.CLASSIFIER.NAME``) replaced
``MODEL.SEM_SEG_HEAD.CLASSIFIER`` / ``MODEL.MASK_FORMER.CLASSIFIER`` and the
``MODEL.MASK_FORMER.GMM_*`` keys; run it on that commit to write them again::

    git worktree add /tmp/pre_seam ccf0766
    cd /tmp/pre_seam && .venv/bin/python tests/data/pre_classifier_seam/make_checkpoints.py OUT_DIR

Each file holds the ``sem_seg_head.*`` entries of a small model trained for
two steps (so the GMM's means, stds and ring memory are no longer their
initial values), the backbone features of two images and the head's
inference outputs on them.
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO)

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

from gmmseg_d2.config import add_gmmseg_config  # noqa: E402

TINY_GMM = ["MODEL.GMM.EMBED_DIM", "8", "MODEL.GMM.NUM_COMPONENTS", "2", "MODEL.GMM.MEMORY_KIND", "ring",
            "MODEL.GMM.UPDATE_INTERVAL", "1", "MODEL.GMM.MEAN_MOMENTUM", "0.5"]
MODELS = {
    "fcn_gmm": ("configs/mosaic/fcn_R18_gmm.yaml",
                ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SEM_SEG_HEAD.NUM_CONVS", "1",
                 "MODEL.GMM.MEMORY_SIZE", "8", *TINY_GMM]),
    "deeplabv3plus_gmm": ("configs/mosaic/deeplabv3plus_R18_gmm.yaml",
                          ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "16", "MODEL.SEM_SEG_HEAD.ASPP_CHANNELS", "16",
                           "MODEL.SEM_SEG_HEAD.PROJECT_CHANNELS", "[8]", "MODEL.GMM.MEMORY_SIZE", "8", *TINY_GMM]),
    "maskformer2_gmm": ("configs/mosaic/maskformer2_R18_gmm.yaml",
                        ["MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", "MODEL.SEM_SEG_HEAD.MASK_DIM", "32",
                         "MODEL.MASK_FORMER.HIDDEN_DIM", "32", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "64",
                         "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "8", "MODEL.MASK_FORMER.DEC_LAYERS", "3",
                         "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "64", "MODEL.MASK_FORMER.GMM_MEMORY_SIZE", "8",
                         *TINY_GMM]),
}


def batch(mask_former: bool, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    records = []
    for index in range(2):
        image = torch.randint(0, 255, (3, size, size), dtype=torch.uint8, generator=generator)
        labels = torch.zeros(size, size, dtype=torch.int64)
        labels[size // 2:] = 1 + index
        labels[:, : size // 4] = 3
        record = {"image": image, "height": size, "width": size}
        if mask_former:
            classes = labels.unique()
            instances = Instances((size, size))
            instances.gt_classes = classes
            instances.gt_masks = torch.stack([labels == c for c in classes])
            record["instances"] = instances
        else:
            record["sem_seg"] = labels
        records.append(record)
    return records


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, (config, opts) in MODELS.items():
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        cfg.merge_from_file(os.path.join(REPO, config))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
        torch.manual_seed(0)
        model = build_model(cfg)
        mask_former = cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
        records = batch(mask_former)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        for _ in range(2):
            losses = model(records)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            images = torch.stack([(r["image"].float() - model.pixel_mean) / model.pixel_std for r in records])
            features = model.backbone(images)
            head = model.sem_seg_head(features)
            if mask_former:
                outputs = {"pred_logits": head["pred_logits"], "pred_masks": head["pred_masks"]}
            else:
                outputs = head[0]
        state = {k: v for k, v in model.state_dict().items() if k.startswith("sem_seg_head.")}
        torch.save({"model": state, "features": features, "outputs": outputs, "config": config, "opts": opts},
                   os.path.join(out_dir, f"{name}.pth"))
        print(name, len(state), "keys", sum(v.numel() for v in state.values()), "values")


if __name__ == "__main__":
    main(sys.argv[1])
