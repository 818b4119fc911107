#!/usr/bin/env python
"""Pretrain the micro-CLIP (model ``micro-clip``, pretrained tag ``synthetic``).

Real CLIP weights cannot be downloaded everywhere, and a randomly initialised
CLIP learns nothing worth showing, so the toolkit ships a small CLIP that it
pretrained itself, contrastively, on captioned images of its procedural
synthetic world (``pfedmoap_cli/data/sources/synthetic.py``).

* Architecture: ``pfedmoap_cli/model/configs/micro-clip.json`` (open_clip ViT,
  32 px, patch 8, width 128, 4 layers; text width 64, 4 layers, context 77,
  the full 49,408-token vocabulary; joint embedding 128).
* Images: the synthetic world's pretraining stream (``pretraining_image``), a
  separately salted seed sequence, so no pretraining image is a train or test
  image of the dataset. A fixed pool is rendered once and augmented with
  random scale, shift and flip.
* Captions: several phrasings per image, some naming its domain ("a sketch
  of a red circle."). By default ("photo-means-colour") the phrase "a photo
  of a ..." only ever describes the colour, so the zero-shot prompt "a photo
  of a {name}." is biased towards colour and leaves shape confusions that a
  learned prompt can fix (see CAPTION_STYLES). Measured on the shipped
  weights: zero-shot 63.2% on the dataset's test split (61.3% from the local
  tokens), where the prompt "{name}." gives 69.3%.
* Loss and optimiser: the symmetric CLIP loss with a learnable temperature,
  plus ``dense_weight`` (default 1) times the same loss on the image's *local
  tokens* (every patch after ``ln_post`` and the projection, each normalised,
  averaged, normalised again). A ViT pooled by its class token never trains
  its last layer's patch outputs, so without this term they carry almost no
  class information (measured on weights pretrained with ``dense_weight`` 0:
  11.7% zero-shot from the local tokens against 68.7% from the pooled
  feature), and FedOTP, which reads only the local tokens, scored 14%. Real
  CLIP's local tokens are semantic enough for FedOTP and dense zero-shot
  work; this term gives the micro-CLIP the same property. AdamW with linear
  warmup and cosine decay, everything seeded; one CPU thread, so a rerun on
  the same machine and torch version gives the same bytes.
* Output: ``micro-clip-synthetic.safetensors`` (fp16: loaded back to fp32),
  its ``.sha256``, and ``micro-clip-synthetic.json`` (the command, settings,
  versions, loss curve and zero-shot accuracy per domain on the dataset's
  test split).

Usage (the command that produced the shipped weights)::

    OMP_NUM_THREADS=1 python scripts/pretrain_microclip.py --out pfedmoap_cli/model/weights

After regenerating, copy the printed sha256 into ``pfedmoap_cli/model/pretrained.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pfedmoap_cli.artifacts.atomic import atomic_write, atomic_write_text  # noqa: E402
from pfedmoap_cli.compat import import_open_clip  # noqa: E402
from pfedmoap_cli.data.sources import synthetic  # noqa: E402
from pfedmoap_cli.model.backbone import register_tiny_configs  # noqa: E402
from pfedmoap_cli.model.local_tokens import vit_tokens  # noqa: E402

MODEL_NAME = "micro-clip"
TAG = "synthetic"
STEM = f"{MODEL_NAME}-{TAG}"

# Caption templates: (template, domain it describes or None for any, weight); {c} is
# the colour, {s} the shape. A template fills `weight` of the 100 caption slots of
# each domain it applies to.
#
# "photo-means-colour" (the default) is deliberately not aligned with the
# zero-shot prompt "a photo of a {name}.": in pretraining, "a photo of a ..."
# only ever describes the colour ("a photo of a red object.": 25% of the
# captions of every domain), while full names appear in other phrasings.
# The text tower therefore reads the zero-shot prompt
# with a bias towards colour, the zero-shot classifier confuses shapes that the
# image features tell apart, and a learned context can undo that bias: this is
# the headroom of prompt learning (CoOp's observation that hand-written prompts
# are fragile). "aligned" is the control: it reaches a higher zero-shot accuracy
# that a learned prompt can hardly improve on, because the image features, not
# the prompt, then limit accuracy.
CAPTION_STYLES: dict[str, tuple[tuple[str, str | None, int], ...]] = {
    "photo-means-colour": (
        ("a photo of a {c} object.", None, 15),
        ("a photo of something {c}.", None, 10),
        ("a {c} {s}.", None, 10),
        ("{c} {s}.", None, 10),
        ("the {c} {s}.", None, 10),
        ("a picture of a {c} {s}.", "photo", 23),
        ("an image of a {c} {s}.", "photo", 22),
        ("a sketch of a {c} {s}.", "sketch", 23),
        ("a drawing of a {c} {s}.", "sketch", 22),
        ("a grainy picture of a {c} {s}.", "noisy", 23),
        ("a noisy image of a {c} {s}.", "noisy", 22),
    ),
    "aligned": (
        ("a photo of a {c} {s}.", "photo", 13),
        ("a picture of a {c} {s}.", "photo", 13),
        ("a shaded {c} {s} on a grey background.", "photo", 13),
        ("a photo of the {c} {s}.", "photo", 13),
        ("a sketch of a {c} {s}.", "sketch", 13),
        ("a drawing of a {c} {s}.", "sketch", 13),
        ("an outline of a {c} {s}.", "sketch", 13),
        ("a {c} line drawing of a {s}.", "sketch", 13),
        ("a noisy image of a {c} {s}.", "noisy", 13),
        ("a grainy picture of a {c} {s}.", "noisy", 13),
        ("a {c} {s} in clutter.", "noisy", 13),
        ("a blurry {c} {s}.", "noisy", 13),
        ("a {c} {s}.", None, 7),
        ("the {s} is {c}.", None, 7),
        ("a {s} coloured {c}.", None, 7),
        ("{c} {s}.", None, 7),
    ),
}


# Other prompts scored on the final weights (for the summary only): their spread
# shows how much a prompt matters to this model.
OTHER_TEMPLATES = ("{}.", "a {}.", "a picture of a {}.")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (recorded in the summary)."""

    seed: int = 0
    world_seed: int = 0
    pool_per_class: int = 160
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 60
    weight_decay: float = 0.1
    caption_style: str = "photo-means-colour"
    min_crop_scale: float = 0.35
    eval_every: int = 250
    eval_per_class: int = 12
    eval_world_seed: int = 0
    dense_weight: float = 1.0


