"""The digits memorization data set: deterministic, duplicates pixel-exact with unique captions."""
import numpy as np
import torch

from sharpfast.zoo.digits_data import DUPLICATION_LEVELS, IMAGES_PER_LEVEL, NAMES, augment, build


def test_build_is_deterministic_and_well_formed():
    a, b = build(seed=3), build(seed=3)
    assert [d.caption for d in a.duplicates] == [d.caption for d in b.duplicates]
    assert a.images.shape == (1797, 1, 16, 16) and a.images.min() >= -1 and a.images.max() <= 1
    caps = [d.caption for d in a.duplicates]
    assert len(set(caps)) == len(caps) == sum(IMAGES_PER_LEVEL) >= 64
    assert len({d.train_index for d in a.duplicates}) == len(caps)
    for d in a.duplicates:
        assert NAMES[d.digit] in d.caption or str(d.digit) in d.caption
        assert d.digit == a.labels[d.train_index]
    assert sorted({d.duplicates for d in a.duplicates}) == list(DUPLICATION_LEVELS)
    for level, k in zip(DUPLICATION_LEVELS, IMAGES_PER_LEVEL):
        assert sum(d.duplicates == level for d in a.duplicates) == k
    assert build(seed=4).duplicates[0].caption != caps[0]


def test_epoch_repeats_duplicates_and_draws_generic_captions():
    data = build()
    idx, caps, aug = data.epoch(np.random.default_rng(0))
    assert len(idx) == len(data.generic_indices) + sum(d.duplicates for d in data.duplicates)
    for d in data.duplicates[:5]:
        rows = [i for i, c in enumerate(caps) if c == d.caption]
        assert len(rows) == d.duplicates and all(idx[r] == d.train_index and not aug[r] for r in rows)
    generic = [c for c, a in zip(caps, aug) if a]
    assert len(set(generic)) < len(generic), "generic captions are shared by many images"


def test_augment_changes_images_within_range():
    x = build().images[:32]
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert not torch.equal(x, y)
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(0)))


