"""The push stage: the run's GGUFs, Modelfiles, adapter (and merged model) plus a model card, to the Hub.

Generated files (README.md, the repository's Modelfiles, Ollama's `template`/`system`/`params`) are written
to `repo/` in the stage's output; the big files are uploaded straight from the upstream stages' folders.
`push.json` records the repository, revision, commit and every file with its size, sha256 and status.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forge.config import LoadedConfig
from forge.hub import (
    AdapterFiles,
    CardFacts,
    GGUFEntry,
    HubError,
    UploadFile,
    check_repo_id,
    human_size,
    listing,
    modelfile_for_repo,
    ollama_hub_files,
    push_files,
    render_model_card,
    upload_file,
)
from forge.pipeline import MANIFEST, Stage, StageContext
from forge.provenance import CARD_KEYS, base_hub_id, card_rows, read_gguf_strings

GENERATED = "repo"  # folder of the stage output that holds the generated files
ADAPTER_MODELFILE = "adapter.Modelfile"  # the ollama stage's Modelfile of ollama.mode adapter
# ollama.mode adapter's files in the repository: one folder, names without a quantization type, so that Ollama's
# `hf.co/<repo>:<QUANT>` tags keep resolving to the merged GGUFs only
ADAPTER_DIR, ADAPTER_NAMES = "ollama-adapter", {"adapter": "adapter.gguf", "base": "base.gguf"}
IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


@dataclass
class PushPlan:
    """The files of one push (repository path, local file, digest), what was left out and why, the card."""

    files: list[UploadFile] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # repo path -> "<stage>/<path>" it comes from
    skipped: dict[str, str] = field(default_factory=dict)
    card: CardFacts | None = None

    def add(self, path: str, local: Path, source: str, sha256: str | None = None) -> None:
        self.files.append(upload_file(path, local, sha256))
        self.sources[path] = source


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubError(f"{path}: missing (the output of the '{path.parent.name}' stage)") from None
    except ValueError as exc:
        raise HubError(f"{path}: not valid JSON ({exc})") from None


def _digests(stage_dir: Path) -> dict[str, str]:
    """sha256 of the files an upstream manifest lists, keyed by path (only those whose size still matches)."""
    try:
        rows = json.loads((stage_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {
        r["path"]: r["sha256"]
        for r in rows
        if "sha256" in r
        and (stage_dir / r["path"]).is_file()
        and (stage_dir / r["path"]).stat().st_size == r["size"]
    }


def _add_folder(plan: PushPlan, folder: Path, prefix: str, stage_dir: Path) -> None:
    digests = _digests(stage_dir)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(stage_dir).as_posix()
        plan.add(
            f"{prefix}/{path.relative_to(folder).as_posix()}",
            path,
            f"{stage_dir.name}/{rel}",
            digests.get(rel),
        )


def _write(out: Path, name: str, text: str) -> Path:
    path = out / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def plan_push(loaded: LoadedConfig, inputs: dict[str, Path], out: Path, repo: str) -> PushPlan:
    """Gather what push.what asks for from the upstream folders; write the generated files into `out`."""
    cfg = loaded.config
    what = set(cfg.push.what)
    if "modelfile" in what and "gguf" not in what:
        raise HubError("push.what: 'modelfile' needs 'gguf' too (the Modelfiles point at the uploaded GGUFs)")
    plan = PushPlan()
    name = re.sub(r"[-_.]gguf$", "", repo.split("/")[1], flags=re.I)
    ggufs = _gguf_entries(inputs["quantize"], name)
    facts = _card_facts(loaded, inputs, repo)
    first_gguf = next(iter(ggufs.values()))[1]  # every quant carries the gguf stage's provenance keys
    facts.provenance, facts.train_config = card_rows(read_gguf_strings(first_gguf, prefixes=CARD_KEYS))
    if "gguf" in what:
        digests = _digests(inputs["quantize"])
        for entry, local in ggufs.values():
            plan.add(entry.path, local, f"quantize/{local.name}", digests.get(local.name))
        facts.ggufs = [entry for entry, _ in ggufs.values()]
        facts.ollama_quant = ggufs[cfg.ollama.quant][0].quant if cfg.ollama.quant in ggufs else None
    if "modelfile" in what:
        facts.modelfiles = _add_modelfiles(plan, inputs["ollama"], ggufs, cfg.ollama.quant, out)
    if "gguf" in what and cfg.ollama.mode == "adapter":
        facts.adapter_mode = _add_adapter_mode(plan, inputs["gguf"], inputs["ollama"], out, "modelfile" in what)
    if "adapter" in what:
        adapter = inputs["train"] / "adapter"
        if adapter.is_dir():
            _add_folder(plan, adapter, "adapter", inputs["train"])
            facts.adapter = "adapter"
        elif cfg.train.method == "full":
            plan.skipped["adapter"] = "train.method is full: there is no adapter"
        else:
            raise HubError(f"{adapter}: missing (the train stage's adapter folder)")
    if "merged" in what:
        merged = inputs["merge"] / "model"
        if not merged.is_dir():
            raise HubError(f"{merged}: missing (the merge stage's model folder)")
        _add_folder(plan, merged, "merged", inputs["merge"])
        facts.merged = "merged"
    facts.eval_report = _eval_report(plan, inputs["eval"])
    readme = _write(out, "README.md", render_model_card(facts))
    plan.add("README.md", readme, f"push/{GENERATED}/README.md")
    plan.card = facts
    return plan


def _gguf_entries(quantize: Path, name: str) -> dict[str, tuple[GGUFEntry, Path]]:
    """quantize.json's files as repository entries `<name>-<TYPE>.gguf`, keyed by type."""
    report = _read_json(quantize / "quantize.json")
    entries: dict[str, tuple[GGUFEntry, Path]] = {}
    for row in report.get("files", []) if isinstance(report, dict) else []:
        try:
            kind, local = str(row["type"]), quantize / row["file"]
        except (KeyError, TypeError):
            raise HubError(
                f"{quantize / 'quantize.json'}: each entry of 'files' needs 'type' and 'file'"
            ) from None
        if not local.is_file():
            raise HubError(f"{local}: listed in quantize.json but missing")
        bpw = row.get("bits_per_weight")
        entry = GGUFEntry(f"{name}-{kind.upper()}.gguf", kind.upper(), local.stat().st_size, bpw)
        entries[kind.lower()] = (entry, local)
    if not entries:
        raise HubError(f"{quantize / 'quantize.json'}: lists no GGUF files")
    return entries


