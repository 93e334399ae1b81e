"""The DeepSeek-V3 GPU checkpoint's size as `ktq gpu` writes it, before issue 23 (every FP8 weight decoded to BF16,
experts in groups of 128, the MTP layer's experts in BF16) and after (FP8 Linears kept with their block scales,
experts in groups of 32, the MTP layer's experts packed like the others), W4A16 and W8A16, and what of it the GPU holds
whatever --kt-num-gpu-experts is: every weight but the routed experts of the model (the MTP draft's not counted).

Every tensor's shape comes from transformers' DeepseekV3 model built on the meta device from DeepSeek-V3's released
config.json (tests/gpu_models.py); the MTP layer (index 61) is one more MoE decoder layer plus its eh_proj, norms,
embedding and head, as the release stores it. Prints a table; not a test.

    .venv/bin/python benchmarks/gpu_checkpoint_size.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gpu_models import deepseek_v3_config  # noqa: E402

BLOCK = 128  # weight_block_size of the FP8 release


def modules(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(kind, name, shape) of every stored weight: kind "expert" (one routed expert's projection), "linear" (a Linear
    the release stores in FP8) or "other" (BF16 in the release: embeddings, norms, routers, lm_head, eh_proj)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    cfg["num_hidden_layers"] += 1  # the MTP layer's decoder part: one more MoE layer
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(DeepseekV3Config(**cfg))
    found = []
    for name, param in model.named_parameters():
        if ".mlp.experts." in name:  # fused [E, 2I, H] gate_up and [E, H, I] down: one entry per expert projection
            experts, rows, cols = param.shape
            shapes = [(rows // 2, cols)] * 2 if "gate_up" in name else [(rows, cols)]
            found += [("expert", name, shape) for shape in shapes for _ in range(experts)]
        elif param.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and "lm_head" not in name \
                and ".mlp.gate." not in name:
            found.append(("linear", name, tuple(param.shape)))
        else:
            found.append(("other", name, tuple(param.shape)))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    found += [("other", "mtp.embed_tokens", (vocab, hidden)), ("other", "mtp.shared_head.head", (vocab, hidden)),
              ("other", "mtp.eh_proj", (hidden, 2 * hidden))] + [("other", f"mtp.{n}", (hidden,))
                                                                    for n in ("enorm", "hnorm", "shared_head.norm")]
    del torch
    return found


def packed(shape: tuple[int, int], bits: int, group: int) -> int:
    rows, cols = shape
    return rows * cols * bits // 8 + 2 * rows * math.ceil(cols / group) + 16  # codes, bf16 scales, weight_shape


def fp8(shape: tuple[int, int]) -> int:
    rows, cols = shape
    return rows * cols + 4 * math.ceil(rows / BLOCK) * math.ceil(cols / BLOCK)


def sizes(found, mtp_layer: int, bits: int) -> dict[str, int]:
    numel = {name: math.prod(shape) for _, name, shape in found}
    source = before = after = resident_before = resident_after = 0
    for kind, name, shape in found:
        in_mtp = name.startswith(f"model.layers.{mtp_layer}.") or name.startswith("mtp.")
        if kind == "expert":
            source += fp8(shape)
            before += 2 * numel[name] if in_mtp else packed(shape, bits, 128)
            after += packed(shape, bits, 32)
        elif kind == "linear":
            source += fp8(shape)
            before += 2 * numel[name]
            after += fp8(shape)
            if not in_mtp:
                resident_before += 2 * numel[name]
                resident_after += fp8(shape)
        else:
            width = 4 if "e_score_correction_bias" in name else 2
            source += width * numel[name]
            before += width * numel[name]
            after += width * numel[name]
            if not in_mtp:
                resident_before += width * numel[name]
                resident_after += width * numel[name]
    return {"source": source, "before": before, "after": after, "resident_before": resident_before,
            "resident_after": resident_after}


def main() -> None:
    config = deepseek_v3_config()
    found = modules(config)
    print("| DeepSeek-V3 | FP8 release | ktq gpu before | ktq gpu after | all but the routed experts, before / after |")
    print("|---|---|---|---|---|")
    for bits in (4, 8):
        s = sizes(found, config["num_hidden_layers"], bits)
        print(f"| W{bits}A16 | {s['source'] / 1e9:.1f} GB | {s['before'] / 1e9:.1f} GB | {s['after'] / 1e9:.1f} GB | "
              f"{s['resident_before'] / 1e9:.1f} / {s['resident_after'] / 1e9:.1f} GB |")


if __name__ == "__main__":
    main()
