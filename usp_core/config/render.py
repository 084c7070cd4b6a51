"""Render ``config/config.toml`` and the README's config reference from the schema."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomlkit

from usp_core.config.schema import ALL_FIELDS, SECTIONS

_SECTION_DOCS = {
    "core": "Predictor core: dtype, seed, window length, interval level.",
    "orchestration": "Fusion (Sinkhorn + JKO), CUSUM, adaptive layer and operating modes (SPEC 3.5-3.9).",
    "gate": "Ingestion gate (SPEC 3.7): outliers, staleness, gaps, frozen signal.",
    "kernels": "The four forecasting kernels (SPEC 3.4).",
    "validation": "Numerical validation tolerances.",
    "backtest": "Walk-forward evaluation (SPEC 4).",
    "promotion": "Champion/challenger promotion gate (SPEC 6).",
    "mutation_policy": "Guards of the config mutation (SPEC 6). Locked keys are never changed by promotion.",
    "audit": "Audit trail of config mutations (SPEC 6).",
    "meta_optimization": "Optuna campaigns (SPEC 5): control keys and the search range of every tunable field.",
}


def render_toml(values: Mapping[str, Any] | None = None) -> str:
    """A commented TOML document holding ``values`` (``section.name -> value``; schema defaults if None)."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment("USP configuration. Generated from usp_core/config/schema.py; promotion rewrites"))
    doc.add(tomlkit.comment("values in place (comments and order survive). Every key is required."))
    for section in SECTIONS:
        table = tomlkit.table()
        table.comment(_SECTION_DOCS.get(section, ""))
        for f in (f for f in ALL_FIELDS if f.section == section):
            value = f.default if values is None else values[f.key]
            item = tomlkit.item(list(value) if f.kind == "list" else value)
            tags = [f.describe_range()]
            if f.static:
                tags.append("static")
            if f.locked:
                tags.append("locked")
            if f.tunable:
                tags.append(f"tier={f.tier}")
            if section != "meta_optimization":
                item.comment(f"{f.doc} {'; '.join(tags)}")
            table.add(f.name, item)
        doc.add(tomlkit.nl())
        doc.add(section, table)
    return tomlkit.dumps(doc)


def config_reference_markdown() -> str:
    """The README's config reference table."""
    rows = ["| key | type | default | range | static | locked | tier | meaning |", "|---|---|---|---|---|---|---|---|"]
    for f in ALL_FIELDS:
        if f.section == "meta_optimization" and f.name.rsplit("_", 1)[-1] in ("min", "max", "step") and f.name not in (
                "n_trials",):
            continue
        rows.append(
            f"| `{f.key}` | {f.kind} | `{f.default!r}` | {f.describe_range()} | {'yes' if f.static else ''} | "
            f"{'yes' if f.locked else ''} | {f.tier if f.tunable else ''} | {f.doc} |"
        )
    rows.append("")
    rows.append("Every tunable field `x` also has `meta_optimization.x_min` / `x_max` (and `x_step` for stepped "
                "integers): its Optuna search range, which must lie inside the field's range.")
    return "\n".join(rows)


README_START = "<!-- config-reference:start -->"
README_END = "<!-- config-reference:end -->"


def update_readme(path: str) -> bool:
    """Rewrite the config reference between the README markers; True if the file changed."""
    from pathlib import Path

    readme = Path(path)
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(README_START)
    _, _, tail = rest.partition(README_END)
    new = f"{head}{README_START}\n{config_reference_markdown()}\n{README_END}{tail}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Render config/config.toml (stdout) or the README reference.")
    parser.add_argument("--readme", help="update the config reference block of this README instead")
    args = parser.parse_args()
    if args.readme:
        update_readme(args.readme)
    else:
        sys.stdout.write(render_toml())
