"""Model layer: frozen open_clip backbones, CoOp prompt text encoder, feature caches.

Modules: ``backbone`` (BackboneSpec, FrozenClip, load_backbone, resolve_device),
``prompt`` (PromptTextEncoder, encode_texts), ``features`` (test-feature cache),
``checkpoints`` (local weight files), ``transforms``, ``device``.
"""