# ----------------------------------------------------------------------------- data



def build_pool(cfg: PretrainConfig, image_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render the pretraining pool: uint8 images (N, 3, H, W), labels (N,), domain ids (N,)."""
    names = synthetic.class_names()
    images, labels, domains = [], [], []
    for d, domain in enumerate(synthetic.DOMAINS):
        for label in range(len(names)):
            for index in range(cfg.pool_per_class):
                images.append(synthetic.pretraining_image(cfg.world_seed, domain, label, index, image_size))
                labels.append(label)
                domains.append(d)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, torch.tensor(labels), torch.tensor(domains)


def caption_bank(tokenizer, style: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """All captions of ``style``, their tokens, and the table [domain, class, slot] -> caption id.

    Each template fills as many slots of a domain as its weight, so drawing a
    slot uniformly draws a template with probability proportional to its weight.
    """
    if style not in CAPTION_STYLES:
        raise SystemExit(f"unknown caption style {style!r}; choose from {', '.join(CAPTION_STYLES)}")
    names = synthetic.class_names()
    templates = CAPTION_STYLES[style]
    captions = [t.format(c=name.split(" ")[0], s=name.split(" ")[1]) for t, _, _ in templates for name in names]
    table = torch.tensor(
        [
            [
                [k * len(names) + label for k, (_, where, weight) in enumerate(templates) if where in (None, domain) for _ in range(weight)]
                for label in range(len(names))
            ]
            for domain in synthetic.DOMAINS
        ]
    )
    return captions, tokenizer(captions).long(), table


def augment(pixels: torch.Tensor, generator: torch.Generator, min_scale: float, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Random zoom-in (area scale in [min_scale, 1]), shift and horizontal flip, then CLIP normalisation."""
    n = pixels.shape[0]
    x = pixels.float() / 255.0
    u = torch.rand(n, 4, generator=generator)
    side = torch.sqrt(min_scale + (1.0 - min_scale) * u[:, 0])  # crop side as a fraction of the image
    room = 1.0 - side
    tx = (2 * u[:, 1] - 1) * room
    ty = (2 * u[:, 2] - 1) * room
    flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 1, 1] = side
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - mean) / std


