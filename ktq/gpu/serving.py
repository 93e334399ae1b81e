"""What the GPU checkpoint writes so that its serving loaders read it right (docs/serving-rules.md names the code
behind each; ktq.serving.config_problems checks the result):

- the experts' scheme with `actorder` None: no g_idx is written, and any truthy actorder makes sglang-kt load the w2
  scales unsharded at TP > 1 (`load_full_w2 = self.actorder and ...`);
- one scheme per MoE layer: sglang reads it from expert 0's gate/up/down and has no parameter for an expert left
  out, so ignore rules keep all of a layer's experts or none (refused otherwise, in one line);
- FP8 kept FP8: an FP8 source's non-expert Linears keep their weight and `weight_scale_inv` bytes; sglang-kt reads
  them through `linear_fp8_config` (its Fp8LinearMethod, which names the scale `weight_scale_inv`), vLLM and
  transformers through a compressed-tensors FP8 block scheme naming them;
- DeepSeek's MTP layer (index num_hidden_layers) under the names of sglang's NextN draft too: its decoder layer is
  built under `model.decoder` with the same config, its own Linears under `model`.
"""

from __future__ import annotations

import re

from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

from ktq.errors import KtqError

NEXTN_DECODER = "model.decoder"  # deepseek_nextn.py: DeepseekV2DecoderLayer(prefix=add_prefix("decoder", "model"))
# deepseek_weight_loader.py (nextn_spec_weight_names): MTP weights mapped to `model.X`, not `model.decoder.X`
NEXTN_OWN = ("shared_head.norm", "eh_proj", "enorm", "hnorm")
NEXTN_LINEARS = ("eh_proj", "shared_head.head")  # the MTP layer's own Linears, beside its decoder layer's


def nextn_name(name: str, mtp_prefix: str) -> str:
    """The name sglang's NextN draft gives a module of the MTP layer `mtp_prefix` (`model.layers.61`)."""
    rest = name[len(mtp_prefix) + 1:]
    if any(own in rest for own in NEXTN_OWN):
        return f"model.{rest}"
    return f"{NEXTN_DECODER}.{rest}"


def fp8_linear_config(block: tuple[int, int]) -> dict:
    """sglang-kt's `linear_fp8_config`: every LinearBase served by its Fp8LinearMethod from `weight` and
    `weight_scale_inv` (compressed_tensors.py, CompressedTensorsConfig.from_config / get_quant_method)."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def fp8_scheme(block: tuple[int, int], targets: list[str]) -> QuantizationScheme:
    """compressed-tensors' FP8 block scheme (FP8_BLOCK) with the source's block, for the named Linears."""
    scheme = preset_name_to_scheme("FP8_BLOCK", targets)
    scheme.weights.block_structure = list(block)
    scheme.format = "float-quantized"
    return scheme


def served_scheme(scheme: QuantizationScheme) -> QuantizationScheme:
    """The experts' scheme as written: the solve's activation order is internal (the codes are stored in column
    order, with no g_idx), so the files hold actorder None."""
    written = scheme.model_copy(deep=True)
    written.weights.actorder = None
    return written


def refuse_partial_layer(layer: str, kept: list[str], total: int) -> None:
    """One line when ignore rules keep some but not all of a MoE layer's expert projections (kept: their names)."""
    if kept and len(kept) < total:
        raise KtqError(f"--ignore_patterns keeps {len(kept)} of the {total} expert projections of {layer} unquantised "
                       f"(e.g. {kept[0]}), but sglang reads one scheme per MoE layer, from expert 0, and skips an "
                       rf"expert left unquantised: keep all of a layer's experts (re:{re.escape(layer)}\..*) or none")


def refuse_partial_ignores(model, text: dict, rules) -> None:
    """Refuse ignore rules that keep part of a MoE layer's experts, before anything is read."""
    from ktq.gpu.model import decoder_layers, experts_module, linear_reasons

    reasons = linear_reasons(model, text, rules)
    for name, layer in decoder_layers(model):
        experts = experts_module(layer)
        if experts is not None:
            prefix = f"{name}.{experts}."
            projections = [n for n in reasons if n.startswith(prefix)]
            refuse_partial_layer(prefix[:-1], [n for n in projections if reasons[n] is not None], len(projections))


# a routed expert's stored projection weight, per-expert layout (DeepSeek's MTP layer has this one)
EXPERT_WEIGHT = re.compile(r"^(?P<module>.*\.mlp\.experts\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj)\.weight$")
