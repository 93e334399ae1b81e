"""The kt-kernel AMXINT4 / AMXINT8 CPU-expert format: every rule in one place.

../shared/docs/kt-format.md is the specification; the bytes written by kt-kernel 0.7.2 are the contract. The
kernels import their tile constants from here and ktq imports names, sizes and alignment rules from here, so a
rule is never written twice: each name's parser stands beside the function that builds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROJECTIONS = ("gate", "up", "down")
TILE_ROWS = 32  # rows of one 2048-byte tile
TILE_BYTES = 2048


@dataclass(frozen=True)
class Method:
    name: str  # the --quant-method value
    kt_method: str  # kt-kernel's --kt-method
    file_tag: str  # prefix of the low-memory file names
    bits: int
    n_block: int  # NB: rows of one N block
    k_block: int  # KB: columns of one K block (the last one may be partial)
    k_step: int  # KS: columns covered by one tile
    align: int  # I_tp and H must be multiples of this
    code_step: float  # value = code x code_step x scale (INT4 codes are multiples of 16 of the int8 grid)
    max_code: int  # codes in [-max_code, max_code] are served right: kt-kernel's small-batch kernel misreads -max-1

    def body_bytes(self, n: int, k: int) -> int:
        return n * k * self.bits // 8

    def is_int4(self) -> bool:
        return self.bits == 4


INT4 = Method("int4", "AMXINT4", "INT4", 4, n_block=128, k_block=3584, k_step=128, align=128, code_step=16.0,
              max_code=7)
INT8 = Method("int8", "AMXINT8", "INT8", 8, n_block=64, k_block=3584, k_step=64, align=64, code_step=1.0,
              max_code=127)
METHODS = {m.name: m for m in (INT4, INT8)}
BY_BITS = {m.bits: m for m in METHODS.values()}


def projection_shape(proj: str, hidden: int, intermediate_per_part: int) -> tuple[int, int]:
    """(n, k) of one NUMA part: gate/up are [I_tp, H], down is [H, I_tp]."""
    return (hidden, intermediate_per_part) if proj == "down" else (intermediate_per_part, hidden)


def scale_bytes(n: int) -> int:
    return 4 * n


def part_bytes(method: Method, hidden: int, intermediate_per_part: int) -> int:
    """Bytes of one expert's three projections (bodies and scales) for one NUMA part."""
    total = 0
    for proj in PROJECTIONS:
        n, k = projection_shape(proj, hidden, intermediate_per_part)
        total += method.body_bytes(n, k) + scale_bytes(n)
    return total


def alignment_problem(method: Method, hidden: int, intermediate: int, numa: int) -> str | None:
    """Why (hidden, intermediate) cannot be split into `numa` parts for `method`, or None when it can."""
    if numa < 1:
        return f"--threadpool-count must be at least 1, not {numa}"
    if hidden % method.align:
        return (f"hidden_size {hidden} is not a multiple of {method.align}, which {method.kt_method} needs; "
                f"this model cannot be converted to {method.kt_method}")
    if intermediate % numa == 0 and (intermediate // numa) % method.align == 0:
        return None
    working = working_numa_counts(method, intermediate)
    if not working:
        return (f"moe_intermediate_size {intermediate} is not a multiple of {method.align}, which "
                f"{method.kt_method} needs for every NUMA part; this model cannot be converted to {method.kt_method}")
    return (f"moe_intermediate_size {intermediate} does not split into {numa} NUMA parts of a multiple of "
            f"{method.align} ({method.kt_method}); use --threadpool-count "
            + ", ".join(str(c) for c in working))


def working_numa_counts(method: Method, intermediate: int, limit: int = 16) -> list[int]:
    return [c for c in range(1, limit + 1) if intermediate % c == 0 and (intermediate // c) % method.align == 0]


# --- names, and their parsers (each beside the function that builds the name) ------------------------------------

def merged_tensor_name(layer: int, proj: str, expert: int, part: int, kind: str) -> str:
    """kind is 'weight' (the packed body, I8) or 'scale' (F32)."""
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}.{kind}"


@dataclass(frozen=True)
class MergedTensorName:
    layer: int
    proj: str
    expert: int
    part: int
    kind: str  # "weight" or "scale"


_PROJ = "|".join(PROJECTIONS)
_MERGED_TENSOR = re.compile(rf"blk\.(\d+)\.ffn_({_PROJ})_exps\.(\d+)\.numa\.(\d+)\.(weight|scale)")


def parse_merged_tensor_name(name: str) -> MergedTensorName | None:
    """The parts of a merged_tensor_name, or None for any other tensor name."""
    m = _MERGED_TENSOR.fullmatch(name)
    if m is None:
        return None
    return MergedTensorName(int(m[1]), m[2], int(m[3]), int(m[4]), m[5])


_LAYER_DIR, _NUMA_DIR = "_layer_", "_numa_"


def layer_dir_name(layer: int) -> str:
    return f"{_LAYER_DIR}{layer}"


def parse_layer_dir_name(name: str) -> int | None:
    """The layer of a layer_dir_name, or None for any other name."""
    return _parse_index(_LAYER_DIR, name)


def numa_dir_name(part: int) -> str:
    return f"{_NUMA_DIR}{part}"


def parse_numa_dir_name(name: str) -> int | None:
    """The NUMA part of a numa_dir_name, or None for any other name."""
    return _parse_index(_NUMA_DIR, name)


def _parse_index(prefix: str, name: str) -> int | None:
    digits = name.removeprefix(prefix)
    return int(digits) if digits != name and digits.isascii() and digits.isdigit() else None


def kt_file_names(method: Method, proj: str, expert: int, n: int, k: int) -> tuple[str, str]:
    """(body, scale) file names of one projection of one expert in the low-memory form."""
    return (_kt_file_name(method, proj, expert, method.body_bytes(n, k), "quant"),
            _kt_file_name(method, proj, expert, scale_bytes(n), "scale"))


def _kt_file_name(method: Method, proj: str, expert: int, nbytes: int, kind: str) -> str:
    return f"{method.file_tag}_{proj}_{expert}_{nbytes}Byte_{kind}_.kt"


@dataclass(frozen=True)
class KtFileName:
    method: Method
    proj: str
    expert: int
    nbytes: int  # the file's size, which its name records
    kind: str  # "quant" (the packed body) or "scale"


_TAGS = "|".join(method.file_tag for method in METHODS.values())
_KT_FILE = re.compile(rf"({_TAGS})_({_PROJ})_(\d+)_(\d+)Byte_(quant|scale)_\.kt")


def parse_kt_file_name(name: str) -> KtFileName | None:
    """The parts of one of kt_file_names, or None for any other file name."""
    m = _KT_FILE.fullmatch(name)
    if m is None:
        return None
    method = next(method for method in METHODS.values() if method.file_tag == m[1])
    return KtFileName(method, m[2], int(m[3]), int(m[4]), m[5])
