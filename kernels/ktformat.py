"""The kt-kernel AMXINT4 / AMXINT8 CPU-expert format: every rule in one place.

../shared/docs/kt-format.md is the specification; the bytes written by kt-kernel 0.7.2 are the contract. The
kernels import their tile constants from here and ktq imports names, sizes and alignment rules from here, so a
rule is never written twice.
"""

from __future__ import annotations

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

    def body_bytes(self, n: int, k: int) -> int:
        return n * k * self.bits // 8

    def is_int4(self) -> bool:
        return self.bits == 4


INT4 = Method("int4", "AMXINT4", "INT4", 4, n_block=128, k_block=3584, k_step=128, align=128)
INT8 = Method("int8", "AMXINT8", "INT8", 8, n_block=64, k_block=3584, k_step=64, align=64)
METHODS = {m.name: m for m in (INT4, INT8)}


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


# --- names -------------------------------------------------------------------------------------------------

def merged_tensor_name(layer: int, proj: str, expert: int, part: int, kind: str) -> str:
    """kind is 'weight' (the packed body, I8) or 'scale' (F32)."""
    return f"blk.{layer}.ffn_{proj}_exps.{expert}.numa.{part}.{kind}"


def layer_dir_name(layer: int) -> str:
    return f"_layer_{layer}"


def numa_dir_name(part: int) -> str:
    return f"_numa_{part}"


def kt_file_names(method: Method, proj: str, expert: int, n: int, k: int) -> tuple[str, str]:
    """(body, scale) file names of one projection of one expert in the low-memory form."""
    prefix = f"{method.file_tag}_{proj}_{expert}_"
    return (f"{prefix}{method.body_bytes(n, k)}Byte_quant_.kt", f"{prefix}{scale_bytes(n)}Byte_scale_.kt")
