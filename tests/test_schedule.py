"""Learning rate at each epoch: warmup + multistep (the paper's recipe) and warmup + cosine."""
import math

import pytest

from config import load_config
from modelling.schedule import lr_at_epoch


def test_paper_recipe_warmup_then_multistep():
    solver = load_config(opts=["SOLVER.BASE_LR", "3.5e-4"]).SOLVER
    lrs = [lr_at_epoch(e, solver) for e in range(120)]
    for e in range(10):
        assert lrs[e] == pytest.approx(3.5e-4 * (e + 1) / 10)
    assert all(lr == pytest.approx(3.5e-4) for lr in lrs[10:40])
    assert all(lr == pytest.approx(3.5e-5) for lr in lrs[40:70])
    assert all(lr == pytest.approx(3.5e-6) for lr in lrs[70:120])


def test_cosine_after_warmup_reaches_min_lr():
    solver = load_config(opts=["SOLVER.LR_SCHEDULER_NAME", "cosine_annealing", "SOLVER.MAX_EPOCHS", "20",
                               "SOLVER.WARMUP_EPOCHS", "4", "SOLVER.BASE_LR", "1e-3", "SOLVER.MIN_LR", "1e-5"]).SOLVER
    assert lr_at_epoch(0, solver) == pytest.approx(2.5e-4)
    assert lr_at_epoch(3, solver) == pytest.approx(1e-3)
    assert lr_at_epoch(4, solver) == pytest.approx(1e-3)
    mid = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 8 / 16))
    assert lr_at_epoch(12, solver) == pytest.approx(mid)
    assert lr_at_epoch(20, solver) == pytest.approx(1e-5)
    lrs = [lr_at_epoch(e, solver) for e in range(4, 21)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_warmup():
    solver = load_config(opts=["SOLVER.USE_WARMUP_LR", "False", "SOLVER.BASE_LR", "0.01"]).SOLVER
    assert lr_at_epoch(0, solver) == pytest.approx(0.01)
    assert lr_at_epoch(40, solver) == pytest.approx(0.001)
