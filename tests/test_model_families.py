"""Every listed model family, small config and random weights: one unit per layer, residual inputs
quantized once, BN folding exact, W8A8 (range init only) close to FP."""

import pytest
import torch

from plan_checks import FAMILIES, check_family


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family(name):
    row = check_family(name)
    assert row["residual_units"] > 0                 # the graph found the residual blocks
    assert row["fold_rel_err"] < 1e-5
    # random weights give near-tied logits, so top-1 agreement is noisy (see model_coverage.md); the output
    # SQNR measures the W8A8 error itself
    assert row["w8a8_sqnr_db"] >= 20.0 and row["w8a8_agreement"] >= 80.0
    assert not [w for w in row["warnings"] if "could not group" in w]


def test_planning_resnet50_is_fast():
    import time

    import torchvision

    import dfquant

    model = torchvision.models.resnet50()
    t0 = time.time()
    plan = dfquant.plan(model, torch.zeros(1, 3, 224, 224))
    assert time.time() - t0 < 5.0 and len([u for u in plan.units if u.kind == "residual"]) == 16
