"""The finetune.dev API, described once and shared by the operator and the trainer.

Standard library only: the operator image and the trainer image both ship it, and importing
it loads no Kubernetes client, no kopf, no ML library (tests/unit/api checks that).

- `schema`: every spec section with its defaults, bounds, docs and CEL rules; the trainer's
  config is assembled from the same sections.
- `models`, `trainer_config`: typed dataclasses generated from `schema` (`make generate`).
- `sources`: the one parser of `pvc://`, `hf://`, `s3://`, `https://` locations.
- `layout`: the job volume's folders; `exitcodes`: what the trainer's exit status means.
"""

from finetune_api.schema import API_VERSION, GROUP, VERSION

__all__ = ["API_VERSION", "GROUP", "VERSION"]
