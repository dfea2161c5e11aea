"""The lab: worlds (what to fine-tune on and how to score it), presets, the runner, ablations, the
RL stage, results, reports, claims and figures. It uses the core and the model wrapper; nothing
below it imports from here."""
