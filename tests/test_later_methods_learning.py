"""The five later methods train end to end on the synthetic world and beat zero-shot CLIP.

FedKgCoOp, PromptFolio, FedPGP, FedTPG and FedCoCoOp, run through the command
line on the shipped micro-CLIP (``micro-clip`` / ``synthetic``) with the
settings of ``MICRO_CLIP_TRAIN`` in conftest.py (3 rounds x 2 local epochs,
4 context tokens, batch 16, lr 0.005) and each method's default options.
Each client is scored on its own test set, argmax over all 36 classes.

Measured on the shipped weights (sha256 1f94bd26...), CPU, one thread,
torch 2.13; final-round mean client accuracy in %, world 0, partition and
training seeds 1-5 (``OMP_NUM_THREADS=1 python scripts/learning_figures.py
--methods zsclip fedkgcoop promptfolio fedpgp fedtpg fedcocoop --cases 0/1 0/2
0/3 0/4 0/5``, adding ``--split dirichlet`` for the Dirichlet rows)::

    seed (world 0)    1      2      3      4      5     gain over zero-shot
    pathological (6 clients x 6 classes, 16 shots)
    zero-shot       63.19  63.19  63.19  63.19  63.19
    FedKgCoOp       64.97  64.74  65.66  66.20  65.51   +1.5 .. +3.0
    PromptFolio     73.38  75.23  72.07  72.07  74.23   +8.9 .. +12.0   tested
    FedPGP          66.98  66.67  69.14  66.82  67.67   +3.5 .. +5.9
    FedPGP, paper   68.36  68.29  68.90  69.06  69.14   +5.1 .. +5.9    tested
    (n_ctx 16, lr 0.001 constant; the script has no per-method flags for it:
    a copy with a --method-flags option measured these, see the lead's notes)
    FedTPG          68.90  66.74  68.29  67.13  64.58   +1.4 .. +5.7
    FedCoCoOp       69.68  66.59  66.51  66.36  67.36   +3.2 .. +6.5    tested
    Dirichlet (alpha 0.5, 6 clients)
    zero-shot       63.17  63.27  63.32  62.87  63.22
    FedKgCoOp       65.39  65.25  65.85  65.64  65.38   +2.0 .. +2.8    tested
    FedTPG          68.01  67.07  68.24  68.10  68.42   +3.8 .. +5.2    tested
    PromptFolio     71.79  68.98     -      -      -    +5.7 .. +8.6 (2 seeds)
    FedPGP          67.02  67.51     -      -      -    +3.8 .. +4.2 (2 seeds)
    FedCoCoOp       67.93     -      -      -      -    +4.8 (1 seed)

Every method beats zero-shot in every measured case with the shared settings
and its default options. FedPGP is nevertheless tested with its paper's
settings (``--n-ctx 16 --lr 0.001``; the default constant rate), the only
ones measured where its gain is learning (see CAUTION below). Each is tested
on the split with the larger smallest gain, which is also where its paper
claims one, except FedCoCoOp: the global-prompt methods FedKgCoOp and FedTPG
on the Dirichlet split (FedTPG's pathological gain is not reliable: seed 5
gains only 1.4 points), the personalised PromptFolio and FedPGP on the
pathological split, and FedCoCoOp on the pathological split too, where it
gains +3.2 .. +6.5 over five seeds: on the Dirichlet split a client holds
all of its training images instead of 16 shots per class and FedCoCoOp's
per-image text passes (B x C sequences a step) make one run take about 5
minutes against 2 (so only seed 1 was measured there). FedKgCoOp gains
less than PromptFL (+4.9 at this Dirichlet case, test_learning_behaviour.py):
its anchor term (lambda 8) holds the prompt near the hand-written one.

CAUTION: beating zero-shot is not evidence of learning here. On the
micro-CLIP the *untrained* "X X X X <name>." prompt (random N(0, 0.02^2)
context) already beats the hand-written "a photo of a <name>." by about five
points. Seed 1, world 0, each method with ``--lr 1e-9`` (nothing learns) on
its tested split, against the trained figure above::

                  untrained  trained   learning   zero-shot
    PromptFolio     68.13     73.38     +5.25       63.19   pathological
    FedCoCoOp       65.66     69.68     +4.02       63.19   pathological
    FedPGP          68.36     66.98     -1.38       63.19   pathological
    FedPGP, paper   63.27     68.36     +5.09       63.19   pathological
    FedKgCoOp       68.26     65.39     -2.87       63.17   Dirichlet
    FedTPG          69.58     68.01     -1.57       63.17   Dirichlet

With the cross-entropy term multiplied by 0 (a one-line mutation of each
method's loss; weight decay and, for FedPGP, the contrastive term still
act), at the shared settings the FedPGP (67.21), FedTPG (69.65) and
FedCoCoOp (65.66) tests would still pass; the FedKgCoOp (63.05: the anchor
alone pulls the prompt onto the hand-written one) and PromptFolio (theta 0,
i.e. PromptFL: 62.11) tests fail. With FedPGP's paper settings (n_ctx 16,
lr 0.001) the untrained prompt scores 63.27, 60.19, 60.42, 61.34, 57.64
(seeds 1-5), below zero-shot, so the gain there is learning; it is tested
with them, and its CE mutant (64.58) fails. The FedTPG and FedCoCoOp tests
check that the method trains and scores end to end without falling below
zero-shot, not that it learns (FedCoCoOp learns +4.0 at seed 1, but half its
smallest gain over zero-shot is under the untrained prompt's); a learning
check would compare each method with its own untrained prompt over several
seeds. Measured further (same command with ``--method-flags``): FedCoCoOp's
untrained start at seed 2 scores 66.13 against 66.59 trained (+0.46), and
FedTPG at its paper's lr 0.003 on the pathological split, trained against
untrained (``--lr 1e-9``), seeds 1-3: 69.29/69.68, 66.13/65.90, 68.44/59.57.
Neither learns reliably beyond its random start on this micro-CLIP world
(FedTPG's untrained generator alone spans 59.6-69.7 over three seeds), so no
threshold over the untrained start would both hold on every seed and fail
when learning breaks; their tests stay the end-to-end check described above.

The tests run world 0, seed 1 and ask, per method, for a gain over zero-shot
under half the smallest gain measured on its split. The zero-shot figure of a
split is measured once per test session in a workspace the split's tests
share (ZS-CLIP trains nothing, so its figure does not depend on which test
runs first).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DIRICHLET, MICRO_CLIP_TRAIN, PATHOLOGICAL, final_accuracy

SPLITS = {"pathological": PATHOLOGICAL, "dirichlet": DIRICHLET}

#: method -> (split, smallest gain over zero-shot the test accepts as a fraction, flags on top of MICRO_CLIP_TRAIN).
GAIN_MIN = {
    "fedkgcoop": ("dirichlet", 0.008, ()),  # measured +0.020 .. +0.028 (5 seeds), this case +0.022
    "promptfolio": ("pathological", 0.04, ()),  # measured +0.089 .. +0.120, this case +0.102
    # The paper's settings: with the shared ones the untrained prompt already scores higher (docstring).
    "fedpgp": ("pathological", 0.025, ("--n-ctx", "16", "--lr", "0.001")),  # measured +0.051 .. +0.059, this case +0.052
    "fedtpg": ("dirichlet", 0.018, ()),  # measured +0.038 .. +0.052, this case +0.048
    "fedcocoop": ("pathological", 0.015, ()),  # measured +0.032 .. +0.065, this case +0.065
}


@pytest.fixture(scope="module")
def split_workspaces(tmp_path_factory) -> dict[str, Path]:
    """One workspace per split, shared by the module's tests: partitioned and zero-shot scored on first use."""
    root = tmp_path_factory.mktemp("later-methods")
    return {split: root / split for split in SPLITS}


