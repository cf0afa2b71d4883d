"""Mutation testing: does the suite fail when the code has a small, realistic bug?

Each mutant is one textual change to one file of ``lxt_plus/`` — a sign, a factor, a detach, a
restore step — together with the tests that should catch it. The runner copies the package, the
tests and the configs into a temporary folder, applies one mutant, runs those tests there
(``PYTHONPATH`` puts the copy ahead of the installed package) and counts the mutant *killed* when
pytest fails. A mutant whose snippet no longer occurs in the code is reported as *stale*: the list
must follow the code. Mutants that are provably equivalent are listed in ``EQUIVALENT`` with the
reason and are not run.

Usage (from the repository root)::

    python dev/mutation.py              # every mutant, one after another (about 10 minutes)
    python dev/mutation.py --only gamma # the mutants whose name contains "gamma"
    python dev/mutation.py --list       # names, files and tests, without running

Exit status: 0 when every mutant is killed, 1 when one survives or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("lxt_plus", "tests", "configs", "notebooks", "pyproject.toml", "README.md")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutant
ZOO_GAPS = "tests/integration/test_zoo.py::test_formerly_refused_architectures_conserve"
PADDED_ROWS = "tests/integration/test_zoo.py::test_padded_rows_equal_their_texts_alone"
AUDIT = "tests/integration/test_audit.py"
HEADS = "tests/integration/test_zoo.py::test_head_relevance_is_what_enters_each_output_projection"
LAYERS = "tests/integration/test_zoo.py::test_layer_capture_mechanisms"
VLM_LAYOUTS = "tests/integration/test_vlm_layouts.py"
RENDER = "tests/unit/test_render.py"
MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ autograd functions
    M(
        "stabilizer-sign",
        "lxt_plus/engine/functional.py",
        "torch.copysign(torch.tensor(eps, dtype=x.dtype, device=x.device), x).add_(x)",
        "torch.copysign(torch.tensor(eps, dtype=x.dtype, device=x.device), -x).add_(x)",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "identity-ratio-inverted",
        "lxt_plus/engine/functional.py",
        "acc(y) / stabilize(acc(x), eps)",
        "acc(x) / stabilize(acc(y), eps)",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "epsilon-ratio-inverted",
        "lxt_plus/engine/functional.py",
        "ratio = acc(z) / stabilize(acc(z), eps)",
        "ratio = stabilize(acc(z), eps) / acc(z)",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "uniform-product-full-share",
        "lxt_plus/engine/functional.py",
        "grad, other, value=0.5)",
        "grad, other, value=1.0)",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "uniform-matmul-full-share",
        "lxt_plus/engine/functional.py",
        "grad_scale(torch.matmul(a, b), 0.5",
        "grad_scale(torch.matmul(a, b), 1.0",
        ("tests/unit/test_patching.py", "tests/integration/test_reference_lrp.py"),
    ),
    M(
        "zennit-stabilizer-one-sided",
        "lxt_plus/engine/functional.py",
        "torch.where(x >= 0, x + eps, x - eps)",
        "torch.where(x >= 0, x + eps, x + eps)",
        ("tests/unit/test_zennit_parity.py",),
    ),
    M(
        "linear-rule-neg-input-mask",
        "lxt_plus/engine/functional.py",
        "g_in = g_in * (xa < 0).to(g_in.dtype)",
        "g_in = g_in * (xa > 0).to(g_in.dtype)",
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "linear-rule-output-mask",
        "lxt_plus/engine/functional.py",
        '((za > 0) if t.mask == "pos" else (za < 0))',
        '((za > 0) if t.mask == "pos" else (za > 0))',
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "exact-input-correction-dropped",
        "lxt_plus/api/explain.py",
        "rel = rel + correction",
        "rel = rel",
        ("tests/unit/test_zennit_parity.py",),
    ),
    M(
        "closed-form-gamma-factor",
        "lxt_plus/engine/functional.py",
        ".mul_(1 + gamma / 2)",
        ".mul_(1 + gamma)",
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "closed-form-gamma-negative-bias",
        "lxt_plus/engine/functional.py",
        "d_neg + gamma * bias.clamp(max=0)",
        "d_neg + gamma * bias.clamp(min=0)",
        ("tests/unit/test_linear_rules_reference.py", "tests/unit/test_zennit_parity.py"),
    ),
    M(
        "exact-input-not-found-behind-a-flatten",
        "lxt_plus/engine/functional.py",
        "ctx.record, ctx.leaf_shape = store.setdefault(id(leaf), []), leaf.shape",
        "pass",
        ("tests/unit/test_zennit_parity.py",),
    ),
    # ------------------------------------------------------------------ rules
    M(
        "gamma-negative-inputs-favour-plus",
        "lxt_plus/engine/rules.py",
        'Term("neg", minus, zero_bias=True, group=0, mask="pos")',
        'Term("neg", plus, zero_bias=True, group=0, mask="pos")',
        ("tests/unit/test_linear_rules_reference.py", "tests/unit/test_zennit_parity.py"),
    ),
    M(
        "gamma-negative-output-keeps-positive-bias",
        "lxt_plus/engine/rules.py",
        'Term("pos", minus, group=1, mask="neg")',
        'Term("pos", plus, group=1, mask="neg")',
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "alpha-beta-adds-beta",
        "lxt_plus/engine/rules.py",
        "a, b = self.alpha, -self.beta",
        "a, b = self.alpha, self.beta",
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "zbox-low-bound-on-negative-weights",
        "lxt_plus/engine/rules.py",
        'Term("low", _positive, sign=-1.0, coef=-1.0)',
        'Term("low", _negative, sign=-1.0, coef=-1.0)',
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "flat-keeps-bias",
        "lxt_plus/engine/rules.py",
        'Term("ones", _ones, zero_bias=True)',
        'Term("ones", _ones)',
        ("tests/unit/test_linear_rules_reference.py",),
    ),
    M(
        "constant-gate-detaches-the-wrong-factor",
        "lxt_plus/engine/modes.py",
        "func(a.detach(), b) if gate_a else func(a, b.detach())",
        "func(a, b.detach()) if gate_a else func(a.detach(), b)",
        ("tests/integration/test_cp_lrp.py",),
    ),
    M(
        "cp-lrp-splits-gates",
        "lxt_plus/engine/plan.py",
        "_lrp(AHLRP(), Constant(), ConstantGate()),",
        "_lrp(AHLRP(), Constant(), UniformProduct()),",
        ("tests/integration/test_cp_lrp.py",),
    ),
    M(
        "norm-scale-not-constant",
        "lxt_plus/engine/modes.py",
        "scale = torch.rsqrt(xf.detach().pow(2)",
        "scale = torch.rsqrt(xf.pow(2)",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "layernorm-mean-detached",
        "lxt_plus/engine/modes.py",
        "centred = x - x.mean(dim=dims, keepdim=True)",
        "centred = x - x.mean(dim=dims, keepdim=True).detach()",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "inline-softmax-not-detached",
        "lxt_plus/engine/modes.py",
        "return out.detach() if self.detach_weights else out",
        "return out",
        ("tests/unit/test_patching.py", "tests/integration/test_families.py"),
    ),
    M(
        "attnlrp-qk-half",
        "lxt_plus/engine/attention.py",
        "(None, 1.0) if detach_weights else (0.25, 0.5)",
        "(None, 1.0) if detach_weights else (0.5, 0.5)",
        ("tests/unit/test_attention.py", "tests/integration/test_reference_lrp.py"),
    ),
    M(
        "ahlrp-value-half",
        "lxt_plus/engine/attention.py",
        "(None, 1.0) if detach_weights else (0.25, 0.5)",
        "(None, 0.5) if detach_weights else (0.25, 0.5)",
        ("tests/unit/test_attention.py", "tests/integration/test_families.py"),
    ),
    # ------------------------------------------------------------------ patching and undo
    M(
        "zeroed-biases-not-restored",
        "lxt_plus/engine/patching.py",
        "p.copy_(value)",
        "pass",
        ("tests/unit/test_patching.py",),
    ),
    M(
        "instance-forward-left-behind",
        "lxt_plus/engine/install.py",
        "delattr(module, attr)",
        "pass",
        ("tests/unit/test_patching.py",),
    ),
    M(
        "registry-keys-left-behind",
        "lxt_plus/engine/hf.py",
        "        _KeyUse.users -= 1\n        if _KeyUse.users == 0:",
        "        _KeyUse.users -= 1\n        if _KeyUse.users == -1:",
        ("tests/unit/test_patching.py",),
    ),
    M(
        "first-match-becomes-last-match",
        "lxt_plus/engine/plan.py",
        "        for sel, rule in self.rules:\n",
        "        for sel, rule in reversed(self.rules):\n",
        ("tests/unit/test_plan.py",),
    ),
    M(
        "conservative-check-keeps-biases",
        "lxt_plus/engine/plan.py",
        "        zero_bias=True,\n",
        "        zero_bias=False,\n",
        ("tests/unit/test_patching.py", "tests/integration/test_families.py"),
    ),
    # ------------------------------------------------------------------ inputs and targets
    M(
        "target-at-last-column-not-last-real-token",
        "lxt_plus/api/explain.py",
        "last = (mask.shape[1] - 1 - mask.flip(-1).argmax(-1)).tolist()",
        "last = [mask.shape[1] - 1] * mask.shape[0]",
        ("tests/unit/test_explain.py", "tests/integration/test_families.py"),
    ),
    M(
        "padding-keeps-relevance",
        "lxt_plus/api/explain.py",
        "rel = rel * mask.to(rel.dtype)",
        "rel = rel * 1",
        ("tests/unit/test_padding_contract.py", "tests/unit/test_explain.py"),
    ),
    M(
        "left-padding-positions-not-shifted",
        "lxt_plus/api/explain.py",
        'kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)',
        "pass",
        ("tests/integration/test_families.py",),
    ),
    M(
        "chat-template-boundary-off-by-one",
        "lxt_plus/api/explain.py",
        "(start < 0 or b <= start or a >= end)",
        "(start < 0 or b < start or a >= end)",
        ("tests/unit/test_explain.py",),
    ),
    M(
        "target-function-reads-pads",
        "lxt_plus/api/explain.py",
        "if arity < 2 and causal and (padded or position is not None):",
        "if False:",
        ("tests/unit/test_target_functions.py",),
    ),
    M(
        "cli-overrides-in-reverse",
        "lxt_plus/cli.py",
        "for text in args.override or []:",
        "for text in reversed(args.override or []):",
        ("tests/integration/test_cli.py",),
    ),
    M(
        "perturbation-steps-floor",
        "lxt_plus/evaluation/evaluate.py",
        "m = int(math.floor(k * n / steps + 0.5))",
        "m = int(math.floor(k * n / steps))",
        ("tests/unit/test_evaluate.py",),
    ),
    M(
        "serialised-head-patterns-keep-string-layers",
        "lxt_plus/results/captures.py",
        "value = {int(k): v for k, v in value.items()}",
        "value = dict(value)",
        ("tests/unit/test_capture.py",),
    ),
    M(
        "pipeline-mask-position-dropped",
        "lxt_plus/api/explain.py",
        "position=call.position if position is None else position,",
        "position=position,",
        ("tests/integration/test_pipelines.py",),
    ),
    M(
        "moved-path-returns-without-warning",
        "lxt_plus/_moved.py",
        "        warnings.warn(",
        "        if False:\n            warnings.warn(",
        ("tests/unit/test_layering.py",),
    ),
    # ------------------------------------------------------------------ operation-level check
    M(
        "opcheck-product-counted-linear",
        "lxt_plus/engine/opcheck.py",
        'return ("linear", base) if n <= 1 else',
        'return ("linear", base) if n <= 2 else',
        ("tests/unit/test_opcheck.py",),
    ),
    M(
        "opcheck-division-denominator-ignored",
        "lxt_plus/engine/opcheck.py",
        "if len(inputs) < 2 or inputs[1] is None:",
        "if True:",
        ("tests/unit/test_opcheck.py",),
    ),
    M(
        "opcheck-constant-add-ignored",
        "lxt_plus/engine/opcheck.py",
        "                if nonzero:\n                    self.constants.add(out.grad_fn)",
        "                if nonzero:\n                    pass",
        ("tests/unit/test_opcheck.py",),
    ),
    M(
        "opcheck-unknown-not-raised",
        "lxt_plus/engine/patching.py",
        '    if strict:\n        raise UnsupportedModelError(\n            f"{message}. Add a rule',
        '    if False:\n        raise UnsupportedModelError(\n            f"{message}. Add a rule',
        ("tests/unit/test_opcheck.py",),
    ),
    M(
        "mamba-scan-parameters-not-detached",
        "lxt_plus/engine/rules.py",
        "wrap_forward(proj, lambda fwd: lambda *a, **k: _detach_all(fwd(*a, **k)), undo)",
        "pass",
        ("tests/integration/test_mamba_reference.py",),
    ),
    M(
        "seq2seq-decoder-relevance-dropped",
        "lxt_plus/results/result.py",
        "            total = total + decoder\n",
        "",
        ("tests/integration/test_seq2seq.py",),
    ),
    M(
        "xlnet-layout-not-transposed",
        "lxt_plus/api/explain.py",
        "        return rel.transpose(0, 1)",
        "        return rel",
        ("tests/integration/test_zoo.py::test_transposed_embeddings",),
    ),
    # ------------------------------------------------------------------ memory at long contexts
    M(
        "gated-product-forgets-the-identity-ratio",
        "lxt_plus/engine/functional.py",
        "grad_x = (acc(grad_a) * ctx.ratio_fn(acc(x))).to(ctx.dtype)",
        "grad_x = acc(grad_a).to(ctx.dtype)",
        ("tests/unit/test_memory.py",),
    ),
    M(
        "gated-product-fuses-past-a-watched-tensor",
        "lxt_plus/engine/functional.py",
        "    if t.retains_grad or t._backward_hooks:",
        "    if False:",
        ("tests/unit/test_memory.py", "tests/unit/test_rules_reference.py"),
    ),
    M(
        "gated-product-keeps-three",
        "lxt_plus/engine/functional.py",
        "if ratio_fn is not None and x._version == version and y.data_ptr() != x.data_ptr():",
        "if False:",
        ("tests/unit/test_memory.py",),
    ),
    M(
        "attnlrp-checkpointing-keeps-fused-backward",
        "lxt_plus/engine/attention.py",
        "return _REPLAY.get() is not None",
        "return False",
        ("tests/integration/test_scale.py::test_checkpointing_runs_each_attention_kernel_once",),
    ),
    M(
        "checkpoint-recomputes-attention",
        "lxt_plus/api/explain.py",
        'kwargs = {"use_reentrant": False, "context_fn": replay_contexts}',
        'kwargs = {"use_reentrant": False}',
        ("tests/integration/test_scale.py::test_checkpointing_runs_each_attention_kernel_once",),
    ),
    M(
        "replay-index-not-reset",
        "lxt_plus/engine/attention.py",
        "self.store.replaying, self.store.index = self.replaying, 0",
        "self.store.replaying = self.replaying",
        ("tests/unit/test_attention.py::test_checkpoint_recomputation_replays_the_attention_output",),
    ),
    M(
        "replay-shape-unchecked",
        "lxt_plus/engine/attention.py",
        "if tuple(kept.shape) == shape:",
        "if True:",
        ("tests/unit/test_attention.py::test_replay_recomputes_an_output_of_another_shape",),
    ),
    M(
        "eager-weights-always-kept",
        "lxt_plus/engine/attention.py",
        "    if probs is not None and probs.shape[-1] > KEEP_WEIGHTS_UP_TO:",
        "    if False:",
        ("tests/unit/test_memory.py",),
    ),
    M(
        "estimate-ignores-pairs",
        "lxt_plus/engine/opcheck.py",
        "return int(rows * (self.per_token * tokens + pairs * tokens * tokens))",
        "return int(rows * self.per_token * tokens)",
        ("tests/unit/test_memory.py",),
    ),
    M(
        "never-refuses",
        "lxt_plus/engine/memory.py",
        "    if need <= free:\n        return",
        "    if need <= free or True:\n        return",
        ("tests/unit/test_memory.py",),
    ),
    M(
        "quantized-weight-not-dequantized",
        "lxt_plus/engine/functional.py",
        "        raw_weight = _dequantized(raw_weight)\n",
        "",
        ("tests/integration/test_quantized.py",),
    ),
    M(
        "offloaded-weights-kept",
        "lxt_plus/engine/offload.py",
        "        entry = loaded.get(t.untyped_storage().data_ptr())",
        "        entry = None",
        ("tests/integration/test_accelerate.py",),
    ),
    M(
        "estimate-counts-offloaded-weights",
        "lxt_plus/engine/opcheck.py",
        "| set(weights)",
        "| set()",
        ("tests/integration/test_accelerate.py",),
    ),
    M(
        "segment-boundary-off-by-one",
        "lxt_plus/results/segments.py",
        "        j = i + 1\n",
        "        j = i\n",
        ("tests/unit/test_segments.py",),
    ),
    # ------------------------------------------------------------------ images
    M(
        "batch-norm-gradient-not-made-dense",
        "lxt_plus/engine/patching.py",
        "    return grad.contiguous()",
        "    return grad",
        ("tests/unit/test_vision_rules.py::test_batch_norm_relevance_equals_its_affine_map",),
    ),
    M(
        "running-mean-not-zeroed",
        "lxt_plus/engine/patching.py",
        '    "running_mean",  # subtracted',
        '    "running_meanX",  # subtracted',
        ("tests/unit/test_vision_rules.py::test_batch_norm_running_mean_is_zeroed_for_the_check",),
    ),
    M(
        "group-norm-scale-not-held-constant",
        "lxt_plus/engine/modes.py",
        "    return centred * torch.rsqrt(centred.detach().pow(2).mean(dim=dims, keepdim=True) + eps)",
        "    return centred * torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + eps)",
        ("tests/unit/test_vision_rules.py::test_group_norm_rule_holds_the_scale_constant",),
    ),
    M(
        "mha-attention-weights-kept-in-ah-lrp",
        "lxt_plus/engine/attention.py",
        '{"attn_mask": mask, "is_causal": causal}, detach_weights',
        '{"attn_mask": mask, "is_causal": causal}, False',
        ("tests/unit/test_vision_rules.py::test_mha_ah_lrp_equals_its_reference",),
    ),
    M(
        "concatenated-constant-not-refused",
        "lxt_plus/engine/opcheck.py",
        "            ):  # a learned token put beside the input's (CLIP's class embedding)\n                self.constants.add(out.grad_fn)",
        "            ):  # a learned token put beside the input's (CLIP's class embedding)\n                pass",
        (
            "tests/unit/test_vision_rules.py::test_learned_token_concatenated_is_a_leak_under_conservative_check",
        ),
    ),
    M(
        "model-autograd-function-counted-as-rule",
        "lxt_plus/engine/opcheck.py",
        'or (ruled and not home.startswith("transformers."))',
        "or ruled",
        ("tests/unit/test_vision_rules.py::test_custom_functions_of_the_model_are_not_covered_by_a_rule",),
    ),
    M(
        "vlm-image-relevance-left-out-of-conservation",
        "lxt_plus/results/result.py",
        "            total = total + image\n",
        "",
        ("tests/integration/test_vlm.py::test_llava_matches_the_reference",),
    ),
    M(
        "similarity-full-relevance-to-both-sides",
        "lxt_plus/api/similarity.py",
        "score = uniform_matmul(a, b.T)[0, 0]",
        "score = (a @ b.T)[0, 0]",
        ("tests/integration/test_similarity.py",),
    ),
    M(
        "generation-image-rows-swapped",
        "lxt_plus/api/generation.py",
        "image_rows.append(torch.stack([to_images(r) for r in rel]).sum(2).cpu())",
        "image_rows.append(torch.stack([to_images(r) for r in rel]).sum(2).flip(0).cpu())",
        ("tests/integration/test_vlm.py::test_generation_rows_equal_explain",),
    ),
    M(
        "overlay-tint-sign-lost",
        "lxt_plus/render/colors.py",
        "    tint = torch.where(v[..., None] > 0, pos, neg)",
        "    tint = torch.where(v[..., None] != 0, pos, neg)",
        ("tests/unit/test_render.py::test_pixel_heatmap_over_the_image",),
    ),
    M(
        "summary-names-the-weakest-as-pushing-down",
        "lxt_plus/render/summary.py",
        "for i in ranked[::-1][:k] if values[i] < 0]",
        "for i in ranked[:k] if values[i] < 0]",
        ("tests/unit/test_render.py::test_summary_says_what_pushed_up_and_down",),
    ),
    # ------------------------------------------------------------------ positional relevance (PA-LRP)
    M(
        "positional-product-not-halved",
        "lxt_plus/engine/modes.py",
        "                self._count()\n                return uniform_mul(a, b)\n        return func(*args, **kwargs)",
        "                self._count()\n                return func(a, b)\n        return func(*args, **kwargs)",
        ("tests/integration/test_reference_lrp.py",),
    ),
    M(
        "positional-derived-through-input",
        "lxt_plus/engine/modes.py",
        "            if id(variable) not in targets:\n                return False\n            continue",
        "            continue",
        ("tests/integration/test_positional.py",),
    ),
    M(
        "positional-not-folded-into-pairs",
        "lxt_plus/api/explain.py",
        "            rel = rel + positional.to(rel.device, rel.dtype)",
        "            pass",
        ("tests/integration/test_reference_lrp.py",),
    ),
    M(
        "position-table-share-kept-in-extra",
        "lxt_plus/api/explain.py",
        "                extra_rel = extra_rel - table.sum(-1).to(extra_rel.dtype)",
        "                pass",
        ("tests/integration/test_reference_lrp.py",),
    ),
    M(
        "positional-leaf-shared-over-rows",
        "lxt_plus/engine/positional.py",
        "        value = value.expand(rows, *value.shape[1:])",
        "        pass",
        ("tests/integration/test_positional.py",),
    ),
    M(
        "tune-cv-selects-on-every-fold",
        "lxt_plus/evaluation/tune.py",
        "chosen = max(per_row, key=lambda c: float(per_row[c][train].mean()))",
        "chosen = max(per_row, key=lambda c: float(per_row[c].mean()))",
        ("tests/unit/test_tune.py",),
    ),
    M(
        "scan-keys-not-detached",
        "lxt_plus/engine/modes.py",
        "            return type(out)(t.detach() if i in self.parameters else t for i, t in enumerate(out))",
        "            return out",
        ("tests/integration/test_scan_reference.py",),
    ),
    M(
        "scan-gates-not-detached",
        "lxt_plus/engine/modes.py",
        "x.requires_grad and torch.is_grad_enabled():\n            self._count()\n            return out.detach()",
        "x.requires_grad and torch.is_grad_enabled():\n            self._count()\n            return out",
        ("tests/integration/test_scan_reference.py",),
    ),
    M(
        "scan-without-the-gated-mlp-rules",
        "lxt_plus/engine/modes.py",
        "            **super()._table(),  # the parameter handlers below take sigmoid and softplus over\n",
        "",
        ("tests/integration/test_scan_reference.py",),
    ),
    M(
        "solve-with-input-dependent-matrix-linear",
        "lxt_plus/engine/opcheck.py",
        '        return ("linear", base) if a_constant else',
        '        return ("linear", base) if True else',
        ("tests/unit/test_opcheck.py",),
    ),
    M(
        "generation-positions-dropped",
        "lxt_plus/api/generation.py",
        "                    row = row + r.to(row.dtype)",
        "                    pass",
        ("tests/unit/test_generation.py",),
    ),
    # ------------------------------------------------------------------ the zoo's last refusals
    M(
        "fft-not-linear",
        "lxt_plus/engine/opcheck.py",
        " FftR2C FftC2C FftC2R",
        "",
        (ZOO_GAPS,),
    ),
    M(
        "shifted-factor-ignored",
        "lxt_plus/engine/modes.py",
        "                return self._product(func, x, other) + other * c",
        "                return self._product(func, first, other)",
        ("tests/unit/test_rules_reference.py", ZOO_GAPS),
    ),
    M(
        "shifted-constant-term-to-the-constant",
        "lxt_plus/engine/modes.py",
        "                return self._product(func, x, other) + other * c",
        "                return self._product(func, x, other) + other.detach() * c",
        ("tests/unit/test_rules_reference.py",),
    ),
    M(
        "head-activation-not-ruled",
        "lxt_plus/engine/rules.py",
        "    return identity_rule(x, lambda _: value)",
        "    return None",
        (ZOO_GAPS,),
    ),
    M(
        "head-activation-hook-kept-in-backbone",
        "lxt_plus/engine/rules.py",
        "        if handles:\n            handles.pop().remove()",
        "        if False:\n            handles.pop().remove()",
        ("tests/integration/test_zoo.py::test_head_activation_hook_is_held_for_the_head_call_only",),
    ),
    M(
        "gated-mlp-taken-for-a-router",
        "lxt_plus/engine/detect.py",
        '            and not has(path, lambda c: roles.get(c) == "activation")\n        ):\n            roles[path] = "router"',
        '        ):\n            roles[path] = "router"',
        (ZOO_GAPS,),
    ),
    M(
        "stack-embeddings-not-found",
        "lxt_plus/engine/detect.py",
        '                emb = getattr(stack, "embed_tokens", None)',
        "                emb = None",
        (ZOO_GAPS,),
    ),
    M(
        "mla-not-attention",
        "lxt_plus/engine/detect.py",
        '_ATTN_NAME = re.compile(r"(?i:attention|attn)|MLA$")',
        '_ATTN_NAME = re.compile(r"(?i:attention|attn)")',
        (ZOO_GAPS,),
    ),
    M(
        "input-dependent-mask-kept-under-ah-lrp",
        "lxt_plus/engine/attention.py",
        "    if detach_weights and isinstance(mask, Tensor) and mask.requires_grad:",
        "    if False:",
        (ZOO_GAPS,),
    ),
    M(
        "position-buffers-not-found",
        "lxt_plus/engine/detect.py",
        "                found.append(b)",
        "                pass",
        ("tests/integration/test_positional.py", ZOO_GAPS),
    ),
    M(
        "position-buffer-copies-not-followed",
        "lxt_plus/engine/positional.py",
        "            self.tables[id(out)] = out",
        "            pass",
        ("tests/integration/test_positional.py",),
    ),
    M(
        "position-buffer-rows-not-leaves",
        "lxt_plus/api/explain.py",
        "        with position_buffer_leaves(model, lambda out: added_leaf(out, True)):",
        "        with contextlib.nullcontext():",
        ("tests/integration/test_positional.py", ZOO_GAPS),
    ),
    # ------------------------------------------------------------------ padded batches
    M(
        "shared-position-table-one-for-all-rows",
        "lxt_plus/api/explain.py",
        "            elif store and value.dim() == store[0].dim() - 1 and value.shape[-1] == store[0].shape[-1]:",
        "            elif False:",
        (PADDED_ROWS,),
    ),
    M(
        "padding-relevance-dropped",
        "lxt_plus/api/explain.py",
        "        extra_rel = _padding_share(rel, mask, picked, extra_rel, type(model).__name__)",
        "        pass",
        ("tests/integration/test_zoo.py::test_padding_the_model_reads_is_reported",),
    ),
    M(
        "zero-based-positions-for-ids-numbered-positions",
        "lxt_plus/api/explain.py",
        '    return not any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules())',
        "    return True",
        (PADDED_ROWS,),
    ),
    M(
        "left-padded-rows-keep-padded-positions",
        "lxt_plus/api/explain.py",
        '            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)',
        "            pass",
        (PADDED_ROWS,),
    ),
    # ------------------------------------------------------------------ audit's module flows
    M(
        "audit-ignores-hidden-states-read-beside-the-output",
        "lxt_plus/evaluation/audit.py",
        '            inner = sum(a for p, a in asides if p.startswith(f.path + "."))',
        "            inner = 0.0",
        (AUDIT,),
    ),
    M(
        "audit-judges-stacks-that-embed-their-tokens",
        "lxt_plus/evaluation/audit.py",
        '            if any(src.startswith(f.path + ".") for src in sources):',
        "            if False:",
        (AUDIT,),
    ),
    M(
        "audit-reads-outputs-after-in-place-updates",
        "lxt_plus/evaluation/audit.py",
        "        value = t.detach().clone()",
        "        value = t.detach()",
        (AUDIT,),
    ),
    M(
        "audit-measures-tuples-as-returned",
        "lxt_plus/evaluation/audit.py",
        "            return tuple(self._copy(t, flow.outputs) if _wanted(t) else t for t in out)",
        "            flow.outputs += [self.measure(t) for t in out if _wanted(t)]\n            return None",
        (AUDIT,),
    ),
    M(
        "audit-judges-incomplete-model-outputs",
        "lxt_plus/evaluation/audit.py",
        "        flow.complete = len(found) <= 1",
        "        flow.complete = True",
        (AUDIT,),
    ),
    # ------------------------------------------------------------------ per-head capture
    M(
        "heads-capture-needs-every-layer",
        "lxt_plus/api/capture.py",
        '        if "heads" in self.captures and not self._head_layers:',
        '        if "heads" in self.captures and len(self._head_layers) < len(self.parts):',
        (HEADS,),
    ),
    M(
        "block-list-may-be-a-blocks-parts",
        "lxt_plus/engine/detect.py",
        '    outer = [(p, m) for p, m in found if not any(p.startswith(f"{q}.") for q, _ in found if q != p)]',
        "    outer = found",
        (HEADS,),
    ),
    M(
        "output-projection-names-case-sensitive",
        "lxt_plus/api/capture.py",
        '    parts = path.lower().split(".")',
        '    parts = path.split(".")',
        (HEADS,),
    ),
    M(
        "output-projection-wrapper-not-named",
        "lxt_plus/api/capture.py",
        '    return parts[-2] if parts[-1] == "linear" and len(parts) > 1 else parts[-1]',
        "    return parts[-1]",
        (HEADS,),
    ),
    M(
        "attention-block-itself-not-attention",
        "lxt_plus/api/capture.py",
        '                and (info.path == block_path or info.path.startswith(block_path + "."))',
        '                and info.path.startswith(block_path + ".")',
        (HEADS,),
    ),
    # ------------------------------------------------------------------ layer capture
    M(
        "layers-sequence-first-not-transposed",
        "lxt_plus/api/capture.py",
        "            if rows is not None and r.dim() >= 3 and r.shape[0] != rows and r.shape[1] == rows:",
        "            if False:",
        (LAYERS,),
    ),
    M(
        "blocks-of-the-vision-tower",
        "lxt_plus/engine/detect.py",
        "    return max(near or outer, key=lambda c: len(c[1]), default=None)",
        "    return max(outer, key=lambda c: len(c[1]), default=None)",
        (LAYERS,),
    ),
    # ------------------------------------------------------------------ vision-language input layouts
    M(
        "pair-view-ignores-the-hovered-token",
        "lxt_plus/render/html.py",
        "function show(t){img.src=d.images[t];",
        "function show(t){img.src=d.images[0];",
        ("tests/integration/test_html_browser.py",),
    ),
    M(
        "pre-cut-patches-misplaced",
        "lxt_plus/api/explain.py",
        "    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(n, channels, gh * patch, gw * patch)",
        "    return x.permute(0, 5, 2, 3, 6, 1, 4, 7).reshape(n, channels, gh * patch, gw * patch)",
        ("tests/integration/test_vlm.py",),
    ),
    M(
        "pre-cut-patch-copies-averaged",
        "lxt_plus/api/explain.py",
        '    x = x.sum(6) if copies == "sum" else x.mean(6)',
        "    x = x.mean(6)",
        ("tests/integration/test_vlm.py",),
    ),
    M(
        "layer-norm-output-keeps-input-strides",
        "lxt_plus/engine/modes.py",
        "        return y.contiguous()",
        "        return y",
        ("tests/integration/test_vlm.py",),
    ),
    M(
        "continuation-token-types-not-padded",
        "lxt_plus/api/generation.py",
        "            out[name] = torch.nn.functional.pad(value, (0, length - n_prompt))",
        "            pass",
        ("tests/integration/test_vlm.py",),
    ),
    M(
        "probe-without-token-types",
        "lxt_plus/engine/patching.py",
        '            probe["mm_token_type_ids"] = (probe["input_ids"] == token).long()',
        "            pass",
        ("tests/integration/test_vlm.py",),
    ),
    # -------------------------------------------- vision towers checked on the first image input
    M(
        "first-image-input-not-checked",
        "lxt_plus/engine/patching.py",
        "    _check_operations(model, plan, tensors, handle.strict, dict(model.named_modules()), handle._undo)",
        "    return",
        (VLM_LAYOUTS,),
    ),
    M(
        "probe-images-not-recorded",
        "lxt_plus/engine/patching.py",
        "    report.images = any(v.is_floating_point() for v in inputs.values() if isinstance(v, torch.Tensor))",
        "    report.images = True",
        (VLM_LAYOUTS,),
    ),
    M(
        "image-newline-not-a-learned-token",
        "lxt_plus/engine/patching.py",
        '    "image_newline",  # LLaVA-Next\'s learned token after each row of image features\n',
        "",
        (VLM_LAYOUTS,),
    ),
    M(
        "audit-measures-the-first-image-check",
        "lxt_plus/evaluation/audit.py",
        "                explain(model, inputs, rules=handle.preset, strict=False, decoder_input_ids=decoder_input_ids)",
        "                pass",
        (VLM_LAYOUTS,),
    ),
    # ------------------------------------------------------------------ sentences and images in views
    M(
        "generation-summary-ignores-later-tokens",
        "lxt_plus/render/summary.py",
        "    seen = gen.prompt_length + t\n",
        "    seen = gen.prompt_length\n",
        (RENDER,),
    ),
    M(
        "generation-html-summary-not-swapped",
        "lxt_plus/render/html.py",
        " root.querySelector('.lxt-summary').textContent=d.summaries[t];\n",
        "",
        ("tests/integration/test_html_browser.py",),
    ),
    M(
        "vlm-html-without-images",
        "lxt_plus/render/html.py",
        "        for i in range(len(images.channels))\n    )",
        "        for i in range(0)\n    )",
        ("tests/integration/test_vlm.py",),
    ),
    M(
        "model-image-errors-raw",
        "lxt_plus/api/explain.py",
        "        if isinstance(exc, LxtPlusError) or not images:",
        "        if True:",
        ("tests/integration/test_vlm.py::test_ids_that_do_not_match_the_images_are_refused_by_name",),
    ),
    M(
        "cli-image-placeholder-not-added",
        "lxt_plus/cli.py",
        '    return f"{token}\\n{text}" if isinstance(token, str) and token and token not in text else text',
        "    return text",
        ("tests/integration/test_cli.py::test_a_vision_language_model_with_an_image_file",),
    ),
    M(
        "whole-position-read-not-a-leaf",
        "lxt_plus/engine/positional.py",
        "            return self.make(out)\n        return out\n\n\n@contextlib.contextmanager",
        "            return out\n        return out\n\n\n@contextlib.contextmanager",
        ("tests/unit/test_vision_rules.py::test_siglip2_classifier_conserves_with_its_position_table",),
    ),
    M(
        "patch-lists-rows-and-columns-swapped",
        "lxt_plus/results/images.py",
        "    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch, w * patch)",
        "    return x.permute(0, 5, 1, 4, 2, 3).reshape(b, channels, h * patch, w * patch)",
        ("tests/unit/test_vision_rules.py::test_siglip2_patch_lists_go_back_onto_the_image_grid",),
    ),
    M(
        "grid-sample-not-linear",
        "lxt_plus/engine/opcheck.py",
        "    GridSampler2D GridSampler3D",
        "    ",
        (ZOO_GAPS,),
    ),
    M(
        "segments-sentence-ranks-wrong",
        "lxt_plus/render/summary.py",
        "    up, down = _extremes(names, values, k)",
        "    up, down = _extremes(names, -values, k)",
        ("tests/unit/test_segments.py",),
    ),
    M(
        "tune-group-epsilon-ignored",
        "lxt_plus/evaluation/tune.py",
        "            if g or e != eps:  # γ (with the group's ε) or the group's own ε",
        "            if g:",
        ("tests/unit/test_tune.py",),
    ),
    # ------------------------------------------------------------------ bad input
    M(
        "contrast-equal-to-target-accepted",
        "lxt_plus/api/explain.py",
        "if cids and set(cids) == set(ids):",
        "if cids and set(cids) == set(ids) and False:",
        ("tests/integration/test_hostile.py",),
    ),
    M(
        "position-bool-accepted",
        "lxt_plus/api/explain.py",
        "        if isinstance(value, bool):\n            raise TypeError\n",
        "",
        ("tests/integration/test_hostile.py",),
    ),
    M(
        "model-type-unchecked",
        "lxt_plus/engine/detect.py",
        '    if not isinstance(model, nn.Module):\n        raise InputError(\n            f"{caller}()',
        '    if False:\n        raise InputError(\n            f"{caller}()',
        ("tests/integration/test_hostile.py",),
    ),
    M(
        "negative-stabiliser-accepted",
        "lxt_plus/engine/rules.py",
        "            if value < 0:\n                raise ConfigError",
        "            if value < -1:\n                raise ConfigError",
        ("tests/unit/test_plan.py",),
    ),
    M(
        "unmatched-selector-silent",
        "lxt_plus/engine/plan.py",
        "        if not any(selector_matches(sel, info) for info in infos):",
        "        if False:",
        ("tests/unit/test_plan.py",),
    ),
    M(
        "attention-rule-on-any-module-forward-route",
        "lxt_plus/engine/rules.py",
        'return Installed("ops", done.undo)',
        'return Installed("ops" if site.role == "attention" else done.route, done.undo)',
        ("tests/unit/test_plan.py",),
    ),
    # ------------------------------------------------------------------ linear attention, RWKV
    M(
        "attention-exp-keeps-its-gradient",
        "lxt_plus/engine/modes.py",
        "if self.detach_weights and isinstance(out, Tensor) and out.grad_fn is not None:",
        "if False:",
        ("tests/integration/test_rwkv_reference.py",),
    ),
    M(
        "inline-square-plain-gradient",
        "lxt_plus/engine/modes.py",
        '    "square",  # RWKV\'s channel mix: square(relu(x))\n',
        "",
        ("tests/integration/test_rwkv_reference.py",),
    ),
    M(
        "attention-hits-only-without-gradient",
        "lxt_plus/engine/patching.py",
        '    _refuse_unseen(model, inputs, [e for e in unseen if not stats[e.path].get("attention_hits")])',
        "    _refuse_unseen(model, inputs, unseen)",
        ("tests/integration/test_zoo.py::test_formerly_refused_architectures_conserve",),
    ),
    M(
        "vlm-patch-list-columns-swapped",
        "lxt_plus/api/explain.py",
        "        return patch_list_images(t, shape, cast(int, patch_size(model)))",
        "        return patch_list_images(t, shape[::-1], cast(int, patch_size(model)))",
        ("tests/integration/test_vlm_layouts.py",),
    ),
    M(
        "plain-module-operations-unchecked",
        "lxt_plus/api/explain.py",
        "        if batch.values is not None and not is_hf_model(model):\n",
        "        if False:\n",
        ("tests/unit/test_patching.py::test_plain_module_operations_are_checked_on_the_explained_input",),
    ),
    M(
        "plain-module-check-not-remembered",
        "lxt_plus/engine/patching.py",
        '    _check_operations(model, plan, {"input": values.detach()}, handle.strict, named, handle._undo)\n    _remember_operations(handle)\n',
        '    _check_operations(model, plan, {"input": values.detach()}, handle.strict, named, handle._undo)\n',
        ("tests/unit/test_patching.py::test_plain_module_operations_are_checked_on_the_explained_input",),
    ),
)

# Changes that cannot alter any result, so no test can (or should) catch them.
EQUIVALENT: tuple[tuple[str, str], ...] = (
    (
        "functional.stabilize: `copysign(ε, x).add_(x)` -> `copysign(ε, x) + x`",
        "the same sum in the same dtype; only whether the temporary is reused differs",
    ),
)


def run(mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    """Apply ``mutant`` in a fresh copy and run its tests; an empty ``old`` runs the code as it is."""
    source = (ROOT / mutant.path).read_text()
    if mutant.old and source.count(mutant.old) != 1:
        return "stale", 0.0, f"{mutant.old!r} does not occur exactly once in {mutant.path}"
    with tempfile.TemporaryDirectory(prefix="lxt-mutant-") as tmp:
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, Path(tmp) / name)
        (Path(tmp) / mutant.path).write_text(source.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": tmp, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-x",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "not slow",
                    *mutant.tests,
                ],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        if proc.returncode == 5:
            return "no tests", seconds, ""
        if proc.returncode == 0:
            return "SURVIVED", seconds, ""
        failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return "killed", seconds, (failed[0] if failed else proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only in m.name]
    if args.list:
        for m in chosen:
            print(f"{m.name:45} {m.path:26} {' '.join(m.tests)}")
        return 0
    # the unmutated code must pass the same tests, or a "killed" mutant proves nothing
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    status, seconds, _ = run(Mutant("baseline", chosen[0].path, "", "", tests), args.timeout)
    print(f"{'baseline ' + ('passed' if status == 'SURVIVED' else 'FAILED'):16} {seconds:6.1f} s", flush=True)
    if status != "SURVIVED":
        print("the unmutated code fails these tests; fix that first")
        return 1
    results = []
    for m in chosen:
        status, seconds, detail = run(m, args.timeout)
        results.append((m, status))
        print(f"{status:16} {seconds:6.1f} s  {m.name}  ({m.path})", flush=True)
        if detail:
            print(f"{'':26}{detail[:150]}", flush=True)
    killed = sum(s.startswith("killed") for _, s in results)
    print(
        f"\nmutation score: {killed}/{len(results)} killed"
        f" ({len(EQUIVALENT)} equivalent mutants listed in dev/mutation.py, not run)"
    )
    for text, reason in EQUIVALENT:
        print(f"  equivalent: {text}: {reason}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
