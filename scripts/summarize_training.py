#!/usr/bin/env python
"""Summarize a trainer JSON-lines log (iterations, wall time, device, final validation) as JSON.

    python scripts/summarize_training.py train_log.jsonl > training_summary.json
    python scripts/summarize_training.py stage1_log.jsonl stage2_log.jsonl train_log.jsonl > training_summary.json

With several logs (a staged run, the last one shipped) the result is ``{"stages": [...]}``.
"""

from __future__ import annotations

import json
import sys


def summarize(lines) -> dict:
    """Fold the trainer's events into the facts a model card needs."""
    out: dict = {"validations": 0}
    last_val = best_val = None
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        kind = ev.get("event")
        if kind == "start" and "config" not in out:
            out.update(device=ev.get("device"), threads=ev.get("threads"), parameters=ev.get("parameters"),
                       config=ev.get("config"), patch=ev.get("patch"), range_um=ev.get("range_um"))
        elif kind == "progress":
            key = "dpm_iterations" if ev.get("phase") == "dpm" else "iterations"
            out[key] = ev.get("iteration")
            out[f"{ev.get('phase')}_elapsed_s"] = ev.get("elapsed_s")
            out[f"{ev.get('phase')}_pairs_per_s"] = ev.get("pairs_s")
        elif kind == "validation":
            out["validations"] += 1
            last_val = ev
            if ev.get("best"):
                best_val = ev
        elif kind in ("export", "done", "error", "stopped"):
            out[kind] = {k: v for k, v in ev.items() if k != "event"}
    out["last_validation"] = last_val
    out["best_validation"] = best_val
    return out


if __name__ == "__main__":
    summaries = []
    for path in sys.argv[1:]:
        with open(path) as f:
            summaries.append(dict(summarize(f), log=path.rsplit("/", 1)[-1]))
    print(json.dumps(summaries[0] if len(summaries) == 1 else {"stages": summaries}, indent=1))
