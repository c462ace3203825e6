"""The finetune.dev Kubernetes operator (kopf)."""

__version__ = "0.1.0"
