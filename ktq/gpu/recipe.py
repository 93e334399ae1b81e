"""The llm-compressor modifier for `ktq gpu`: GPTQ with calibration data, or RTN (round to nearest) without."""

from __future__ import annotations

from ktq.gpu.layout import Rule


def build_recipe(method: str, scheme: str, rules: list[Rule], dampening_frac: float, gptq_batch: int | None):
    """One modifier targeting every Linear except the ignored ones; the scheme is compressed-tensors' preset
    (W4A16 / W8A16: symmetric int weights in groups of 128, saved pack-quantized)."""
    ignore = [rule.pattern for rule in rules]
    if method == "RTN":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore)
    from llmcompressor.modifiers.gptq import GPTQModifier

    # an explicit batch keeps GPTQ inside the plan; llm-compressor's "auto" would take 75% of free GPU memory
    return GPTQModifier(targets="Linear", scheme=scheme, ignore=ignore, dampening_frac=dampening_frac,
                        batched_quantization=gptq_batch if gptq_batch else "auto")
