"""The base stage: resolve base.model and write it as a normalized HF folder (`model/`) plus `base.json`."""

from __future__ import annotations

import json
from typing import Any

from forge.config import LoadedConfig
from forge.models.normalize import normalize_base
from forge.models.resolve import identity_digest, resolve_base
from forge.pipeline import Stage, StageContext
from forge.provenance import base_record


def _resolved(loaded: LoadedConfig):
    base = loaded.config.base
    return resolve_base(base.model, base.revision, loaded.root)


class BaseStage(Stage):
    name = "base"
    version = 2  # 2: base.json records the source files' sha256, Hub id and commit
    config_keys = ("base",)

    def external_inputs(self, loaded: LoadedConfig) -> dict[str, str]:
        return {"base.model files": identity_digest(_resolved(loaded))}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        base = ctx.config.base
        resolved = _resolved(ctx.loaded)
        ctx.log(f"  base: {resolved.ref} ({resolved.kind}: {resolved.path})")
        facts = normalize_base(resolved, ctx.out / "model", base.dtype, base.trust_remote_code)
        source = {
            "ref": resolved.ref,
            "kind": resolved.kind,
            "path": str(resolved.path),
            "revision": resolved.revision,
            **facts,
            **base_record(resolved),
        }
        ctx.log(f"  source files: {len(source['files'])}, sha256 {source['sha256'][:16]}")
        (ctx.out / "base.json").write_text(json.dumps(source, indent=2))
        size_mb = facts["weights_bytes"] / 2**20
        return {
            **{k: v for k, v in source.items() if k != "files"},
            "line": f"{facts['architecture']} {facts['dtype']}, {size_mb:.0f} MiB ({facts['how']})",
        }
