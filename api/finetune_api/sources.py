"""The one parser of source locations (models, datasets, adapters, push targets).

    parse_source("pvc://datasets/support.jsonl")  # Source(scheme="pvc", authority="datasets", path="support.jsonl")
    parse_source("meta-llama/Llama-3.1-8B")       # Source(scheme="hf", authority="", path="meta-llama/Llama-3.1-8B")

The schema's CEL rules (MODEL_SOURCE, PUSH_URI in `schema`) decide what admission accepts;
this parser tells the forms apart once they are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

PVC, HF, S3, HTTPS, VOLUME, PATH = "pvc", "hf", "s3", "https", "volume", "path"
_SCHEMES = (PVC, HF, S3, HTTPS, VOLUME)


@dataclass(frozen=True)
class Source:
    """scheme: pvc | hf | s3 | https | volume | path. authority: the claim, the bucket or the
    host ("" for hf ids, volume:// and paths). path: what follows, without a leading '/'
    (for `path` sources the absolute or relative path as given; for hf the repository id)."""

    scheme: str
    authority: str
    path: str

    @property
    def is_hub(self) -> bool:
        return self.scheme == HF

    def __str__(self) -> str:
        if self.scheme == PATH:
            return self.path
        if self.scheme in (HF, VOLUME):
            return f"{self.scheme}://{self.path}"
        return f"{self.scheme}://{self.authority}/{self.path}" if self.path else \
            f"{self.scheme}://{self.authority}"


def parse_source(location: str) -> Source:
    """Splits a location into its parts; bare `org/name` ids are Hugging Face ids, anything
    starting with '/' or '.' is a local path."""
    for scheme in _SCHEMES:
        prefix = f"{scheme}://"
        if location.startswith(prefix):
            rest = location[len(prefix):]
            if scheme in (HF, VOLUME):
                return Source(scheme, "", rest.strip("/"))
            authority, _, path = rest.partition("/")
            return Source(scheme, authority, path.strip("/"))
    if location.startswith(("/", ".")) or "://" in location:
        return Source(PATH, "", location)
    return Source(HF, "", location.strip("/"))


def hub_id(location: str) -> str | None:
    """The Hugging Face repository id of `org/name` or `hf://org/name`; None for other forms."""
    source = parse_source(location)
    return source.path if source.is_hub else None
