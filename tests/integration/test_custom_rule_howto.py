"""docs/howto/custom-rule.md runs as written: its rule files are one class each, used by name with no
edit anywhere in lxt_plus, from Python, a YAML preset and a command-line wrapper.

The page's code blocks are run in order in one fresh interpreter, from a temporary folder: the
first Python block is saved as ``my_rules.py`` (the page says so), the YAML block as
``my-preset.yaml``, the wrapper as ``my_lxt.py``; the other Python blocks are executed. The checks
then show each rule did what the page says, against references computed here.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "howto" / "custom-rule.md"


def blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)


CHECKS = r"""
import torch
import lxt_plus
from lxt_plus.engine.functional import epsilon_rule, grad_scale
from lxt_plus.engine.rules import Gamma

# rel-epsilon equals LRP-eps with eps computed per call, checked on one layer by hand
lin = torch.nn.Linear(6, 3)
x = torch.randn(4, 6, requires_grad=True)
with lxt_plus.patched(lin, rules=lxt_plus.get_preset("attnlrp").override("linear", {"rel-epsilon": {"rel": 0.05}})):
    (out := lin(x)).sum().backward()
ours = (x * x.grad).detach()
x2 = x.detach().clone().requires_grad_(True)
z = lin(x2)
epsilon_rule(z, 0.05 * float(z.detach().abs().mean())).sum().backward()
torch.testing.assert_close(ours, (x2 * x2.grad).detach())
assert not torch.allclose(ours, (x2 * lin.weight.sum(0)).detach())  # not plain Gradient x Input

# the preset built in Python, by name and from YAML agree; and rel-epsilon changed the heatmap
base = lxt_plus.explain(model, ids, rules="attnlrp").relevance
yaml_res = lxt_plus.explain(model, ids, rules="my-preset.yaml").relevance
torch.testing.assert_close(yaml_res, res.relevance)
assert not torch.allclose(base, res.relevance)

# w-plus is the gamma rule's limit, on one layer (a deep stack of either amplifies float error)
for rule in ("w-plus", Gamma(gamma=1e6, generalized=False)):
    x = torch.rand(4, 6, requires_grad=True, generator=torch.Generator().manual_seed(1))
    with lxt_plus.patched(lin, rules=lxt_plus.get_preset("attnlrp").override("linear", rule)):
        lin(x).sum().backward()
    rel = (x * x.grad).detach() if rule == "w-plus" else torch.testing.assert_close((x * x.grad).detach(), rel, rtol=1e-3, atol=1e-4)
w = lxt_plus.explain(model, ids, rules=lxt_plus.get_preset("attnlrp").override("linear", "w-plus")).relevance
assert torch.isfinite(w).all() and not torch.allclose(w, base)

# damp-output through a hook on a linear layer (plain LRP-0 in attnlrp, so only the hook differs):
# equal to the same hook registered by hand; the model is restored bit for bit afterwards
down = model.model.layers[1].mlp.down_proj
damp = lxt_plus.get_preset("attnlrp").override("name:*.layers.1.mlp.down_proj", "damp-output")
state = {k: v.clone() for k, v in model.state_dict().items()}
forwards = {n: m.forward for n, m in model.named_modules()}
damped = lxt_plus.explain(model, ids, rules=damp).relevance
manual = down.register_forward_hook(lambda m, a, o: grad_scale(o, 0.5))
reference = lxt_plus.explain(model, ids, rules="attnlrp").relevance
manual.remove()
torch.testing.assert_close(damped, reference)
assert not torch.allclose(damped, base, atol=1e-4)
assert all(not m._forward_hooks for m in model.modules())
assert all(m.forward == forwards[n] for n, m in model.named_modules())
assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
with lxt_plus.patched(model, rules=damp) as h:
    assert any(
        r.strip().startswith("model.layers.1.mlp.down_proj") and "damp-output(factor=0.5)" in r
        for r in h.describe().splitlines()
    )
one = lxt_plus.get_preset("attnlrp").override("name:*.layers.1.mlp.down_proj", {"damp-output": {"factor": 1.0}})
with lxt_plus.patched(model, rules=one) as h:
    rows = [r for r in h.describe().splitlines() if r.strip().startswith("model.layers.1.mlp.down_proj")]
    assert not rows, rows  # is_noop: the plan leaves the module out
print("CHECKS-OK")
"""


def test_the_custom_rule_howto_runs_as_written(tmp_path: Path) -> None:
    found = blocks()
    python = [code for lang, code in found if lang == "python"]
    yaml_blocks = [code for lang, code in found if lang == "yaml"]
    assert len(python) >= 6 and len(yaml_blocks) == 1, [lang for lang, _ in found]
    (tmp_path / "my_rules.py").write_text(python[0])
    (tmp_path / "my-preset.yaml").write_text(yaml_blocks[0])
    wrapper = next(code for code in python if "from lxt_plus.cli import main" in code)
    (tmp_path / "my_lxt.py").write_text(wrapper)
    rest = [code for code in python[1:] if code is not wrapper]
    script = "\n".join(
        f"exec(compile({code!r}, 'custom-rule.md block {i}', 'exec'))" for i, code in enumerate(rest, 1)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script + "\n" + textwrap.dedent(CHECKS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "CHECKS-OK" in proc.stdout, proc.stderr[-4000:]
    assert "rel-epsilon(rel=0.05)" not in proc.stderr

    # the command-line wrapper knows the rule; plain lxt-plus does not and names the nearest rule
    audit = [sys.executable, "my_lxt.py", "audit", "--help"]
    assert subprocess.run(audit, cwd=tmp_path, capture_output=True, text=True, timeout=120).returncode == 0
