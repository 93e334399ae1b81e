"""Which Linear layers of a MoE model `ktq gpu` quantises, decided from config.json alone.

KTransformers serves the routed experts from the GPU in GPTQ form and keeps everything else (attention, routers,
shared experts, dense MLP layers, lm_head) in the original precision. Every rule below is a regular expression in
compressed-tensors' `re:` form, matched with `re.match` against the module name like llm-compressor does, so a
prefix such as `model.language_model.` or `thinker.model.` is allowed by the leading `(.*\\.)?`, and each rule ends
with `$` or a `\\.` so that `mlp.gate` never matches `mlp.gate_proj` and layer 1 never matches layer 10.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ktq import hfformat
from ktq.errors import KtqError
from ktq.serving import match_target

_ANY_PREFIX = r"(.*\.)?"
BASE_RULES: tuple[tuple[str, str], ...] = (
    ("lm_head", rf"re:{_ANY_PREFIX}lm_head$"),
    ("router", r"re:.*\.(gate|router|gate\.wg)$"),  # gate.wg: HunYuan-MoE
    ("router", r"re:.*\.shared_expert_gate$"),
    ("attention", r"re:.*\.(self_attn|linear_attn|attention|attn)\..*"),
    ("shared expert", r"re:.*\.(shared_experts?|shared_mlp)\..*"),  # shared_mlp: HunYuan-MoE
    ("vision/audio tower", rf"re:{_ANY_PREFIX}(visual|vision_tower|vision_model|multi_modal_projector|mm_projector"
                           r"|audio_tower)\..*"),
)


@dataclass(frozen=True)
class Rule:
    reason: str
    pattern: str

    def matches(self, name: str, class_names: Iterable[str] = ()) -> bool:
        return match_target(self.pattern, name, class_names)


@dataclass(frozen=True)
class MoeLayout:
    """The parts of config.json that decide what is quantised."""

    model_type: str
    num_layers: int
    num_experts: int
    dense_layers: tuple[int, ...]  # decoder layers whose MLP is dense, not routed experts

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> "MoeLayout":
        text = hfformat.checked_text_config(config)
        experts = hfformat.expert_count(text)
        if not experts:
            kind = text.get("model_type") or config.get("model_type") or "unknown"
            raise KtqError(f"{source} describes a dense model ({kind}: no {' / '.join(hfformat.EXPERT_COUNT_KEYS)}); "
                           "ktq gpu quantises the routed experts of Mixture-of-Experts models only")
        layers = hfformat.num_layers(text)
        if not layers:
            raise KtqError(f"{source} has no valid num_hidden_layers")
        return cls(model_type=str(text.get("model_type") or config.get("model_type")), num_layers=layers,
                   num_experts=experts, dense_layers=hfformat.dense_layers(text))


def dense_layer_rule(layers: Iterable[int]) -> Rule | None:
    """One rule for the MLPs of the given layers: an explicit alternation, exact past 9 (no `[0-k]` ranges)."""
    layers = sorted(set(layers))
    if not layers:
        return None
    alternation = "|".join(str(i) for i in layers)
    return Rule("dense MLP layer", rf"re:{_ANY_PREFIX}layers\.({alternation})\.(mlp|feed_forward)\..*")


def ignore_rules(layout: MoeLayout, extra_patterns: Iterable[str] = ()) -> list[Rule]:
    """The default MoE rules, the dense-layer rule from config.json, then the user's --ignore_patterns."""
    rules = [Rule(reason, pattern) for reason, pattern in BASE_RULES]
    dense = dense_layer_rule(layout.dense_layers)
    if dense is not None:
        rules.append(dense)
    rules += [Rule("--ignore_patterns", p) for p in extra_patterns]
    return rules


def validate_patterns(patterns: Iterable[str]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise KtqError(f"--ignore_patterns {pattern!r} is not a valid regular expression: {exc}") from exc


def ignore_reason(rules: Iterable[Rule], name: str, class_names: Iterable[str] = ()) -> str | None:
    """Why a module is kept in full precision, or None when it is quantised."""
    class_names = tuple(class_names)
    return next((rule.reason for rule in rules if rule.matches(name, class_names)), None)


_FUSED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|up_proj|down_proj)$")


def stores_fused_experts(model_id: str) -> bool:
    """Whether a local checkpoint keeps each layer's experts in fused 3-D tensors (`experts.gate_up_proj`) rather
    than one tensor per expert (`experts.7.gate_proj.weight`); False when it cannot tell (hub ids)."""
    from ktq.safetensors_io import read_header

    folder = Path(model_id).expanduser()
    index = folder / hfformat.INDEX_NAME
    if index.is_file():
        names = list(json.loads(index.read_text()).get("weight_map", {}))
    else:
        names = [name for shard in sorted(folder.glob("*.safetensors")) for name in read_header(shard)[0]]
    return any(_FUSED_EXPERTS.search(name) for name in names)