def normalise(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- model


def encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` computed only up to the last EOT position (exact: causal mask, EOT pooling)."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)])
    return x @ model.text_projection


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings of positions and the temperature."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name or "embedding" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def round_to_storage(model) -> dict[str, torch.Tensor]:
    """The fp16 tensors that are stored; loading casts them back to fp32 (the model's real weights)."""
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


@torch.no_grad()
def zero_shot(model, tokenizer, mean, std, cfg: PretrainConfig, template: str = "a photo of a {}.") -> dict[str, float]:
    """Zero-shot accuracy on the synthetic dataset's test split, overall and per domain."""
    source = synthetic.SyntheticSource(seed=cfg.eval_world_seed, test_per_class=cfg.eval_per_class)
    samples = source.samples("test")
    pixels = torch.stack([torch.from_numpy(np.array(source.load_image(s))).permute(2, 0, 1) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    model.eval()
    text = F.normalize(model.encode_text(tokenizer([template.format(n) for n in source.class_names])), dim=-1)
    tokens = torch.cat([F.normalize(vit_tokens(model.visual, normalise(pixels[i : i + 512], mean, std)), dim=-1) for i in range(0, len(samples), 512)])
    correct = (tokens[:, 0] @ text.t()).argmax(dim=-1) == labels
    result = {"overall": float(correct.float().mean())}
    # The local tokens (what FedOTP reads): mean of every token's class scores.
    local_correct = (tokens[:, 1:] @ text.t()).mean(dim=1).argmax(dim=-1) == labels
    result["local_tokens"] = float(local_correct.float().mean())
    for domain in source.domains:
        mask = torch.tensor([s.domain == domain for s in samples])
        result[domain] = float(correct[mask].float().mean())
    return result


# ----------------------------------------------------------------------------- training


def pretrain(cfg: PretrainConfig, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the micro-CLIP; return the stored (fp16) state dict and the training summary.

    Runs on one CPU thread with deterministic algorithms and its own RNG
    state; the caller's thread count, determinism flag and RNG are restored.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            return _pretrain(cfg, log)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _pretrain(cfg: PretrainConfig, log) -> tuple[dict[str, torch.Tensor], dict]:
    open_clip = import_open_clip()
    register_tiny_configs()
    torch.manual_seed(cfg.seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    image_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list)) else model.visual.image_size)
    preprocess = open_clip.model.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess.get("mean") or open_clip.constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.get("std") or open_clip.constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    started = time.perf_counter()
    pixels, labels, domains = build_pool(cfg, image_size)
    captions, tokens, table = caption_bank(tokenizer, cfg.caption_style)
    log(f"pool: {len(labels)} images rendered in {time.perf_counter() - started:.1f}s; {len(captions)} captions")

    generator = torch.Generator().manual_seed(cfg.seed + 1)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    history: list[dict] = []
    loss_sum, loss_count = 0.0, 0
    model.train()
    train_started = time.perf_counter()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        index = torch.randint(len(labels), (cfg.batch_size,), generator=generator)
        slot = torch.randint(table.shape[2], (cfg.batch_size,), generator=generator)
        caption_ids = table[domains[index], labels[index], slot]
        images = augment(pixels[index], generator, cfg.min_crop_scale, mean, std)

        text_features = F.normalize(encode_text_truncated(model, tokens[caption_ids]), dim=-1)
        target = torch.arange(cfg.batch_size)
        if cfg.dense_weight > 0:
            all_tokens = vit_tokens(model.visual, images)
            image_features = F.normalize(all_tokens[:, 0], dim=-1)
            local_features = F.normalize(F.normalize(all_tokens[:, 1:], dim=-1).mean(dim=1), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.t()
            local_logits = model.logit_scale.exp() * local_features @ text_features.t()
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
            loss = loss + cfg.dense_weight * 0.5 * (F.cross_entropy(local_logits, target) + F.cross_entropy(local_logits.t(), target))
        else:
            image_features = F.normalize(model.encode_image(images), dim=-1)
            logits = model.logit_scale.exp() * image_features @ text_features.t()
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_sum += float(loss.detach())
        loss_count += 1
        last = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            entry = {
                "step": step + 1,
                "loss": round(loss_sum / loss_count, 4),
                "lr": lr_at(step, cfg),
                "logit_scale": round(float(model.logit_scale.detach().exp()), 3),
                "seconds": round(time.perf_counter() - train_started, 1),
            }
            if not last:
                entry["zero_shot"] = {k: round(v, 4) for k, v in zero_shot(model, tokenizer, mean, std, cfg).items()}
                model.train()
            history.append(entry)
            log(json.dumps(entry))
            loss_sum, loss_count = 0.0, 0

    state = round_to_storage(model)
    model.load_state_dict({k: v.float() for k, v in state.items()})  # score the weights as they are stored
    final = {k: round(v, 4) for k, v in zero_shot(model, tokenizer, mean, std, cfg).items()}
    by_template = {t: round(zero_shot(model, tokenizer, mean, std, cfg, t)["overall"], 4) for t in OTHER_TEMPLATES}
    history[-1]["zero_shot"] = final
    log(f"zero-shot (stored weights): {json.dumps(final)}")
    summary = {
        "model": MODEL_NAME,
        "pretrained": TAG,
        "config": dataclasses.asdict(cfg),
        "storage_dtype": "float16 (loaded as float32)",
        "parameters": int(sum(v.numel() for v in state.values())),
        "pool_images": int(len(labels)),
        "captions": len(captions),
        "train_seconds": round(time.perf_counter() - train_started, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "zero_shot_template": "a photo of a {}.",
        "zero_shot_test": final,
        "zero_shot_test_other_templates": by_template,
        "history": history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "numpy": np.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    return state, summary


def save(out_dir: Path, state: dict[str, torch.Tensor], summary: dict, command: str) -> str:
    """Write the weights, their sha256 and the summary; return the sha256."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{STEM}.safetensors"

    def write_weights(tmp: Path) -> None:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; the file is package data

    # Atomic: a run that loads the shipped weights while they are regenerated
    # reads the old file or the new one, never half of one.
    atomic_write(weights, write_weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    atomic_write_text(out_dir / f"{STEM}.sha256", f"{digest}  {weights.name}\n")
    summary = {**summary, "command": command, "sha256": digest, "bytes": weights.stat().st_size}
    atomic_write_text(out_dir / f"{STEM}.json", json.dumps(summary, indent=2) + "\n")
    return digest


def parse_args(argv: list[str] | None) -> tuple[PretrainConfig, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("pfedmoap_cli/model/weights"), help="output folder")
    for field in dataclasses.fields(PretrainConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
    return cfg, args.out


def main(argv: list[str] | None = None) -> str:
    cfg, out_dir = parse_args(argv)
    args = sys.argv[1:] if argv is None else argv
    command = "OMP_NUM_THREADS=1 python scripts/pretrain_microclip.py " + " ".join(args)
    state, summary = pretrain(cfg)
    digest = save(out_dir, state, summary, command.strip())
    print(f"wrote {out_dir / (STEM + '.safetensors')} sha256 {digest}")
    return digest


if __name__ == "__main__":
    main()
