"""Tool declarations as the TypeScript-style text K2.5/K2.6 were trained on (`tools_ts_str`).

Moonshot's tokenizer (`tokenization_kimi.py`) sorts the keys of the tool list recursively, turns each function's
JSON schema into a `type NAME = (_: {...}) => any;` declaration inside `namespace functions`, and passes the text to
the chat template as `tools_ts_str`; when a schema cannot be converted the template falls back to the compact
JSON of the (sorted) tools. This module writes the same text:

    # Tools

    ## functions
    namespace functions {
    // {function description}
    type get_weather = (_: {
      // {property description}
      city: string,
      unit?: "c" | "f"
    }) => any;
    }

Required properties come first, each group sorted by name; `?` marks optional ones; descriptions, constraints
(string maxLength/minLength/pattern, number maximum/minimum, array minItems/maxItems) and defaults become `//`
comments above the property; `$defs` become `interface` declarations and a `$ref` to `#` makes the parameters an
interface of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

INDENT = "  "
_UNION_NAMES = {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "null": "null",
                "object": "{}", "array": "Array<any>"}
_CONSTRAINTS = {"string": ("maxLength", "minLength", "pattern"), "number": ("maximum", "minimum"),
                "integer": ("maximum", "minimum"), "array": ("minItems", "maxItems")}


def deep_sort(obj: Any) -> Any:
    """`obj` with every dict's keys sorted (lists keep their order), as Moonshot's tokenizer sorts tools."""
    if isinstance(obj, dict):
        return {k: deep_sort(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [deep_sort(v) for v in obj]
    return obj


@dataclass
class _Node:
    kind: str                  # scalar, object, array, enum, any_of, union, ref
    value: Any                 # type name / (props, additional) / item / values / nodes / names / ref name
    description: str = ""
    constraints: dict = field(default_factory=dict)


@dataclass
class _Prop:
    name: str
    node: _Node
    optional: bool
    default: Any


class _Context:
    def __init__(self):
        self.defs: dict[str, Any] = {}
        self.self_ref = False


def _comment(text: str, indent: str = "") -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _parse(schema: Any, ctx: _Context) -> _Node:
    if isinstance(schema, bool):  # true: anything; false: nothing, written as null
        return _Node("scalar", "any" if schema else "null")
    if not isinstance(schema, dict):
        raise ValueError(f"not a JSON schema: {schema!r:.60}")
    desc = schema.get("description", "")
    if "$ref" in schema:
        ref = schema["$ref"]
        if ref == "#":
            ctx.self_ref = True
            return _Node("ref", "parameters", desc)
        if not (isinstance(ref, str) and ref.startswith("#/$defs/")) or ref.split("/")[-1] not in ctx.defs:
            raise ValueError(f"unsupported $ref {ref!r}")
        return _Node("ref", ref.split("/")[-1], desc)
    if "anyOf" in schema:
        return _Node("any_of", [_parse(s, ctx) for s in schema["anyOf"]], desc)
    if "enum" in schema:
        _check_enum(schema)
        return _Node("enum", schema["enum"], desc)
    if "type" in schema:
        typ = schema["type"]
        if isinstance(typ, list):
            return _Node("union", [_UNION_NAMES[t] for t in typ], desc)
        if typ == "object":
            return _object(schema, ctx)
        keys = _CONSTRAINTS.get(typ, ()) if isinstance(typ, str) else ()
        constraints = {k: v for k, v in schema.items() if k in keys}
        if typ == "array":
            item = _parse(schema["items"], ctx) if schema.get("items") else _Node("scalar", "any")
            return _Node("array", item, desc, constraints)
        return _Node("scalar", typ, desc, constraints)
    if schema == {}:
        return _Node("scalar", "any")
    raise ValueError(f"schema without type, enum, anyOf or $ref: {schema!r:.60}")


def _check_enum(schema: dict) -> None:
    typ = schema.get("type")
    if isinstance(typ, list):
        if len(typ) == 1 or (len(typ) == 2 and "null" in typ):
            typ = [t for t in typ if t != "null"][0] if len(typ) == 2 else typ[0]
        else:
            raise ValueError(f"enum type {typ} is not supported")
    kinds = {"string": str, "number": (int, float), "integer": int, "boolean": bool}
    for v in schema["enum"]:
        if v is not None and typ in kinds and not isinstance(v, kinds[typ]):
            raise ValueError(f"enum value {v!r} is not of type {typ}")


def _object(schema: dict, ctx: _Context) -> _Node:
    props, additional = [], None
    if schema:
        ctx.defs.update(schema.get("$defs") or {})
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            additional = _parse(additional, ctx)
        required = set(schema.get("required", []))
        for name, prop in (schema["properties"].items() if "properties" in schema else ()):
            props.append(_Prop(name, _parse(prop, ctx), name not in required,
                               prop.get("default") if isinstance(prop, dict) else None))
    return _Node("object", (props, additional), schema.get("description", "") if schema else "")


def _doc(node: _Node, indent: str) -> str:
    """The `//` comment lines written above a value of this type."""
    lines = [_comment(node.description, indent)] if node.description else []
    if node.constraints:
        lines.append(indent + "// " + ", ".join(f"{k}: {v}" for k, v in sorted(node.constraints.items())))
    return "".join(line + "\n" for line in lines)


def _prop(p: _Prop, indent: str) -> str:
    text = _doc(p.node, indent)
    if p.default is not None:
        shown = repr(p.default) if isinstance(p.default, (int, float, bool)) else json.dumps(p.default,
                                                                                            ensure_ascii=False)
        text += f"{indent}// Default: {shown}\n"
    return text + f"{indent}{p.name}{'?' if p.optional else ''}: {_ts(p.node, indent)}"


def _ts(node: _Node, indent: str = "") -> str:
    kind, value = node.kind, node.value
    if kind == "scalar":
        return "number" if value == "integer" else f"{value}"
    if kind == "object":
        props, additional = value
        ordered = sorted((p for p in props if not p.optional), key=lambda p: p.name) + \
            sorted((p for p in props if p.optional), key=lambda p: p.name)
        fields = [_prop(p, indent + INDENT) for p in ordered]
        if additional is not None:
            if additional is True or additional is False:
                shown = "any" if additional else "never"
            elif isinstance(additional, _Node):
                shown = _ts(additional, indent + INDENT)
            else:
                raise ValueError(f"unknown additionalProperties {additional!r}")
            fields.append(f"{indent + INDENT}[k: string]: {shown}")
        return "{\n" + ",\n".join(fields) + f"\n{indent}}}" if fields else "{}"
    if kind == "array":
        doc = _doc(value, indent + INDENT)
        if doc:
            return f"Array<\n{doc}{indent + INDENT}{_ts(value, indent + INDENT)}\n{indent}>"
        return f"Array<{_ts(value, indent)}>"
    if kind == "enum":
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value)
    if kind == "any_of":
        return " | ".join(_ts(n, indent) for n in value)
    if kind == "union":
        return " | ".join(value)
    return value  # ref


def _function(fn: dict) -> str:
    ctx = _Context()
    root = _object(fn.get("parameters") or {}, ctx)
    interfaces, self_ref = [], ctx.self_ref  # a `#` reached only from a $defs entry does not count
    if self_ref:  # the parameters refer to themselves: declare them as `interface parameters`
        body = ",\n".join(_prop(p, INDENT) for p in root.value[0])
        interfaces.append(f"interface parameters {{{f'{chr(10)}{body}{chr(10)}' if body else ''}}}")
    for name, schema in list(ctx.defs.items()):
        if not isinstance(schema, dict):
            raise ValueError(f"$defs entry {name!r} is not a schema")
        doc = _comment(schema["description"]) + "\n" if schema.get("description") else ""
        interfaces.append(f"{doc}interface {name} {_ts(_parse(schema, ctx))}")
    params = "parameters" if self_ref else _ts(root)
    desc = fn.get("description")
    parts = ["\n".join(interfaces), _comment(desc) if desc else "",
             f"type {fn.get('name', 'function')} = (_: {params}) => any;"]
    return "\n".join(p for p in parts if p)


def tools_ts_str(tools: list[dict] | None) -> str | None:
    """The TypeScript-style declaration of `tools` (sorted first, as Moonshot's tokenizer does), or None when
    there is nothing to declare or a schema cannot be converted: the template then writes compact JSON."""
    if not tools:
        return None
    try:
        functions = [_function(t["function"]) for t in deep_sort(tools)
                     if t.get("type") == "function" and t.get("function")]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    if not functions:
        return None
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
