"""`ktq inspect` of a ktq gpu checkpoint (config.json with a compressed-tensors quantization_config beside
ktq_gpu_report.json): the experts' scheme, the tensor-parallel sizes sglang serves it with, the loader rules its
config breaks, and the serve lines (ktq.serving), Marlin on the GPU and the CPU experts beside it."""

from __future__ import annotations

import json
from pathlib import Path

from ktq import digest, hfformat
from ktq.cpu.checkpoint import open_checkpoint
from ktq.cpu.experts import find_experts, geometry_of
from ktq.errors import KtqError
from ktq.kernels.ktformat import METHODS
from ktq.serving import (
    cpu_output_serve,
    expert_scheme,
    gpu_checkpoint_serves,
    scheme_group,
    scheme_problems,
    serve_lines,
    tp_sizes,
    tp_summary,
)

REPORT_FILE = "ktq_gpu_report.json"  # written by every ktq gpu run (ktq.gpu.report)
MANIFEST = "ktq_gpu.json"  # each shard's size and digest (ktq.gpu.output)


def is_gpu_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not (path / REPORT_FILE).is_file() or not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _source_type(source: str) -> str | None:
    """How the source stores its routed experts, or None when it is not there to read."""
    try:
        return find_experts(open_checkpoint(Path(source).expanduser())).input_type
    except (KtqError, OSError):
        return None


def gpu_checkpoint_report(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    run = json.loads((path / REPORT_FILE).read_text())
    qc = config["quantization_config"]
    text = hfformat.text_config(config)
    g = geometry_of(text)
    weights = expert_scheme(qc)
    if weights is None:
        raise KtqError(f"{path / 'config.json'}: no config group targets the experts (\"Linear\")")
    bits, group = weights["num_bits"], scheme_group(weights)
    options = run.get("options") or {}
    cpu = options.get("cpu_experts")
    cpu_serve = None
    if cpu and Path(cpu["output"]).is_dir():
        method = METHODS[cpu["method"]].kt_method
        cpu_serve = cpu_output_serve(str(path.resolve()), Path(cpu["output"]).resolve(), method, cpu["numa"])
    source = str(run.get("model_id"))
    serves, notes = gpu_checkpoint_serves(path.resolve(), bits, group, source, _source_type(source), cpu_serve)
    tp = tp_sizes(qc, g.hidden, g.intermediate)
    fp8 = [grp for grp in qc["config_groups"].values() if grp["weights"].get("type") == "float"]
    return {
        "path": str(path.resolve()), "kind": "gpu-checkpoint", "model_type": text.get("model_type"),
        "source": source, "quant_method": run.get("quant_method"), "bits": bits, "group_size": group,
        "actorder": weights.get("actorder"), "symmetric": weights.get("symmetric"),
        "hidden": g.hidden, "intermediate": g.intermediate, "experts": g.experts,
        "fp8_linears": sum(len(grp["targets"]) for grp in fp8), "sglang_kt_fp8": "linear_fp8_config" in qc,
        "tp_sizes": [size for size, problem in tp.items() if problem is None], "tp": tp_summary(tp),
        "problems": scheme_problems(qc, g.hidden, g.intermediate),
        "serve_lines": serve_lines(*serves) + [f"note: {note}" for note in notes],
    }


def verify_shards(path: Path) -> list[str]:
    """Every shard re-hashed against the digest ktq_gpu.json recorded when it was written."""
    try:
        units = json.loads((path / MANIFEST).read_text())["units"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST} is missing or damaged ({exc}): nothing to check the shards against"]
    problems = []
    for record in units.values():
        shard = path / record["file"]
        algorithm, expected = digest.recorded(record)
        if not shard.is_file() or shard.stat().st_size != record["bytes"]:
            problems.append(f"{record['file']} is missing or not {record['bytes']} bytes")
        elif digest.of_file(shard, algorithm) != expected:
            problems.append(f"{record['file']} does not match its {algorithm} in {MANIFEST} (damaged or changed)")
    return problems
