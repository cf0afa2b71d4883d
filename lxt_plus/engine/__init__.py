"""The LRP engine: autograd rules, attention, torch-function modes, rules and their registry, role
detection, presets and plans, patching. It imports nothing of lxt_plus above it, and transformers only
in :mod:`~lxt_plus.engine.hf` and :mod:`~lxt_plus.engine.detect`."""
