"""What the generated models need at run time: camelCase parsing into dataclasses, a check of
a plain dict against a schema node (for files no API server has seen), and the hand-written
behaviour the generated classes inherit (`<ClassName>Behaviour`). Standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from finetune_api import layout
from finetune_api.schema import (
    ADAPTER_METHODS, API_VERSION, TRAINER_CONFIG, TRAINER_CONFIG_KIND, MethodType,
)
from finetune_api.sources import HTTPS, PVC, S3, VOLUME, parse_source

FREE_FORM = dict[str, Any]


class InvalidResource(ValueError):
    """The object or config does not have the shape the schema promises. For the trainer this is
    a permanent error: retrying cannot help (exit code PERMANENT)."""


def camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def snake(camel_name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel_name).lower()


# --- parsing ---------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None or tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InvalidResource(f"{path}: expected an object, got {type(value).__name__}")
        return parse(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise InvalidResource(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_parse_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # an int-or-string quantity such as memory: 64
    if tp in (str, int, bool) and not isinstance(value, tp):
        raise InvalidResource(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


_PLANS: dict[type, list[tuple[str, str, Any, bool]]] = {}


def _plan(cls: type) -> list[tuple[str, str, Any, bool]]:
    """(field, JSON key, type with Optional unwrapped, required) of each field of `cls`, worked
    out once per class: resolving the string annotations (typing.get_type_hints) on every
    parse was most of the operator's CPU time per FineTuneJob (15 ms a parse)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = [(f.name, f.metadata.get("json", camel(f.name)), _unwrap_optional(hints[f.name]),
                 f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
                for f in dataclasses.fields(cls)]
        _PLANS[cls] = plan
    return plan


def parse(cls: type, data: dict, path: str = "") -> Any:
    """Builds dataclass ``cls`` from a camelCase dict; absent fields take the dataclass default."""
    kwargs = {}
    for name, key, tp, required in _plan(cls):
        value = data.get(key)
        if value is not None:
            kwargs[name] = _parse_value(tp, value, f"{path}.{key}" if path else key)
        elif required:
            raise InvalidResource(f"{path}.{key} is required" if path else f"{key} is required")
    return cls(**kwargs)


def to_dict(value: Any) -> Any:
    """The camelCase dict of a model (fields that are None are left out)."""
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is not None:
                out[f.metadata.get("json", camel(f.name))] = to_dict(item)
        return out
    if isinstance(value, list):
        return [to_dict(v) for v in value]
    if isinstance(value, dict):
        return {k: to_dict(v) for k, v in value.items()}
    return value


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "array": (list,), "object": (dict,)}


def check(node: dict, value: Any, path: str) -> None:
    """Checks a plain dict against a schema node the way the API server would, short of CEL
    and patterns: unknown and missing fields, types, enums. For files no API server has seen
    (the trainer's config); each error names the field."""
    if value is None:
        return
    if node.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise InvalidResource(f"{path}: expected a string or an integer, got {value!r}")
        return
    kind = node.get("type")
    if kind is not None:
        allowed = _JSON_TYPES[kind]
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            raise InvalidResource(f"{path}: expected {kind}, got {value!r}")
    if "enum" in node and value not in node["enum"]:
        raise InvalidResource(f"{path}: {value!r} is not one of {', '.join(map(str, node['enum']))}")
    if kind == "array":
        for i, item in enumerate(value):
            check(node["items"], item, f"{path}[{i}]")
    elif kind == "object" and "properties" in node:
        for key, item in value.items():
            if key not in node["properties"]:
                raise InvalidResource(f"{path}.{key}: unknown field")
            check(node["properties"][key], item, f"{path}.{key}")
        for key in node.get("required", []):
            if value.get(key) is None:
                raise InvalidResource(f"{path}.{key} is required")


@dataclass(kw_only=True)
class Metadata:
    """The part of ObjectMeta the operator reads."""

    name: str
    namespace: Optional[str] = None
    uid: Optional[str] = None
    generation: Optional[int] = None
    resource_version: Optional[str] = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def _from_resource(cls: type, obj: dict) -> Any:
    if obj.get("kind", cls.KIND) != cls.KIND:
        raise InvalidResource(f"kind: expected {cls.KIND}, got {obj.get('kind')!r}")
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidResource(f"apiVersion: expected {API_VERSION}, got {obj.get('apiVersion')!r}")
    return parse(cls, {key: obj.get(key) for key in ("metadata", "spec", "status")})


