"""How sglang-kt serves what ktq writes: the command that starts a server, the tensor-parallel sizes a GPU checkpoint
serves with, and which group sizes kt-kernel's RAWINT4 computes right. One place for the rules every command
prints by; docs/serving-rules.md cites the loader code behind each one.

No torch here: `ktq cpu`, `ktq merge` and `ktq inspect` print serve lines too.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ktq.system import cpu_cores, numa_nodes, physical_cores

PLACEMENT_FILE = "init_expert_location.pt"  # sglang-kt's --init-expert-location file, written by calibrated runs

SERVER = "python -m sglang.launch_server"
# --kt-num-gpu-experts: experts per MoE layer on the GPU (sglang-kt multiplies it by the MoE layers). KTransformers'
# DeepSeek tutorials start with 1 on a 48 GB card; raise it while the GPU has room.
DEFAULT_GPU_EXPERTS = 1
# where --model-path is not known to the command (a CPU output inspected or merged without its source)
UNKNOWN_MODEL = "/path/to/model"
# tensor-parallel sizes sglang is started with on one host
TP_SIZES = (1, 2, 4, 8)
# kt-kernel 0.7.2's RAWINT4 (AMXInt4_KGroup_MOE), measured on AVX-512 (tests/test_kt_kernel.py): groups of 32
# compute what the files hold; groups of 64 and 128 load without an error, then return wrong values (cosine 0.3 and
# 0.1 to the dequantised product) for a few tokens and NaN for many, or crash; one scale per channel crashes
RAWINT4_GROUP = 32
RAWINT4_REFUSAL = ("kt-kernel 0.7.2 computes RAWINT4 right only for int4 weights in groups of 32 (groups of 64 and "
                   "128 load, then give wrong values, NaN or a crash; per-channel scales crash)")


@dataclass(frozen=True)
class Serve:
    """One way to serve: the GPU side from model_path, the CPU experts from kt_weight_path with kt_method."""

    model_path: str
    kt_weight_path: str
    kt_method: str
    threadpool_count: int  # AMXINT4/AMXINT8: the NUMA parts baked into the files; other methods: this machine's
    placement: Path | None = None  # init_expert_location.pt, for the frequency placement strategy
    gpu_experts: int = DEFAULT_GPU_EXPERTS

    def command(self) -> str:
        """The sglang-kt command line: every flag it needs to start (--kt-cpuinfer has no default: kt-kernel
        divides it by --kt-threadpool-count), and with a placement file the strategy that reads it."""
        args = ["--model-path", self.model_path, "--kt-method", self.kt_method, "--kt-weight-path",
                self.kt_weight_path, "--kt-threadpool-count", str(self.threadpool_count),
                "--kt-cpuinfer", str(cpuinfer_threads(self.threadpool_count)),
                "--kt-num-gpu-experts", str(self.gpu_experts)]
        if self.placement is not None:
            args += ["--kt-expert-placement-strategy", "frequency", "--init-expert-location", str(self.placement)]
        return f"{SERVER} {shlex.join(args)}"

    def line(self) -> str:
        return f"serve with: {self.command()}"


def cpuinfer_threads(threadpool_count: int) -> int:
    """--kt-cpuinfer: this machine's physical cores (KTransformers' recommendation), at least one per NUMA pool."""
    return max(physical_cores() or cpu_cores(), threadpool_count)


def placement_note(placement: Path | None) -> str | None:
    """What the placement flags do, beside a line that has them."""
    if placement is None:
        return None
    return ("--kt-expert-placement-strategy frequency puts on the GPU the N x (MoE layers) experts with the most "
            f"calibration tokens in {placement.name}, counted over all layers together (a layer may get more or "
            "fewer than N); --kt-num-gpu-experts N sets the total")


def serve_lines(*serves: Serve) -> list[str]:
    """The serve lines, and once what their placement flags do."""
    lines = [serve.line() for serve in serves]
    note = next((placement_note(s.placement) for s in serves if s.placement is not None), None)
    return lines + ([f"note: {note}"] if note else [])


def cpu_output_serve(model_path: str, out: Path, kt_method: str, numa: int) -> Serve:
    """A ktq cpu output (AMXINT4 / AMXINT8) beside the checkpoint the GPU side loads: the NUMA count is the one
    baked into the files; a calibrated output's placement file goes with it."""
    placement = out / PLACEMENT_FILE
    return Serve(model_path, str(out), kt_method, numa, placement if placement.is_file() else None)


