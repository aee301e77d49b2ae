"""The configuration reference, docs/config.md, generated from the typed configs.

    .venv/bin/python -m parityrl.config_reference > docs/config.md

Every key of a run config (config.py `RunConfig`, through every nested section) and every option of
`parityrl doctor` (doctor/config.py `DoctorConfig`): dotted key, type, default, description. A
field without a description is an error here, so a new undocumented key fails
tests/test_config_reference.py instead of reaching the docs as a blank cell.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from pathlib import Path
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

from parityrl.config import RunConfig
from parityrl.engine.settings import BITWISE_KNOBS

REGENERATE = ".venv/bin/python -m parityrl.config_reference > docs/config.md"


@dataclass
class Row:
    key: str
    type: str
    default: str
    description: str


@dataclass
class Section:
    key: str  # dotted path of the section ("" for the top level)
    title: str
    description: str
    level: int
    rows: list[Row] = field(default_factory=list)
    note: str = ""


class UndocumentedField(ValueError):
    """A config field has no description: give it `Field(..., description=...)`."""


# ---------------------------------------------------------------- types, defaults, constraints


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _union_members(tp: Any) -> tuple | None:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(tp)
    return None


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """The models a field holds: [M] for M or M | None; the variants of a union of models."""
    tp = _strip_annotated(tp)
    if _is_model(tp):
        return [tp]
    members = _union_members(tp)
    if members is None:
        return []
    members = [_strip_annotated(m) for m in members if m is not type(None)]
    return members if members and all(_is_model(m) for m in members) else []


def _optional(tp: Any) -> bool:
    members = _union_members(_strip_annotated(tp))
    return members is not None and type(None) in members


def type_name(tp: Any) -> str:
    """A readable name for an annotation: `int`, `"a" | "b" | null`, `list[str]`, `section`."""
    tp = _strip_annotated(tp)
    if tp is type(None) or tp is None:
        return "null"
    if tp is typing.Any:
        return "any"
    if _is_model(tp):
        return "section"
    members = _union_members(tp)
    if members is not None:
        names = [type_name(m) for m in members]
        # A Literal member reads best first, null last.
        return " | ".join([n for n in names if n != "null"] + [n for n in names if n == "null"])
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(json.dumps(v) if isinstance(v, str) else _value(v)
                          for v in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    return getattr(tp, "__name__", str(tp))


def _constraints(info: FieldInfo) -> str:
    """The field's bounds, as `≥ 1, < 6`."""
    out = []
    for meta in info.metadata:
        for attr, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if isinstance(meta, getattr(annotated_types, attr.capitalize())) and bound is not None:
                out.append(f"{symbol} {_value(bound)}")
        if isinstance(meta, annotated_types.MinLen):
            out.append(f"at least {meta.min_length} item{'s' if meta.min_length != 1 else ''}")
        if isinstance(meta, annotated_types.MaxLen):
            out.append(f"at most {meta.max_length} items")
        pattern = getattr(meta, "pattern", None)
        if isinstance(pattern, str):
            out.append(f"matches `{pattern}`")
    return ", ".join(out)


def _value(value: Any) -> str:
    """A default as it would be written in YAML: null, true, 0.0001, [0.9, 0.99], {}, text."""
    value = to_jsonable_python(value)
    if isinstance(value, str):
        return value if value.strip() == value and value else json.dumps(value)
    return json.dumps(value, ensure_ascii=False)


_UNSET = object()


def _default(info: FieldInfo, owner: BaseModel | None, name: str) -> Any:
    """The value a config gets when it leaves the field out: the enclosing section's default
    instance decides (RunConfig.sampling's max_tokens is 16, SamplingConfig's own is 64)."""
    if owner is not None:
        return getattr(owner, name)
    if info.default is PydanticUndefined and info.default_factory is None:
        return _UNSET
    return info.get_default(call_default_factory=True)


# ---------------------------------------------------------------- walking the models


