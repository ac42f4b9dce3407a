"""The stage contract: fingerprints, atomic outputs with manifest.json, checked cache hits, locking, resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.config import LoadedConfig, section_dump

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class PipelineError(RuntimeError):
    """A pipeline problem the user must act on (locked run folder, unknown stage, ...)."""


@dataclass
class StageContext:
    """What a stage's run() gets: the config, its inputs' output folders and where to write."""

    loaded: LoadedConfig
    out: Path
    work: Path
    inputs: dict[str, Path]
    fingerprint: str
    log: Callable[[str], None]

    @property
    def config(self):
        return self.loaded.config


class Stage:
    """One step of the pipeline. Subclasses set name/version/needs/config_keys and implement run()."""

    name: str = ""
    version: int = 1
    needs: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    # keys inside config_keys that change how the stage runs, not what it writes: not fingerprinted
    run_only_keys: tuple[str, ...] = ()

    def external_inputs(self, loaded: LoadedConfig) -> dict[str, str]:
        """Digests of inputs outside the pipeline (dataset files, a model file), keyed by what they are."""
        return {}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write the outputs into ctx.out; return a summary (its 'line' is printed, all goes in the manifest)."""
        raise NotImplementedError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def config_part(stage: Stage, loaded: LoadedConfig) -> dict[str, Any]:
    part = {key: section_dump(loaded.config, key) for key in stage.config_keys}
    for dotted in stage.run_only_keys:
        section, _, key = dotted.rpartition(".")
        part.get(section, {}).pop(key, None)
    return part


def fingerprint(
    stage: Stage, loaded: LoadedConfig, upstream: dict[str, str], external: dict[str, str] | None = None
) -> str:
    """hash(name, version, config part, fingerprints of what it needs, external input digests)."""
    return stable_hash(
        {
            "stage": stage.name,
            "version": stage.version,
            "config": config_part(stage, loaded),
            "needs": {n: upstream[n] for n in stage.needs},
            "external": stage.external_inputs(loaded) if external is None else external,
        }
    )


def list_files(root: Path, digests: bool = True) -> list[dict[str, Any]]:
    """Every file under root except the manifest, with size (and sha256)."""
    rows = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        row: dict[str, Any] = {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size}
        if digests:
            row["sha256"] = sha256_file(path)
        rows.append(row)
    return rows


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def check_output(stage_dir: Path, manifest: dict[str, Any], verify: bool = False) -> str | None:
    """None when every recorded file is present with its size (and digest when verify); else why not."""
    for row in manifest.get("files", []):
        path = stage_dir / row["path"]
        if not path.is_file():
            return f"{row['path']} is missing"
        if path.stat().st_size != row["size"]:
            return f"{row['path']} changed size"
        if verify and sha256_file(path) != row["sha256"]:
            return f"{row['path']} changed content"
    return None


@dataclass(frozen=True)
class Change:
    """One reason a stage will run.

    kind: missing (no output), output (damaged: name says how), code (stage version), config (name: the key),
    input (name: the external input, e.g. a dataset file; old/new: its digests), upstream (name: a stage that
    will run first), remade (name: a stage whose output changed since), forced (name: the --force stage),
    unknown (the fingerprint differs and the manifest does not say why).
    """

    kind: str
    name: str = ""
    old: Any = None
    new: Any = None

    def __str__(self) -> str:
        """The change in full: a config key's old and new value, a file's old and new digest, ..."""
        if self.kind == "code":
            return f"stage code changed (version {self.old} -> {self.new})"
        if self.kind == "config":
            return f"config {self.name}: {json.dumps(self.old)} -> {json.dumps(self.new)}"
        if self.kind == "input" and self.old is None:
            return f"{self.name} added"
        if self.kind == "input" and self.new is None:
            return f"{self.name} removed"
        if self.kind == "input":
            return f"{self.name} changed (sha256 {str(self.old)[:12]} -> {str(self.new)[:12]})"
        if self.kind == "upstream":
            return f"{self.name} will run"
        if self.kind == "remade":
            return f"{self.name} was made again since this stage ran"
        return SUMMARIES[self.kind].format(self.name)


# each kind of change, shortest first, as `forge status` and the run log say it ({} = the names)
SUMMARIES = {
    "missing": "no output yet",
    "output": "{}",
    "code": "stage code changed",
    "config": "config changed: {}",
    "input": "input changed: {}",
    "upstream": "{} will re-run",
    "remade": "{} changed",
    "unknown": "an input changed",
    "forced": "forced by --force {}",
}