# kt-kernel's methods that read a source's routed experts as they are stored (NativeMoEWrapper's loaders)
NATIVE_METHODS = {"bf16": "BF16", "fp8": "FP8"}


def gpu_checkpoint_serves(folder: Path, bits: int, group_size: int, source: str, source_type: str | None,
                          cpu: Serve | None) -> tuple[list[Serve], list[str]]:
    """How sglang-kt serves a ktq gpu checkpoint (Marlin on the GPU from `folder`), with each way to serve the CPU
    experts: the calibrated CPU output written beside it (cpu), the folder itself with RAWINT4 when kt-kernel
    computes its group right, else the source's experts as stored (kt-kernel's native BF16 / FP8). Returns the
    serves and notes on what is not offered and why."""
    placement = folder / PLACEMENT_FILE
    placement = placement if placement.is_file() else None
    serves = [cpu] if cpu is not None else []
    notes = []
    problem = rawint4_problem(bits, group_size)
    if problem is None:
        serves.append(Serve(str(folder), str(folder), "RAWINT4", machine_numa(), placement))
    else:
        notes.append(f"no RAWINT4 line: {problem}; this checkpoint is W{bits} in "
                     + (f"groups of {group_size}" if group_size > 0 else "one scale per channel"))
    if not serves and source_type in NATIVE_METHODS:
        serves.append(Serve(str(folder), source, NATIVE_METHODS[source_type], machine_numa(), placement))
    if not serves:
        notes.append(f"CPU experts: convert them with `ktq cpu -i {source} -o DIR` and serve that folder with "
                     "--kt-weight-path DIR and the --kt-method it prints")
    return serves, notes


def rawint4_problem(bits: int, group_size: int) -> str | None:
    """Why kt-kernel cannot serve these compressed-tensors experts with RAWINT4, or None when it can."""
    if bits == 4 and group_size == RAWINT4_GROUP:
        return None
    return RAWINT4_REFUSAL


def packed_factor(bits: int) -> int:
    """Codes per int32 word of compressed-tensors' pack-quantized format."""
    return 32 // bits


def tp_problem(tp: int, hidden: int, intermediate: int, bits: int, group_size: int) -> str | None:
    """Why sglang's compressed-tensors MoE (CompressedTensorsWNA16MoE.create_weights) cannot load these experts at
    tensor-parallel size tp, or None. Each rank holds intermediate / tp of every expert; the scale counts are floor
    divisions (hidden // group, share // group) and the packed rows share // (32 / bits), so each must divide
    exactly. group_size -1 is one scale per output channel."""
    if intermediate % tp:
        return f"moe_intermediate_size {intermediate} does not split into {tp} shares"
    share = intermediate // tp
    if hidden % packed_factor(bits):
        return f"hidden_size {hidden} is not a whole number of int32 words of {bits}-bit codes"
    if share % packed_factor(bits):
        return f"a share of {share} is not a whole number of int32 words of {bits}-bit codes"
    if group_size > 0:
        if hidden % group_size:
            return f"hidden_size {hidden} is not a multiple of the group size {group_size}"
        if share % group_size:
            return f"a share of {share} is not a multiple of the group size {group_size}"
    return None


def working_tp_sizes(hidden: int, intermediate: int, bits: int, group_size: int) -> list[int]:
    return [tp for tp in TP_SIZES if tp_problem(tp, hidden, intermediate, bits, group_size) is None]


def tp_summary(tp_sizes: dict[int, str | None]) -> str:
    """'TP 1, 2, 4 (not 8: why)' from each size's problem (None: it serves)."""
    working = [str(tp) for tp, problem in tp_sizes.items() if problem is None]
    failing = [f"{tp}: {problem}" for tp, problem in tp_sizes.items() if problem is not None]
    text = f"TP {', '.join(working)}" if working else "no TP size"
    return text + (f" (not {'; '.join(failing)})" if failing else "")


def machine_numa() -> int:
    """--kt-threadpool-count for methods with no NUMA count baked in: this machine's nodes."""
    return numa_nodes()


