"""Prometheus Operator objects checked against the operator's CRD schemas.

kubernetes-validate ships only the built-in kinds. cloudcoil-models-prometheus-operator
ships the operator's CRDs as pydantic models (types, enums, duration patterns); they ignore
unknown fields, so a field that does not survive the round trip is reported as unknown.
"""

from __future__ import annotations

from typing import Any

import pydantic
from cloudcoil.models.prometheus_operator import v1


def operator_schema_errors(doc: dict[str, Any]) -> list[str]:
    model = getattr(v1, doc["kind"], None)
    if model is None:
        return [f"no schema for monitoring.coreos.com {doc['kind']}"]
    try:
        parsed = model.model_validate(doc)
    except pydantic.ValidationError as e:
        return [str(error) for error in e.errors()]
    kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [] if kept == doc else [f"unknown or changed fields: {_difference(doc, kept)}"]


def _difference(given: Any, kept: Any, path: str = "") -> str:
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                return f"{path}.{key}"
            if value != kept[key]:
                return _difference(value, kept[key], f"{path}.{key}")
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (a, b) in enumerate(zip(given, kept, strict=True)):
            if a != b:
                return _difference(a, b, f"{path}[{i}]")
    return path or "."