def _walk(model: type[BaseModel], prefix: str, instance: BaseModel | None, level: int,
          title: str, description: str, missing: list[str], note: str = "",
          flag: typing.Callable[[str, FieldInfo], str] | None = None) -> list[Section]:
    """`model`'s section (its plain keys) followed by a section for each nested model."""
    here = Section(prefix, title, description, level, note=note)
    below: list[Section] = []
    child = min(level + 1, 4) if prefix else level  # the top level's sections are its peers
    for name, info in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        shown = flag(name, info) if flag is not None and not prefix else key
        if not (info.description or "").strip():
            missing.append(f"{model.__module__}.{model.__qualname__}.{name} ({key})")
        value = _default(info, instance, name)
        models = _models_in(info.annotation)
        if len(models) > 1:  # a union of sections told apart by a discriminator (task)
            below.extend(_variants(key, info, models, value, child, missing))
            continue
        if models:
            sub_instance = value if isinstance(value, BaseModel) else None
            if _optional(info.annotation) or not isinstance(value, BaseModel):
                # A section that may be absent: a row for its null, a section for its keys.
                here.rows.append(Row(f"`{shown}`", f"`{type_name(info.annotation)}`",
                                     _default_cell(value), info.description or ""))
            # An optional section's row says what it is for; its heading, what it holds.
            about = (models[0].__doc__ or "").strip() if _optional(info.annotation) else ""
            below.extend(_walk(models[0], key, sub_instance, child, key,
                               about or info.description or "", missing))
            continue
        typ = f"`{type_name(info.annotation)}`"
        bounds = _constraints(info)
        here.rows.append(Row(f"`{shown}`", f"{typ}, {bounds}" if bounds else typ,
                             _default_cell(value), info.description or ""))
    return [here] + below


def _default_cell(value: Any) -> str:
    if value is _UNSET:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{_value(value)}`"


def _variants(key: str, info: FieldInfo, models: list[type[BaseModel]], default: Any,
              level: int, missing: list[str]) -> list[Section]:
    tag = info.discriminator if isinstance(info.discriminator, str) else "type"
    default_tag = getattr(default, tag, None) if isinstance(default, BaseModel) else None
    intro = Section(key, key, info.description or "", level, note=(
        f"One of {len(models)} kinds, chosen by `{key}.{tag}`"
        + (f" (default: {default_tag})" if default_tag else "") + "; each kind has its own keys. "
        f"Changing `{key}.{tag}` on the command line starts that kind's section afresh."))
    out = [intro]
    for variant in models:
        name = typing.get_args(_strip_annotated(variant.model_fields[tag].annotation))[0]
        instance = default if type(default) is variant else None
        out.extend(_walk(variant, key, instance, min(level + 1, 4),
                         f"{key} ({tag}: {name})", (variant.__doc__ or "").strip(), missing))
    return out


# ---------------------------------------------------------------- Markdown


# A module named from its package in a description (trainer/lora.py): named from src/ in the docs.
_SUBPACKAGES = sorted(p.parent.name for p in Path(__file__).parent.glob("*/__init__.py"))
_PACKAGE_PATH = re.compile(rf"(?<![\w/.])((?:{'|'.join(_SUBPACKAGES)})/\w+\.py)")


def _escape(text: str) -> str:
    """Table-cell text: one line, `|` escaped; outside `code`, what Markdown would read as an
    HTML tag (<name>) or emphasis (*) escaped too."""
    text = _PACKAGE_PATH.sub(r"parityrl/\1", " ".join(text.split()))
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i]).replace("*", r"\*")
    return "`".join(parts).replace("|", r"\|")


def _table(rows: list[Row], first: str = "Key") -> list[str]:
    out = [f"| {first} | Type | Default | Description |", "|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(_escape(c) for c in (r.key, r.type, r.default,
                                                           r.description)) + " |")
    return out


def _markdown(sections: list[Section], first: str = "Key") -> list[str]:
    out: list[str] = []
    for s in sections:
        out += ["", f"{'#' * s.level} {s.title}"]
        if s.description:
            out += ["", _escape(s.description).replace(r"\|", "|")]
        if s.note:
            out += ["", s.note]
        if s.rows:
            out += [""] + _table(s.rows, first)
    return out


# ---------------------------------------------------------------- the document


