"""Turn sweep results (one JSON per run) into tables and plots: mean over seeds, metric against ratio.

"Better compression" is made concrete by :func:`ratio_at_drop`: the largest compression ratio
whose metric stays within ``drop`` (1 point) of dense, interpolated linearly on the measured
curve.

    >>> ratio_at_drop([(2.0, 85.5), (2.8, 84.5), (3.57, 82.0)], dense=86.0)  # crosses 85.0 halfway
    2.4
    >>> ratio_at_drop([(2.0, 84.0)], dense=86.0) is None
    True
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text, check_file_output
from dsformer.harness.methods import METHODS

DENSE_RATIOS = {"ratio_params": 1.0, "ratio_bytes": 1.0}


def measured_ratios(run: dict[str, Any]) -> dict[str, float]:
    """A run result's compression ratios (``ratio_params``, ``ratio_bytes``); a dense run records none: 1x."""
    return run.get("ratios") or DENSE_RATIOS


@dataclass(frozen=True)
class Cell:
    """The seeds of one (task, method label, ratio): test metric in points (×100)."""

    task: str
    metric: str
    label: str
    trainer: str
    ratio: float  # the asked ratio
    measured_ratio: float  # mean ratio by value parameters
    scores: tuple[float, ...]
    files: tuple[str, ...]
    method: str = ""  # the method behind the label (``svd`` for ``svd-stf``)

    @property
    def mean(self) -> float:
        return mean(self.scores)

    @property
    def std(self) -> float:
        return stdev(self.scores) if len(self.scores) > 1 else 0.0

    @property
    def off_nominal(self) -> str:
        """`` at 2.91x`` where the measured ratio is more than 2% from the asked one (N:M rounds N), else ``""``."""
        return f" at {self.measured_ratio:.2f}x" if abs(self.measured_ratio / self.ratio - 1) > 0.02 else ""


def collect(folders: list[Path]) -> list[Cell]:
    """Group every run JSON under ``folders`` by task, label and ratio."""
    groups: dict[tuple[str, str, float], list[tuple[dict, Path]]] = defaultdict(list)
    for folder in folders:
        files = sorted(Path(folder).glob("*.json"))
        if not files:
            raise DsformerError(f"{folder} holds no run JSON files; give the results folder of a sweep")
        for file in files:
            try:
                run = json.loads(file.read_text())
                key = (run["task"], run.get("label", run["method"]), float(run["ratio"]))
                run["test"][run["metric"]]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DsformerError(f"{file} is not a run result ({type(err).__name__}: {err})") from None
            groups[key].append((run, file))
    cells = []
    for (task, label, ratio), runs in sorted(groups.items()):
        metric = runs[0][0]["metric"]
        measured = [measured_ratios(r)["ratio_params"] for r, _ in runs]
        cells.append(
            Cell(
                task,
                metric,
                label,
                runs[0][0].get("trainer", "-"),
                ratio,
                mean(measured),
                tuple(100 * r["test"][metric] for r, _ in runs),
                tuple(str(f) for _, f in runs),
                runs[0][0]["method"],
            )
        )
    return cells


def ratio_at_drop(curve: list[tuple[float, float]], dense: float, drop: float = 1.0) -> float | None:
    """The largest ratio on ``curve`` ((ratio, metric) points) with metric ≥ ``dense - drop``, interpolated.

    From the largest measured point within the drop, linearly to the next ratio's point (a dip
    below the line at a smaller ratio, seed noise, does not end the curve there). ``None`` when no
    point is within; the largest ratio when the last one is (the curve does not show where it would cross).
    """
    floor = dense - drop
    points = sorted(curve)
    within = [i for i, (_, metric) in enumerate(points) if metric >= floor]
    if not within:
        return None
    last = within[-1]
    if last == len(points) - 1:
        return round(points[last][0], 4)
    (r0, m0), (r1, m1) = points[last], points[last + 1]
    return round(r0 + (r1 - r0) * (m0 - floor) / (m0 - m1), 4)  # crossing between the two points


