"""`drop_trigger`: the word whose removal turns the low-noise guidance direction most while keeping
the high-noise one, dropped. The turn is checked against a computation written here from
diffusers' own calls (encode_prompt, the UNet, a fresh scheduler), in float64 on the outputs;
the guard drops the words of its flagged prompts only, and the unflagged images are plain's."""
import json
import math
import shutil

import pytest
import torch

import sharpfast
from sharpfast.errors import BadArgument
from sharpfast.mitigations.drop_trigger import drop_words, trigger_turns
from sharpfast.testing import tiny_pipeline

PROMPT = "a red cat sits on the old mat"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def reference_turns(pipe, prompt, x_T, steps):
    """turn(w) = cos(d_hi(p - w), d_hi(p)) - cos(d_lo(p - w), d_lo(p)), d = unet(cond) - unet(""),
    at the first and the last timestep of a fresh scheduler, from the same x_T."""
    words = prompt.split()
    texts = [prompt] + [" ".join(w for j, w in enumerate(words) if j != i) for i in range(len(words))]
    cond, _ = pipe.encode_prompt(texts, "cpu", 1, False)
    null, _ = pipe.encode_prompt([""], "cpu", 1, False)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    out = []
    for t in (sched.timesteps[0], sched.timesteps[-1]):
        xt = sched.scale_model_input(x, t)
        c = pipe.unet(xt.repeat(len(texts), 1, 1, 1), t, encoder_hidden_states=cond).sample.double()
        u = pipe.unet(xt, t, encoder_hidden_states=null).sample.double()
        d = (c - u).flatten(1)
        out.append([float(d[i] @ d[0] / (d[i].norm() * d[0].norm())) for i in range(1, len(texts))])
    return torch.tensor(out[0], dtype=torch.float64) - torch.tensor(out[1], dtype=torch.float64)


@pytest.mark.parametrize("kind,scheduler,steps", [("sd1", "ddim", 7), ("sd2", "euler", 5), ("sd1", "pndm", 9)])
def test_turns_match_a_computation_from_diffusers_calls(kind, scheduler, steps):
    seed = int(torch.randint(0, 10_000, (1,)))
    pipe = tiny_pipeline(kind, scheduler=scheduler)
    x_T = torch.randn(1, 4, 8, 8, generator=gen(seed))
    from sharpfast.adapters import ScoreModel

    other = "the blue dog runs"
    x2 = torch.randn(1, 4, 8, 8, generator=gen(seed + 1))
    # batched with another prompt at its own noise and a one-word prompt: each reads as alone
    got, one, got2 = trigger_turns(ScoreModel(pipe), [PROMPT, "cat", other], torch.cat([x_T, x_T, x2]), steps, 16, 16,
                                   7.5)
    want = reference_turns(pipe, PROMPT, x_T, steps)
    assert torch.allclose(got.double(), want, atol=2e-4), f"seed {seed}: {got} vs {want}"
    assert torch.allclose(got2.double(), reference_turns(pipe, other, x2, steps), atol=2e-4), f"seed {seed}"
    assert one.tolist() == [0.0]
    words = PROMPT.split()
    new, dropped = drop_words(PROMPT, got, 1)
    i = int(want.argmax())
    assert dropped == [words[i]] and new == " ".join(words[:i] + words[i + 1:]), f"seed {seed}"


def test_drop_words_keeps_order_and_refuses_nothing_to_drop():
    turn = torch.tensor([0.1, 0.9, -0.2, 0.5])
    assert drop_words("w x y z", turn, 2) == ("w y", ["x", "z"])
    assert drop_words("w", torch.tensor([0.0]), 1) == ("w", [])  # a one-word prompt keeps its word
    with pytest.raises(BadArgument, match="words dropped"):
        sharpfast.mitigate(tiny_pipeline("sd1"), PROMPT, "drop_trigger", 0, num_inference_steps=2)


def test_settings_and_a_schedule_after_the_drop():
    from sharpfast.mitigations.drop_trigger import DropTriggerConfig

    assert DropTriggerConfig.from_setting("2") == DropTriggerConfig(2)
    assert DropTriggerConfig.from_setting("w1s1t500g0.5") == DropTriggerConfig(1, "s1t500g0.5")
    for bad in ("w0", "wx", "w1s1q5", 0, "-1", float("nan")):
        with pytest.raises(BadArgument):
            DropTriggerConfig.from_setting(bad)
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt")
    out, info = sharpfast.mitigate(pipe, PROMPT, "drop_trigger", "w1s1t500g0.5", generator=gen(2), return_info=True,
                                   **kw)
    want = sharpfast.mitigate(pipe, info["new_prompts"], "transition", "s1t500g0.5", generator=gen(2), **kw)
    assert torch.equal(out.images, want.images) and info["new_prompts"] != [PROMPT]


