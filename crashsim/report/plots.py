"""The four PNG figures of a scenario report, drawn from its results dict.

Uses matplotlib's object API only (``Figure`` on an Agg canvas), never pyplot: no global
state, safe in worker processes and threads. Every figure has a title, axis labels with
units and a legend; empty data gives a figure that says so rather than an error.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .core import (FAILED_COLOUR, SEVERITY, colour, is_violation, scenario_name,
                   worst)

DPI = 100
WIDTH_IN = 10.0
MARKER_LIMIT = 80          # above this many steps, lines without markers stay readable
LABEL_ROWS_LIMIT = 40      # above this many I/Os, the y axis is not labelled per I/O
MAX_BRANCHES = 30
MAX_HEAT_COLS = 1500       # heat-map grid bounds: beyond them, steps or counts are binned
MAX_HEAT_ROWS = 120
LOG_SPAN_DECADES = 10      # legal counts far above explored ones are clipped, not squashed
WRITE_COLOUR = "#4575b4"
FLUSH_COLOUR = "#7b3294"
ACK_COLOUR = "#1a1a1a"
NO_CELL_COLOUR = "#f2f2f2"


def render_all(result: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of one scenario, as ``{file name: PNG bytes}``."""
    return {name: _png(draw, result) for name, draw in FIGURES.items()}


def _png(draw: Callable[[Figure, dict[str, Any]], None], result: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(WIDTH_IN, 4.8), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig, result)
    buf = io.BytesIO()
    # No "Software" chunk: the same results give byte-identical images.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _title(fig: Figure, what: str, result: dict[str, Any]) -> None:
    fig.suptitle(f"{what} — {_short(scenario_name(result), 60)}", fontsize=12)


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#555555",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


# -- (1) states per step --------------------------------------------------------------