def _add_modelfiles(
    plan: PushPlan, ollama: Path, ggufs: dict[str, tuple[GGUFEntry, Path]], quant: str, out: Path
) -> list[str]:
    """Each `<type>.Modelfile`, pointed at its uploaded GGUF, plus Ollama's hf.co files from the main one."""
    # adapter.Modelfile (ollama.mode adapter) points at the gguf stage's GGUFs: _add_adapter_mode uploads it
    modelfiles = sorted(p for p in ollama.glob("*.Modelfile") if p.name != ADAPTER_MODELFILE)
    if not modelfiles:
        raise HubError(f"{ollama}: no *.Modelfile (the ollama stage's output)")
    paths, texts = [], {}
    for source in modelfiles:
        kind = source.name[: -len(".Modelfile")].lower()
        if kind not in ggufs:
            raise HubError(f"{source}: no GGUF of type '{kind}' in quantize.json to point it at")
        entry = ggufs[kind][0]
        text = source.read_text(encoding="utf-8")
        texts[kind] = (text, str(source))
        path = f"{entry.quant}.Modelfile"
        local = _write(out, path, modelfile_for_repo(text, entry.path, str(source)))
        plan.add(path, local, f"push/{GENERATED}/{path}")
        paths.append(path)
    text, source = texts.get(quant.lower()) or texts[sorted(texts)[0]]
    for path, content in sorted(ollama_hub_files(text, source).items()):
        plan.add(path, _write(out, path, content), f"push/{GENERATED}/{path}")
    return paths


