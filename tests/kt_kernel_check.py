"""kt-kernel 0.7.2's real MoE forward on a ktq output, against ktq's own computation from the same files.

Not a test file: tests import it (tests/test_kt_kernel.py; outputs with calibrated codes can reuse
assert_kt_kernel_agrees). kt-kernel is installed apart from the venv in build/kt-kernel and imported only by
tests/kt_kernel_forward.py, which runs in a subprocess with PYTHONPATH=build/kt-kernel.

What kt-kernel computes (AMXINT4 / AMXINT8; read from its source, then matched bit for bit by experiment on its
AVX-512 build here and its AMX build on a Xeon with AMX), for each NUMA part p and each routed expert, per token:
  1. x (bf16) -> int8 codes: d = amax|x| * fp32(1/127), codes = rne(x * fp32(1/d)) (saturated; 0 for d = 0);
  2. gate, up = d * (d_w * float(int32 sum of codes x weight codes)), each rounded to bf16, where the weight codes
     are INT8 q or INT4 16*m (the nibble as the high half of a byte: the stored INT4 scale is 1/16 of the step);
  3. h = bf16((g * (1 / (1 + exp(-g)))) * u) in that order (g / (1 + exp(-g)) differs in rare last bits), with
     kt-kernel's exp: 2^round(x log2 e) times a degree-5 polynomial, -g clamped to 88;
  4. h -> int8 codes as in 1 (amax over this part's I/numa columns), down as in 2, rounded to bf16;
  5. the part's output: fp32 fused multiply-adds over the top-k slots in order, y_k * w_k;
then the parts' fp32 outputs are added in order and rounded to bf16.

RAWINT4 (compressed-tensors int4 experts read as they are, e.g. a `ktq gpu --group_size 32` checkpoint; its
AMXInt4_KGroup_MOE kernel, one part, matched bit for bit here by experiment through both kernels): as above, except
that activations get int8 codes per group of 32 columns (d and codes of step 1 per group) and each output is the
fp32 sum over the groups in order of d_g * (s_w[g] * float(int32 sum over the group of codes x weight codes)), the
weight codes being the stored nibble - 8 and s_w the bf16 scale of that row and group.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from ktq.kernels import ktformat as fmt
from ktq.kernels.amx import pack_codes, unpack_dequantize

REPO = Path(__file__).resolve().parents[1]
KT_KERNEL = REPO / "build" / "kt-kernel"
FORWARD_SCRIPT = Path(__file__).with_name("kt_kernel_forward.py")


RAWINT4 = "RAWINT4"
RAWINT4_GROUP = 32


def _method(method: str) -> fmt.Method:
    """int4 / int8 / AMXINT4 / AMXINT8 -> the format's Method."""
    return fmt.METHODS[method.lower().removeprefix("amx")]


def _kt_method(method: str) -> str:
    """kt-kernel's --kt-method for int4 / int8 / AMXINT4 / AMXINT8 / RAWINT4."""
    return RAWINT4 if method.upper() == RAWINT4 else _method(method).kt_method


def _kt_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(KT_KERNEL)}


@functools.cache
def kt_kernel_variant() -> str | None:
    """The kernel build kt-kernel picks on this CPU ('avx512_bf16', 'amx', ...), or None when build/kt-kernel is
    missing or does not import."""
    if not (KT_KERNEL / "kt_kernel").is_dir():
        return None
    probe = subprocess.run([sys.executable, "-c", "import kt_kernel; print(kt_kernel.__cpu_variant__)"],
                           env=_kt_env(), capture_output=True, text=True)
    return probe.stdout.split()[-1] if probe.returncode == 0 and probe.stdout.split() else None


def kt_kernel_available() -> bool:
    """build/kt-kernel exists and kt_kernel imports from it (in a subprocess, as the forward runs)."""
    return kt_kernel_variant() is not None


def small_batch_limit(experts: int, top_k: int) -> int:
    """kt-kernel multiplies batches of at most this many tokens with its small-batch kernel (vec_mul), larger ones
    with its large-batch kernel (mat_mul: AMX tiles on an AMX build)."""
    return 4 * experts // top_k


