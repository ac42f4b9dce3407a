"""The quantize stage: one GGUF per type in export.quants, through llama.cpp's quantizer."""

from __future__ import annotations

import json
import os
from typing import Any

from forge.converters import quantize_gguf
from forge.pipeline import Stage, StageContext


class QuantizeStage(Stage):
    name = "quantize"
    version = 1
    needs = ("gguf",)
    config_keys = ("export.quants",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        export = ctx.config.export
        source = next(ctx.inputs["gguf"].glob("model-*.gguf"))
        nthread = export.nthread or os.cpu_count() or 1
        rows = []
        for qtype in export.quants:
            result = quantize_gguf(source, ctx.out / f"model-{qtype}.gguf", qtype, nthread)
            row = {
                "type": qtype,
                "file": result.path.name,
                "size": result.size_bytes,
                "bits_per_weight": result.bits_per_weight,
                "seconds": result.seconds,
                "tensor_types": result.tensor_types,
            }
            rows.append(row)
            ctx.log(
                f"  {qtype}: {row['size'] / 2**20:.0f} MiB, {row['bits_per_weight']:.2f} bpw, {row['seconds']:.1f}s"
            )
        (ctx.out / "quantize.json").write_text(json.dumps({"source": source.name, "files": rows}, indent=2))
        line = ", ".join(f"{r['type']} {r['size'] / 2**20:.0f} MiB" for r in rows)
        return {"files": rows, "line": line}
