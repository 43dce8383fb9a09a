"""The tables of a `cxr bench` JSON report, as text or Markdown, with the issue's goals for one
H100 checked against them. They read the report, not the measuring code: `cxr bench --report`
prints a saved run without importing torch, and book/performance.md shows the same Markdown."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_lib.bench.options import TASK_NAMES

PIPELINES = ("reference", "ours", "step")


@dataclass(frozen=True)
class Goal:
    """A bar for the engine ("ours") on one H100 at the default settings: `measure` (a field
    of a pipeline in the report) at least `bar`; `aim`: where the study aims beyond it."""

    task: str
    measure: str  # "images_per_s", "speedup_vs_reference" or "fraction_of_step"
    bar: float
    aim: float | None = None

    def describe(self, value: float) -> str:
        if self.measure == "images_per_s":
            return f"{value:,.0f} img/s"
        if self.measure == "speedup_vs_reference":
            return f"{value:.2f}x the reference"
        return f"{value:.0%} of the step alone"

    @property
    def text(self) -> str:
        aim = f" (aim {self.describe(self.aim)})" if self.aim is not None else ""
        return f"at least {self.describe(self.bar)}{aim}"


_SPEED_GOALS = (
    Goal("mae_vit_s", "images_per_s", 10_000, aim=14_000),
    Goal("mae_vit_s_8b", "images_per_s", 5_500),
    Goal("finetune_vit_s", "images_per_s", 4_000),
    Goal("finetune_densenet121", "images_per_s", 2_000),
    Goal("moco_densenet121", "speedup_vs_reference", 3.0),
)
# Each task's speed, then its share of the step alone: within 10%, the data is never the
# bottleneck.
GOALS: tuple[Goal, ...] = tuple(
    goal for speed in _SPEED_GOALS
    for goal in (speed, Goal(speed.task, "fraction_of_step", 0.9)))
GOAL_IMAGE_SIZE = 224
GOAL_DEVICES = ("H100", "H200")  # an H200 has the H100's tensor-core peak, more bandwidth


def goals_unchecked(report: dict) -> str | None:
    """Why the report's run cannot be held to the goals, or None when it can."""
    s = report["settings"]
    device = report["tasks"][0]["device"] if report["tasks"] else "no task"
    if s["tiny"]:
        return "tiny stand-in models"
    if s["model"] is not None:
        return f"another model ({s['model']})"
    if s["image_size"] != GOAL_IMAGE_SIZE:
        return f"{s['image_size']} px, not {GOAL_IMAGE_SIZE}"
    if not any(name.lower() in device.lower() for name in GOAL_DEVICES):
        return f"{device}, not an H100"
    return None


def goal_rows(report: dict) -> list[dict]:
    """One row per goal of a task in the report: the goal, what was measured, and whether it
    was met ("n/a" when `goals_unchecked`)."""
    unchecked = goals_unchecked(report)
    tasks = {t["task"]: t for t in report["tasks"]}
    rows = []
    for goal in GOALS:
        if goal.task not in tasks:
            continue
        value = tasks[goal.task]["pipelines"]["ours"][goal.measure]
        met = "n/a" if unchecked else ("yes" if value >= goal.bar else "no")
        rows.append({"task": goal.task, "goal for ours": goal.text,
                     "measured": goal.describe(value), "met": met})
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def measurement_rows(report: dict) -> list[dict]:
    """One row per task and pipeline."""
    rows = []
    for t in report["tasks"]:
        for name in PIPELINES:
            p = t["pipelines"][name]
            rows.append({"task": t["task"], "pipeline": name,
                         "img/s": f"{p['images_per_s']:,.1f}",
                         "vs reference": f"{p['speedup_vs_reference']:.2f}x",
                         "of step": f"{p['fraction_of_step']:.0%}",
                         "GFLOP/img": f"{t['flops_per_image'] / 1e9:.3g}",
                         "TFLOP/s": f"{p['tflops']:.3g}",
                         "% of peak": _fmt(p["peak_fraction"], ".1%"),
                         "peak GiB": _fmt(p["peak_memory_gib"], ".2f"),
                         "syncs/step": _fmt(p["syncs_per_step"], ".2g")})
    return rows


def _run_line(report: dict) -> str:
    s = report["settings"]
    t = report["tasks"][0]
    peak = f"{t['peak_tflops']:g} TFLOP/s dense bf16" if t["peak_tflops"] else "no listed peak"
    pngs = "real PNGs" if s["png_dir"] else f"phantom PNGs of {s['png_size']} px"
    workers = f"{s['workers']} data-loader worker{'' if s['workers'] == 1 else 's'}"
    return (f"device: {t['device']} ({peak}); batch {t['batch_size']}, {t['image_size']} px, "
            f"{s['steps']} timed steps after {s['warmup']}, {pngs}, reference on {workers}"
            f"{', ours compiled' if s['compile'] else ''}; torch {report['torch']}")


def _goals_line(report: dict) -> str:
    unchecked = goals_unchecked(report)
    return (f"goals (one H100, {GOAL_IMAGE_SIZE} px, the default models): "
            + (f"not checked: {unchecked}" if unchecked else "checked"))


def _notes(report: dict) -> list[str]:
    return [f"{t['task']}: {note}" for t in report["tasks"] for note in t["notes"]]


def format_table(report: dict) -> str:
    """The measurements, the run, the goals and the notes, as plain text."""
    if not report["tasks"]:
        return "no task was measured"
    return "\n".join([pd.DataFrame(measurement_rows(report)).to_string(index=False),
                      _run_line(report), _goals_line(report),
                      pd.DataFrame(goal_rows(report)).to_string(index=False),
                      *_notes(report)])


def _markdown(rows: list[dict]) -> list[str]:
    header = list(rows[0])
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(row[k]) for k in header) + " |" for row in rows)]


def format_markdown(report: dict) -> str:
    """The same as `format_table`, as Markdown (for book/performance.md)."""
    if not report["tasks"]:
        return "No task was measured."
    return "\n".join([_sentence(_run_line(report)), "", *_markdown(measurement_rows(report)),
                      "", _sentence(_goals_line(report)), "", *_markdown(goal_rows(report)),
                      "", *(f"- {note}" for note in _notes(report))]).rstrip()


def format_report(report: dict, markdown: bool = False) -> str:
    """`format_markdown` or `format_table` of the report: what `cxr bench` prints."""
    return format_markdown(report) if markdown else format_table(report)


def _sentence(line: str) -> str:
    return line[0].upper() + line[1:] + "."


class ReportError(ValueError):
    """A file that is not a `cxr bench` JSON report."""


def read_report(path: str | Path) -> dict:
    """A JSON report written by `cxr bench --json`, checked for what the tables read."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not JSON ({err})") from None
    if not isinstance(report, dict) or not {"settings", "torch", "tasks"} <= set(report):
        raise ReportError(f"{path}: not a cxr bench report (it needs settings, torch, tasks)")
    for t in report["tasks"]:
        if t.get("task") not in TASK_NAMES or set(t.get("pipelines", ())) != set(PIPELINES):
            raise ReportError(f"{path}: task {t.get('task')!r} is not a cxr bench task with "
                              f"the pipelines {', '.join(PIPELINES)}")
    return report