# --- the GPU checkpoint's quantization_config as the loaders read it ---------------------------------------------

def match_target(target: str, name: str, class_names: Iterable[str] = ()) -> bool:
    """compressed-tensors' and sglang's matching of a target or ignore entry: `re:` + re.match on the module name,
    else the exact name or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in class_names


def matches(name: str, targets: Iterable[str]) -> bool:
    return any(match_target(target, name) for target in targets)


def expert_scheme(qc: dict) -> dict | None:
    """The weights of the config group targeting "Linear" (the experts'), or None."""
    groups = [g for g in (qc.get("config_groups") or {}).values() if "Linear" in (g.get("targets") or [])]
    return groups[0]["weights"] if len(groups) == 1 else None


def scheme_group(weights: dict) -> int:
    """The group size of a compressed-tensors weights scheme, -1 for one scale per output channel."""
    return weights["group_size"] if weights.get("strategy") == "group" else -1


def scheme_problems(qc: dict, hidden: int, intermediate: int) -> list[str]:
    """What sglang-kt's CompressedTensorsWNA16MoE cannot serve right in the experts' scheme: the top-level format and
    target it reads, symmetric weights, and `actorder`: no g_idx is written, and any truthy value makes it load the
    w2 scales unsharded at TP > 1 (`load_full_w2 = self.actorder and ...`)."""
    weights = expert_scheme(qc)
    if qc.get("format") != "pack-quantized" or weights is None:
        return ['the experts need one config group targeting "Linear" at the top-level format pack-quantized']
    problems = []
    if weights.get("actorder") is not None:
        problems.append(f"actorder is {weights['actorder']!r} but no g_idx is written: sglang-kt then loads the down "
                        "projections' scales unsharded and computes wrongly at tensor-parallel sizes above 1 (set it "
                        "to null in config.json, which is what the files hold)")
    if not weights.get("symmetric"):
        problems.append("the experts' weights are not symmetric, which sglang's MoE kernels require")
    problem = tp_problem(1, hidden, intermediate, weights["num_bits"], scheme_group(weights))
    if problem:
        problems.append(f"not even TP 1 loads the experts: {problem}")
    return problems


def config_problems(qc: dict, hidden: int, intermediate: int, expert_layers: dict[str, list[str]],
                    kept: Iterable[str], fp8: Iterable[str]) -> list[str]:
    """The loader rules a written quantization_config breaks, checked against the checkpoint's modules:
    expert_layers: each MoE layer's expert projections (module names, every expert); kept: the Linears written as
    the source holds them (not FP8), under every name a loader looks them up by; fp8: the FP8 Linears kept."""
    problems = scheme_problems(qc, hidden, intermediate)
    ignore = qc.get("ignore") or []
    for layer, names in expert_layers.items():
        ignored = [matches(name, ignore) for name in names]
        if any(ignored) and not all(ignored):
            problems.append(f"{layer}: {sum(ignored)} of its {len(names)} expert projections are ignored; sglang "
                            "reads one scheme per MoE layer, from expert 0")
    missing = [name for name in kept if not matches(name, ignore)]
    if missing:
        problems.append(f"{len(missing)} Linears kept as the source holds them are not in ignore, e.g. {missing[0]}")
    fp8 = list(fp8)
    if fp8:
        fp8_targets = [t for g in qc["config_groups"].values() if "Linear" not in g["targets"] for t in g["targets"]]
        untargeted = [name for name in fp8 if matches(name, ignore) or not matches(name, fp8_targets)]
        if untargeted:
            problems.append(f"{len(untargeted)} FP8 Linears have no FP8 scheme, e.g. {untargeted[0]}")
        if not isinstance(qc.get("linear_fp8_config"), dict):
            problems.append("FP8 Linears without linear_fp8_config: sglang-kt would read them as the experts' scheme")
    return problems


def tp_sizes(qc: dict, hidden: int, intermediate: int) -> dict[int, str | None]:
    """Each TP size sglang could start with, and why it cannot load these experts (None: it can)."""
    weights = expert_scheme(qc)
    return {tp: tp_problem(tp, hidden, intermediate, weights["num_bits"], scheme_group(weights)) for tp in TP_SIZES}