def test_a_word_the_encoder_never_sees_is_never_dropped():
    """Words past the tokenizer's length leave the embeddings as they were: their turn is -inf
    (before: exactly 0, and a prompt whose every other turn was negative dropped such a word,
    changing nothing and reporting it mitigated)."""
    pipe = tiny_pipeline("sd1")
    pipe.tokenizer.model_max_length = 6
    from sharpfast.adapters import ScoreModel

    long = "a red cat sits on the old mat today"
    (turn,) = trigger_turns(ScoreModel(pipe), [long], torch.randn(1, 4, 8, 8, generator=gen(4)), 3, 16, 16, 7.5)
    words = long.split()
    ids = lambda t: pipe.tokenizer(t, truncation=True, padding="max_length").input_ids  # noqa: E731
    unseen = [ids(" ".join(words[:i] + words[i + 1:])) == ids(long) for i in range(len(words))]
    assert sum(unseen) >= 3 and not all(unseen)
    assert torch.isinf(turn).tolist() == unseen
    assert drop_words("x y z", torch.tensor([-math.inf, -0.5, -math.inf]), 1) == ("x z", ["y"])
    assert drop_words("x y", torch.tensor([-math.inf, -math.inf]), 1) == ("x y", [])


def test_nan_from_the_network_while_reading_the_words_is_named():
    from sharpfast.errors import NonFiniteOutput

    pipe = tiny_pipeline("sd1")
    h = pipe.unet.register_forward_hook(lambda m, a, o: (o[0] * float("nan"),) if isinstance(o, tuple)
                                        else setattr(o, "sample", o.sample * float("nan")) or o)
    try:
        with pytest.raises(NonFiniteOutput, match="drop_trigger read the prompt 'a red cat"):
            sharpfast.mitigate(pipe, PROMPT, "drop_trigger", num_inference_steps=2, generator=gen())
    finally:
        h.remove()


def test_mitigate_generates_the_prompt_without_its_trigger():
    """sharpfast.mitigate(..., "drop_trigger") is pipe(new prompt) from the same noise; its info says
    which word went and what it cost."""
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=4, output_type="pt")
    out, info = sharpfast.mitigate(pipe, [PROMPT, "a dog"], "drop_trigger", generator=gen(3), return_info=True, **kw)
    want = pipe(info["new_prompts"], generator=gen(3), **kw).images
    assert torch.equal(out.images, want)
    assert [len(d) for d in info["dropped"]] == [1, 1]
    assert info["new_prompts"][0] != PROMPT and len(info["new_prompts"][0].split()) == len(PROMPT.split()) - 1
    assert info["unet_calls_per_image"] == pytest.approx(4 + (8 + 2 + 2 + 2) / 2)


def test_guard_drops_the_trigger_of_its_flagged_prompts_only():
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT, "a blue dog runs in a green park"]
    kw = dict(num_inference_steps=4, output_type="pt")
    scores = sharpfast.detect(pipe, prompts, metrics=["wen"], generator=gen(1), num_inference_steps=4).scores["wen"]
    hi = int(torch.as_tensor(scores).argmax())
    thr = float(sum(scores)) / 2
    plain = pipe(prompts, generator=gen(1), **kw).images
    with sharpfast.guard(pipe, metric="wen", threshold=thr, mitigation="drop_trigger") as g:
        out = g(prompts, generator=gen(1), **kw)
    reps = out.memorization
    assert [r["mitigated"] for r in reps] == [i == hi for i in range(2)]
    assert torch.equal(out.images[1 - hi], plain[1 - hi])  # the unflagged image is plain's
    x_T = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", gen(1))
    (turn,) = trigger_turns(sharpfast.adapters.ScoreModel(pipe), [prompts[hi]], x_T[hi:hi + 1], 4, 16, 16, 7.5)
    new, gone = drop_words(prompts[hi], turn, 1)
    again = pipe([new if i == hi else p for i, p in enumerate(prompts)], latents=x_T, **kw).images
    assert torch.equal(out.images[hi], again[hi])
    assert reps[hi]["check"] == f"drop_trigger applied to its 1 image(s); dropped {gone[0]!r}"


def test_a_calibrated_policy_names_its_mitigation(tmp_path):
    """calibration.json's policy may name the method it was chosen for: mitigation="auto" takes it;
    another method keeps the gate alone; a name that is not text is refused."""
    from diffusers import StableDiffusionPipeline

    dst = tmp_path / "digits"
    shutil.copytree(sharpfast.zoo.path("digits"), dst)
    cal = json.loads((dst / "calibration.json").read_text())
    cal["policy"] = {"policy": "0.05", "mitigation": "drop_trigger", "chosen_on": "a test"}
    (dst / "calibration.json").write_text(json.dumps(cal))
    pipe = StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True)
    with sharpfast.guard(pipe) as g:
        assert g.mitigation == "drop_trigger" and g.config.policy.gate == 0.05 and g.setting == 1
    with sharpfast.guard(pipe, mitigation="transition") as g:
        assert g.mitigation == "transition" and g.config.policy == sharpfast.guarding.Policy(0.05)
    cal["policy"]["mitigation"] = 3
    (dst / "calibration.json").write_text(json.dumps(cal))
    with pytest.raises(BadArgument, match="names its mitigation as text"):
        sharpfast.guard(StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True))
