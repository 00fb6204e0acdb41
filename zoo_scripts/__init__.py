"""The scripts that made the bundled models and their data (kept in the repository, not in the
wheel, which ships the models, their prompt sets and judges): train_digits / measure_digits,
train_scenes / measure_scenes, make_generic_prompts. Run from the repository root, e.g.
`python -m zoo_scripts.train_digits --out DIR`."""