def kt_kernel_forward_batches(output_dir, method, numa, layer, experts, hidden, intermediate,
                              batches, repeat: int = 0, threads: int | None = None) -> list[torch.Tensor]:
    """kt-kernel's forward (bf16 [T, H]) of each (x, ids, weights) in batches; one subprocess loads the layer once.
    repeat > 0: returns (outputs, each batch's median seconds over that many more runs) instead (benchmarks)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save({"batches": [(x.to(torch.bfloat16), i.to(torch.int64), w.to(torch.float32))
                                for x, i, w in batches]}, src)
        cmd = [sys.executable, str(FORWARD_SCRIPT), str(output_dir), str(src), str(dst),
               "--method", _kt_method(method), "--numa", str(numa), "--layer", str(layer),
               "--experts", str(experts), "--hidden", str(hidden), "--intermediate", str(intermediate),
               "--repeat", str(repeat), *(["--threads", str(threads)] if threads else [])]
        run = subprocess.run(cmd, env=_kt_env(), capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"kt-kernel forward failed (exit {run.returncode}):\n{run.stdout[-2000:]}\n"
                               f"{run.stderr[-2000:]}")
        result = torch.load(dst)
        return (result["out"], result["seconds"]) if repeat else result["out"]


def kt_kernel_forward(output_dir, method, numa, layer, experts, hidden, intermediate, x, ids, weights) -> torch.Tensor:
    """kt-kernel's forward of one batch: x bf16 [T, H], ids int64 [T, K], weights float32 [T, K] -> bf16 [T, H]."""
    return kt_kernel_forward_batches(output_dir, method, numa, layer, experts, hidden, intermediate,
                                     [(x, ids, weights)])[0]


# --- ktq's side: the files read back, and the forward computed from them ------------------------------------------