def test_training_script_runs_a_few_steps_and_saves_a_pipeline(tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from sharpfast.zoo.copying import COPY_CUT, copy_stats, generate
    from zoo_scripts.train_digits import main

    main(
        ["--out", str(tmp_path), "--vae-steps", "2", "--pretrain-steps", "2", "--unet-steps", "2", "--batch-size", "8"]
    )
    info = json.loads((tmp_path / "train_info.json").read_text())
    assert info["unet_steps"] == 2 and info["final_unet_loss"] > 0
    assert info["init"] == str(tmp_path / "pretrained")
    assert json.loads((tmp_path / "pretrained" / "train_info.json").read_text())["generic_only"]
    assert list(tmp_path.rglob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    data = build()
    # the saved pipeline decodes at the latent scale its UNet was trained at: one over the spread
    # of the VAE's latent means of the digit images (not diffusers' default 0.18215)
    with torch.no_grad():
        spread = torch.cat([pipe.vae.encode(x).latent_dist.mean for x in data.images.split(512)]).std().item()
    assert abs(pipe.vae.config.scaling_factor * spread - 1) < 1e-4
    imgs = generate(pipe, [data.duplicates[0].caption], seeds=[0, 1], num_inference_steps=3)
    assert imgs.shape == (2, 1, 16, 16) and imgs.min() >= -1 and imgs.max() <= 1
    copies, sim = copy_stats(imgs, data.images, data.duplicates[0].train_index)
    assert copies.shape == (2,) and ((sim >= COPY_CUT) | ~copies).all()
    # a training image is its own nearest neighbour, a copy with similarity 1
    c, s = copy_stats(data.images[[5, 9]], data.images, [5, 9])
    assert c.all() and torch.allclose(s, torch.ones(2, dtype=s.dtype))


def test_training_is_deterministic_and_checkpoints_equal_shorter_runs(tmp_path):
    from safetensors.torch import load_file

    from zoo_scripts.train_digits import main

    args = ["--vae-steps", "1", "--batch-size", "4", "--pretrain-steps", "0"]
    main(["--out", str(tmp_path / "a"), "--unet-steps", "2", "--save-at", "1", *args])
    main(["--out", str(tmp_path / "b"), "--unet-steps", "1", *args])
    w = "unet/diffusion_pytorch_model.safetensors"
    ck, short, final = (load_file(tmp_path / p / w) for p in ("a/step-1", "b", "a"))
    assert ck.keys() == short.keys()
    assert all(torch.equal(ck[k], short[k]) for k in ck), "a checkpoint is the shorter run, bit for bit"
    assert not all(torch.equal(ck[k], final[k]) for k in ck)


def test_pretraining_then_fine_tuning_from_it(tmp_path):
    from safetensors.torch import load_file

    from zoo_scripts.train_digits import main

    args = ["--batch-size", "4", "--vae-steps", "1"]
    main(["--out", str(tmp_path / "pre"), "--generic-only", "--unet-steps", "1", *args])
    main(["--out", str(tmp_path / "ft"), "--init", str(tmp_path / "pre"), "--unet-steps", "1", *args])
    main(["--out", str(tmp_path / "one"), "--pretrain-steps", "1", "--unet-steps", "1", *args])
    for part in ("vae", "unet"):
        w = f"{part}/diffusion_pytorch_model.safetensors"
        pre, ft, one = (load_file(tmp_path / d / w) for d in ("pre", "ft", "one"))
        same = all(torch.equal(pre[k], ft[k]) for k in pre)
        assert same == (part == "vae"), f"fine-tuning keeps the VAE and trains the UNet ({part})"
        assert all(torch.equal(one[k], ft[k]) for k in ft), "one command = pretraining, then --init, bit for bit"
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tmp_path / "ft" / "tokenizer")
    assert tok.tokenize("a handwritten seven") == ["a</w>", "handwritten</w>", "seven</w>"]


def test_one_copy_definition_with_its_cut():
    """Issue 33, item 4: a copy is the nearest training image being the prompt's own at similarity
    >= 0.8 (the one cut of every table, figure and the demo; 0.9 beside it). An image made to sit
    at similarity ~0.85 with its target, and nearest to it, is a copy at the default cut and not at
    the strict one; both judges share the constant."""
    import torch

    from sharpfast.zoo import copying, scenes_judge

    assert (copying.COPY_CUT, copying.LABEL_CUT) == (0.8, 0.9)
    assert copying.DigitsJudge.threshold == scenes_judge.ScenesJudge.threshold == copying.COPY_CUT
    g = torch.Generator().manual_seed(3)
    train = torch.randn(5, 1, 16, 16, generator=g)
    # target 2 plus independent noise of the same spread: correlation 1/sqrt(1 + a^2) ~ 0.85
    a = (1 / 0.85 ** 2 - 1) ** 0.5
    img = train[[2]] + a * torch.randn(1, 1, 16, 16, generator=g)
    _, sim = copying.nearest(img, train)
    assert 0.8 < float(sim) < 0.9, float(sim)
    assert copying.copy_stats(img, train, 2)[0].all()
    assert not copying.copy_stats(img, train, 2, copying.LABEL_CUT)[0].any()
    assert not copying.copy_stats(img, train, 3)[0].any()  # the wrong target is never a copy


def test_the_shipped_digits_pipeline_decodes_at_the_scale_it_was_trained_at():
    """The shipped digits VAE config once kept diffusers' default 0.18215 while the UNet was trained
    on latents scaled by one over their spread (about 0.725), so every image was decoded about 4x
    too large (docs/zoo.md). The config now holds the trained scale."""
    from diffusers import AutoencoderKL

    from sharpfast import zoo

    vae = AutoencoderKL.from_pretrained(zoo.path("digits"), subfolder="vae", local_files_only=True)
    with torch.no_grad():
        spread = torch.cat([vae.encode(x).latent_dist.mean for x in build().images.split(512)]).std().item()
    assert abs(vae.config.scaling_factor * spread - 1) < 1e-4, (vae.config.scaling_factor, 1 / spread)


def test_recalibrating_keeps_the_chosen_policy_of_the_same_weights(tmp_path):
    """zoo_scripts' write_calibration: a recalibration (--calibration-only) keeps calibration.json's
    "policy" when the weights are the same (it is what half A chose), and drops it for others."""
    import json

    from zoo_scripts.measure_digits import write_calibration

    weights = {"fingerprint": "aaaa", "structure": "s", "dtype": "float32", "sample": [1.0]}
    policy = {"policy": "0.01:w1s0t500", "mitigation": "drop_trigger"}
    (tmp_path / "calibration.json").write_text(json.dumps({"weights": weights, "wen_low": {"threshold": 1.0},
                                                           "policy": policy}))
    write_calibration(str(tmp_path), {"weights": dict(weights), "wen_low": {"threshold": 2.0}})
    got = json.loads((tmp_path / "calibration.json").read_text())
    assert got["policy"] == policy and got["wen_low"]["threshold"] == 2.0
    write_calibration(str(tmp_path), {"weights": dict(weights, fingerprint="bbbb", structure="t"),
                                      "wen_low": {"threshold": 3.0}})
    got = json.loads((tmp_path / "calibration.json").read_text())
    assert "policy" not in got and got["wen_low"]["threshold"] == 3.0