def draw_states_per_step(fig: Figure, result: dict[str, Any]) -> None:
    _title(fig, "Crash states per I/O step", result)
    ax = fig.add_subplot()
    ax.set_xlabel("crash point (power cut after N I/O steps)")
    ax.set_ylabel("crash states (count, log scale)")
    rows = result.get("per_step") or []
    if not rows:
        return _no_data(ax, "no data: no I/O steps were recorded")
    steps, legal, explored, failed = step_series(rows)
    during = any(r.get("recovery_explored") for r in rows)
    marker = "o" if len(rows) <= MARKER_LIMIT else None
    top = _top_decade(legal, explored)
    # counts beyond ~1e300 overflow a float, so the legal line is clipped in log space
    legal_shown = 10.0 ** np.minimum(legal, top)
    explored[explored <= 0] = np.nan          # log scale: zero is "nothing", not a point
    failed[failed <= 0] = np.nan
    _flush_marks(ax, rows)
    # explored may exceed legal (crashes during recovery add states): shade only the gap
    floor = np.nan_to_num(explored, nan=1.0)
    ax.fill_between(steps, floor, np.maximum(legal_shown, floor), step="mid",
                    color="#d9d9d9", alpha=0.6, label="legal, not explored")
    ax.step(steps, legal_shown, where="mid", color="#525252", ls="--",
            label="legal states")
    ax.plot(steps, explored, color=WRITE_COLOUR, marker=marker, ms=4,
            label="explored (incl. cut during\nrecovery)" if during else "explored")
    ax.plot(steps, failed, color=FAILED_COLOUR, ls="none", marker="v",
            ms=7 if marker else 4,
            label="failed (any violation)")
    ax.set_yscale("log")
    ax.set_ylim(0.6, 10.0 ** (top + 0.3))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(steps.min() - 0.5, steps.max() + 0.5)
    if legal.max() > top:
        ax.set_title(f"legal states reach ~$10^{{{legal.max():.0f}}}$: drawn clipped at "
                     f"$10^{{{top:.0f}}}$", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _legend_right(ax)


def step_series(rows: list[dict[str, Any]]) -> tuple[np.ndarray, ...]:
    """Per crash point: step, log10 of legal states, states judged, states failed.

    States cut during recovery count as judged: the outcome counts (and so the failed
    markers) include them, and a failed marker above the explored line would read as
    more failing states than were ever tried.
    """
    steps = np.array([r["step"] for r in rows])
    legal = np.array([r.get("legal_states_log10", 0.0) for r in rows], dtype=float)
    explored = np.array([r.get("explored", 0) + (r.get("recovery_explored") or 0)
                         for r in rows], dtype=float)
    failed = np.array([sum(n for c, n in r.get("outcomes", {}).items() if is_violation(c))
                       for r in rows], dtype=float)
    return steps, legal, explored, failed


def _legend_right(ax, **kw) -> None:
    """Legend outside the axes, so it never covers data; constrained layout makes room."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False,
              borderaxespad=0.0, **kw)


def _top_decade(legal: np.ndarray, explored: np.ndarray) -> float:
    seen = math.log10(max(1.0, float(np.nanmax(explored)))) if len(explored) else 0.0
    return float(max(1.0, seen, min(np.nanmax(legal), seen + LOG_SPAN_DECADES)))


def _flush_marks(ax, rows: list[dict[str, Any]]) -> None:
    """Thin lines where a flush completes: the durability barriers of the run."""
    xs = [r["step"] for r in rows if r.get("kind") == "flush_complete"]
    if xs:
        ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), color=FLUSH_COLOUR,
                  lw=0.8, alpha=0.35, label="flush completes")


# -- (2) heat map ---------------------------------------------------------------------

def draw_heatmap(fig: Figure, result: dict[str, Any]) -> None:
    _title(fig, "Outcome by crash point and crash-state shape", result)
    cells = (result.get("heatmap") or {}).get("cells") or []
    steps = [r["step"] for r in result.get("per_step") or []]
    if not cells:
        ax = fig.add_subplot()
        ax.set_xlabel("crash point (I/O step)")
        ax.set_ylabel("surviving pending writes (count)")
        return _no_data(ax, "no data: no crash states were explored")
    torn = any(c.get("torn_units", 0) for c in cells)
    axes = fig.subplots(2 if torn else 1, 1, sharex=True, squeeze=False)[:, 0]
    present: set[str] = set()
    present |= _heat_panel(axes[0], cells, steps, "survivors",
                           "surviving pending\nwrites (count)")
    if torn:
        present |= _heat_panel(axes[1], cells, steps, "torn_units",
                               "torn units\n(count per state)")
    else:
        axes[0].set_title("no torn writes among the explored states", fontsize=9)
    axes[-1].set_xlabel("crash point (power cut after N I/O steps)")
    order = sorted(present, key=_severity)
    handles = [Patch(color=colour(c), label=c) for c in order]
    handles.append(Patch(facecolor=NO_CELL_COLOUR, edgecolor="#bbbbbb", label="no state"))
    _legend_right(axes[0], handles=handles, title="worst outcome\nin cell",
                  title_fontsize=9)


def _severity(outcome: str) -> int:
    return SEVERITY.index(outcome) if outcome in SEVERITY else len(SEVERITY)


def _heat_panel(ax, cells: list[dict[str, Any]], steps: list[int], key: str,
                ylabel: str) -> set[str]:
    """One step × ``key`` grid coloured by the worst outcome of each cell.

    Very long runs or very torn states are binned so the grid stays small; a bin shows
    the worst outcome of the cells it covers.
    """
    x0 = min([*steps, *(c["step"] for c in cells)])
    x1 = max([*steps, *(c["step"] for c in cells)])
    y1 = max(int(c.get(key, 0)) for c in cells)
    xbin = math.ceil((x1 - x0 + 1) / MAX_HEAT_COLS)
    ybin = math.ceil((y1 + 1) / MAX_HEAT_ROWS)
    by_cell: dict[tuple[int, int], list[str]] = {}
    for c in cells:
        at = ((c["step"] - x0) // xbin, int(c.get(key, 0)) // ybin)
        by_cell.setdefault(at, []).append(c["outcome"])
    worst_of = {cell: worst(outs) for cell, outs in by_cell.items()}
    names = sorted(set(worst_of.values()), key=_severity)
    grid = np.full(((y1 // ybin) + 1, ((x1 - x0) // xbin) + 1), np.nan)
    for (x, y), name in worst_of.items():
        grid[y, x] = names.index(name)
    cmap = ListedColormap([colour(n) for n in names]).with_extremes(bad=NO_CELL_COLOUR)
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5,
              origin="lower", aspect="auto", interpolation="nearest",
              extent=(x0 - 0.5, x0 + grid.shape[1] * xbin - 0.5,
                      -0.5, grid.shape[0] * ybin - 0.5))
    ax.set_ylabel(ylabel + (f"\nbinned by {ybin}" if ybin > 1 else ""), fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return set(names)


# -- (3) I/O timeline -----------------------------------------------------------------

def draw_timeline(fig: Figure, result: dict[str, Any]) -> None:
    _title(fig, "Writer I/O timeline (simulated)", result)
    tl = result.get("timeline") or {}
    ios = tl.get("ios") or []
    if not ios:
        ax = fig.add_subplot()
        ax.set_xlabel("simulated time (µs)")
        ax.set_ylabel("I/O")
        return _no_data(ax, "no data: the writer issued no I/O")
    end_us = _end_time(result, ios)
    n_rows = len(ios)
    labelled = n_rows <= LABEL_ROWS_LIMIT
    fig.set_size_inches(WIDTH_IN, max(4.8, 2.6 + 0.2 * n_rows) if labelled else 6.0)
    events, ax = fig.subplots(2, 1, sharex=True,
                              height_ratios=[1.0, max(2.5, min(n_rows, 40) / 4)])
    handles = _draw_crash_points(events, result.get("per_step") or [], 1)
    handles += _draw_acks(events, ax, tl.get("tx") or [], 0)
    events.set_yticks([0, 1], ["tx ack", "crash points"], fontsize=8)
    events.set_ylim(-0.6, 1.6)
    handles = _draw_ios(ax, ios, end_us) + handles
    if labelled:
        labels = [f"{'W' if r['kind'] == 'write' else 'F'}{r['io_id']}" for r in ios]
        ax.set_yticks(range(len(ios)), labels, fontsize=8 if len(ios) > 12 else 9)
        ax.set_ylabel("I/O, by submit order\n(W = write, F = flush)")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"I/O number, by submit order\n({n_rows} I/Os)")
    ax.set_ylim(-0.7, n_rows - 0.3)
    ax.set_xlim(-0.02 * end_us, end_us * 1.03)
    ax.set_xlabel("simulated time (µs)")
    for a in (events, ax):
        a.grid(axis="x", alpha=0.3)
    _legend_right(ax, handles=handles)   # beside the tall panel: no gap between panels


def _end_time(result: dict[str, Any], ios: list[dict[str, Any]]) -> float:
    times = [r.get("time_us") or 0.0 for r in result.get("per_step") or []]
    times += [r.get("complete_us") or r.get("submit_us") or 0.0 for r in ios]
    return max(max(times), 1.0)


def _draw_ios(ax, ios: list[dict[str, Any]], end_us: float) -> list:
    groups: dict[str, tuple[list, list, list]] = {}
    for y, r in enumerate(ios):
        start = r.get("submit_us") or 0.0
        stop = r.get("complete_us")
        kind = ("flush" if r["kind"] == "flush" else "write (FUA)" if r.get("fua")
                else "write")
        key = kind if stop is not None else "never completed"
        # an I/O still in flight at the end runs off the right edge of the plot
        width = (end_us * 1.03 if stop is None else stop) - start
        g = groups.setdefault(key, ([], [], []))
        g[0].append(y), g[1].append(start), g[2].append(width)
    style = {"write": dict(facecolor=WRITE_COLOUR, edgecolor=WRITE_COLOUR),
             "write (FUA)": dict(facecolor=WRITE_COLOUR, hatch="////", edgecolor="black"),
             "flush": dict(facecolor=FLUSH_COLOUR, edgecolor=FLUSH_COLOUR),
             "never completed": dict(facecolor="#bdbdbd", edgecolor="#636363",
                                     linestyle="--")}
    handles = []
    for key in ("write", "write (FUA)", "flush", "never completed"):
        if key in groups:
            ys, starts, widths = groups[key]
            _bars(ax, ys, starts, widths, style[key])
            # a zero-length I/O would vanish; its submit tick keeps it visible
            ax.plot(starts, ys, ls="none", marker="|", ms=8,
                    color=style[key]["edgecolor"])
            handles.append(Patch(label=f"{key}: submit → complete", **style[key]))
    return handles


def _bars(ax, ys: list[int], starts: list[float], widths: list[float],
          style: dict[str, Any]) -> None:
    """Horizontal bars as one PolyCollection: thousands of I/Os draw in a blink."""
    h = 0.3
    verts = [[(x, y - h), (x + w, y - h), (x + w, y + h), (x, y + h)]
             for y, x, w in zip(ys, starts, widths)]
    ax.add_collection(PolyCollection(verts, linewidths=0.6, **style), autolim=True)


def _draw_acks(events, ax, tx: list[dict[str, Any]], row: int) -> list:
    acks = [t["ack_us"] for t in tx if t.get("ack_us") is not None]
    if not acks:
        return []
    events.plot(acks, [row] * len(acks), ls="none", marker="^", ms=8, color=ACK_COLOUR)
    for a in (events, ax):   # carried down: which I/O did each ack wait for?
        a.vlines(acks, 0, 1, transform=a.get_xaxis_transform(), color=ACK_COLOUR,
                 lw=0.5, ls=":", alpha=0.5)
    return [Line2D([], [], ls="none", marker="^", color=ACK_COLOUR,
                   label=f"transaction acknowledged ({len(acks)})")]


def _draw_crash_points(ax, rows: list[dict[str, Any]], row: int) -> list:
    by_outcome: dict[str, list[float]] = {}
    for r in rows:
        name = worst(c for c, n in r.get("outcomes", {}).items() if n)
        if name is not None:
            by_outcome.setdefault(name, []).append(r.get("time_us") or 0.0)
    handles = []
    # worse outcomes drawn last so a failing point is never hidden under a passing one
    for name in sorted(by_outcome, key=_severity):
        ax.plot(by_outcome[name], [row] * len(by_outcome[name]), ls="none", marker="D",
                ms=7, color=colour(name), markeredgecolor="black", markeredgewidth=0.4)
        handles.append(Line2D([], [], ls="none", marker="D", color=colour(name),
                              label=f"crash point, worst: {name}"))
    return handles


# -- (4) recovery paths ---------------------------------------------------------------

def draw_recovery_paths(fig: Figure, result: dict[str, Any]) -> None:
    _title(fig, "Recovery branches exercised", result)
    ax = fig.add_subplot()
    ax.set_xlabel("crash states taking the branch (count)")
    ax.set_ylabel("recovery branch")
    paths = {str(k): int(v) for k, v in (result.get("recovery_paths") or {}).items()}
    if not paths:
        return _no_data(ax, "no data: no recovery branch was recorded")
    items = sorted(paths.items(), key=lambda kv: (-kv[1], kv[0]))
    shown, rest = items[:MAX_BRANCHES], items[MAX_BRANCHES:]
    names = [_short(k) for k, _ in reversed(shown)]
    counts = [v for _, v in reversed(shown)]
    bars = ax.barh(range(len(shown)), counts, color=WRITE_COLOUR, height=0.7,
                   label="crash states exercising the branch")
    ax.bar_label(bars, labels=[f"{c:,}" for c in counts], padding=3, fontsize=8)
    ax.set_yticks(range(len(shown)), names, fontsize=8 if len(shown) > 12 else 9)
    ax.set_xlim(0, max(counts) * 1.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    title = f"{len(paths)} branches" + (f"; {len(rest)} least used not shown"
                                        if rest else "")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=9)


def _short(name: str, limit: int = 40) -> str:
    name = name if len(name) <= limit else name[:limit - 1] + "…"
    return name.replace("$", r"\$")   # user text (a tool's name) is never mathtext


FIGURES: dict[str, Callable[[Figure, dict[str, Any]], None]] = {
    "states_per_step.png": draw_states_per_step,
    "heatmap.png": draw_heatmap,
    "timeline.png": draw_timeline,
    "recovery_paths.png": draw_recovery_paths,
}
