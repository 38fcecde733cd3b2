"""Pydantic plumbing every section of the `"fuyou"` block shares: sizes, and errors a user can act on.

Pydantic reports what is wrong in its own words and locations (`('io', 'queue_depth')`, "Input should be greater
than or equal to 1"). Users edit JSON, so each problem is turned into a FuyouConfigError with the JSON path
(`fuyou.io.queue_depth`), the value, the reason and a fix: a did-you-mean for a misspelt key, the allowed choices,
the bound, or the example the field declares. Every problem of one config is reported at once.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError

from deepspeed_fuyou.config.sizes import parse_size
from deepspeed_fuyou.errors import FuyouConfigError


def _size(value: Any) -> int:
    try:
        return parse_size(value, "")
    except FuyouConfigError as err:
        raise invalid(err.reason, err.fix) from None


def _size_or_auto(value: Any) -> int | None:
    return None if value == "auto" else _size(value)


Size = Annotated[int, BeforeValidator(_size)]
"""Bytes, written as an integer or a string with a unit ("8GiB", "512MB")."""
SizeOrAuto = Annotated[int | None, BeforeValidator(_size_or_auto)]
"""A size, or "auto" (None): detected at run time."""


def invalid(reason: str, fix: str) -> PydanticCustomError:
    """The error a validator raises: `reason` and `fix` reach the user unchanged."""
    return PydanticCustomError("fuyou", reason, {"fix": fix})


class FuyouModel(BaseModel):
    """A section of the block: immutable (so hashable), unknown keys rejected, errors as FuyouConfigError."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    json_path: ClassVar[str] = "fuyou"
    """Where this section sits in the DeepSpeed config, for the field names in errors."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise config_error(err, type(self), self.json_path) from None

    @classmethod
    def parse(cls, data: Any) -> FuyouModel:
        """Validates raw JSON data, raising one FuyouConfigError that lists every problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise config_error(err, cls, cls.json_path) from None


def config_error(err: ValidationError, model: type[BaseModel], json_path: str) -> FuyouConfigError:
    by_field: dict[str, FuyouConfigError] = {}
    for detail in err.errors():
        for problem in _problems(detail, model, json_path):
            by_field.setdefault(problem.field, problem)
    return FuyouConfigError.combine(list(by_field.values()))


def _problems(detail: ErrorDetails, model: type[BaseModel], json_path: str) -> list[FuyouConfigError]:
    nested = (detail.get("ctx") or {}).get("error")
    if isinstance(nested, FuyouConfigError):  # a section's own __init__ already named its fields
        return nested.problems
    return [_problem(detail, model, json_path)]


def _problem(detail: ErrorDetails, model: type[BaseModel], json_path: str) -> FuyouConfigError:
    loc = list(detail["loc"])
    field = json_path + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
    owner, info = _field_at(model, loc)
    value = detail.get("input")
    ctx = detail.get("ctx") or {}
    kind = detail["type"]
    if kind == "extra_forbidden":
        known = list(json_keys(owner)) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return FuyouConfigError(field, value, "unknown key", fix)
    if kind == "missing":
        return FuyouConfigError(field, None, "required", f"set it, e.g. {_example(info)}")
    reason = detail["msg"][0].lower() + detail["msg"][1:]
    if "fix" in ctx:
        fix = ctx["fix"]
    elif kind == "literal_error":
        fix = f"use one of {ctx['expected']}"
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        fix = f"use a value in range, e.g. {_example(info)}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        fix = f"write {field} as a JSON object {{...}}"
    else:
        fix = f"write it as e.g. {_example(info)}"
    return FuyouConfigError(field, value, reason, fix)


def json_keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The keys a section accepts in JSON (a field's alias where it has one) and their fields."""
    return {info.alias or name: info for name, info in model.model_fields.items()}


def size_field(info: FieldInfo) -> bool:
    """Whether the field takes a size (`Size` or `SizeOrAuto`)."""
    return any(getattr(meta, "func", None) in (_size, _size_or_auto) for meta in info.metadata)


def _field_at(model: type[BaseModel], loc: list[str | int]) -> tuple[type[BaseModel] | None, FieldInfo | None]:
    """The section that owns the last key of `loc`, and that key's field (None when the key is unknown)."""
    keys = [part for part in loc if isinstance(part, str)]
    owner: type[BaseModel] | None = model
    for depth, key in enumerate(keys):
        info = json_keys(owner).get(key) if owner is not None else None
        if info is None:
            return owner, None
        if depth == len(keys) - 1:
            return owner, info
        nested = info.annotation
        owner = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    return owner, None


def _example(info: FieldInfo | None) -> str:
    if info is not None and info.examples:
        return repr(info.examples[0])
    if info is not None and info.default is not None and not callable(info.default):
        return repr(info.default)
    return "the value from the docs (README, 'The fuyou block')"