# methods whose runs are DSFormer itself or a variant of it (any label: dsformer+kd, dsformer-fisher),
# never baselines to beat; and the low-rank baselines
OUR_METHODS = tuple(name for name, m in METHODS.items() if m.ours)
LOW_RANK = tuple(name for name, m in METHODS.items() if m.family == "low rank")
# the labels set against the baselines unless told others: the method, and with --fisher
DEFAULT_OURS = ("dsformer", "dsformer-fisher")


def curves(cells: list[Cell], task: str) -> tuple[Cell | None, dict[str, list[tuple[float, float]]]]:
    """A task's dense cell and, per label, its (measured ratio, mean metric) points."""
    dense = next((c for c in cells if c.task == task and c.label == "dense"), None)
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in cells:
        if c.task == task and c.label != "dense":
            out[c.label].append((c.measured_ratio, c.mean))
    return dense, dict(out)


def compression_at_drop(cells: list[Cell], ours: str = "dsformer", drop: float = 1.0) -> list[dict]:
    """Per task: the largest ratio within ``drop`` points of dense for ``ours``, the best baseline and the
    best low-rank method, and the quotients (the paper's "better compression", made concrete).

    A ratio marked ``open`` is the largest measured one with the metric still within ``drop``: the
    curve does not show where it would cross, so the true ratio is at least that.
    """
    rows = []
    for task in sorted({c.task for c in cells}):
        dense, per_label = curves(cells, task)
        if dense is None or ours not in per_label:
            continue
        methods = {c.label: c.method for c in cells if c.task == task}
        found = {label: _within(label, curve, dense.mean - drop) for label, curve in per_label.items()}
        baselines = [label for label in per_label if methods.get(label) not in OUR_METHODS]
        rows.append(
            {
                "task": task,
                "ours": found[ours],
                "baseline": _furthest([found[label] for label in baselines]),
                "low_rank": _furthest([found[label] for label in baselines if methods.get(label) in LOW_RANK]),
            }
        )
    return rows


def _within(label: str, curve: list[tuple[float, float]], floor: float) -> dict:
    """How far ``label``'s curve stays above ``floor``; ``open``: still above at its largest ratio."""
    points = sorted(curve)
    ratio = ratio_at_drop(points, floor, drop=0.0)
    return {"label": label, "ratio": ratio, "open": points[-1][1] >= floor, "first": points[0][0]}


def _furthest(found: list[dict]) -> dict | None:
    """The one that stays within the drop to the largest ratio; ``none`` if none does; None if the list is empty.

    A run that is never within still bounds the answer by its smallest measured ratio, if a metric
    does not rise with compression: it is within the drop only below that ratio. ``none`` carries
    ``below``, the largest of those (the best is below it); a found one carries ``upto`` when such
    a ratio lies above its own (the best may be one of the unmeasured, up to there).
    """
    if not found:
        return None
    within = [f for f in found if f["ratio"] is not None]
    firsts = [f["first"] for f in found if f["ratio"] is None]
    if not within:
        return {"label": "none", "ratio": None, "open": False, "below": max(firsts)}
    best = dict(max(within, key=lambda f: f["ratio"]))
    if firsts and max(firsts) > best["ratio"]:
        best["upto"] = max(firsts)
    return best


def _floor2(x: float) -> str:
    return f"{math.floor(x * 100 + 1e-9) / 100:.2f}"


def _ceil2(x: float) -> str:
    return f"{math.ceil(x * 100 - 1e-9) / 100:.2f}"


