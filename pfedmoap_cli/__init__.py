"""pfedmoap: personalized federated prompt learning for CLIP (pFedMoAP and baselines)."""

__version__ = "0.1.0"