def _add_adapter_mode(plan: PushPlan, gguf: Path, ollama: Path, out: Path, modelfile: bool) -> AdapterFiles:
    """ollama.mode adapter: the gguf stage's LoRA and base GGUFs in `ADAPTER_DIR`, and (with `modelfile`) the
    adapter Modelfile beside them, pointed at them, so that `ollama create -f ollama-adapter/Modelfile` works in a
    download."""
    report = _read_json(gguf / "gguf.json")
    pair = report.get("adapter_mode") if isinstance(report, dict) else None
    if not isinstance(pair, dict) or not {"adapter", "base"} <= set(pair):
        raise HubError(f"{gguf / 'gguf.json'}: no adapter_mode entry (ollama.mode adapter); rerun the gguf stage")
    digests, entries = _digests(gguf), []
    for kind in ("adapter", "base"):
        local = gguf / pair[kind]
        if not local.is_file():
            raise HubError(f"{local}: listed as the {kind} GGUF in gguf.json but missing")
        path = f"{ADAPTER_DIR}/{ADAPTER_NAMES[kind]}"
        plan.add(path, local, f"gguf/{local.name}", digests.get(local.name))
        entries.append(GGUFEntry(path, str(report.get("out_type", "")).upper(), local.stat().st_size))
    path = None
    if modelfile:
        source = ollama / ADAPTER_MODELFILE
        if not source.is_file():
            raise HubError(f"{source}: missing (the ollama stage's Modelfile for ollama.mode adapter)")
        text = source.read_text(encoding="utf-8")
        text = modelfile_for_repo(text, ADAPTER_NAMES["base"], str(source), ADAPTER_NAMES["adapter"])
        path = f"{ADAPTER_DIR}/Modelfile"
        plan.add(path, _write(out, ADAPTER_MODELFILE, text), f"push/{GENERATED}/{ADAPTER_MODELFILE}")
    return AdapterFiles(*entries, modelfile=path)


def _eval_report(plan: PushPlan, eval_dir: Path) -> str | None:
    """report.md for the card: title dropped, headings one level down, its local images put under eval/."""
    path = eval_dir / "report.md"
    if not path.is_file():
        return None
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and re.match(r"# ", line) and not lines:
            continue
        lines.append(f"#{line}" if not fenced and re.match(r"#{1,5} ", line) else line)
    text = "\n".join(lines).strip()
    digests = _digests(eval_dir)

    def relink(match: re.Match) -> str:
        target = match.group(2)
        local = eval_dir / target
        if "://" in target or not local.is_file() or eval_dir.resolve() not in local.resolve().parents:
            return match.group(0)
        repo_path = f"eval/{Path(target).as_posix()}"
        if repo_path not in plan.sources:
            plan.add(repo_path, local, f"eval/{target}", digests.get(target))
        return f"![{match.group(1)}]({repo_path})"

    return IMAGE_LINK.sub(relink, text)


def _card_facts(loaded: LoadedConfig, inputs: dict[str, Path], repo: str) -> CardFacts:
    cfg = loaded.config
    base = _read_json(inputs["base"] / "base.json")
    report = _read_json(inputs["eval"] / "report.json")
    gate = (report.get("gate") if isinstance(report, dict) else None) or {}
    return CardFacts(
        repo=repo,
        base_model=cfg.push.base_model or base_hub_id(base),
        license=cfg.push.license or _base_license(base),
        datasets=list(cfg.push.datasets),
        model_type=base.get("model_type"),
        method=cfg.train.method,
        training=_training_rows(loaded, inputs["train"]),
        data=_data_rows(inputs["data"]),
        eval_passed=gate.get("passed"),
        eval_failures=[str(f) for f in gate.get("failures") or []],
        private=cfg.push.private,
    )


