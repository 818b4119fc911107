"""The shipped micro-CLIP has learnt something, and prompt learning improves on it.

Real learning end to end, no mocks: the micro-CLIP (``micro-clip`` /
``synthetic``, pretrained by ``scripts/pretrain_microclip.py``) classifies the
synthetic world zero-shot far above chance (1/36 = 2.8%) yet well below what
a learned prompt reaches; CoOp, run through the command line, beats zero-shot
CLIP on the pathological split (6 clients x 6 classes, 16 shots per class),
and PromptFL does on a Dirichlet split (alpha 0.5 over 6 clients). Each client
is scored on its own test set, argmax over all 36 classes.

Measured on the shipped weights (sha256 1f94bd26...), CPU, one thread,
torch 2.13, with the settings of ``MICRO_CLIP_TRAIN`` in conftest.py (3 rounds x 2 local epochs,
4 context tokens, batch 16, lr 0.005). Final-round mean client accuracy in %,
9 runs: partition and training seeds 1-5 on the default world, seeds 1-2 on
worlds 1 and 2 (``OMP_NUM_THREADS=1 python scripts/learning_figures.py``,
``--split dirichlet --methods zsclip promptfl`` for the Dirichlet rows)::

    world/seed   0/1    0/2    0/3    0/4    0/5    1/1    1/2    2/1    2/2
    pathological
    zero-shot    63.19  63.19  63.19  63.19  63.19  61.57  61.57  62.96  62.96
    CoOp         78.01  77.08  75.93  79.55  77.78  80.17  81.10  80.40  77.85
    PromptFL     62.11  65.51  66.51  67.13  67.05  67.98  66.36  65.66  66.20
    Dirichlet (re-measured after the Dirichlet cap fix, which moved the
    partitions of seeds 1 and 2)
    zero-shot    63.17  63.27  63.32  62.87  63.22  61.73  61.68  62.90  63.10
    PromptFL     68.02  67.09  67.90  66.47  67.27  67.67  67.83  66.30  67.44

    CoOp, pathological       78.65 +- 1.73   gain over zero-shot +12.7 .. +19.5
    PromptFL, pathological   66.06 +- 1.66   gain over zero-shot  -1.1 .. +6.4
    PromptFL, Dirichlet      67.33 +- 0.62   gain over zero-shot  +3.4 .. +6.2

PromptFL's single averaged prompt serves six clients with disjoint classes
under the pathological split, and its gain there is not reliable (world 0,
seed 1 loses 1.1 points); under the Dirichlet split it gains every time, so
that is where it is tested. The tests run world 0, seed 1 (pathological:
zero-shot 63.19, CoOp 78.01; Dirichlet: zero-shot 63.17, PromptFL 68.02).
Zero-shot on the whole test split: 63.2% (photo 65.7, sketch 79.2, noisy
44.7). The gain thresholds sit under half the smallest measured gain.
"""

from __future__ import annotations

import torch

from conftest import DIRICHLET, PATHOLOGICAL, train_and_score

ZERO_SHOT_MIN = 0.55  # measured 0.632
ZERO_SHOT_MAX = 0.75  # headroom: a learned prompt must have something to improve
DOMAIN_MIN = 0.35  # measured: noisy 0.447, photo 0.657, sketch 0.792
COOP_GAIN_MIN = 0.06  # pathological; measured +0.127 .. +0.195 (9 runs), this case +0.148
PROMPTFL_GAIN_MIN = 0.015  # Dirichlet; measured +0.034 .. +0.062 (9 runs), this case +0.049


def test_zero_shot_is_far_above_chance_and_below_the_ceiling(micro_clip_test_split):
    split = micro_clip_test_split
    correct = (split.clip.encode_images(split.images) @ split.text.t()).argmax(dim=1) == split.labels
    assert ZERO_SHOT_MIN <= float(correct.float().mean()) <= ZERO_SHOT_MAX
    for domain in split.domains:
        mask = torch.tensor([d == domain for d in split.sample_domains])
        assert float(correct[mask].float().mean()) >= DOMAIN_MIN, domain


def test_coop_beats_zero_shot_on_the_pathological_split(cli, tmp_path):
    accuracy = train_and_score(cli, tmp_path / "ws", PATHOLOGICAL, {"zsclip": (), "coop": ()})
    assert accuracy["zsclip"] >= ZERO_SHOT_MIN
    assert accuracy["coop"] >= accuracy["zsclip"] + COOP_GAIN_MIN, accuracy


def test_promptfl_beats_zero_shot_on_a_dirichlet_split(cli, tmp_path):
    accuracy = train_and_score(cli, tmp_path / "ws", DIRICHLET, {"zsclip": (), "promptfl": ()})
    assert accuracy["zsclip"] >= ZERO_SHOT_MIN
    assert accuracy["promptfl"] >= accuracy["zsclip"] + PROMPTFL_GAIN_MIN, accuracy