def _quotient(ours: dict, other: dict | None) -> str:
    """``ours`` over ``other``; an open end (still within the drop at the largest ratio measured) makes it a bound.

    Bounds round outwards, so a printed bound always holds.
    """
    if other is None:
        return "no such baseline ran"
    if ours["ratio"] is None:
        return "neither is within 1 point" if other["ratio"] is None else "below it"
    if other["ratio"] is None:
        return f"> {_floor2(ours['ratio'] / other['below'])}x"  # other's ratio is below ``below``
    if ours["open"] and other["open"]:
        return "unknown: both are within 1 point at every ratio measured"
    if ours["open"] and other.get("upto"):  # ours ≥ its ratio, other's below ``upto``
        return f"≥ {_floor2(ours['ratio'] / other['upto'])}x"
    if other["open"] or other.get("upto"):  # other's ratio may be larger than the one found: at most this
        return f"≤ {_ceil2(ours['ratio'] / other['ratio'])}x"
    if ours["open"]:
        return f"≥ {_floor2(ours['ratio'] / other['ratio'])}x"
    return f"{ours['ratio'] / other['ratio']:.2f}x"


def _at_text(found: dict | None, with_label: bool = True) -> str:
    if found is None:
        return "-"
    if found["ratio"] is None:
        if not with_label:
            return "never"
        return f"none within 1 point (all < {_ceil2(found['below'])}x)"
    label = f"{found['label']} " if with_label else ""
    text = f"{label}{'≥ ' if found['open'] else ''}{found['ratio']:.2f}x"
    if with_label and found.get("upto"):
        text += f" (others unmeasured below {_ceil2(found['upto'])}x)"
    return text


def compression_markdown(cells: list[Cell], ours: str = "dsformer") -> str:
    """The "better compression" table: ratios within 1 point of dense, ``ours`` over the baselines'."""
    rows = compression_at_drop(cells, ours)
    if not rows:
        return ""
    lines = [
        "### Compression within 1 point of dense" + ("" if ours == "dsformer" else f": `{ours}`"),
        "",
        "The largest compression ratio (value parameters) whose test metric is within 1 point of the dense "
        'start, interpolated on each method\'s measured curve; "≥" where the curve never dropped that far '
        '(the largest ratio measured), "never" where no ratio measured is within. A baseline never within '
        "1 point bounds the column by its smallest measured ratio, if a metric does not rise with compression: "
        '"all < r" where none of the column is within (the quotient is then a lower bound, ">"), "others '
        'unmeasured below r" where one is within but another was only measured from r on (an upper bound, "≤").',
        "",
        f"| task | {ours} | best baseline | {ours} / baseline | best low rank | {ours} / low rank |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {_at_text(r['ours'], False)} | {_at_text(r['baseline'])} "
            f"| {_quotient(r['ours'], r['baseline'])} | {_at_text(r['low_rank'])} "
            f"| {_quotient(r['ours'], r['low_rank'])} |"
        )
    return "\n".join([*lines, ""])


def versus(cells: list[Cell], ours: str = "dsformer") -> list[dict]:
    """At each task and ratio where ``ours`` ran: its mean against the best baseline's (DS variants excluded)."""
    rows = []
    for cell in (c for c in cells if c.label == ours):
        rivals = [
            c
            for c in cells
            if c.task == cell.task and c.ratio == cell.ratio and c.method not in (*OUR_METHODS, "dense")
        ]
        if rivals:
            best = max(rivals, key=lambda c: c.mean)
            both_seeded = len(cell.scores) > 1 and len(best.scores) > 1
            rows.append(
                {
                    "task": cell.task,
                    "ratio": cell.ratio,
                    "ours": cell.mean,
                    "n": len(cell.scores),
                    "best": best.label + best.off_nominal,
                    "best_mean": best.mean,
                    "best_n": len(best.scores),
                    "difference": cell.mean - best.mean,
                    # the standard error of the difference of two means; unknown with one seed on a side
                    "se": math.hypot(cell.std / math.sqrt(len(cell.scores)), best.std / math.sqrt(len(best.scores)))
                    if both_seeded
                    else None,
                }
            )
    return rows


