"""Tiny models and calibration files for the `ktq gpu` tests, all built locally (nothing is downloaded).

Sizes are multiples of 128 where quantised: W4A16 and W8A16 quantise in groups of 128 input columns.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that tried the hub would fail here instead of downloading
os.environ.setdefault("TQDM_DISABLE", "1")

WORDS = ("experts route tokens to a few of many the quick brown fox jumps over lazy dog hot cold GPU CPU "
         "quantisation maps weights to fewer bits 0123456789").split()


def sample_moe(out: Path, layers: int = 3, dense_layers: int = 1, experts: int = 8) -> Path:
    """A qwen3_moe checkpoint from `ktq sample`: dense MLP in the first layers, routed experts after."""
    from ktq.sample import write_sample

    return write_sample(out, layers=layers, experts=experts, hidden=128, moe_intermediate=128,
                        dense_layers=dense_layers, seed=1)


def deepseek_moe(out: Path, layers: int = 12, first_k_dense: int = 11) -> Path:
    """A deepseek_v3 checkpoint (MLA attention, shared experts, first_k_dense_replace) from transformers."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from ktq.sample import write_tokenizer

    config = DeepseekV3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=first_k_dense, n_group=1, topk_group=1, q_lora_rank=64, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, max_position_embeddings=256)
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    write_tokenizer(out)
    return out


def deepseek_v3_config() -> dict:
    """DeepSeek-V3's config.json as released (FP8, block-scaled 128 x 128)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3,
        "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
        "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                 "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
        "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128,
        "vocab_size": 129280}


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"messages": [{"role": "user", "content": " ".join(rng.choices(WORDS, k=12))},
                          {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=24))}]}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tensors(folder: Path) -> dict:
    """Every tensor's header entry over the checkpoint's shards."""
    from ktq.safetensors_io import read_header

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(read_header(shard)[0])
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / "ktq_gpu_report.json").read_text())


def run_ktq(*args: object) -> int:
    """`ktq ARGS` in this process (the llm-compressor import is paid once per test session); the exit code."""
    from ktq.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def run_ktq_capture(*args: object) -> tuple[int, str, str]:
    """`ktq ARGS` in this process: the exit code, stdout and stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_ktq(*args)
    return code, out.getvalue(), err.getvalue()


def python_with_ktq(code: str):
    """argv of a fresh interpreter running `code`, for what only a new process shows (import order, CUDA)."""
    return [sys.executable, "-c", code]
