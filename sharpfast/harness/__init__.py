"""The evaluation harness: detection quality (the paper's Table 1) and mitigation quality
(copying against prompt fidelity) on the bundled digits model or a local model directory."""
