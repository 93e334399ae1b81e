"""The reference measurement for benchmarks/gpu_bench.py: llm-compressor's `oneshot` called as its documentation
shows (model path in, output folder out), with the recipe `ktq gpu` builds: the same GPTQ scheme, ignore list,
dampening and calibration samples. Prints one JSON line: seconds inside oneshot and the peak GPU memory.

    python benchmarks/bare_oneshot.py MODEL OUT --dataset FILE --quant_type W4A16 --samples N --seq L
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--quant_type", default="W8A16")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dampening_frac", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoConfig, AutoTokenizer

    from ktq.gpu.data import calibration_dataset
    from ktq.gpu.layout import MoeLayout, ignore_rules

    # the same calibration samples and ignore rules as ktq gpu; data preparation is not timed
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = calibration_dataset(args.dataset, "train", None, tokenizer, args.samples, args.seq, args.seed)
    layout = MoeLayout.from_config(AutoConfig.from_pretrained(args.model).to_dict())
    recipe = GPTQModifier(targets="Linear", scheme=args.quant_type, dampening_frac=args.dampening_frac,
                          ignore=[rule.pattern for rule in ignore_rules(layout)])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(model=args.model, dataset=data, recipe=recipe, num_calibration_samples=len(data),
            max_seq_length=args.seq, shuffle_calibration_samples=False, output_dir=args.out)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    print(json.dumps({"seconds": seconds, "peak_gpu_bytes": peak, "samples": len(data),
                      "tokens": sum(len(ids) for ids in data["input_ids"])}))


if __name__ == "__main__":
    main()
