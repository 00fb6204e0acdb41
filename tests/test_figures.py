"""The figures read without the docs (issue 33, item 10): every curve keeps its colour, style and
legend place in every panel of the ROC figure, settings are written in words, frontier labels
never overlap, and a grid says what its numbers measure."""
import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sharpfast.harness import plots  # noqa: E402


@pytest.fixture
def kept(monkeypatch):
    """The figures the plot functions close, kept for inspection."""
    import matplotlib.pyplot as plt

    figs = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
    return figs


@pytest.mark.parametrize("method, setting, words", [
    ("transition", "s0t450", "CFG 0 above t=450"),
    ("transition", "s-1t500", "CFG -1 above t=500"),
    ("transition", "s1t500g0.5", "CFG 1 above t=500, then 0.5"),
    ("transition", "s0.9t0", "CFG 0.9 throughout"),
    ("attenuate", "a0.3t0.01", "spikes x0.3, z > 0.01"),
    ("attenuate", "a0t1all", "spikes x0, z > 1, every layer"),
    ("sail+transition", "s0t500", "SAIL, then CFG 0 above t=500"),
    ("sail", "k1s3lr0.7", "1 start, 3 steps, lr 0.7"),
    ("sail", "k4s2lr0.05", "4 starts, 2 steps, lr 0.05"),
    ("sail_alpha", "k1s3a1e-5", "alpha 1e-5"),
    ("random_tokens", 4, "4 tokens"),
    ("attention_rescale", 1.25, "BOS x1.25"),
])
def test_settings_are_written_in_words(method, setting, words):
    assert plots.setting_label(method, setting) == words


@pytest.mark.parametrize("policy, words", [
    ("0.01", "gate at 1% of normal captions"),
    ("always,0.01:s0t200", "every prompt; above the 1% cut: CFG 0 above t=200"),
    ("0.01:s1.25t0,x3:s1t500g0.5", "gate at 1% of normal captions: CFG 1.25 throughout; above 3x the gate's margin: "
                                   "CFG 1 above t=500, then 0.5"),
])
def test_policies_are_written_in_words(policy, words):
    assert plots.policy_words(policy) == words


def test_roc_curves_keep_colour_style_and_order_in_every_panel(tmp_path, kept):
    rng = np.random.default_rng(0)
    labels = [f"m{i}" for i in range(10)] + ["combined(m0 + m1)", "combined(m0 + m2)", "combined(m1 + m2)"]

    def curve():
        f = np.r_[0, np.sort(rng.random(20)), 1]
        return f, np.sqrt(f), float(rng.random())  # random AUCs: a legend sorted by AUC would reorder

    panels = {}
    for p in range(4):
        order = list(rng.permutation(labels))  # each panel's dict in another order
        panels[f"panel {p}"] = {lab: curve() for lab in order}
    plots.roc_figure(panels, str(tmp_path / "roc.png"), "t")
    axes = [ax for ax in kept[-1].axes if ax.get_lines()]
    seen = {}
    legends = []
    for ax in axes:
        names = [t.get_text().split(" (AUC")[0] for t in ax.get_legend().get_texts()]
        legends.append(names)
        for line in ax.get_lines():
            lab = line.get_label().split(" (AUC")[0]
            if lab in labels:
                look = (matplotlib.colors.to_hex(line.get_color()), str(line.get_linestyle()),
                        str(getattr(line, "_unscaled_dash_pattern", "")))  # (the dash pattern itself)
                assert seen.setdefault(lab, look) == look, lab
    assert all(names == legends[0] for names in legends) and sorted(legends[0]) == sorted(labels)
    looks = [seen[lab] for lab in labels]
    assert len(set(looks)) == len(labels)  # no two curves look alike
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_frontier_labels_never_overlap(tmp_path, kept):
    # a crowded corner: 8 settings of two methods within 0.02 of each other
    series = {"none": [(1.0, 0.85, None, 50)],
              "transition": [(0.98 + 0.002 * i, 0.30 + 0.01 * i, f"s0t{400 + 25 * i}", 50) for i in range(8)],
              "sail": [(0.975 + 0.003 * i, 0.31 + 0.012 * i, f"k1s{i + 1}lr0.7", 57) for i in range(8)]}
    plots.tradeoff_figure(series, str(tmp_path / "f.png"), chosen=("transition", "s0t450"))
    fig = kept[-1]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in ax.texts if t.get_text().startswith(("CFG", "1 start"))]
    assert texts, "no setting was labelled"
    boxes = [t.get_window_extent(r) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    assert not any("s0t" in t.get_text() for ax in fig.axes for t in ax.texts)  # words, not codes


def test_grid_prints_what_its_similarity_measures(tmp_path, kept):
    img = np.zeros((1, 8, 8), dtype=np.float32)
    plots.image_grid([[img, img]], ["a prompt"], ["training image", "transition"], str(tmp_path / "g.png"),
                     "t", notes=[[(None, None), (0.05, None)]],
                     caption="similarity: pixels in place; moved objects score 0")
    assert any("moved objects score 0" in t.get_text() for t in kept[-1].texts)
