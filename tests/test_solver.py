"""Optimizer parameter groups, full-model gradient clipping and LR schedules."""
import pytest
import torch
from torch import nn

from gmmseg_d2.solver import build_lr_scheduler, build_optimizer, get_optimizer_param_groups


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(2)
        self.tied = self.head  # a shared module must not be optimised twice


def test_param_groups_lr_and_weight_decay():
    groups = get_optimizer_param_groups(_Toy(), base_lr=1.0, weight_decay=0.1,
                                        weight_decay_norm=0.01, weight_decay_embed=0.001,
                                        backbone_multiplier=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone.0.weight"]["lr"] == 0.5
    assert by_name["backbone.0.weight"]["weight_decay"] == 0.1
    assert by_name["backbone.1.weight"]["weight_decay"] == 0.01
    assert by_name["backbone.1.weight"]["lr"] == 0.5
    assert by_name["embed.weight"]["weight_decay"] == 0.001
    assert by_name["head.weight"]["lr"] == 1.0 and by_name["head.weight"]["weight_decay"] == 0.1
    assert by_name["norm.bias"]["weight_decay"] == 0.01
    assert len(groups) == 2 + 2 + 1 + 2 + 2  # conv, bn, embed, head, norm; tied head once


def _one_sgd_step(demo_cfg, clip_type, clip_value):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    cfg = demo_cfg.clone()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM = "SGD", 1.0, 0.0
    cfg.SOLVER.WEIGHT_DECAY = cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = clip_type is not None
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type or "value"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = clip_value
    optimizer = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(8, 4)) * 100).sum().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    optimizer.step()
    steps = [b - p.detach() for b, p in zip(before, model.parameters())]
    return grads, steps


def test_full_model_gradient_clipping_clips_the_global_norm(demo_cfg):
    grads, steps = _one_sgd_step(demo_cfg, "full_model", 1.0)
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert total > 1.0  # the test is only meaningful if clipping kicks in
    for g, s in zip(grads, steps):
        torch.testing.assert_close(s, g / total, rtol=1e-4, atol=1e-6)


def test_no_clipping_and_value_clipping(demo_cfg):
    grads, steps = _one_sgd_step(demo_cfg, None, 1.0)
    for g, s in zip(grads, steps):
        torch.testing.assert_close(s, g, rtol=1e-5, atol=1e-6)
    grads, steps = _one_sgd_step(demo_cfg, "value", 0.5)
    for g, s in zip(grads, steps):
        torch.testing.assert_close(s, g.clamp(-0.5, 0.5), rtol=1e-5, atol=1e-6)


def test_unknown_optimizer(demo_cfg):
    demo_cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="Unknown SOLVER.OPTIMIZER 'LAMB'"):
        build_optimizer(demo_cfg, nn.Linear(2, 2))


def test_warmup_poly_and_multistep_schedules(demo_cfg):
    cfg = demo_cfg.clone()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER = 1.0, 100
    cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR, cfg.SOLVER.WARMUP_METHOD = 10, 0.1, "linear"
    cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.POLY_LR_POWER = "WarmupPolyLR", 0.9
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx((0.1 * (1 - 0.5) + 0.5) * (1 - 5 / 100) ** 0.9)
    assert lrs[50] == pytest.approx((1 - 50 / 100) ** 0.9)

    cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = "WarmupMultiStepLR", (90, 95), 0.1
    cfg.SOLVER.WARMUP_ITERS = 0
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[89] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.1)
    assert lrs[95] == pytest.approx(0.01)
