"""The scenes data set and its judge, checked against facts written here (not the renderer's own
helpers): pixel colours at known places, captions that name every object, the duplication plan,
and a judge that finds a planted copy and misses a different scene."""
import numpy as np
import pytest
import torch

from sharpfast.zoo import scenes_data as sd


def test_render_puts_each_colour_where_the_scene_says():
    o = sd.Obj("large", "red", "circle", "center", 16.0, 16.0, 7.0)
    s = sd.Scene("teal", (o, sd.Obj("small", "yellow", "square", "top", 6.0, 6.0, 3.0)))
    img = sd.render(s)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32
    np.testing.assert_allclose(img[:, 16, 16], [0.86, 0.1, 0.1], atol=1e-6)       # inside the circle
    np.testing.assert_allclose(img[:, 6, 6], [0.96, 0.86, 0.1], atol=1e-6)        # inside the square
    np.testing.assert_allclose(img[:, 30, 30], [0.08, 0.48, 0.5], atol=1e-6)      # background
    # a circle of radius 7 covers about pi 7^2 pixels (anti-aliased edges average in)
    red = (np.abs(img - np.array([0.86, 0.1, 0.1])[:, None, None]).sum(0) < 0.05).sum()
    assert abs(red - np.pi * 49) < 0.15 * np.pi * 49
    # the triangle points up: its top rows are narrower than its bottom rows
    t = sd.render(sd.Scene("white", (sd.Obj("large", "blue", "triangle", "center", 16.0, 16.0, 8.0),)))
    blue = np.abs(t - np.array([0.15, 0.3, 0.92])[:, None, None]).sum(0) < 0.05
    assert blue[10].sum() < blue[20].sum() and blue[4].sum() == 0


def test_captions_name_every_object_and_the_background():
    rng = np.random.default_rng(3)
    for _ in range(300):
        s = sd.random_scene(rng)
        c = sd.caption(s, rng)
        assert s.background in c
        for o in s.objects:
            assert f"{o.size} {o.colour} {o.shape}" in c
        if len(s.objects) == 2:
            assert s.objects[0].position != s.objects[1].position
    words = set(sd.caption_words())
    assert {"circle", "square", "triangle", "teal", "badge", "wallpaper"} <= words


def test_duplication_plan_is_seeded_and_each_caption_has_one_image():
    a, b, c = sd.build(0), sd.build(0), sd.build(1)
    assert [f.caption for f in a.fixed] == [f.caption for f in b.fixed]
    assert torch.equal(a.fixed_images(), b.fixed_images())
    assert [f.caption for f in a.fixed] != [f.caption for f in c.fixed]
    dups = a.duplicates
    assert [sum(f.duplicates == lv for f in dups) for lv in sd.DUPLICATION_LEVELS] == list(sd.IMAGES_PER_LEVEL)
    assert len({f.caption for f in a.fixed}) == len(a.fixed)   # one caption per image
    assert len(a.template) == 18 and {f.duplicates for f in a.template} == {sd.TEMPLATE_DUPLICATES}
    assert all(f.caption.startswith("event poster template with a ") for f in a.template)
    # an epoch holds every fixed scene exactly `duplicates` times, and generic_per_epoch pool scenes
    pool = a.generic_pool()[:500]
    keys, caps = a.epoch(np.random.default_rng(0), pool)
    counts = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    assert all(counts[("fixed", f.index)] == f.duplicates for f in a.fixed)
    assert sum(1 for k in keys if k[0] == "generic") == min(a.generic_per_epoch, len(pool))
    assert all(caps[i] == a.fixed[k[1]].caption for i, k in enumerate(keys) if k[0] == "fixed")


class _IdentityVAE:
    """A stand-in VAE whose decode(encode(x)) is x: the judge's references are then the renders."""
    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, x):
        return type("E", (), {"latent_dist": type("D", (), {"mean": x})()})()

    def decode(self, z):
        return type("O", (), {"sample": z})()


@pytest.fixture(scope="module")
def judge():
    """The shipped judge (its classifier) with references that are the renders themselves."""
    from sharpfast import zoo
    from sharpfast.zoo import scenes_judge

    return scenes_judge.ScenesJudge(type("P", (), {"vae": _IdentityVAE()})(), zoo.path("scenes"))


