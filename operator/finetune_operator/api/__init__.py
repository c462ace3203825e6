"""The finetune.dev API: schema (the single source), typed models, and the CRD generator."""

from finetune_operator.api.schema import API_VERSION, GROUP, VERSION

__all__ = ["API_VERSION", "GROUP", "VERSION"]