def _merged_reader(output_dir: Path):
    """name -> numpy array of a merged output; the index names each tensor's shard."""
    from safetensors import safe_open

    weight_map = json.loads((output_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def read(name: str) -> np.ndarray:
        with safe_open(output_dir / weight_map[name], framework="np") as f:
            return f.get_tensor(name)

    return read


def read_layer_codes(output_dir, method, numa, layer, experts, hidden, intermediate):
    """{(proj, expert, part): (codes float32 [n, k], scales float32 [n])} of one MoE layer, from the merged shards or
    the .kt tree (kt-kernel's rule: merged when a *.safetensors file is at the top). codes are the integers kt-kernel
    multiplies: INT8 q, INT4 16*m; the weight is codes * scale."""
    output_dir, m = Path(output_dir), _method(method)
    read = _merged_reader(output_dir) if any(output_dir.glob("*.safetensors")) else None
    out = {}
    for proj in fmt.PROJECTIONS:
        n, k = fmt.projection_shape(proj, hidden, intermediate // numa)
        for e in range(experts):
            for p in range(numa):
                if read:
                    body = read(fmt.merged_tensor_name(layer, proj, e, p, "weight")).view(np.uint8)
                    scale = read(fmt.merged_tensor_name(layer, proj, e, p, "scale"))
                else:
                    folder = output_dir / fmt.layer_dir_name(layer) / fmt.numa_dir_name(p)
                    body_name, scale_name = fmt.kt_file_names(m, proj, e, n, k)
                    body = np.fromfile(folder / body_name, np.uint8)
                    scale = np.fromfile(folder / scale_name, np.float32)
                # unit scales: unpack_dequantize returns q (INT8) or m * 16 (INT4), exactly
                codes = unpack_dequantize(body, np.ones(n, np.float32), n, k, m.bits)
                out[proj, e, p] = (torch.from_numpy(codes), torch.from_numpy(np.array(scale, np.float32)))
    return out


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()  # round to nearest even, as vcvtne2ps2bf16


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add: a product of two fp32 is exact in fp64, so only the sum is rounded (in fp64, then
    fp32: a double rounding that differs from the single one only in rare exact-halfway cases)."""
    return (a.double() * b.double() + c.double()).float()


_EXP_POLY = [torch.tensor(c, dtype=torch.float32) for c in
             (0.9999999995, 0.6931471805, 0.2402265069, 0.0555041087, 0.0096181291, 0.0013333558)]


def _exp_kt(x: torch.Tensor) -> torch.Tensor:
    """kt-kernel's exp_avx512: 2^i * P(f), y = x * log2(e), i = rne(y), f = y - i, P by Horner with fused
    multiply-adds. (Some kt-kernel sources nest the fmadds so that P = 1 + f * (sum of the coefficients); 0.7.2
    does not: that variant matches 2% of the outputs, this one all of them.)"""
    y = x * torch.tensor(1.44269504089, dtype=torch.float32)
    i = torch.round(y)
    f = y - i
    p = _EXP_POLY[5].expand_as(f)
    for c in reversed(_EXP_POLY[:5]):
        p = _fma(p, f, c)
    return torch.ldexp(p, i)


def _act_codes(a: torch.Tensor):
    """Per-row int8 codes and scales of activations, as kt-kernel's BufferA. d = amax * fp32(1/127) (not amax / 127,
    which differs in the last bit for some rows and so changes whole tokens)."""
    d = a.abs().amax(dim=1) * torch.tensor(1 / 127, dtype=torch.float32)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return torch.round(a * inv[:, None]).clamp(-128, 127), d


def _int_gemm(q, d, codes, scales, minus128_as_abs: bool):
    """d * (d_w * float(acc)) with acc the exact integer sum (it fits int32, and fp64 holds it exactly).
    minus128_as_abs: weight code -128 (INT4 m = -8, INT8 q = -128) multiplies |activation code|, as kt-kernel's
    small-batch kernel computes it, and on its AVX-512 builds its large-batch kernel too (the AMX build's AMX tiles
    multiply it signed); tests/test_kt_kernel.py shows it."""
    q, w = q.double(), codes.double()
    if minus128_as_abs:
        low = (w == -128).double()
        acc = q @ (w * (1 - low)).T - 128 * (q.abs() @ low.T)
    else:
        acc = q @ w.T
    return d[:, None] * (scales[None, :] * acc.float())


def read_rawint4_codes(output_dir, layer, experts):
    """{(proj, expert): (codes float32 [n, k], scales float32 [n, k / group])} of one MoE layer of a compressed-tensors
    checkpoint, as kt-kernel's RAWINT4 reads them: the stored int4 values (nibble - 8) and the bf16
    scales, by their per-expert names."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors import safe_open

    output_dir = Path(output_dir)
    weight_map = json.loads((output_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def read(name: str) -> torch.Tensor:
        with safe_open(output_dir / weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    out = {}
    for proj in fmt.PROJECTIONS:
        for e in range(experts):
            module = f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj"
            shape = torch.Size(read(f"{module}.weight_shape").tolist())
            out[proj, e] = (unpack_from_int32(read(f"{module}.weight_packed"), 4, shape).float(),
                            read(f"{module}.weight_scale").float())
    return out


def _group_gemm(a: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RAWINT4's product: activation codes per group of 32 columns, each group's exact integer sum scaled by the
    activation's d and the weight's scale, the groups added in order in fp32."""
    tokens, k = a.shape
    groups = k // RAWINT4_GROUP
    q, d = _act_codes(a.reshape(tokens * groups, RAWINT4_GROUP))
    q, d = q.view(tokens, groups, RAWINT4_GROUP), d.view(tokens, groups)
    acc = torch.einsum("tgc,ngc->tng", q.double(), codes.view(-1, groups, RAWINT4_GROUP).double()).float()
    terms = d[:, None, :] * (scales[None, :, :] * acc)
    out = terms[:, :, 0]
    for g in range(1, groups):
        out = out + terms[:, :, g]
    return out


def _kt_moe(xf: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, parts: int, gemm) -> torch.Tensor:
    """kt-kernel's MoE step by step (module docstring), given its product gemm(a, proj, e, part) -> fp32."""
    out = torch.zeros(xf.shape[0], xf.shape[1])
    for p in range(parts):
        part = torch.zeros(xf.shape[0], xf.shape[1])
        for slot in range(ids.shape[1]):  # the slots in order: each token's sum is a chain of fmas over its slots
            for e in ids[:, slot].unique().tolist():
                rows = (ids[:, slot] == e).nonzero().flatten()
                g = _bf16(gemm(xf[rows], "gate", e, p))
                u = _bf16(gemm(xf[rows], "up", e, p))
                h = _bf16((g * (1 / (1 + _exp_kt(torch.minimum(-g, torch.tensor(88.0)))))) * u)
                y = _bf16(gemm(h, "down", e, p))
                part[rows] = _fma(y, weights[rows, slot].float()[:, None], part[rows])
        out += part
    return out.to(torch.bfloat16)


def _plain_moe(xf: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, weight) -> torch.Tensor:
    """The value the quantised files stand for: fp32 products with the dequantised weights, weight(proj, e)."""
    out = torch.zeros(xf.shape[0], xf.shape[1])
    for e in ids.unique().tolist():
        rows, slot = (ids == e).nonzero(as_tuple=True)
        a = xf[rows]
        h = torch.nn.functional.silu(a @ weight("gate", e).T) * (a @ weight("up", e).T)
        out.index_add_(0, rows, (h @ weight("down", e).T) * weights[rows, slot].float()[:, None])
    return out


def reference_forward(output_dir, method, numa, layer, experts, hidden, intermediate, x, ids, weights,
                      act_quant: bool = True, minus128_as_abs: bool = False, codes=None) -> torch.Tensor:
    """ktq's computation of the MoE layer from the files: out = sum_k w_k * down_e(silu(gate_e x) * up_e x).

    act_quant=True: kt-kernel's arithmetic step by step (module docstring), bf16 [T, H]. act_quant=False: the plain
    fp32 product with the dequantised weights, the NUMA parts joined back into whole matrices (gate/up parts are
    row blocks of I, down parts column blocks), fp32 [T, H]: the value the quantised files stand for.
    method RAWINT4: a compressed-tensors checkpoint in groups of 32, split at load time into numa parts as AMX
    outputs are split on disk.
    codes: read_layer_codes' (read_rawint4_codes') result, to read the files once for several calls."""
    xf = x.to(torch.bfloat16).float()
    if method.upper() == RAWINT4:
        codes = codes or read_rawint4_codes(output_dir, layer, experts)
        if not act_quant:
            def weight(proj, e):
                c, sc = codes[proj, e]
                return c * sc.repeat_interleave(c.shape[1] // sc.shape[1], 1)  # any group size

            return _plain_moe(xf, ids, weights, weight)

        def part(proj: str, e: int, p: int):
            """Part p of a projection: a block of intermediate rows (gate, up) or columns (down)."""
            (c, sc), share = codes[proj, e], intermediate // numa
            rows, groups = slice(p * share, (p + 1) * share), slice(p * share // RAWINT4_GROUP,
                                                                    (p + 1) * share // RAWINT4_GROUP)
            return (c[:, rows], sc[:, groups]) if proj == "down" else (c[rows], sc[rows])

        return _kt_moe(xf, ids, weights, numa, lambda a, proj, e, p: _group_gemm(a, *part(proj, e, p)))
    codes = codes or read_layer_codes(output_dir, method, numa, layer, experts, hidden, intermediate)
    if not act_quant:
        def weight(proj, e):
            return torch.cat([c * s[:, None] for c, s in (codes[proj, e, p] for p in range(numa))],
                             dim=1 if proj == "down" else 0)

        return _plain_moe(xf, ids, weights, weight)
    return _kt_moe(xf, ids, weights, numa,
                   lambda a, proj, e, p: _int_gemm(*_act_codes(a), *codes[proj, e, p], minus128_as_abs))


# --- comparing the two --------------------------------------------------------------------------------------------

def make_inputs(tokens: int, hidden: int, experts: int, top_k: int = 2, seed: int = 0):
    """(x bf16 [T, H], ids int64 [T, K], weights float32 [T, K]): hidden states of unit scale and a softmax router's
    normalised top-k over random logits (distinct experts per token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    probs = torch.softmax(torch.randn(tokens, experts, generator=g) * 2, dim=1)
    weights, ids = probs.topk(top_k, dim=1)
    return x, ids, weights / weights.sum(dim=1, keepdim=True)


def agreement(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    """equal: the share of bit-identical elements; max_abs; max_rel (max_abs / max |want|); cos."""
    got, want = got.float(), want.float()
    diff = (got - want).abs()
    return {"equal": (got == want).float().mean().item(), "max_abs": diff.max().item(),
            "max_rel": (diff.max() / want.abs().max()).item(),
            "cos": torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()}


def assert_kt_kernel_agrees(output_dir, method, numa, layer, experts, hidden, intermediate, top_k: int = 2,
                            tokens: tuple[int, ...] | None = None, seed: int = 0) -> dict[int, dict]:
    """Run kt-kernel on the output folder and assert it computes what ktq's reference computes from the same files.

    tokens: batch sizes, by default 1 (its decode path), 3 and the small-batch limit (its small-batch kernel), one
    more and 256 (its large-batch kernel). Returns {tokens: {"exact": agreement with the step-by-step reference,
    "fp32": agreement with the plain fp32 product}} for reporting.

    Tolerances. kt-kernel's integer products are exact and every rounding it makes is modelled, so the outputs are
    expected bit for bit (observed: every element of 6,000+ tokens, INT4 and INT8, 1 and 2 parts, hidden 512 and
    4096). Allowed: up to 0.1% of the elements off, by at most 1/64 of the largest output. That is room for one
    last-bit slip of the emulation (fp32 fma done as fp64 then fp32) flipping a bf16 rounding of h: it moves one
    token's outputs by up to ~0.5% (when that h is the token's amax, every code of the token is rescaled). Anything
    structural fails it: the plain fp32 product is off by ~2% of the largest output in nearly every element, and a
    wrong rounding rule (amax / 127, g / (1 + e)) puts whole tokens off. The plain product must still agree to
    cosine 0.999: it checks the dequantised weights themselves (observed 0.9997-0.9999)."""
    limit = small_batch_limit(experts, top_k)
    tokens = tokens or (1, 3, limit, limit + 1, 256)
    batches = [make_inputs(t, hidden, experts, top_k, seed + t) for t in tokens]
    outs = kt_kernel_forward_batches(output_dir, method, numa, layer, experts, hidden, intermediate, batches)
    codes = (read_rawint4_codes(output_dir, layer, experts) if method.upper() == RAWINT4
             else read_layer_codes(output_dir, method, numa, layer, experts, hidden, intermediate))
    report = {}
    for t, (x, ids, w), got in zip(tokens, batches, outs):
        args = (output_dir, method, numa, layer, experts, hidden, intermediate, x, ids, w)
        exact = agreement(got, reference_forward(*args, codes=codes))
        plain = agreement(got, reference_forward(*args, act_quant=False, codes=codes))
        report[t] = {"exact": exact, "fp32": plain}
        where = f"{method} numa={numa} layer={layer} tokens={t}"
        assert exact["equal"] >= 0.999 and exact["max_rel"] <= 1 / 64, f"kt-kernel != reference ({where}): {exact}"
        assert plain["cos"] >= 0.999, f"kt-kernel far from the dequantised weights' fp32 product ({where}): {plain}"
    return report


def with_extreme_codes(src, dst, method, numa, layer, experts, hidden, intermediate, share: float = 0.01,
                       seed: int = 0) -> Path:
    """A copy of the merged output src in dst whose layer has a random `share` of every weight code set to the
    code round-to-nearest never writes: INT4 -8 (nibble 0x8), INT8 -128 (byte 0x80). Repacked with ktq's own
    packer (kernels/amx.pack_codes, kt-format.md §3), so each changed byte sits where kt-kernel reads that code."""
    src, dst, m = Path(src), Path(dst), _method(method)
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weight_map = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    rng = np.random.default_rng(seed)
    changed: dict[str, dict[str, np.ndarray]] = {}
    for (proj, e, p), (codes, _) in read_layer_codes(dst, method, numa, layer, experts, hidden, intermediate).items():
        q = (codes.numpy() / (16 if m.bits == 4 else 1)).astype(np.int8)
        q[rng.random(q.shape) < share] = -8 if m.bits == 4 else -128
        body = np.zeros(m.body_bytes(*q.shape), np.uint8)
        pack_codes(q, 0, q.shape[1], m.bits, body)
        name = fmt.merged_tensor_name(layer, proj, e, p, "weight")
        changed.setdefault(weight_map[name], {})[name] = body.view(np.int8)
    for shard, bodies in changed.items():
        tensors = load_file(dst / shard)
        tensors.update(bodies)
        save_file(tensors, dst / shard, metadata={"format": "pt"})
    return dst
