"""The ollama stage: a checked Modelfile for every GGUF; `ollama create` + a smoke prompt when Ollama is here."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

from forge.config import ConfigError
from forge.modelfiles import modelfile_for_gguf, read_gguf_chat_info
from forge.pipeline import Stage, StageContext

SMOKE_PROMPT = "Say hello in one short sentence."


class OllamaStage(Stage):
    name = "ollama"
    version = 1
    needs = ("quantize", "eval")
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


def _create_and_smoke(ctx: StageContext, command: list[str], model_name: str) -> dict[str, str]:
    # `ollama create` reads the Modelfile from its final place, which exists only after this stage: write a copy
    staged = ctx.out / "create.Modelfile"
    final_text = (ctx.out / command[-1].rsplit("/", 1)[-1]).read_text(encoding="utf-8")
    staged.write_text(final_text.replace("FROM ../quantize/", f"FROM {ctx.loaded.run_dir / 'quantize'}/"))
    created = subprocess.run([*command[:-1], str(staged)], capture_output=True, text=True, timeout=1800)
    staged.unlink()
    if created.returncode != 0:
        raise RuntimeError(f"ollama create failed: {created.stderr.strip().splitlines()[-1:]}")
    reply = subprocess.run(["ollama", "run", model_name, SMOKE_PROMPT], capture_output=True, text=True, timeout=600)
    if reply.returncode != 0 or not reply.stdout.strip():
        raise RuntimeError(f"ollama run {model_name} gave no answer: {reply.stderr.strip()[:200]}")
    ctx.log(f"  ollama run {model_name}: {reply.stdout.strip()[:120]}")
    return {"smoke_prompt": SMOKE_PROMPT, "reply": reply.stdout.strip()}
