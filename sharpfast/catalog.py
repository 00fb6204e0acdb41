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
