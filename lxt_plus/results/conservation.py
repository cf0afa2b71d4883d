"""What each preset conserves, by name: the one place the result types and the renderers ask."""

from __future__ import annotations

__all__ = ["conservation_kind", "WHY", "WHERE"]

# why ``absorbed`` is not zero, per kind (the repr of Explanation.conservation)
WHY = {
    "softmax": "Under AttnLRP the softmax rule hands part of the relevance to the softmax's bias term (the "
    "softmax is not linear), and Linear/norm biases and the epsilon stabiliser keep theirs.",
    "biases": "Linear and norm biases keep their share, and the epsilon stabiliser a little.",
    "exact": "With conservative-check it is float error only.",
    "none": "Plain Gradient×Input (rules='gradient') does not conserve at all.",
}
# where the absorbed share went, per kind (the header of repr(explanation))
WHERE = {
    "softmax": "absorbed by biases and the softmax, not a leak",
    "biases": "absorbed by biases, not a leak",
    "exact": "left over (float error: conservative-check conserves exactly)",
    "none": "not accounted for (plain Gradient×Input does not conserve)",
}


def conservation_kind(rules: str) -> str:
    """How the preset named ``rules`` conserves relevance, the one place that knows it by name:
    ``"exact"`` (conservative-check), ``"none"`` (gradient), ``"softmax"`` (AttnLRP: biases and the
    softmax rule absorb a share) or ``"biases"`` (AH-LRP, CP-LRP and the rest: biases absorb)."""
    name = rules.lower()
    if name == "conservative-check":
        return "exact"
    if name == "gradient":
        return "none"
    return "softmax" if "attnlrp" in name else "biases"
