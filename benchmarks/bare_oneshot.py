"""The reference measurement for benchmarks/gpu_bench.py: llm-compressor's `oneshot` called as its documentation
shows (model path in, output folder out), with the recipe `ktq gpu` builds: the same GPTQ scheme, ignore list,
dampening and calibration samples. Prints one JSON line: seconds inside oneshot and the peak GPU memory.

    python benchmarks/bare_oneshot.py MODEL OUT --dataset FILE --quant_type W4A16 --samples N --seq L [--causal]

--causal keeps transformers' own attention during calibration. llm-compressor 0.14.0.1 forces eager attention for
its calibration passes (`use_eager_attention`), and with transformers 5.17 the mask it then passes for unpadded
samples is None, which eager attention takes as "no mask": every layer is calibrated on inputs computed with
bidirectional attention (measured on a qwen3_moe sample: layer 0's attention output 0.157 off transformers' own
forward). For comparing outputs with ktq's engine, which computes causal attention as transformers does, the
patched run is the one whose Hessians are comparable; timings are the same either way.
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
    parser.add_argument("--causal", action="store_true", help="keep transformers' attention (see above)")
    parser.add_argument("--losses", help="write each module's GPTQ loss (unrounded) to this JSON file")
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
    if args.causal:
        import contextlib

        import llmcompressor.utils.helpers as helpers

        helpers.use_eager_attention = lambda model: contextlib.nullcontext()
    losses: dict[str, float] = {}
    if args.losses:
        _record_losses(GPTQModifier, losses)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    oneshot(model=args.model, dataset=data, recipe=recipe, num_calibration_samples=len(data),
            max_seq_length=args.seq, shuffle_calibration_samples=False, moe_calibrate_all_experts=True,
            output_dir=args.out)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    if args.losses:
        with open(args.losses, "w") as f:
            json.dump(losses, f, indent=1)
    print(json.dumps({"seconds": seconds, "peak_gpu_bytes": peak, "samples": len(data),
                      "tokens": sum(len(ids) for ids in data["input_ids"])}))


def _record_losses(modifier_class, losses: dict) -> None:
    """GPTQ hands each module's loss only to CompressionLogger.set_results (logged rounded to two decimals): keep
    the exact value under the module's name."""
    from compressed_tensors.utils import patch_attr
    from llmcompressor.utils.metric_logging import CompressionLogger

    compress = modifier_class.compress_module_list
    set_results = CompressionLogger.set_results

    def recording(modifier, module_list):
        def record(logger, name=None, loss=None):
            set_results(logger, name=name, loss=loss)
            if loss is not None:
                losses[modifier._module_names[logger.module]] = float(loss)

        with patch_attr(CompressionLogger, "set_results", record):
            return compress(modifier, module_list)

    modifier_class.compress_module_list = recording


if __name__ == "__main__":
    main()
