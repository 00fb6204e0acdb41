"""The names of the built-in registries, for what must answer without importing torch
(`sharpfast --help`, argument errors). The registries themselves live with their code
(sharpfast.scores.REGISTRY, sharpfast.mitigations.REGISTRY); tests/test_cli_options.py holds
these lists equal to them, so a new built-in metric or mitigation is added here too or the
suite fails naming it."""

METRICS = ("wen", "sharpness", "trace", "trace_delta", "score_norm", "channel_wen", "aniso_align", "anisotropy",
           "wen_low", "attn_entropy")
MITIGATIONS = ("none", "sail", "sail_alpha", "sail_reference", "sail_guard", "random_tokens", "wen_embedding",
               "transition", "sail+transition", "attention_rescale", "attenuate", "zhao_guard", "drop_trigger")
HVP_MODES = ("fd", "jvp")

# metrics that take a number of probe noises: "wen_low@4" is wen_low averaged over the image's own
# noise and 3 fixed probe noises, in one batched call (sharpfast.scores, "Probe noises")
PROBED = ("wen_low",)
MAX_PROBES = 16


def probed(name: object) -> tuple | None:
    """(base metric, n) of a name "<base>@<n>" with base in PROBED and 2 <= n <= MAX_PROBES;
    None for any other name (a plain metric, or a malformed one)."""
    if not isinstance(name, str) or name.count("@") != 1:
        return None
    base, n = name.split("@")
    if base not in PROBED or not n.isdigit() or n != str(int(n)) or not 2 <= int(n) <= MAX_PROBES:
        return None
    return base, int(n)


def is_metric(name: object) -> bool:
    """Whether `name` is a built-in metric: one of METRICS, or a probed one ("wen_low@4")."""
    return name in METRICS or probed(name) is not None


METRIC_HELP = f"{', '.join(METRICS)}, or {' / '.join(PROBED)}@n (n probe noises, 2..{MAX_PROBES})"
