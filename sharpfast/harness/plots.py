"""Figures of the harness (matplotlib, Agg backend: files only, no display needed)."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_NUM = r"(-?\d*\.?\d+(?:e-?\d+)?)"


def setting_label(method: str, setting: Any) -> str:
    """A method's setting in words for a figure ("s0t450" -> "CFG 0 above t=450"); the code itself
    when it is not one of the known grammars."""
    import re

    if setting is None:
        return "default"
    text = str(setting)
    keys = dict(re.findall(r"([a-z]+)" + _NUM, text))
    then = "SAIL, then " if method == "sail+transition" else ""
    if method in ("transition", "sail+transition") and "t" in keys:
        if keys["t"] == "0":
            return f"{then}CFG {keys.get('s', '0')} throughout" + (f", {keys['g']} at t=0" if "g" in keys else "")
        return f"{then}CFG {keys.get('s', '0')} above t={keys['t']}" + (f", then {keys['g']}" if "g" in keys else "")
    if method in ("transition", "sail+transition") and "dyn" in text:
        return f"{then}CFG {keys.get('s', '0')} until the dynamic point"
    if method == "sail_alpha" and "a" in keys:
        return f"alpha {keys['a']}"
    if method in ("sail", "sail_reference") and "k" in keys:
        lr = keys.get("lr", "0.05" if method == "sail_reference" else "0.7")
        return f"{keys['k']} start{'s' if keys['k'] != '1' else ''}, {keys.get('s', '?')} steps, lr {lr}"
    if method == "attenuate" and "a" in keys:
        return f"spikes x{keys['a']}" + (f", z > {keys['t']}" if "t" in keys else "") + (
            ", every layer" if text.endswith("all") else "")
    if method == "zhao_guard" and "r" in keys:
        return f"r {keys['r']}, alpha {keys.get('a', '0.3')}"
    if method == "random_tokens":
        return f"{text} tokens"
    if method == "wen_embedding":
        return f"to {text} of its ||eps_delta||"
    if method == "attention_rescale":
        return f"BOS x{text}"
    if method == "sail_guard":
        return f"margin {text}"
    return text


def _style_of(labels: list) -> dict:
    """One colour and line style per curve label, the same in every panel: single metrics get
    the ten distinct tab10 colours in order, combined detectors black / grey with their own dashes."""
    plt = pyplot()
    colors = plt.get_cmap("tab10").colors
    dashes = [(0, (5, 2)), (0, (2, 1.5)), (0, (6, 2, 1.5, 2)), (0, (1, 1))]
    style, k, c = {}, 0, 0
    for label in labels:
        if label.startswith("combined"):
            style[label] = dict(color="black" if c % 2 == 0 else "dimgrey", ls=dashes[(c // 2) % len(dashes)], lw=1.8)
            c += 1
        else:
            style[label] = dict(color=colors[k % len(colors)], ls="-" if k < len(colors) else ":", lw=1.5)
            k += 1
    return style


def roc_figure(curves: dict, path: str, title: str = "") -> str:
    """curves: {panel title: {label: (fpr, tpr, auc)}}; one panel per key, log-scaled FPR axis.
    Every curve keeps one colour and line style in every panel (single metrics: ten distinct
    colours; combined detectors: black / grey dashes), and each panel's legend beside it lists
    the curves in the same order (with that panel's AUC), so panels read side by side."""
    plt = pyplot()
    k = len(curves)
    cols = min(k, 2)
    rows = math.ceil(k / cols)
    order = list(dict.fromkeys(label for lines in curves.values() for label in lines))
    order = sorted(order, key=lambda lab: lab.startswith("combined"))  # (stable: single metrics first)
    style = _style_of(order)
    fig, axes = plt.subplots(rows, cols, figsize=(8.6 * cols, 4.2 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, curves.items()):
        for label in (lab for lab in order if lab in lines):
            fpr, tpr, auc = lines[label]
            ax.plot(np.maximum(fpr, 1e-3), tpr, label=f"{label} (AUC {auc:.3f})", **style[label])
        ax.axvline(0.01, color="grey", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false positive rate: share of normal prompts flagged (log scale; dotted: 1%)", fontsize=9)
        ax.set_ylabel("true positive rate: share of\nmemorized prompts flagged", fontsize=9)
        ax.set_title(panel, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    import textwrap

    note = ("each detector scores a prompt from its first sampling steps (steps: how many, n: initial noises per "
            "prompt); upper left is better")
    width = int(11 * fig.get_figwidth())  # characters that fit the figure's width at this size
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(note, width)), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(rows: list[list], row_labels: list[str], col_labels: list[str], path: str, title: str = "",
               notes=None, caption: str = "") -> str:
    """A grid of single-channel images in [-1, 1] (rows x columns; None leaves a cell blank).

    notes[r][c] = (similarity or None, mark): the similarity is printed under the cell, mark
    "copy" frames it red, "near" orange. Row labels are wrapped, never cut; `caption` is printed
    under the grid (what the numbers measure, what they miss)."""
    import textwrap

    plt = pyplot()
    R, C = len(rows), len(col_labels)
    wrapped = ["\n".join(textwrap.wrap(lab, 28)) or " " for lab in row_labels]
    label_w = 0.09 * max(len(line) for lab in wrapped for line in lab.split("\n")) + 0.4
    fig, axes = plt.subplots(R, C, figsize=(1.45 * C + label_w, 1.6 * R + 0.9), squeeze=False)
    for r, cells in enumerate(rows):
        for c in range(C):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            img = cells[c] if c < len(cells) else None
            if img is None:
                ax.axis("off")
                continue
            arr = np.asarray(img, dtype=np.float32)
            if arr.ndim == 3 and arr.shape[0] == 3:  # RGB in [-1, 1], channels first (scenes)
                ax.imshow(((arr.transpose(1, 2, 0) + 1) / 2).clip(0, 1))
            else:  # one channel (digits): dark ink on white
                ax.imshow(arr.reshape(arr.shape[-2:]), cmap="gray_r", vmin=-1, vmax=1)
            if r == 0:
                ax.set_title(col_labels[c], fontsize=8)
            sim, mark = (notes[r][c] if notes and c < len(notes[r]) else (None, None))
            if sim is not None:
                ax.set_xlabel(f"{sim:.2f}" + (" copy" if mark == "copy" else ""), fontsize=7,
                              color="tab:red" if mark == "copy" else "black")
            if mark in ("copy", "near"):
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red" if mark == "copy" else "tab:orange")
                    spine.set_linewidth(2.5)
        axes[r][0].set_ylabel(wrapped[r], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    lines = textwrap.wrap(caption, int(14 * fig.get_figwidth())) if caption else []
    if lines:
        fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, va="bottom", ha="left")
    fig.tight_layout(rect=(0, (0.13 * len(lines) + 0.08) / fig.get_figheight() if lines else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def similarity_histogram(sims: dict, cuts, path: str) -> str:
    """sims: {method: similarities to the memorized image}; one histogram per method, the copy cuts marked."""
    plt = pyplot()
    k = len(sims)
    fig, axes = plt.subplots(k, 1, figsize=(7, 1.7 * k + 0.8), sharex=True, squeeze=False)
    bins = np.linspace(min(0.0, min(float(np.min(v)) for v in sims.values())), 1.0, 41)
    for ax, (method, v) in zip(axes[:, 0], sims.items()):
        ax.hist(v, bins=bins, color="tab:blue", alpha=0.8)
        for c in cuts:
            ax.axvline(c, color="tab:red", ls="--", lw=0.9)
        shares = "\n".join(f"similarity >= {c}: {(np.asarray(v) >= c).mean():.1%}" for c in cuts)
        ax.text(0.02, 0.92, shares, transform=ax.transAxes, fontsize=7, va="top", color="tab:red",
                bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
        ax.set_ylabel("outputs", fontsize=8)
        ax.set_title(f"{method}: {len(v)} outputs, mean similarity {np.mean(v):.3f}", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(f"similarity to the memorized training image (dashed: {min(cuts)}, the copy cut, and "
                           f"{', '.join(str(c) for c in sorted(cuts)[1:])} beside it)")
    fig.suptitle("similarity of mitigated outputs to the memorized image", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pareto(pts) -> list:
    """The points no other point beats on both axes (higher fidelity, fewer copies), by fidelity."""
    keep = [p for p in pts if not any((q[0] >= p[0] and q[1] < p[1]) or (q[0] > p[0] and q[1] <= p[1]) for q in pts)]
    return sorted(keep, key=lambda p: p[0])


def tradeoff_figure(series: dict, path: str, title: str = "", chosen=None, fidelity_floor=None,
                    copy_cut: float = 0.8, zoom: float | None = None) -> str:
    """The mitigation frontier. series: {method: [(fidelity, copies, setting, CFG calls per image),
    ...]}: every setting a dot, each method's own frontier (the settings no other of its settings
    beats on both axes) a line with its settings labelled, the mean CFG calls per image in the
    legend, unmitigated generation a black star drawn on top; `chosen` (method, setting) is
    ringed, `fidelity_floor` a dotted vertical line; `copy_cut` is the similarity the copies
    were counted at (the y axis' label). zoom: a fidelity from which a second panel enlarges the
    crowded high-fidelity corner (its points are labelled there, not on the full view)."""
    plt = pyplot()
    panels = 2 if zoom is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(10 + 4 * (panels - 1), 5.8), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2][:panels]})
    if zoom is not None:  # (the limits first: labels are placed inside them)
        z = axes[0][1]
        ys = [p[1] for pts in series.values() for p in pts if p[0] >= zoom]
        z.set_xlim(zoom - (1.0 - zoom) * 0.04, 1.0 + (1.0 - zoom) * 0.08)
        z.set_ylim(min(ys) - 0.04, max(ys) + 0.04)
        axes[0][0].axvspan(zoom, 1.0, color="grey", alpha=0.08)
    for i, ax in enumerate(axes[0]):
        _draw_tradeoff(ax, series, chosen, fidelity_floor,
                       label=lambda p, i=i: zoom is None or (p[0] >= zoom) == (i == 1), legend=i == 0)
        ax.set_xlabel("prompt fidelity (share of outputs the digit classifier reads as the prompted digit)"
                      if i == 0 else "the same, fidelity >= " + str(zoom), fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
    axes[0][0].set_ylabel(f"copies: nearest training image is the memorized one, similarity >= {copy_cut}",
                          fontsize=9)
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(title or "mitigation frontier (lower right is better)",
                                         int(11 * fig.get_figwidth()))), fontsize=10)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="lower center",
               ncol=min(3, len(series) + 1), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_tradeoff(ax: Any, series, chosen, fidelity_floor, label: Callable, legend) -> None:
    """One panel of tradeoff_figure; label(point) says whether a point's setting is written here.
    Settings are written in words (setting_label) beside their points, each label placed where it
    overlaps no label placed before it (or left out: the legend and the dot remain)."""
    colors = pyplot().get_cmap("tab10").colors
    k = 0
    wanted: list = []
    rings: list = []
    for method, pts in series.items():
        calls = np.mean([p[3] for p in pts]) if pts and len(pts[0]) > 3 and pts[0][3] is not None else None
        name = method if calls is None else f"{method} ({calls:.0f} CFG calls per image)"
        if method == "none":
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="*", markersize=18, color="black", mec="white",
                    mew=1.0, linestyle="none", label="no mitigation" + name[4:], zorder=12)
            continue
        color = colors[k % len(colors)]
        k += 1
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=color, linestyle="none", alpha=0.5)
        front = _pareto(pts)
        ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", ms=5, lw=1.5, color=color, label=name)
        wanted += [(p, setting_label(method, p[2]), color) for p in front if p[2] is not None and label(p)]
        if chosen and chosen[0] == method:
            for p in pts:
                if str(p[2]) == str(chosen[1]):
                    rings.append(p)
                    ax.plot([p[0]], [p[1]], marker="o", ms=15, mfc="none", mec="black", mew=1.5, zorder=11,
                            linestyle="none", label=f"chosen: {method}, {setting_label(method, chosen[1])}")
    if fidelity_floor is not None:
        ax.axvline(fidelity_floor, color="grey", ls=":", lw=1)
        ax.annotate(f"fidelity {fidelity_floor}", (fidelity_floor, 0.98), xycoords=("data", "axes fraction"),
                    fontsize=7, color="grey", ha="right", xytext=(-3, 0), textcoords="offset points")
    _place_labels(ax, wanted, [p for pts in series.values() for p in pts], rings)
    del legend


def _place_labels(ax: Any, wanted: list, points: list, rings: Sequence = ()) -> None:
    """Writes each (point, text, colour) beside its point at the first of eight offsets whose box
    overlaps no label already placed, none of `points` (a dot's radius around each) and none of
    the `rings` (the chosen point's circle); a label with no free place is left out."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72  # pixels per point: the markers' sizes are in points
    dots = [(ax.transData.transform((p[0], p[1])), 3 * px) for p in points]
    dots += [(ax.transData.transform((p[0], p[1])), 8 * px) for p in rings]  # the ring: ms 15
    placed: list = []
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12), (8, -4), (-8, -4), (0, 10), (0, -16)]
    for p, text, color in wanted:
        for dx, dy in offsets:
            a = ax.annotate(text, (p[0], p[1]), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                            color=color, ha="left" if dx >= 0 else "right")
            box = a.get_window_extent(renderer).expanded(1.05, 1.15)
            hits_dot = any(box.padded(r).contains(x, y) for (x, y), r in dots)
            inside = ax.get_window_extent(renderer).contains(box.x0, box.y0) and \
                ax.get_window_extent(renderer).contains(box.x1, box.y1)
            if inside and not hits_dot and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            a.remove()


def policy_words(text: str) -> str:
    """A policy in words: "always,0.01:s0t300" -> "every prompt; above the 1% cut: CFG 0 above t=300"."""
    from ..guarding.policy import Policy

    pol = Policy.parse(text)
    gate = "every prompt" if pol.gate == "always" else f"gate at {float(pol.gate):.0%} of normal captions"
    if pol.setting is not None:
        gate += f": {setting_label('transition', pol.setting)}"
    return "; ".join([gate] + [f"above {_tier_words(key)}: {setting_label('transition', setting)}"
                               for key, setting in pol.tiers])


def _tier_words(key: Any) -> str:
    from ..guarding.policy import Multiple

    return f"{key.m:g}x the gate's margin" if isinstance(key, Multiple) else f"the {key:.0%} cut"


def policy_frontier(points: list, path: str, model: str = "", half: str = "") -> str:
    """The guard's policies on one model: left, the share of memorized prompts' outputs that copy
    their training image (plain pipe(...) dashed, the 20% target dotted); right, the guarded /
    plain fidelity of memorized and normal prompts (targets 0.95 and 0.97 dotted); x: the share
    of the model's normal captions the policy's gate sends to the mitigation ("always": 1).
    Gate-only policies at the guard's setting are joined by lines; policies with a setting of
    their own or tiers are single labelled markers."""
    plt = pyplot()

    from ..guarding.policy import Policy

    def x_of(text: str) -> float:
        return Policy.parse(text).share

    pts = sorted(points, key=lambda p: (x_of(p["policy"]), p["policy"]))
    gates = [p for p in pts if not (Policy.parse(p["policy"]).tiers or Policy.parse(p["policy"]).setting)]
    tiered = [p for p in pts if p not in gates]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12.5, 4.6))
    xs = [x_of(p["policy"]) for p in gates]
    a.plot(xs, [p["summary"]["guard"]["copies_at_0.8"] for p in gates], "o-", color="tab:red",
           label="guarded, gate only")
    a.axhline(float(np.mean([p["summary"]["plain"]["copies_at_0.8"] for p in pts])), color="grey", ls="--",
              label="plain pipe(...)")
    a.axhline(0.2, color="black", ls=":", lw=0.8, label="target 20%")
    a.set_ylabel("memorized prompts: share of outputs that copy\n(nearest training image is theirs, sim. >= 0.8)")
    b.plot(xs, [p["summary"]["fidelity_ratio"] for p in gates], "o-", color="tab:red", label="memorized prompts")
    b.plot(xs, [p["summary"]["normal"]["fidelity_ratio"] for p in gates], "s-", color="tab:blue",
           label="normal prompts")
    for k, p in enumerate(tiered):  # a stronger setting above a stricter cut: one marker each, named
        x, s = x_of(p["policy"]), p["summary"]
        mark = "^v<>Dp"[k % 6]
        a.scatter([x], [s["guard"]["copies_at_0.8"]], marker=mark, color="tab:purple", zorder=3,
                  label=policy_words(p["policy"]))
        b.scatter([x], [s["fidelity_ratio"]], marker=mark, color="tab:red", zorder=3)
        b.scatter([x], [s["normal"]["fidelity_ratio"]], marker=mark, color="tab:blue", zorder=3)
    b.axhline(0.95, color="tab:red", ls=":", lw=0.8, label="memorized target 0.95")
    b.axhline(0.97, color="tab:blue", ls=":", lw=0.8, label="normal target 0.97")
    b.set_ylabel("fidelity, guarded / plain (same seeds)")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("share of the model's normal captions the gate mitigates (1 = always)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    where = f", {half}" if half else ""
    import textwrap

    title = (f"sharpfast.guard policies on the {model} model{where}: the gate mitigates prompts scoring above "
             f"that share of normal captions with the transition (CFG 0 above t=450); purple markers name "
             f"their own setting, or a stronger one above a stricter cut") if model else "sharpfast.guard policies"
    fig.suptitle("\n".join(textwrap.wrap(title, int(11 * fig.get_figwidth()))), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
