"""The model as transformers builds it, on the meta device: its decoder layers, their routed experts, every Linear
and where each stored weight of the source belongs. No weight is read here.

The planner sizes its terms from this (layer_specs, linear_reasons); the engine assigns each layer's weights by it
(ModelMap); the GPU checkpoint names its quantised experts and its ignore list from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ktq.gpu.layout import Rule, ignore_reason
from ktq.hfformat import EXPERT_PROJECTION_NAMES

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# llm-compressor's names of an expert's projections once linearised (`...experts.E.gate_proj`): report keys and
# ignore targets, whatever the source calls them
LINEAR_NAMES = EXPERT_PROJECTION_NAMES["proj"]


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its weights outside the routed experts, and the routed experts' geometry."""

    name: str
    dense_bytes: int  # parameters outside the routed experts, in --torch_dtype
    experts: int = 0  # 0 for a dense layer
    hidden: int = 0
    intermediate: int = 0

    @property
    def expert_bytes(self) -> int:
        return 2 * 3 * self.experts * self.hidden * self.intermediate  # bf16, as decoded

    @property
    def weight_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes


def auto_model_class(config):
    """AutoModelForImageTextToText for a multimodal config (Qwen3-VL-MoE, Qwen3.5-MoE's wrapper), else
    AutoModelForCausalLM; remote-code models resolve through their own auto_map in AutoModelForCausalLM.

    The multimodal class comes first: AutoModelForCausalLM also maps some multimodal configs (Qwen3.5-MoE's) to the
    text-only model, which has no vision tower, so the tower's Linears would be missing from what is kept."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def meta_model(config, dtype: str, trust_remote_code: bool):
    """The model with every parameter on the meta device (buffers such as rotary frequencies stay real)."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return auto_model_class(config).from_config(config, dtype=getattr(torch, dtype),
                                                    trust_remote_code=trust_remote_code)


def decoder_layers(model) -> list[tuple[str, object]]:
    """The decoder layers (transformers' _no_split_modules classes), narrowed to the language model's `layers.N`
    where a vision tower's blocks are in the same list: text-only calibration never runs those."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    found = [(name, module) for name, module in model.named_modules() if type(module).__name__ in classes]
    text = [(name, module) for name, module in found if re.search(r"(^|\.)layers\.\d+$", name)]
    return text or found


def experts_module(layer) -> str | None:
    """The path of a decoder layer's routed-experts module (`mlp.experts`, `block_sparse_moe.experts`), if any."""
    return next((sub for sub, _ in layer.named_modules() if sub.split(".")[-1] == "experts"), None)


def layer_specs(model, text: dict, dtype: str) -> list[LayerSpec]:
    from ktq.cpu.experts import geometry_of

    width = DTYPE_BYTES[dtype]
    specs = []
    for name, layer in decoder_layers(model):
        experts = experts_module(layer)
        dense = sum(p.numel() for pname, p in layer.named_parameters()
                    if experts is None or not pname.startswith(experts + ".")) * width
        if experts is None:
            specs.append(LayerSpec(name, dense))
            continue
        g = geometry_of(text)
        specs.append(LayerSpec(name, dense, g.experts, g.hidden, g.intermediate))
    return specs


def linear_reasons(model, text: dict, rules: list[Rule]) -> dict[str, str | None]:
    """Every Linear of the model and every routed-expert projection, named as llm-compressor's linearisation names
    it (`...experts.E.gate_proj`), with the reason it is kept; None for the expert projections quantised."""
    import torch

    from ktq.cpu.experts import geometry_of

    reasons: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            classes = [c.__name__ for c in type(module).__mro__]
            reasons[name] = ignore_reason(rules, name, classes) or "not a routed expert"
    for name, layer in decoder_layers(model):
        experts = experts_module(layer)
        if experts is None:
            continue
        for e in range(geometry_of(text).experts):
            for proj in LINEAR_NAMES:
                projection = f"{name}.{experts}.{e}.{proj}"
                reasons[projection] = ignore_reason(rules, projection, ["Linear"])
    return reasons


class ModelMap:
    """Where the source's stored weights go in the meta model: each decoder layer's module, its routed-experts
    module, and each stored weight's module path (transformers' key renamings for the architecture applied)."""

    def __init__(self, skeleton, logical_names) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        self.skeleton = skeleton
        self.layer_names = [name for name, _ in decoder_layers(skeleton)]
        self.layers = [skeleton.get_submodule(name) for name in self.layer_names]
        self.experts_path = [self._experts_path(name, layer) for name, layer in zip(self.layer_names, self.layers)]
        renamings = [t for t in get_model_conversion_mapping(skeleton) if isinstance(t, WeightRenaming)]
        # module path of every stored weight (transformers' renamings applied), and the reverse
        self.module_of = {name: rename_source_key(name, renamings, [])[0] for name in logical_names}
        self.stored_as = {module: name for name, module in self.module_of.items()}

    @staticmethod
    def _experts_path(name: str, layer) -> str | None:
        sub = experts_module(layer)
        return f"{name}.{sub}" if sub is not None else None

    def layer_index(self, module: str) -> int | None:
        for index, name in enumerate(self.layer_names):
            if module.startswith(name + "."):
                return index
        return None

    def unit_tensors(self, unit: int | None) -> list[str]:
        """Stored weights of decoder layer `unit` outside its routed experts (None: everything outside the decoder
        layers, the embeddings, final norm, lm_head and MTP layers included), sorted."""
        names = []
        for name, module in self.module_of.items():
            layer = self.layer_index(module)
            if layer != unit:
                continue
            experts = self.experts_path[layer] if layer is not None else None
            if experts is not None and module.startswith(experts + "."):
                continue
            names.append(name)
        return sorted(names)

    def linear_name(self, index: int, e: int, p: int) -> str:
        """The name llm-compressor gives the Linear of expert e's projection p (gate, up, down) in decoder layer
        `index`: its report key and ignore target."""
        return f"{self.experts_path[index]}.{e}.{LINEAR_NAMES[p]}"