def test_the_classifier_trains_saves_and_loads(tmp_path):
    from sharpfast.zoo import scenes_judge

    acc = scenes_judge.train_classifier(str(tmp_path / "judge"), seed=3, steps=3, pool=64, log=lambda m: None)
    assert set(acc) == {"background", "pairs_exact"}
    net = scenes_judge.classifier(str(tmp_path))
    lb, lp = net(torch.zeros(2, 3, 32, 32))
    assert lb.shape == (2, 6) and lp.shape == (2, 18)
    with pytest.raises(FileNotFoundError, match="train_scenes"):
        scenes_judge.classifier(str(tmp_path / "nothing"))


def test_judge_finds_a_copy_and_only_that_copy(judge):
    data = sd.build(0)
    x = data.fixed_images()
    i, j = data.duplicates[5].index, data.duplicates[9].index
    noisy = (x[[i, i]] + 0.05 * torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    copies, sim = judge.copy_stats(noisy, i)
    assert copies.all() and (sim > judge.threshold).all()  # a copy by the judge's own cut (COPY_CUT)
    copies, sim = judge.copy_stats(noisy, j)        # the right image, the wrong caption's target
    assert not copies.any()
    # a template caption counts a copy of ANY template scene; a verbatim caption does not
    t0, t1 = data.template[0].index, data.template[1].index
    copies, _ = judge.copy_stats(x[[t1]], t0)
    assert copies.all()
    copies, _ = judge.copy_stats(x[[t1]], i)
    assert not copies.any()
    # a fresh generic scene copies nothing
    fresh = sd.to_tensor([sd.random_scene(np.random.default_rng(5)) for _ in range(20)])
    assert judge.copies_any(fresh)[0].float().mean() <= 0.1


def test_fidelity_reads_the_prompted_attributes(judge):
    rng = np.random.default_rng(11)
    scenes = [sd.random_scene(rng) for _ in range(60)]
    x = sd.to_tensor(scenes)
    right = judge.fidelity(x, [{"attributes": s.attributes()} for s in scenes])
    # the same images judged against another scene's attributes
    wrong = judge.fidelity(x, [{"attributes": s.attributes()} for s in scenes[1:] + scenes[:1]])
    assert right.mean() >= 0.8 and wrong.mean() <= 0.5, (right.mean(), wrong.mean())
    # the same objects on another background: one attribute of 2-3 missed
    other = [{"attributes": {**s.attributes(), "background": next(b for b in sd.BACKGROUNDS if b != s.background)}}
             for s in scenes]
    assert right.mean() - judge.fidelity(x, other).mean() >= 0.25
    narrow = judge.fidelity(x[:1], [{"attributes": {"background": None,
                                                      "objects": scenes[0].attributes()["objects"][:1]}}])
    assert narrow.shape == (1,)


def test_training_is_deterministic_and_reuses_its_pretraining(tmp_path, monkeypatch):
    """Two runs of the training script with one seed give the same weights bit for bit (a small
    pool and a few steps of every stage); a rerun into the same folder reuses stages 1-2."""
    from safetensors.torch import load_file

    from sharpfast.zoo import scenes_judge
    from zoo_scripts import train_scenes

    monkeypatch.setattr(sd, "GENERIC_POOL", 96)
    monkeypatch.setattr(scenes_judge, "POOL", 64)
    args = ["--vae-steps", "2", "--pretrain-steps", "2", "--unet-steps", "2", "--judge-steps", "2", "--batch-size", "8"]
    for d in ("a", "b"):
        train_scenes.main(["--out", str(tmp_path / d), *args])
    w = lambda d: load_file(str(tmp_path / d / "unet" / "diffusion_pytorch_model.safetensors"))  # noqa: E731
    wa, wb = w("a"), w("b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    pre = (tmp_path / "a" / "pretrained" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    logs = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: logs.append(" ".join(map(str, a))))
    train_scenes.main(["--out", str(tmp_path / "a"), *args])
    assert any("reused" in m for m in logs)
    assert (tmp_path / "a" / "pretrained" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == pre
    wc = w("a")
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
