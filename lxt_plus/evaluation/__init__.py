"""Checking and measuring explanations: audit (conservation, module by module), faithfulness curves,
baseline attribution methods, preset tuning."""
