"""FedOTP learns on the synthetic world: its local tokens carry class information and it beats zero-shot.

FedOTP scores an image through its *local* tokens only (every patch of the
last image layer, projected to D), so it needs a backbone whose local tokens
are semantic, as real CLIP's are. The shipped micro-CLIP is pretrained with a
dense term for that (``scripts/pretrain_microclip.py``, ``dense_weight``);
weights pretrained without it gave 11.7% zero-shot from the local tokens and
FedOTP 14%, far below zero-shot CLIP. These tests would catch either a
backbone or a token path that loses that property again.

Measured on the shipped weights (sha256 1f94bd26...), CPU, one thread, torch
2.13, pathological split (6 clients x 6 classes, 16 shots), 3 rounds x 2
local epochs, 4 context tokens, batch 16, lr 0.005, FedOTP's defaults (eps
0.01, top_percent 0.8); final-round mean client accuracy in %, 9 runs
(``OMP_NUM_THREADS=1 python scripts/learning_figures.py``; world/seed as in
``test_learning_behaviour.py``)::

    world/seed  0/1    0/2    0/3    0/4    0/5    1/1    1/2    2/1    2/2
    zero-shot   63.19  63.19  63.19  63.19  63.19  61.57  61.57  62.96  62.96
    FedOTP      73.15  75.69  72.07  73.38  72.45  73.84  73.92  73.15  71.60

    FedOTP      73.25 +- 1.20   gain over zero-shot +8.64 .. +12.50, mean +10.47

Re-measured with the authors' stopping rule (``stop_rule=authors``, the
default) and the float64 transport: the same nine figures to two decimals
(at eps 0.01 both rules run the 100-iteration cap).

Zero-shot from the local tokens (mean of the tokens' class scores, prompt
"a photo of a {name}."): 61.3% on the whole test split (pooled feature 63.2%).
The test runs world 0, seed 1 and asks for half the smallest measured gain.
"""

from __future__ import annotations

from conftest import PATHOLOGICAL, train_and_score
from pfedmoap_cli.model.local_tokens import encode_image_tokens

LOCAL_ZERO_SHOT_MIN = 0.45  # measured 0.613; chance 0.028
FEDOTP_GAIN_MIN = 0.04  # measured +0.086 .. +0.125 (9 runs), this case +0.100


def test_local_tokens_classify_far_above_chance(micro_clip_test_split):
    split = micro_clip_test_split
    local = encode_image_tokens(split.clip, split.images)[:, 1:]  # (B, 16, D): the 4 x 4 patches
    assert local.shape[1] == 16
    scores = (local @ split.text.t()).mean(dim=1)
    assert float((scores.argmax(dim=1) == split.labels).float().mean()) >= LOCAL_ZERO_SHOT_MIN


def test_fedotp_beats_zero_shot_on_the_pathological_split(cli, tmp_path):
    accuracy = train_and_score(cli, tmp_path / "ws", PATHOLOGICAL, {"zsclip": (), "fedotp": ()})
    assert accuracy["fedotp"] >= accuracy["zsclip"] + FEDOTP_GAIN_MIN, accuracy