def zero_shot_and_method(cli, workspace: Path, split: str, method: str, flags: tuple[str, ...]) -> dict[str, float]:
    """Final accuracies of ZS-CLIP and ``method`` on ``split`` (partition seed 1, world 0), as train_and_score."""
    if not workspace.exists():
        result = cli("partition", "--dataset", "synthetic", *SPLITS[split], "--seed", "1", workspace=workspace)
        assert result.exit_code == 0, result.stderr
        result = cli("train", "--method", "zsclip", *MICRO_CLIP_TRAIN, workspace=workspace)
        assert result.exit_code == 0, result.stderr
    result = cli("train", "--method", method, *MICRO_CLIP_TRAIN, *flags, workspace=workspace)
    assert result.exit_code == 0, result.stderr
    return {"zsclip": final_accuracy(workspace, "zsclip"), method: final_accuracy(workspace, method)}


@pytest.mark.parametrize("method", sorted(GAIN_MIN))
def test_method_beats_zero_shot(cli, split_workspaces, method):
    split, gain_min, flags = GAIN_MIN[method]
    accuracy = zero_shot_and_method(cli, split_workspaces[split], split, method, flags)
    assert accuracy["zsclip"] >= 0.55, accuracy  # measured 0.632; a broken backbone would explain a failure below
    assert accuracy[method] >= accuracy["zsclip"] + gain_min, accuracy
