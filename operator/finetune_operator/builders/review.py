"""The review ConfigMap: created empty by the operator (owned by the FineTuneJob), filled by
the comparison Job with what the review page shows besides the status (`comparison.json`
with every answer, `dataset.json`, and `loss.png` as binary data). The claim is not mounted in
the operator, so this is how the page reaches it; the trainer's Role may get and patch this
one ConfigMap only. ConfigMaps hold at most 1 MiB: the comparison Job shortens long answers
to fit (the full ones stay in `artifacts/comparison.json` on the volume).
"""

from __future__ import annotations

from finetune_api.models import FineTuneJob

from finetune_operator import names
from finetune_operator.builders import object_meta

COMPONENT = "review"


def build_review_config_map(job: FineTuneJob) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": object_meta(job, names.review_config_map(job.metadata.name), COMPONENT),
            "data": {}}
