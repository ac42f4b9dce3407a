"""The ollama stage: a checked Modelfile for every GGUF; `ollama create` + a smoke prompt when Ollama is here.

With ollama.mode adapter it also writes `adapter.Modelfile` (FROM the base GGUF, ADAPTER the LoRA GGUF of the
gguf stage), which `ollama create` then uses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from forge.config import ConfigError
from forge.modelfiles import modelfile_for_gguf, parse_modelfile, read_gguf_chat_info, render_modelfile
from forge.pipeline import Stage, StageContext

SMOKE_PROMPT = "Say hello in one short sentence."
ADAPTER_MODELFILE = "adapter.Modelfile"


class OllamaStage(Stage):
    name = "ollama"
    version = 2  # 2: ollama.mode adapter (reads the gguf stage's adapter and base GGUFs)
    needs = ("gguf", "quantize", "eval")
    config_keys = ("ollama", "run.name", "data.system_prompt")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.ollama
        quantized = json.loads((ctx.inputs["quantize"] / "quantize.json").read_text())["files"]
        info = read_gguf_chat_info(ctx.inputs["quantize"] / quantized[0]["file"])
        system = cfg.system or ctx.config.data.system_prompt
        written = []
        for row in quantized:
            # the Modelfile lives in runs/<run>/ollama/, the GGUF in runs/<run>/quantize/
            built = modelfile_for_gguf(
                ctx.inputs["quantize"] / row["file"],
                model=f"../quantize/{row['file']}",
                system=system,
                parameters=cfg.parameters,
                license=cfg.license,
                template=cfg.template,
                info=info,
            )
            name = f"{row['type']}.Modelfile"
            (ctx.out / name).write_text(built.text, encoding="utf-8")
            written.append({"type": row["type"], "modelfile": name, "gguf": row["file"]})
        if cfg.mode == "adapter":
            written.append(_adapter_modelfile(ctx, system))
            chosen = written[-1]
        else:
            chosen = next((w for w in written if w["type"] == cfg.quant), None)
        if chosen is None:
            made = ", ".join(w["type"] for w in written)
            raise ConfigError(f"ollama.quant '{cfg.quant}' is not among export.quants ({made})")
        model_name = cfg.name or ctx.config.run.name
        modelfile_path = ctx.loaded.run_dir / self.name / chosen["modelfile"]
        command = ["ollama", "create", model_name, "-f", str(modelfile_path)]
        facts: dict[str, Any] = {"model": model_name, "modelfiles": written, "command": " ".join(command)}
        if shutil.which("ollama"):
            facts["created"] = _create_and_smoke(ctx, command, model_name)
        else:
            ctx.log(f"  Ollama is not installed here; to load the model run:\n    {facts['command']}")
        (ctx.out / "ollama.json").write_text(json.dumps(facts, indent=2))
        return {**facts, "line": f"{len(written)} Modelfiles; {facts['command']}"}


def _adapter_modelfile(ctx: StageContext, system: str | None) -> dict[str, str]:
    """adapter.Modelfile: FROM the base GGUF, ADAPTER the LoRA GGUF (both in runs/<run>/gguf/)."""
    cfg = ctx.config.ollama
    files = json.loads((ctx.inputs["gguf"] / "gguf.json").read_text()).get("adapter_mode")
    if not files:
        raise ConfigError(f"{ctx.inputs['gguf'] / 'gguf.json'}: no adapter GGUF; rerun the gguf stage (--force gguf)")
    base = ctx.inputs["gguf"] / files["base"]
    built = modelfile_for_gguf(
        base,
        model=f"../gguf/{files['base']}",
        adapter=f"../gguf/{files['adapter']}",
        system=system,
        parameters=cfg.parameters,
        license=cfg.license,
        template=cfg.template,
    )
    (ctx.out / ADAPTER_MODELFILE).write_text(built.text, encoding="utf-8")
    return {"type": "adapter", "modelfile": ADAPTER_MODELFILE, "gguf": files["base"], "adapter": files["adapter"]}


def _with_absolute_paths(text: str, run_dir: Path) -> str:
    """The Modelfile with its ../<stage>/ paths made absolute (for `ollama create` before the folder is in place)."""
    mf = parse_modelfile(text)

    def absolute(path: str | None) -> str | None:
        return str(run_dir / path.removeprefix("../")) if path and path.startswith("../") else path

    return render_modelfile(dataclasses.replace(mf, model=absolute(mf.model), adapter=absolute(mf.adapter)))


def _create_and_smoke(ctx: StageContext, command: list[str], model_name: str) -> dict[str, str]:
    # `ollama create` reads the Modelfile from its final place, which exists only after this stage: write a copy
    staged = ctx.out / "create.Modelfile"
    final_text = (ctx.out / command[-1].rsplit("/", 1)[-1]).read_text(encoding="utf-8")
    staged.write_text(_with_absolute_paths(final_text, ctx.loaded.run_dir), encoding="utf-8")
    created = subprocess.run([*command[:-1], str(staged)], capture_output=True, text=True, timeout=1800)
    staged.unlink()
    if created.returncode != 0:
        raise RuntimeError(f"ollama create failed: {created.stderr.strip().splitlines()[-1:]}")
    reply = subprocess.run(["ollama", "run", model_name, SMOKE_PROMPT], capture_output=True, text=True, timeout=600)
    if reply.returncode != 0 or not reply.stdout.strip():
        raise RuntimeError(f"ollama run {model_name} gave no answer: {reply.stderr.strip()[:200]}")
    ctx.log(f"  ollama run {model_name}: {reply.stdout.strip()[:120]}")
    return {"smoke_prompt": SMOKE_PROMPT, "reply": reply.stdout.strip()}
