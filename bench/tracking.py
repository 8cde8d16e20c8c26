"""wandb logging: a mirror of the record (config, summary metrics, ψ-curves, grids, artifact).

Offline by default (``logger.mode: offline``; the ``WANDB_MODE`` environment variable wins), so
nothing needs a network; ``logger=none`` turns it off. Every call is guarded: a logging failure
never fails a job, and ``finish`` runs in the job's ``finally``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


class Tracker:
    def __init__(self, cfg: Any, job_key: str, run_dir: Path, config: dict):
        self.run = None
        lg = cfg.logger
        if lg.name != "wandb":
            return
        try:
            os.environ.setdefault("WANDB_SILENT", "true")  # the job's own summary is what a user reads last
            import wandb

            mode = os.environ.get("WANDB_MODE") or lg.get("mode") or "offline"
            wandb_dir = Path(cfg.out_dir) / "wandb"
            wandb_dir.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=lg.get("project") or "concealbench",
                entity=lg.get("entity"),
                group=lg.get("group"),
                tags=list(lg.get("tags") or []),
                name=f"{cfg.method.name}-{cfg.concept.name}-{job_key}",
                id=f"{job_key}-{os.getpid()}",
                config=config,
                mode=mode,
                dir=str(wandb_dir),
                reinit="finish_previous",
            )
        except Exception as e:  # noqa: BLE001 — tracking must never break a job
            warnings.warn(f"wandb disabled for this job: {e}", stacklevel=2)
            self.run = None

    @property
    def url(self) -> str | None:
        if self.run is None:
            return None
        return getattr(self.run, "url", None) or f"offline:{getattr(self.run, 'dir', '')}"

    def log_record(self, record: dict, run_dir: Path) -> None:
        if self.run is None:
            return
        try:
            import wandb

            flat = {}
            for block in ("metrics", "retain"):
                for k, m in (record.get(block) or {}).items():
                    if isinstance(m, dict) and m.get("value") is not None:
                        flat[f"{block}/{k}"] = m["value"]
            log = {}
            for name, block in (record.get("probes") or {}).items():
                for k, m in (block.get("metrics") or {}).items():
                    if isinstance(m, dict) and m.get("value") is not None:
                        flat[f"{name}/{k}"] = m["value"]
                table = wandb.Table(columns=[block["axis"]["name"], "p_original", "retrieval", "detection", "specificity"])
                for row in block.get("curve") or []:
                    table.add_data(row["x"], row.get("p_original"), row.get("retrieval"), row.get("detection"), row.get("specificity"))
                log[f"{name}/curve"] = table
            self.run.summary.update(flat)
            for name, rel in (record.get("artifacts") or {}).items():
                p = run_dir / rel
                if p.suffix == ".png" and p.exists():
                    log[name] = wandb.Image(str(p))
            self.run.log(log)
            art = wandb.Artifact(f"record-{record['job_key']}", type="record")
            art.add_file(str(run_dir / "record.json"))
            self.run.log_artifact(art)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"wandb logging failed: {e}", stacklevel=2)

    def finish(self, outcome: str = "ok") -> None:
        """Close the run: ``ok``, ``failed``, ``interrupted`` (marked so, with a non-zero exit code —
        an interrupted job is not finished) or ``bad_input`` (the run is deleted: bad input leaves
        no trace, like the job folder)."""
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            run.summary["status"] = outcome
            run.finish(exit_code={"ok": 0, "interrupted": 130}.get(outcome, 1))
        except Exception:  # noqa: BLE001
            pass
        if outcome == "bad_input":
            import shutil

            folder = Path(getattr(run, "dir", "") or "").parent  # <wandb dir>/offline-run-…/files → the run folder
            if folder.name.startswith(("offline-run-", "run-")):
                shutil.rmtree(folder, ignore_errors=True)