def _front_matter(readme: Path) -> dict[str, Any]:
    try:
        match = re.match(r"^---\n(.*?)\n---", readme.read_text(encoding="utf-8"), re.S)
        meta = yaml.safe_load(match.group(1)) if match else {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _base_license(base: dict[str, Any]) -> str | None:
    """The base model's license id: general.license of a GGUF, or the license key of the folder's README."""
    path = Path(base.get("path", ""))
    if path.is_file() and path.suffix == ".gguf":
        found = read_gguf_strings(path, ("general.license",)).get("general.license")
    else:
        found = _front_matter(path / "README.md").get("license")
    return str(found) if found else None


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _training_rows(loaded: LoadedConfig, train_dir: Path) -> list[tuple[str, str]]:
    """The training settings that shape the result, then every scalar of train_stats.json."""
    t = loaded.config.train
    rows = [("method", t.method)]
    if t.method != "full":
        targets = t.target_modules if isinstance(t.target_modules, str) else ", ".join(t.target_modules)
        rows += [("LoRA rank / alpha", f"{t.lora_r} / {_number(t.lora_alpha)}"), ("target modules", targets)]
    rows += [
        ("learning rate", f"{t.lr:g} ({t.schedule}, warm-up {t.warmup_ratio:g})"),
        ("training length", f"{t.max_steps} steps" if t.max_steps else f"{_number(t.epochs)} epoch(s)"),
        ("batch", f"{t.batch_size} × {t.grad_accum} accumulation"),
    ]
    stats_path = train_dir / "train_stats.json"
    stats = _read_json(stats_path) if stats_path.is_file() else {}
    for key, value in stats.items() if isinstance(stats, dict) else []:
        if isinstance(value, (int, float, str, bool)) and value is not None:
            rows.append((key.replace("_", " "), _number(value)))
    return rows


def _data_rows(data_dir: Path) -> list[tuple[str, str]]:
    stats_path = data_dir / "stats.json"
    if not stats_path.is_file():
        return []
    s = _read_json(stats_path)
    rows = []
    if "examples" in s:
        split = (
            f" ({s['train']['examples']:,} train / {s['eval']['examples']:,} eval)" if "train" in s else ""
        )
        rows.append(("examples", f"{s['examples']:,}{split}"))
    if "tokens" in s:
        trained = f", {1 - s['masked_fraction']:.0%} with labels" if "masked_fraction" in s else ""
        rows.append(("tokens", f"{s['tokens']:,}{trained}"))
    for key, label in (("format", "format"), ("train_on", "trained on"), ("max_seq_len", "max length")):
        if key in s:
            rows.append((label, _number(s[key])))
    if "packing" in s:
        rows.append(("packing", _number(s["packing"])))
    return rows


class PushStage(Stage):
    name = "push"
    version = 2  # 2: ollama.mode adapter uploads the gguf stage's adapter and base GGUFs and adapter.Modelfile
    needs = ("base", "data", "train", "merge", "gguf", "quantize", "eval", "ollama")
    config_keys = ("push",)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = ctx.config.push
        repo = check_repo_id(cfg.repo)
        plan = plan_push(ctx.loaded, ctx.inputs, ctx.out / GENERATED, repo)
        for what, why in plan.skipped.items():
            ctx.log(f"  skipped {what}: {why}")
        files = listing(plan.files)
        for row in files:
            row["source"] = plan.sources[row["path"]]
        total = human_size(sum(f.size for f in plan.files))
        record: dict[str, Any] = {
            "repo": repo,
            "revision": cfg.revision,
            "private": cfg.private,
            "dry_run": cfg.dry_run,
            "skipped": plan.skipped,
        }
        if cfg.dry_run:
            for row in files:
                row["status"] = "planned"
                ctx.log(
                    f"  would upload {row['path']} ({human_size(row['size'])}) sha256 {row['sha256'][:12]}"
                )
            record.update(commit=None, url=None, files=files)
            line = f"dry run: {len(files)} files ({total}) would go to {repo}@{cfg.revision}"
        else:
            quants = ", ".join(e.quant for e in plan.card.ggufs) or "no GGUF"
            result = push_files(
                plan.files,
                repo,
                revision=cfg.revision,
                private=cfg.private,
                message=f"Forge: {len(files)} files ({quants})",
                log=ctx.log,
            )
            uploaded = set(result.uploaded)
            for row in files:
                row["status"] = "uploaded" if row["path"] in uploaded else "unchanged"
            record.update(commit=result.commit, url=result.url, files=files)
            state = f"{len(uploaded)} uploaded" if uploaded else "already up to date"
            line = f"{repo}@{cfg.revision} {result.commit[:8]}: {len(files)} files ({total}), {state}"
        (ctx.out / "push.json").write_text(json.dumps(record, indent=2))
        return {
            "line": line,
            "repo": repo,
            "revision": cfg.revision,
            "commit": record["commit"],
            "files": len(files),
        }
