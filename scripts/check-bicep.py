#!/usr/bin/env python3
"""Checks gantry's Bicep without the Bicep CLI (not reachable here).

What it checks (docs/deploy.md, "What CI checks in infra/"):
  1. syntax: every infra/**/*.bicep parses with pycep-parser's Bicep grammar;
  2. modules: every `module x 'path'` names an existing file, passes only
     parameters that module declares and every parameter without a default;
  3. outputs: every `<module>.outputs.<name>` is an output of that module;
  4. types: every resource type carries an API version (`Type@yyyy-mm-dd`);
  5. main.parameters.json sets only parameters main.bicep declares and every
     one without a default.
What it does not: type checking of property values, resource schemas and API
versions against Azure, expression evaluation (`bicep build` / `az deployment
what-if` do that; see docs/deploy.md).
"""

import json
import pathlib
import re
import sys

from pycep import BicepParser

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


def parse(path, errors):
    try:
        return BicepParser().parse(file_path=path)
    except Exception as e:  # lark's errors carry line and column
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        errors.append(f"{path.relative_to(ROOT)}: syntax: {first}")
        return None


def module_body(module):
    """The `{ name, scope, params }` object of a module, under loops/conditions."""
    config = module.get("config", {})
    while isinstance(config, dict) and "config" in config and "params" not in config:
        config = config["config"]
    return config if isinstance(config, dict) else {}


def output_refs(node, module_names, found):
    """Every `<module>.outputs.<name>` in an expression tree."""
    if isinstance(node, dict):
        op = node.get("operator")
        if isinstance(op, dict) and op.get("type") == "property_accessor":
            operands = op.get("operands", {})
            first, second = operands.get("operand_1"), operands.get("operand_2")
            if isinstance(first, str) and first in module_names and isinstance(second, dict):
                inner = second.get("operator", {})
                if inner.get("type") == "property_accessor":
                    inner_ops = inner.get("operands", {})
                    if inner_ops.get("operand_1") == "outputs":
                        name = inner_ops.get("operand_2")
                        if isinstance(name, dict):  # outputs.x.y: the first name
                            name = name.get("operator", {}).get("operands", {}).get("operand_1")
                        if isinstance(name, str):
                            found.append((first, name))
        for value in node.values():
            output_refs(value, module_names, found)
    elif isinstance(node, list):
        for value in node:
            output_refs(value, module_names, found)


def main():
    errors = []
    files = sorted(INFRA.rglob("*.bicep"))
    if not files:
        print("no Bicep files under infra/", file=sys.stderr)
        return 1
    parsed = {path: parse(path, errors) for path in files}

    for path, tree in parsed.items():
        if tree is None:
            continue
        rel = path.relative_to(ROOT)
        text = path.read_text()
        for m in re.finditer(r"^\s*resource\s+\w+\s+'([^']+)'", text, re.M):
            if "@" not in m.group(1):
                errors.append(f"{rel}: resource type {m.group(1)} has no API version")
        modules = tree.get("modules", {}) or {}
        for symbol, module in modules.items():
            target = (path.parent / module.get("detail", {}).get("path", "")).resolve()
            if not target.is_file():
                errors.append(f"{rel}: module {symbol}: {target} does not exist")
                continue
            target_tree = parsed.get(target)
            if target_tree is None:
                continue  # its own syntax error is reported
            declared = target_tree.get("parameters", {}) or {}
            passed = module_body(module).get("params", {}) or {}
            if not isinstance(passed, dict):
                continue  # params from an expression: not checkable here
            for name in passed:
                if name not in declared:
                    errors.append(f"{rel}: module {symbol} passes {name}, which {target.name} does not declare")
            for name, spec in declared.items():
                if spec.get("default") is None and not str(spec.get("type", "")).endswith("?") and name not in passed:
                    errors.append(f"{rel}: module {symbol} does not pass required parameter {name} of {target.name}")
        refs = []
        output_refs(tree, set(modules), refs)
        for symbol, name in refs:
            target = (path.parent / modules[symbol].get("detail", {}).get("path", "")).resolve()
            target_tree = parsed.get(target)
            if target_tree is not None and name not in (target_tree.get("outputs", {}) or {}):
                errors.append(f"{rel}: {symbol}.outputs.{name} is not an output of {target.name}")

    main_bicep = INFRA / "main.bicep"
    params_file = INFRA / "main.parameters.json"
    if parsed.get(main_bicep) is not None and params_file.is_file():
        declared = parsed[main_bicep].get("parameters", {}) or {}
        given = json.loads(params_file.read_text()).get("parameters", {})
        for name in given:
            if name not in declared:
                errors.append(f"infra/main.parameters.json sets {name}, which main.bicep does not declare")
        for name, spec in declared.items():
            if spec.get("default") is None and not str(spec.get("type", "")).endswith("?") and name not in given:
                errors.append(f"infra/main.parameters.json does not set required parameter {name}")

    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"bicep check: {len(files)} files, {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
