"""What a complete ktq output holds, file by file and byte by byte, in either form.

The writers (ktq.cpu.sinks), resume, `ktq merge` and `ktq inspect` all take names, order and sizes from one Layout,
so they cannot disagree about what "complete" means. A Layout is what ktq.json records about the output (the
method, the NUMA count, the geometry and the MoE layers) or what ktq.inspect infers from a folder without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ktq import hfformat
from ktq.kernels import ktformat as fmt
from ktq.safetensors_io import encode_header

FORMS = ("merged", "kt")
DISK_BLOCK = 4096  # what one small file costs on a disk at least (ext4, xfs, tmpfs)
# Experts x NUMA parts of one layer, at most: the largest MoE models have 512 experts, machines 16 NUMA nodes. A
# layout read from a folder (ktq.json, file names) beyond it is damage, and checking it file by file would not end.
MAX_PIECES_PER_LAYER = 1 << 16

# A tensor of a merged shard as safetensors_io declares it: (name, dtype, shape, bytes)
Entry = tuple[str, str, tuple[int, ...], int]


@dataclass(frozen=True)
class Piece:
    """One projection of one expert for one NUMA part: the unit the kernel packs and the sinks write."""

    proj: str
    part: int
    n: int
    k: int
    body_bytes: int

    @property
    def scale_bytes(self) -> int:
        return fmt.scale_bytes(self.n)


def expert_pieces(method: fmt.Method, numa: int, hidden: int, intermediate: int) -> list[Piece]:
    """One expert's pieces in the order they are written: projection, then NUMA part."""
    pieces = []
    for proj in fmt.PROJECTIONS:
        n, k = fmt.projection_shape(proj, hidden, intermediate // numa)
        pieces += [Piece(proj, part, n, k, method.body_bytes(n, k)) for part in range(numa)]
    return pieces


@dataclass(frozen=True)
class Layout:
    form: str  # "merged" or "kt"
    method: fmt.Method
    numa: int
    hidden: int
    intermediate: int
    experts: int
    layers: tuple[int, ...]  # the MoE layers, ascending

    @property
    def pieces(self) -> list[Piece]:
        return expert_pieces(self.method, self.numa, self.hidden, self.intermediate)

    def shard_name(self, layer: int) -> str:
        """Merged form: one shard per MoE layer, numbered by the layer's rank among all MoE layers."""
        return hfformat.shard_name(self.layers.index(layer) + 1, len(self.layers))

    def layer_path(self, layer: int) -> str:
        """The file (merged) or folder (kt) that holds one layer, relative to the output folder."""
        return self.shard_name(layer) if self.form == "merged" else fmt.layer_dir_name(layer)

    def tensor_entries(self, layer: int) -> list[Entry]:
        """Merged form: the shard's tensors in stream order (expert, projection, NUMA part, weight then scale)."""
        entries = []
        for e in range(self.experts):
            for p in self.pieces:
                entries.append((fmt.merged_tensor_name(layer, p.proj, e, p.part, "weight"), "I8", (p.body_bytes,),
                                p.body_bytes))
                entries.append((fmt.merged_tensor_name(layer, p.proj, e, p.part, "scale"), "F32", (p.n,),
                                p.scale_bytes))
        return entries

    def shard_header(self, layer: int) -> bytes:
        return encode_header(self.tensor_entries(layer), None)

    def kt_files(self, layer: int) -> list[tuple[str, int]]:
        """Low-memory form: (path relative to the layer folder, bytes) of every file, in write order."""
        files = []
        for e in range(self.experts):
            for p in self.pieces:
                body, scale = fmt.kt_file_names(self.method, p.proj, e, p.n, p.k)
                folder = fmt.numa_dir_name(p.part)
                files += [(f"{folder}/{body}", p.body_bytes), (f"{folder}/{scale}", p.scale_bytes)]
        return files

    def expert_bytes(self) -> int:
        return sum(p.body_bytes + p.scale_bytes for p in self.pieces)

    def layer_bytes(self, layer: int) -> int:
        """Exact bytes of one layer's file (merged: header included) or files (kt)."""
        data = self.experts * self.expert_bytes()
        return _shard_header_bytes(self, len(str(layer))) + data if self.form == "merged" else data

    def disk_bytes(self, layers: list[int]) -> int:
        """What the layers take on a disk: every file rounded up to whole blocks."""
        def blocks(n: int) -> int:
            return -(-n // DISK_BLOCK) * DISK_BLOCK

        if self.form == "merged":
            return sum(blocks(self.layer_bytes(layer)) for layer in layers)
        per_expert = sum(blocks(p.body_bytes) + blocks(p.scale_bytes) for p in self.pieces)
        return len(layers) * self.experts * per_expert


@lru_cache(maxsize=16)
def _shard_header_bytes(layout: Layout, digits: int) -> int:
    """Length of a merged shard's header for a layer index of `digits` digits. The tensor names of two layers differ
    only in that index and their offsets not at all, so nothing else changes it. One header per digit count instead
    of one per layer: a DeepSeek-V3 plan encoded its 58 headers of 1536 tensors twice, 0.9 s."""
    return len(layout.shard_header(10 ** (digits - 1)))


def geometry_problem(layout: Layout) -> str | None:
    """Why no kt-kernel output can have this layout (read from a folder, not computed from a model), or None:
    sizes that are not positive integers, a split kt-kernel cannot make, an absurd expert count, layers out of
    order."""
    sizes = {"hidden size": layout.hidden, "intermediate size": layout.intermediate, "expert count": layout.experts,
             "NUMA count": layout.numa}
    for what, value in sizes.items():
        if type(value) is not int or value < 1:
            return f"{what} {value!r} is not a positive integer"
    if layout.experts * layout.numa > MAX_PIECES_PER_LAYER:
        return f"{layout.experts} experts in {layout.numa} NUMA parts per layer is more than any model has"
    if not all(type(layer) is int and layer >= 0 for layer in layout.layers) or \
            list(layout.layers) != sorted(set(layout.layers)):
        return f"the MoE layers {list(layout.layers)[:5]} are not ascending layer indices"
    return fmt.alignment_problem(layout.method, layout.hidden, layout.intermediate, layout.numa)