def versus_markdown(cells: list[Cell], ours: str = "dsformer") -> str:
    """Where ``ours`` wins and where it loses: one line per task and ratio, and the count."""
    rows = versus(cells, ours)
    if not rows:
        return ""
    name = "DSFormer" if ours == "dsformer" else f"`{ours}`"
    lines = [
        f"### {name} against the best baseline",
        "",
        f"| task | ratio | {ours} | best baseline | difference | |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = "wins" if r["difference"] > 0 else ("ties" if r["difference"] == 0 else "**loses**")
        difference = f"{r['difference']:+.2f}"
        if r["se"] is not None:
            difference += f" ± {r['se']:.2f}"
            verdict += " (within noise)" if _within_noise(r) else ""
        lines.append(
            f"| {r['task']} | {r['ratio']:g}x | {r['ours']:.2f} [n={r['n']}] "
            f"| {r['best']} {r['best_mean']:.2f} [n={r['best_n']}] | {difference} | {verdict} |"
        )
    wins = sum(r["difference"] > 0 for r in rows)
    lines += ["", f"{name} is ahead of every baseline in {wins} of {len(rows)} task-ratio cells."]
    seeded = [r for r in rows if r["se"] is not None]
    if seeded:
        clear = [r for r in seeded if not _within_noise(r)]
        lines[-1] += (
            f" Where both sides ran several seeds ({len(seeded)} cells; difference ± its standard error), "
            f"{len(clear)} of them differ by more than two standard errors "
            f"({sum(r['difference'] > 0 for r in clear)} won, {sum(r['difference'] < 0 for r in clear)} lost)."
        )
    return "\n".join([*lines, ""])


def _within_noise(row: dict) -> bool:
    return row["se"] is not None and abs(row["difference"]) < 2 * row["se"]


def markdown(cells: list[Cell]) -> str:
    """Tables per task: mean ± std (n seeds) per method and ratio, the difference to dense, files."""
    lines = []
    for task in sorted({c.task for c in cells}):
        here = [c for c in cells if c.task == task]
        dense = next((c for c in here if c.label == "dense"), None)
        ratios = sorted({c.ratio for c in here if c.label != "dense"})
        lines += [f"### {task} ({here[0].metric}, test split)", ""]
        if dense is not None:
            lines += [f"Dense start: {dense.mean:.2f} ({len(dense.scores)} run: `{Path(dense.files[0]).name}`).", ""]
        head = ["method", "trainer"] + [f"{r:g}x" for r in ratios]
        if dense is not None:
            head.append("ratio within 1 point of dense")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in dict.fromkeys(c.label for c in here if c.label != "dense"):
            row = [label, next(c.trainer for c in here if c.label == label)]
            curve = []
            for ratio in ratios:
                cell = next((c for c in here if c.label == label and c.ratio == ratio), None)
                if cell is None:
                    row.append("")
                    continue
                diff = f" ({cell.mean - dense.mean:+.2f})" if dense is not None else ""
                spread = f" ± {cell.std:.2f}" if len(cell.scores) > 1 else ""
                row.append(f"{cell.mean:.2f}{spread}{diff} [n={len(cell.scores)}]{cell.off_nominal}")
                curve.append((cell.measured_ratio, cell.mean))
            if dense is not None:
                found = _within(label, curve, dense.mean - 1.0)
                row.append("below 1 point at every ratio" if found["ratio"] is None else _at_text(found, False))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(cells: list[Cell], folder: Path) -> list[Path]:
    """One PNG per task: metric against measured ratio, one line per method, dense dashed."""
    try:
        import matplotlib
    except ImportError:
        raise DsformerError("the plots need matplotlib: pip install 'dsformer[report]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in sorted({c.task for c in cells}):
        here = [c for c in cells if c.task == task]
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in dict.fromkeys(c.label for c in here if c.label != "dense"):
            line = sorted((c for c in here if c.label == label), key=lambda c: c.measured_ratio)
            ax.errorbar(
                [c.measured_ratio for c in line],
                [c.mean for c in line],
                yerr=[c.std for c in line],
                marker="o",
                capsize=3,
                label=label,
            )
        dense = next((c for c in here if c.label == "dense"), None)
        if dense is not None:
            ax.axhline(dense.mean, color="black", linestyle="--", label="dense")
            ax.axhline(dense.mean - 1, color="grey", linestyle=":", label="dense - 1")
        nominal = sorted({c.ratio for c in here if c.label != "dense"})
        if nominal:  # ticks at the asked ratios; room around them even when only one was measured
            ax.set_xticks(nominal, [f"{r:g}x" for r in nominal])
            ax.set_xlim(nominal[0] - 0.3, nominal[-1] + 0.3)
        ax.set_xlabel("compression ratio (value parameters of the compressed layers)")
        ax.set_ylabel(f"{here[0].metric} (test, x100)")
        ax.set_title(task)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"results_{task}.png"
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def our_labels(cells: list[Cell], asked: list[str] | None) -> list[str]:
    """The labels of DSFormer runs to set against the baselines, checked against the runs; without any
    asked, the default ones that ran."""
    labels = {c.label for c in cells}
    if asked is None:
        return [label for label in DEFAULT_OURS if label in labels]
    for label in asked:
        methods = sorted({c.method for c in cells if c.label == label})
        if not methods:
            known = sorted({c.label for c in cells if c.method in OUR_METHODS}) or ["(none)"]
            raise DsformerError(f"--ours {label}: no run has that label; DSFormer labels here: {', '.join(known)}")
        others = [m for m in methods if m not in OUR_METHODS]
        if others:
            what = "the dense reference" if others == ["dense"] else f"method {others[0]!r}, a baseline"
            raise DsformerError(f"--ours {label}: its runs are {what}; ours are methods {', '.join(OUR_METHODS)}")
    return list(dict.fromkeys(asked))


def write_results(
    folders: list[Path], output: Path, plots: Path | None = None, notes: str | None = None,
    ours: list[str] | None = None, warn=print,
) -> str:  # fmt: skip
    """``dsformer results``: the markdown of every table (per task, against the best baseline, within 1 point
    of dense) with a plot per task, written to ``output`` (with the text of the file ``notes`` under the
    heading); returns the tables and where they went."""
    try:  # read, and the output checked, before anything is written
        notes = Path(notes).read_text() if notes else ""
    except OSError as err:
        raise DsformerError(f"--notes {notes}: {err.strerror}") from None
    check_file_output(output, "--output")
    cells = collect(list(dict.fromkeys(folders)))  # a folder given twice counts once
    images = plot(cells, plots or output.parent)
    labels = our_labels(cells, ours)
    against = {label: (versus_markdown(cells, label), compression_markdown(cells, label)) for label in labels}
    for label, found in against.items():
        if not any(found):
            warn(f"note: --ours {label}: no task has its runs beside the dense start and a baseline")
    tables = "\n".join([v for v, _ in against.values()] + [c for _, c in against.values()] + [markdown(cells)])
    sources = ", ".join(f"`{p}`" for p in folders)
    shown = "\n".join(f"![{p.stem}]({os.path.relpath(p, output.parent)})" for p in images)
    text = (
        "# Results\n\nGenerated by `dsformer results` from " + sources + ": mean ± standard deviation over seeds "
        "of the test metric (x100), difference to the dense start in brackets. Each run's JSON holds its "
        "command, configuration and hardware.\n\n" + (notes.strip() + "\n\n" if notes.strip() else "") + tables
        + "\n" + shown + "\n"
    )  # fmt: skip
    atomic_write_text(output, text)
    return tables + f"\nwritten: {output}, " + ", ".join(str(p) for p in images)