# --- behaviour of generated classes (class <Name> inherits <Name>Behaviour) -------------------


class MethodBehaviour:
    type: str
    objective: str
    lora: Any
    quantization: Any
    dpo: Any

    def __post_init__(self) -> None:
        # The schema cannot default a block that exists only for some methods; fill it here
        # with the same defaults (see docs/api.md, "Defaults of optional blocks").
        self.validate("method")
        if self.type in ADAPTER_METHODS and self.lora is None:
            self.lora = _class("LoRA")()
        if self.type == MethodType.QLORA and self.quantization is None:
            self.quantization = _class("Quantization")()
        if self.objective == "dpo" and self.dpo is None:
            self.dpo = _class("Dpo")()

    def validate(self, where: str) -> None:
        """The schema's CEL rules on method, for configs no API server has checked."""
        if self.dpo is not None and self.objective != "dpo":
            raise InvalidResource(f"{where}.dpo: only allowed when {where}.objective is dpo")
        if self.lora is not None and self.type not in ADAPTER_METHODS:
            raise InvalidResource(f"{where}.lora: only allowed when {where}.type is lora or qlora")
        if self.quantization is not None and self.type != MethodType.QLORA:
            raise InvalidResource(f"{where}.quantization: only allowed when {where}.type is qlora")

    @property
    def uses_adapter(self) -> bool:
        return self.type in ADAPTER_METHODS


class FineTuneJobBehaviour:
    KIND: typing.ClassVar[str] = "FineTuneJob"
    status: Any

    @classmethod
    def from_resource(cls, obj: dict) -> Any:
        return _from_resource(cls, obj)

    @property
    def started(self) -> bool:
        """Training started: the spec is frozen except suspend, deploy, ttlSecondsAfterFinished."""
        return self.status.start_time is not None


class InferenceServiceBehaviour:
    KIND: typing.ClassVar[str] = "InferenceService"

    @classmethod
    def from_resource(cls, obj: dict) -> Any:
        return _from_resource(cls, obj)


class PathsConfigBehaviour:
    """Folders of the job volume (finetune_api.layout) under where it is mounted."""

    root: str
    job_folder: str

    def _under(self, relative: str) -> Path:
        """A folder of the job's own output (under job_folder)."""
        return Path(layout.under(layout.under(self.root, self.job_folder), relative))

    @property
    def checkpoints(self) -> Path:
        return self._under(layout.CHECKPOINTS)

    @property
    def artifacts(self) -> Path:
        return self._under(layout.ARTIFACTS)

    @property
    def reports(self) -> Path:
        return self._under(layout.REPORTS)

    @property
    def data_cache(self) -> Path:
        return self._under(layout.DATA_CACHE)

    @property
    def tracking(self) -> Path:
        return self._under(layout.TRACKING)

    @property
    def job_root(self) -> Path:
        """The top of the job's own output (the volume's top on a claim of its own)."""
        return self._under("")

    def resolve(self, location: str) -> str:
        """`pvc://<claim>/<path>` and `volume://<path>` name files on the job volume, and so do
        s3:// and https:// sources once downloaded (layout.remote_source); anything else is
        returned as it is."""
        source = parse_source(location)
        if source.scheme in (PVC, VOLUME):
            return layout.under(self.root, source.path)
        if source.scheme in (S3, HTTPS):
            return str(self._under(layout.remote_source(location)))
        return location


class TrainerConfigBehaviour:
    """`TrainerConfig.load(path)`, `from_dict(data)`, `to_dict()`: the file's camelCase form."""

    KIND: typing.ClassVar[str] = TRAINER_CONFIG_KIND

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        if not isinstance(data, dict):
            raise InvalidResource(f"config: expected an object, got {type(data).__name__}")
        data = dict(data)
        data.pop("apiVersion", None)
        kind = data.pop("kind", TRAINER_CONFIG_KIND)
        if kind != TRAINER_CONFIG_KIND:
            raise InvalidResource(f"kind: expected {TRAINER_CONFIG_KIND}, got {kind!r}")
        check(TRAINER_CONFIG, data, "config")
        return parse(cls, data, "config")

    @classmethod
    def load(cls, path: Any) -> Any:
        text = Path(path).read_text()
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            import yaml  # YAML for hand-written configs on a laptop (the trainer image has it)

            data = yaml.safe_load(text)
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": TRAINER_CONFIG_KIND, **to_dict(self)}


def _class(name: str) -> type:
    from finetune_api import models

    return getattr(models, name)