@dataclass
class StagePlan:
    """What `forge run` would do with one stage now: its fingerprint, cache state and why it runs.

    state: cached (a valid hit), stale (an output exists but will be replaced) or missing. `changes` says why a
    stage is not cached (or is forced); `runs` is whether a run would execute it.
    """

    stage: Stage
    fingerprint: str
    state: str
    changes: list[Change] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    external: dict[str, str] = field(default_factory=dict)

    @property
    def runs(self) -> bool:
        return bool(self.changes)

    @property
    def reason(self) -> str:
        """One short line: what kinds of thing changed, naming the keys, files and stages."""
        if not self.changes:
            return "up to date"
        parts = []
        for kind, summary in SUMMARIES.items():
            names = [c.name for c in self.changes if c.kind == kind]
            if names:
                parts.append(summary.format(", ".join(names)))
        return "; ".join(parts)


@dataclass
class Pipeline:
    """The ordered stages of one run folder."""

    loaded: LoadedConfig
    stages: list[Stage]
    log: Callable[[str], None] = print
    _by_name: dict[str, Stage] = field(init=False)

    def __post_init__(self) -> None:
        self._by_name = {s.name: s for s in self.stages}

    @property
    def run_dir(self) -> Path:
        return self.loaded.run_dir

    def stage(self, name: str) -> Stage:
        if name not in self._by_name:
            raise PipelineError(f"unknown stage '{name}' (stages: {', '.join(self._by_name)})")
        return self._by_name[name]

    def closure(self, target: str) -> list[Stage]:
        """The target and everything it needs, in pipeline order."""
        wanted: set[str] = set()
        todo = [self.stage(target).name]
        while todo:
            name = todo.pop()
            if name not in wanted:
                wanted.add(name)
                todo.extend(self.stage(name).needs)
        return [s for s in self.stages if s.name in wanted]

    def downstream(self, names: set[str]) -> set[str]:
        """The given stages and every stage that depends on one of them."""
        result = set(names)
        for s in self.stages:
            if any(n in result for n in s.needs):
                result.add(s.name)
        return result

    def plan(
        self, target: str | None = None, verify: bool = False, force: set[str] | None = None
    ) -> list[StagePlan]:
        """What `run(target, force, verify)` would do now, stage by stage (all stages when target is None).

        `forge status`, `forge plan` and `run` itself all use this one function.
        """
        stages = self.closure(target) if target else self.stages
        forced = {self.stage(name).name for name in force or ()}  # what follows runs as their downstream
        fps: dict[str, str] = {}
        runs: set[str] = set()
        plans = []
        for stage in stages:
            for need in stage.needs:
                if need not in fps:  # a stage outside the closure, only when listing all
                    raise PipelineError(f"stage '{stage.name}' needs '{need}' which comes after it")
            external = stage.external_inputs(self.loaded)
            fp = fingerprint(stage, self.loaded, fps, external)
            fps[stage.name] = fp
            stage_dir = self.run_dir / stage.name
            manifest = read_manifest(stage_dir)
            upstream = [Change("upstream", n) for n in stage.needs if n in runs]
            if manifest is None:
                state, changes = "missing", [Change("missing")]
            elif manifest.get("fingerprint") != fp:
                state = "stale"
                changes = _changes(manifest, stage, self.loaded, external, fps, runs) + upstream
                if not changes:
                    changes = [Change("unknown")]
            elif problem := check_output(stage_dir, manifest, verify):
                state, changes = "stale", [Change("output", problem)]
            elif upstream:  # same inputs, but what it reads will be rewritten
                state, changes = "stale", upstream
            else:
                state, changes = "cached", []
            if stage.name in forced:
                changes.append(Change("forced", stage.name))
            if changes:
                runs.add(stage.name)
            plans.append(StagePlan(stage, fp, state, changes, manifest, external))
        return plans

    def run(self, target: str, force: set[str] | None = None, verify: bool = False) -> list[dict[str, Any]]:
        """Run target and what it needs; cached stages are skipped. Returns the manifests in order."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(self.run_dir):
            _sweep_temporaries(self.run_dir)
            done: list[dict[str, Any]] = []
            for plan in self.plan(target, verify, force):
                stage = plan.stage
                if not plan.runs:
                    self.log(
                        f"[dim]✓ {stage.name:<9} cached[/dim]  {plan.manifest.get('summary', {}).get('line', '')}"
                    )
                    done.append(plan.manifest)
                    continue
                if plan.state == "stale":
                    self.log(f"[yellow]↻ {stage.name:<9} stale: {plan.reason}[/yellow]")
                done.append(self._execute(stage, plan.fingerprint, plan.external))
            return done

    def _execute(self, stage: Stage, fp: str, external: dict[str, str]) -> dict[str, Any]:
        inputs = {n: self.run_dir / n for n in stage.needs}
        tmp = self.run_dir / ".tmp" / f"{stage.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        work = self.run_dir / ".work" / f"{stage.name}-{fp[:16]}"
        work.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(self.loaded, tmp, work, inputs, fp, self.log)
        self.log(f"[bold]▶ {stage.name}[/bold]")
        started = time.time()
        try:
            summary = stage.run(ctx) or {}
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            full = disk_full(exc) if isinstance(exc, Exception) else None
            if full is not None:
                free = shutil.disk_usage(self.run_dir).free / 2**30
                raise PipelineError(
                    f"stage {stage.name}: the disk is full ({full}); its partial output is removed ({free:.2f} GiB "
                    f"free at {self.run_dir} now) and finished stages are kept: free space or set run.dir to a "
                    "larger disk (`forge check` estimates what the run needs), then run again"
                ) from exc
            raise
        seconds = time.time() - started
        manifest = {
            "format": MANIFEST_FORMAT,
            "stage": stage.name,
            "version": stage.version,
            "fingerprint": fp,
            "config": config_part(stage, self.loaded),
            "inputs": {n: read_manifest(p)["fingerprint"] for n, p in inputs.items()},
            "external": external,
            "files": list_files(tmp),
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
            "summary": summary,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, self.run_dir / stage.name)
        shutil.rmtree(work, ignore_errors=True)
        self.log(f"[green]✓ {stage.name:<9}[/green] {summary.get('line', '')} [dim]({seconds:.1f}s)[/dim]")
        return manifest

    def clean(self, stage: str | None = None) -> list[str]:
        """Remove one stage's output and everything downstream of it (or the whole run folder)."""
        with run_lock(self.run_dir):
            names = self.downstream({self.stage(stage).name}) if stage else {s.name for s in self.stages}
            removed = []
            for s in self.stages:
                if s.name in names and (self.run_dir / s.name).exists():
                    shutil.rmtree(self.run_dir / s.name)
                    removed.append(s.name)
            if stage is None:
                for extra in (".tmp", ".work"):
                    shutil.rmtree(self.run_dir / extra, ignore_errors=True)
            return removed


