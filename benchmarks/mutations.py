"""Plant each bug the design issues listed (and one per detector of issue 15), run the tests
meant to guard against it, and report which test catches it (the suite must fail for every
one). Restores every file afterwards.

    python benchmarks/mutations.py            # about 12 minutes on 2 cores
    python benchmarks/mutations.py server cli # only the mutations whose names contain these
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = [
    # issue 32, wen_low@n: the probe noises, their mean, their seed, the names the catalog accepts
    ("wen_low@n: the first noise only, not the mean", "sharpfast/scores.py",
     "return (c - u).reshape(n, N, -1).norm(dim=2).mean(dim=0)", "return (c - u).reshape(n, N, -1).norm(dim=2)[0]",
     ["tests/test_detectors.py::test_wen_low_with_probe_noises_equals_the_reference"]),
    ("wen_low@n: probe_seed ignored", "sharpfast/scores.py",
     "generator=torch.Generator(\"cpu\").manual_seed(self.probe_seed))",
     "generator=torch.Generator(\"cpu\").manual_seed(0))",
     ["tests/test_detectors.py::test_wen_low_with_probe_noises_equals_the_reference"]),
    ("wen_low@n: each image its own probes", "sharpfast/scores.py",
     "z.to(self.x.device, self.x.dtype).repeat_interleave(N, dim=0)",
     "torch.randn((N * (n - 1), *self.x.shape[1:])).to(self.x.device, self.x.dtype)",
     ["tests/test_detectors.py::test_wen_low_with_probe_noises_equals_the_reference"]),
    ("catalog: one probe noise accepted", "sharpfast/catalog.py", "not 2 <= int(n) <= MAX_PROBES",
     "not 1 <= int(n) <= MAX_PROBES", ["tests/test_detectors.py::test_a_bad_probed_metric_name_is_refused"]),
    ("guard: wen_low@n gated at wen_low's cut", "sharpfast/guarding/thresholds.py",
     "found = resolve(self.pipe, self.metric, cal_key,",
     "found = resolve(self.pipe, self.metric.split(\"@\")[0], cal_key,",
     ["tests/test_guard_policy.py::test_guard_with_probe_noises_reads_its_own_calibration"]),
    ("zoo: a recalibration drops the chosen policy", "zoo_scripts/measure_digits.py",
     'cal = {**cal, "policy": old["policy"]}', "pass",
     ["tests/test_digits_data.py::test_recalibrating_keeps_the_chosen_policy_of_the_same_weights"]),
    # issue 32, drop_trigger: the turn's sign and timesteps, the rows it rewrites, the calibrated method
    ("drop_trigger: the turn read low minus high", "sharpfast/mitigations/drop_trigger.py",
     "turn = (cos[0] - cos[1]).cpu()", "turn = (cos[1] - cos[0]).cpu()",
     ["tests/test_drop_trigger.py::test_turns_match_a_computation_from_diffusers_calls"]),
    ("drop_trigger: the low-noise reading one timestep early", "sharpfast/mitigations/drop_trigger.py",
     "t_lo, _ = model.low_noise(sched, 1)", "t_lo, _ = model.low_noise(sched, 2)",
     ["tests/test_drop_trigger.py::test_turns_match_a_computation_from_diffusers_calls"]),
    ("drop_trigger: a word the encoder never sees is a candidate", "sharpfast/mitigations/drop_trigger.py",
     "    turn = turn.masked_fill(same, -math.inf)\n", "    turn = turn.masked_fill(same, 0.0)\n",
     ["tests/test_drop_trigger.py::test_a_word_the_encoder_never_sees_is_never_dropped"]),
    ("drop_trigger: the schedule after the drop left out", "sharpfast/mitigations/drop_trigger.py",
     "    if cfg.then is None:\n        return plan\n", "    if True:\n        return plan\n",
     ["tests/test_drop_trigger.py::test_settings_and_a_schedule_after_the_drop"]),
    ("drop_trigger: every prompt of the batch rewritten", "sharpfast/mitigations/drop_trigger.py",
     "    chosen = sorted({r // ctx.n for r in rows})\n", "    chosen = list(range(len(ctx.prompts)))\n",
     ["tests/test_drop_trigger.py::test_guard_drops_the_trigger_of_its_flagged_prompts_only"]),
    ("guard: the calibrated policy's mitigation ignored", "sharpfast/guarding/config.py",
     'if mitigation == "auto" and policy.method is not None:', 'if False:',
     ["tests/test_drop_trigger.py::test_a_calibrated_policy_names_its_mitigation"]),
    # issue 32, the digits decode scale: a trained pipeline must record the scale its UNet learned at
    ("zoo: train_digits sets the latent scale as an attribute only", "zoo_scripts/train_digits.py",
     "    vae.register_to_config(scaling_factor=sf)\n", "    vae.config.scaling_factor = sf\n",
     ["tests/test_digits_data.py::test_training_script_runs_a_few_steps_and_saves_a_pipeline"]),
    # issue 32, "always": the score is the model's, not the mitigated model's
    ("guard: the metric's own calls go through the mitigation's hooks", "sharpfast/guarding/request.py",
     "with torch.no_grad(), registry.unedited():", "with torch.no_grad():",
     ["tests/test_guard_policy.py::test_always_scores_the_model_not_the_mitigated_model"]),
    ("guard: an attention-edited first step scored as captured", "sharpfast/guarding/request.py",
     "        edited = registry.edits_inside()\n", "        edited = False\n",
     ["tests/test_guard_policy.py::test_always_scores_the_model_not_the_mitigated_model"]),
    # issue 32, per-prompt strength: a multiple tier's cut, and the cuts a served guard calibrates
    ("policy: a multiple tier measured from zero, not the normal captions' median", "sharpfast/guarding/policy.py",
     "return med + self.m * (cuts[gate] - med)", "return self.m * cuts[gate]",
     ["tests/test_guard_policy.py::test_multiple_tier_decides_by_the_gate_margin_over_the_median"]),
    ("policy: calibrate() resolves the threshold only", "sharpfast/guarding/wrapper.py",
     "for share in [*self.config.policy.calibrated_shares(), ", "for share in [*[], ",
     ["tests/test_guard_policy.py::test_calibrate_resolves_every_cut_the_policy_reads"]),
    # the third design step (issue 31): the hook registry, the setting grammar, the adapter's step
    # limit, the serving core's one mapping
    ("hooks: a later hook's output dropped", "sharpfast/mitigations/hooks.py", "                output = new\n",
     "                pass\n", ["tests/test_mitigations.py::test_static_transition_is_jain_et_al"]),
    ("grammar: keys in any order", "sharpfast/mitigations/grammar.py", "or order.index(key) <= last or",
     "or order.index(key) < -1 or", ["tests/test_mitigations.py::test_one_setting_grammar_for_every_method"]),
    ("adapter: the step limit one past what the scheduler lays out", "sharpfast/adapters/base.py",
     "            lo, hi = (mid, hi) if self.steps_fit(mid) else (lo, mid)\n        return lo\n",
     "            lo, hi = (mid, hi) if self.steps_fit(mid) else (lo, mid)\n        return hi\n",
     ["tests/test_server_limits.py::test_the_step_limit_is_what_the_scheduler_can_take"]),
    ("ray transport: its own error mapping", "sharpfast/server/ray_serve.py",
     "        if isinstance(result, BaseException):\n            raise result",
     "        if isinstance(result, BaseException):\n            raise RuntimeError(str(result))",
     ["tests/test_transports.py"]),
    ("service: a 500 echoes the model's exception", "sharpfast/server/service.py",
     'message = f"internal error (incident {incident}; the server\'s log has the details)"',
     'message = f"{type(err).__name__}: {err} (incident {incident})"', ["tests/test_transports.py"]),
    # the scenes model's judge (issue 22)
    ("scenes judge: a template caption's copy must be its own scene", "sharpfast/zoo/scenes_judge.py",
     "hit = torch.where(self.template[target], self.template[idx], idx == target)", "hit = idx == target",
     ["tests/test_scenes_data.py"]),
    ("scenes judge: fidelity ignores the background", "sharpfast/zoo/scenes_judge.py",
     "hits = [] if a[\"background\"] is None else", "hits = [] if True else", ["tests/test_scenes_data.py"]),
    ("scenes renderer: triangle upside down", "sharpfast/zoo/scenes_data.py",
     "np.abs(dx) <= (dy - top) / (base - top) * o.r", "np.abs(dx) <= (base - dy) / (base - top) * o.r",
     ["tests/test_scenes_data.py"]),
    # the second design step (issue 20)
    ("engine: uncommitted records count", "sharpfast/engine.py",
     "                pending.append(rec)\n    return recs, chunks, good\n",
     "                pending.append(rec)\n    return recs + pending, chunks, good\n", ["tests/test_engine.py"]),
    ("hutchinson: a sibling operator keeps its parent's branch", "sharpfast/curvature.py",
     "op.branch, op._s0 = b, None", "op.branch, op._s0 = self.branch, None", ["tests/test_reference.py"]),
    ("guard: flux timestep read back unscaled", "sharpfast/adapters/flow.py", "t = kwargs[\"timestep\"] * 1000",
     "t = kwargs[\"timestep\"]", ["tests/test_flow.py"]),
    (
        "v-prediction conversion sign",
        "sharpfast/adapters/parameterizations.py",
        "return a * pred.float() + s * x.float()",
        "return a * pred.float() - s * x.float()",
        ["tests/test_reference.py"],
    ),
    (
        "score sign",
        "sharpfast/adapters/parameterizations.py",
        "return -eps / sigma_of(alpha_bar)",
        "return eps / sigma_of(alpha_bar)",
        ["tests/test_reference.py"],
    ),
    (
        "score_norm as L1 over sigma",
        "sharpfast/scores.py",
        "return eps_c.reshape(len(eps_c), -1).pow(2).sum(dim=1) / step.sigma ** 2",
        "return eps_c.reshape(len(eps_c), -1).abs().sum(dim=1) / step.sigma",
        ["tests/test_reference.py"],
    ),
    (
        "sharpness 1/sigma^2 dropped",
        "sharpfast/curvature.py",
        "return dod * wen / (sig * sig * h)",
        "return dod * wen / h",
        ["tests/test_reference.py"],
    ),
    (
        "eval detect labels swapped",
        "sharpfast/harness/detect_eval.py",
        "np.concatenate([np.ones(len(scores_pos)), np.zeros(len(scores_neg))])",
        "np.concatenate([np.zeros(len(scores_pos)), np.ones(len(scores_neg))])",
        ["tests/test_harness.py::test_eval_detect_table_json_png_and_resume"],
    ),
    (
        "per-prompt noise seed + i -> seed",
        "sharpfast/adapters/base.py",
        "manual_seed(seed + int(i))",
        "manual_seed(seed)",
        [
            "tests/test_scan.py::test_row_i_is_detect_of_that_prompt_with_seed_plus_i",
            "tests/test_cli.py::test_detect_ids_are_line_numbers_and_noise_is_seed_plus_id",
        ],
    ),
    (
        "Euler alpha_bar 1/(1+sigma)",
        "sharpfast/adapters/base.py",
        "return 1.0 / (1.0 + sigma * sigma)",
        "return 1.0 / (1.0 + sigma)",
        ["tests/test_reference.py::test_euler_and_ddim_agree_on_alpha_bar_at_equal_t"],
    ),
    (
        "trace_delta sign",
        "sharpfast/scores.py",
        "return -(tr_c - tr_u)",
        "return (tr_c - tr_u)",
        ["tests/test_reference.py::test_traces_values_and_signs"],
    ),
    # the detectors of the field (issue 15)
    (
        "anisotropy weight of v-prediction",
        "sharpfast/scores.py",
        '"v_prediction": (1.0, 0.1)',
        '"v_prediction": (1.0, 2.0)',
        ["tests/test_detectors.py::test_wen_low_and_anisotropy_equal_the_reference"],
    ),
    (
        "wen_low at the third-to-last timestep",
        "sharpfast/scores.py",
        "u, c = step.at_low_noise(1)",
        "u, c = step.at_low_noise(3)",
        ["tests/test_detectors.py::test_wen_low_and_anisotropy_equal_the_reference"],
    ),
    (
        "attention entropy in bits",
        "sharpfast/attention.py",
        "ent = -(p * torch.log(p.clamp_min(1e-30)))",
        "ent = -(p * torch.log2(p.clamp_min(1e-30)))",
        ["tests/test_detectors.py::test_attention_entropy_equals_the_reference"],
    ),
    (
        "combined detector: MAD not scaled to a standard deviation",
        "sharpfast/roc.py",
        "* 1.4826",
        "* 1.0",
        ["tests/test_detectors.py::test_combined_detector_standardizes_on_normal_prompts_only"],
    ),
    # the mitigations and the guard's report (issue 19)
    (
        "anisotropy's norm term normalized per channel",
        "sharpfast/scores.py",
        "return g1 * step.wen.float() + g2 * step.aniso_align()",
        "return g1 * step.channel_wen() + g2 * step.aniso_align()",
        ["tests/test_detectors.py::test_wen_low_and_anisotropy_equal_the_reference"],
    ),
    (
        "transition: the early scale above the switch applied below it",
        "sharpfast/mitigations/transition.py",
        "if float(call.timestep) <= t_switch:",
        "if float(call.timestep) > t_switch:",
        ["tests/test_mitigations.py::test_static_transition_is_jain_et_al"],
    ),
    (
        "dynamic transition at a fall, not at the rise after a minimum",
        "sharpfast/mitigations/transition.py",
        "turn = (d > st.prev) & (st.prev2 > st.prev) & (st.prev >= 0)",
        "turn = (d < st.prev) & (st.prev2 > st.prev) & (st.prev >= 0)",
        ["tests/test_mitigations.py::test_dynamic_transition_is_the_first_local_minimum"],
    ),
    (
        "attention_rescale scales the null branch too",
        "sharpfast/mitigations/attention_rescale.py",
        "cond = (rows >= images)",
        "cond = (rows >= 0)",
        ["tests/test_mitigations.py::test_attention_rescale_is_ren_et_al"],
    ),
    (
        "zhao_guard attracts the memorized prediction instead of repelling it",
        "sharpfast/mitigations/zhao_guard.py",
        "return u.float() + scale * v_a - repel * v_c",
        "return u.float() + scale * v_a + repel * v_c",
        ["tests/test_zhao_guard.py::test_guard_matches_its_authors_definition_in_float64"],
    ),
    (
        "guard: mitigated whatever the check",
        "sharpfast/guarding/regenerate.py",
        "                ok = under\n",
        "                ok = True\n",
        ["tests/test_guard.py::test_mitigated_is_earned"],
    ),
    # serving past one process and the first hour (issues 21, 23)
    ("calibration: one threshold for every image size", "sharpfast/calibration/store.py",
     '"seed": 0, "height": None, "width": None}', '"seed": 0}',
     ["tests/test_calibration_files.py::test_the_size_is_part_of_the_setting"]),
    ("calibration: a NaN threshold in a file accepted", "sharpfast/calibration/store.py",
     "not isinstance(v, (int, float)) or not math.isfinite(v):", "not isinstance(v, (int, float)):",
     ["tests/test_calibration_files.py::test_a_threshold_that_is_not_finite_is_not_read"]),
    ("server: a deeply nested body reaches the parser", "sharpfast/server/middleware.py",
     "if not depth_ok(body, self.limits.max_depth):", "if False:", ["tests/test_server_limits.py"]),
    ("server: any API key accepted", "sharpfast/server/middleware.py",
     '            if scheme.lower() != "bearer" or not ok:', "            if False:",
     ["tests/test_server_limits.py::test_the_api_key"]),
    ("cli: --batch-size default off the shared table", "sharpfast/cli/options.py",
     '(default {settings.BATCH_SIZE})", default=settings.BATCH_SIZE,', '(default {settings.BATCH_SIZE})", default=16,',
     ["tests/test_cli_options.py"]),
    ("sail: nothing-to-do note whatever happened", "sharpfast/mitigations/sail.py",
     "    if under == len(start):", "    if True:",
     ["tests/test_first_hour.py::test_sail_says_when_it_did_nothing"]),
]


def _pytest(tests):
    return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ})


def main(argv=None) -> int:
    only = (argv if argv is not None else sys.argv[1:])  # names containing any of these (default: all)
    chosen = [m for m in MUTATIONS if not only or any(o in m[0] for o in only)]
    # the guarding tests must pass unmutated, or a "caught" below would only mean a broken setup
    every = sorted({t for *_, tests in chosen for t in tests})
    base = _pytest(every)
    if base.returncode != 0:
        print(f"the guarding tests fail without any mutation:\n{base.stdout[-3000:]}{base.stderr[-2000:]}")
        return 2
    missed = []
    for name, rel, old, new, tests in chosen:
        path = ROOT / rel
        src = path.read_text()
        assert src.count(old) == 1, f"{name}: the line to mutate is not found exactly once in {rel}"
        path.write_text(src.replace(old, new))
        try:
            s = time.perf_counter()
            res = _pytest(tests)
            failed = [ln.split(" ")[1] for ln in res.stdout.splitlines() if ln.startswith("FAILED ")]
        finally:
            path.write_text(src)
        caught = res.returncode != 0
        print(f"{'CAUGHT' if caught else 'MISSED'}  {name:34s} {failed[0] if failed else '-'}  "
              f"({time.perf_counter() - s:.0f} s)", flush=True)
        if not caught:
            missed.append(name)
    print(f"{len(chosen) - len(missed)}/{len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