def run_config_sections(missing: list[str]) -> list[Section]:
    return _walk(RunConfig, "", None, 2, "Top-level keys",
                 "The run's own keys; every other key lives in a section below.", missing)


def doctor_config() -> type[BaseModel] | None:
    """doctor/config.py's DoctorConfig, where it exists."""
    if importlib.util.find_spec("parityrl.doctor.config") is None:
        return None
    model = getattr(importlib.import_module("parityrl.doctor.config"), "DoctorConfig", None)
    if model is None:
        return None
    if not _is_model(model):
        raise TypeError("parityrl.doctor.config.DoctorConfig is not a pydantic model: the "
                        "reference documents its fields")
    return model


# Doctor options whose flag is not the field's name with `-` for `_` (cli.py `doctor`).
_DOCTOR_FLAGS = {"json_out": "--json"}


def _doctor_flag(name: str, info: FieldInfo) -> str:
    """The command-line flag of a DoctorConfig field: `json_schema_extra={"flag": ...}` where the
    field names one, else the field's name as a flag; an optional bool is a --x/--no-x pair."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag = extra.get("flag") or info.alias or _DOCTOR_FLAGS.get(name)
    if isinstance(flag, str):
        return flag if flag.startswith("-") else f"--{flag}"
    flag = "--" + name.replace("_", "-")
    if info.annotation == bool | None:
        return f"{flag} / --no-{name.replace('_', '-')}"
    return flag


def doctor_sections(missing: list[str]) -> list[Section]:
    model = doctor_config()
    if model is None:
        return []
    sections = _walk(model, "", None, 2, "Doctor options",
                     (model.__doc__ or "").strip() or "The options of `parityrl doctor`.",
                     missing, note="`parityrl doctor --help` prints the same list.",
                     flag=_doctor_flag)
    for s in sections[1:]:  # nested sections sit under the doctor's own heading
        s.level = min(s.level + 1, 4)
    return sections


def _count(sections: list[Section]) -> int:
    return sum(len(s.rows) for s in sections)


def render() -> str:
    """docs/config.md. Raises UndocumentedField when a field has no description."""
    missing: list[str] = []
    run = run_config_sections(missing)
    doctor = doctor_sections(missing)
    if missing:
        raise UndocumentedField(
            "config fields without a description (give each `Field(..., description=...)`): "
            + "; ".join(missing))
    bitwise = ", ".join(f"`engine.{k}={_value(v)}`" for k, v in BITWISE_KNOBS.items())
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the typed configs by src/parityrl/config_reference.py: do not edit.",
        f"     Regenerate with: {REGENERATE}",
        "     tests/test_config_reference.py fails when this file is stale. -->",
        "",
        f"Generated from the typed configs (src/parityrl/config_reference.py); regenerate with "
        f"`{REGENERATE}`.",
        "",
        "A run config is YAML (`parityrl train CONFIG.yaml`); any key can be overridden on the "
        "command line as a dotted `key.sub=value` (the value is read as YAML). Defaults < YAML < "
        "overrides; an unknown key or a wrong type is refused when the config is loaded. "
        f"{_count(run)} run-config keys"
        + (f" and {_count(doctor)} doctor options" if doctor else "") + " below.",
        "",
        "The defaults are what a config gets when it leaves a key out. Loading the config then "
        "resolves a few keys from others, and the run directory's config.yaml records the "
        "result:",
        "",
        f"- `parity.mode=bitwise` sets {bitwise} (a config that sets one otherwise is refused).",
        "- `cluster.engines` > 1 or `cluster.backend=ray` (without `trainer.lora`) sets "
        "`engine.weight_transport=gloo`.",
        "- `trainer.lora` sets `engine.max_lora_rank` to the smallest rank vLLM allows that holds "
        "`trainer.lora.rank`, unless the config sets a larger one.",
        "- `trainer.optim.loss_scale.mode=auto` becomes `dynamic` for `dtype=float16`, `off` "
        "otherwise.",
    ]
    lines += _markdown(run)
    if doctor:
        lines += _markdown(doctor, first="Option")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.stdout.write(render())
