"""Everything a run needs, assembled from its settings and partition.

Shared by ``train`` and ``evaluate``: opens the dataset and checks it is the
one the partition was made from, loads the frozen backbone, builds the prompt
encoder and the method, and loads (or computes once) the test features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pfedmoap_cli.artifacts.partition import Partition, check_partition_matches_dataset
from pfedmoap_cli.data.decoded_images import DecodedImageSettings, DecodedImageStore
from pfedmoap_cli.data.sources import open_dataset
from pfedmoap_cli.data.sources.base import DatasetSource, Sample
from pfedmoap_cli.engine.settings import TrainSettings, backbone_spec
from pfedmoap_cli.errors import ArtifactError, ConfigError
from pfedmoap_cli.methods.base import FederatedMethod, LocalTraining, MethodEnv, get_method
from pfedmoap_cli.model.backbone import FrozenClip, load_backbone, resolve_device
from pfedmoap_cli.model.features import cached_image_features
from pfedmoap_cli.model.prompt import PromptTextEncoder


@dataclass
class Session:
    """A dataset, a frozen model and a method, ready for the round loop."""

    settings: TrainSettings
    partition: Partition
    partition_sha256: str
    source: DatasetSource
    train_samples: list[Sample]
    test_samples: list[Sample]
    clip: FrozenClip
    method: FederatedMethod
    test_features: torch.Tensor
    test_labels: torch.Tensor
    #: The training images decoded once (``image_pipeline = "tensor"``; None for "pil").
    train_images: DecodedImageStore | None = None

    @property
    def device(self) -> torch.device:
        return self.clip.device


def open_partition_dataset(partition: Partition, data_root: Path) -> DatasetSource:
    """Open the partition's dataset and refuse it if its samples changed."""
    source = open_dataset(partition.dataset, Path(data_root), **partition.dataset_options)
    if source.fingerprint() != partition.dataset_fingerprint:
        raise ArtifactError(
            f"the {partition.dataset} data under {data_root} differs from the data this partition was made from "
            "(sample hash mismatch); recreate the partition with 'pfedmoap partition' or point --data-root at the original data"
        )
    # Same samples, but the partition's class names or sample ids could still
    # have been edited by hand: training on swapped names is silently wrong.
    check_partition_matches_dataset(partition, source)
    return source


def method_options(method_cls: type[FederatedMethod], raw: dict) -> object:
    """Build a method's typed options from the settings' ``method_options``."""
    if method_cls.Options is type(None):
        if raw:
            raise ConfigError(f"method {method_cls.name} takes no method options, got {sorted(raw)}; remove them")
        return None
    known = {f.name: f for f in dataclasses.fields(method_cls.Options)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"method {method_cls.name} has no option(s) {unknown}; its options are {sorted(known)}")
    return method_cls.Options(**raw)


def option_names(method_cls: type[FederatedMethod]) -> set[str]:
    """Names of the options a method accepts (empty for methods without options)."""
    if method_cls.Options is type(None):
        return set()
    return {f.name for f in dataclasses.fields(method_cls.Options)}


def applicable_options(method: str, defaults: dict) -> dict:
    """The recipe defaults that ``method`` understands.

    A dataset recipe sets options for the methods of its table (for example
    pFedMoAP's ``num_experts``); other methods simply do not take them. Options
    a user gives explicitly are never filtered: unknown ones stay errors.
    """
    known = option_names(get_method(method))
    return {k: v for k, v in defaults.items() if k in known}


def build_method(settings: TrainSettings, partition: Partition, device: torch.device | None = None) -> tuple[FrozenClip, FederatedMethod]:
    """The frozen backbone and the method of a run, without any data.

    What a federation's server needs (it never sees images); :func:`open_session`
    adds the dataset and the test features.
    """
    method_cls = get_method(settings.method)
    options = method_options(method_cls, settings.method_options)
    device = device if device is not None else resolve_device(settings.device)
    clip = load_backbone(backbone_spec(settings), device=device, amp=settings.amp)
    text_encoder = PromptTextEncoder(
        clip, list(partition.class_names), n_ctx=settings.n_ctx, init_phrase=settings.ctx_init or None, truncate=settings.truncate_prompts
    ).to(device)
    env = MethodEnv(
        clip=clip,
        text_encoder=text_encoder,
        class_names=tuple(partition.class_names),
        num_clients=partition.num_clients,
        training=LocalTraining(settings.local_epochs, settings.lr, settings.momentum, settings.weight_decay),
        seed=settings.seed,
        device=device,
    )
    return clip, method_cls(env, options)


def open_session(
    settings: TrainSettings,
    partition: Partition,
    partition_sha256: str,
    data_root: Path,
    features_cache: Path,
    progress: bool = True,
    images_cache: Path | None = None,
) -> Session:
    """Assemble a :class:`Session`; raises user errors for anything misconfigured.

    ``images_cache``: the folder decoded training images spill to (default:
    ``images`` beside ``features_cache``, i.e. ``<workspace>/cache/images``).
    """
    method_cls = get_method(settings.method)
    method_options(method_cls, settings.method_options)  # option errors before the data is opened
    source = open_partition_dataset(partition, data_root)
    clip, method = build_method(settings, partition)
    train_samples, test_samples = source.samples("train"), source.samples("test")
    features = cached_image_features(
        clip,
        lambda i: source.load_image(test_samples[i]),
        [s.key for s in test_samples],
        source.fingerprint(),
        features_cache,
        batch_size=settings.eval_batch_size,
        num_workers=settings.num_workers,
        progress=progress,
        desc="test tokens" if method_cls.needs_local_tokens else "test features",
        tokens=method_cls.needs_local_tokens,
    ).to(clip.device)
    labels = torch.tensor([s.label for s in test_samples], dtype=torch.long, device=clip.device)
    train_images = None
    if settings.image_pipeline == "tensor":
        # Once per session: every round and client of the run (and every node
        # a process serves) shares the decoded images. Large images are kept
        # at twice the model's input size (see decoded_images).
        train_images = DecodedImageStore(
            source,
            train_samples,
            Path(images_cache) if images_cache is not None else Path(features_cache).parent / "images",
            DecodedImageSettings(memory_mb=settings.image_cache_mb, max_short_side=2 * clip.image_size),
        )
    return Session(settings, partition, partition_sha256, source, train_samples, test_samples, clip, method, features, labels, train_images)