def _changes(
    manifest: dict[str, Any],
    stage: Stage,
    loaded: LoadedConfig,
    external: dict[str, str],
    fps: dict[str, str],
    runs: set[str],
) -> list[Change]:
    """What differs between the inputs a stage's output was made from (its manifest) and its inputs now."""
    changes = []
    if manifest.get("version") != stage.version:
        changes.append(Change("code", stage.name, manifest.get("version"), stage.version))
    old_config = manifest.get("config", {})
    changes += [Change("config", k, old, new) for k, old, new in _diff(old_config, config_part(stage, loaded))]
    old_ext = manifest.get("external", {})
    changes += [
        Change("input", k, old_ext.get(k), external.get(k))
        for k in sorted(set(old_ext) | set(external))
        if old_ext.get(k) != external.get(k)
    ]
    made_from = manifest.get("inputs", {})
    changes += [
        Change("remade", n, made_from.get(n), fps[n])
        for n in stage.needs
        if n not in runs and n in made_from and made_from[n] != fps[n]
    ]
    return changes


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for k in sorted(set(old) | set(new)):
            found += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return found
    return [(prefix.rstrip("."), old, new)] if old != new else []


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # as native libraries word it


def disk_full(exc: BaseException) -> str | None:
    """What the file system refused to store, when exc (or an exception it came from) is a full disk or
    quota: Python's OSError, or the same OS error in the message of a native library (safetensors:
    "No space left on device (os error 28)"); None for any other error."""
    seen: BaseException | None = exc
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return f"{seen.strerror}: {seen.filename}" if seen.filename else str(seen.strerror)
        text = str(seen)
        for message in DISK_FULL_MESSAGES:
            if message in text:
                return message
        seen = seen.__cause__ or seen.__context__
    return None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished output into place; an older output is moved aside first, then removed."""
    if final.exists():
        trash = final.parent / ".tmp" / f"old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _sweep_temporaries(run_dir: Path) -> None:
    """Remove what interrupted stages left half-written (only ever called while holding the lock)."""
    shutil.rmtree(run_dir / ".tmp", ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One writer per run folder: a lock file naming the owner's pid; a dead owner's lock is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}
            pid = int(owner.get("pid", 0) or 0)
            same_host = owner.get("host") == me["host"]
            if pid and (not same_host or _pid_alive(pid)):
                raise PipelineError(
                    f"{run_dir} is in use by pid {pid} on {owner.get('host')} since {owner.get('since')}; "
                    "wait for it or stop it"
                ) from None
            lock.unlink(missing_ok=True)  # its owner died: take over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise PipelineError(f"{run_dir}: could not take the lock {lock}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    """Versions of Forge and the libraries whose behaviour shapes the outputs."""
    from importlib import metadata

    found = {"python": platform.python_version()}
    for dist in ("forge-llm", "torch", "transformers", "peft", "triton", "gguf", "llama-cpp-python", "bitsandbytes"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    found["platform"] = f"{sys.platform}-{platform.machine()}"
    return found
