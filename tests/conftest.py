"""Shared fixtures: the golden vectors beside the repository and a way to run the CLI in-process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Idle OpenMP workers of the Numba kernels sleep instead of spinning: tests alternate small kernels with Python
# work on a shared 2-core machine, where spinning workers cost a third of the suite's CPU time. Set before any
# kernel runs (the OpenMP runtime reads it once); the subprocesses the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def golden() -> Path:
    assert GOLDEN.is_dir(), f"golden vectors missing: {GOLDEN} (CI clones the repository beside ../shared)"
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_trained_moe(tmp_path_factory) -> Path:
    """benchmarks/trained_moe.py's tiny preset trained on the CPU for a fixed step count (the same model on a slow
    machine), on the prose of networkx's docstrings (its whole-venv corpus takes 1.5 minutes to gather), packed as
    the device machine returns it and unpacked: corpus/ (its text splits), returned/ (the packed files) and
    model/bf16. Shared by the tests of trained_moe.py and trained_quality.py, which would each train it."""
    import networkx

    base = tmp_path_factory.mktemp("trained-moe")
    script = REPO / "benchmarks" / "trained_moe.py"
    for args in (("corpus", "--out", base / "corpus", "--site", Path(networkx.__file__).parent),
                 ("train", "--corpus", base / "corpus", "--out", base / "returned", "--preset", "tiny", "--device",
                  "cpu", "--steps", 150, "--minutes", 3, "--pack"),
                 ("unpack", "--parts", base / "returned", "--out", base / "model")):
        run = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0, f"trained_moe.py {args[0]} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return base


@pytest.fixture
def ktq(capsys):
    """Run `ktq ARGS` in this process; returns exit code, stdout and stderr."""
    from ktq.cli import main

    def run(*args: object) -> Run:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return Run(code, out.out, out.err)

    return run


def ktq_subprocess(*args: object, **kwargs) -> Run:
    """Run the installed console script: the real process, exit code and streams a user sees."""
    proc = subprocess.run([sys.executable, "-m", "ktq", *map(str, args)], capture_output=True, text=True, **kwargs)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def interrupt_when(argv: list[object], ready, timeout: float = 300) -> Run:
    """`ktq ARGV` in a process of its own, sent SIGINT (Ctrl-C) as soon as `ready()` (polled) is true."""
    import signal
    import time

    def as_from_a_shell() -> None:
        """SIGINT delivered and handled as a terminal's Ctrl-C would be: a child inherits its parent's blocked
        signals and ignored ones, and a library in this test process may have left SIGINT either way."""
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, "-m", "ktq", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_shell)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it was ready to be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=timeout)
    return Run(proc.returncode, stdout, stderr)


def layers_recorded(manifest: Path, key: str) -> int:
    """How many layers (or units) an output's manifest records; 0 while it is missing or being replaced."""
    try:
        return len(json.loads(manifest.read_text())[key])
    except (OSError, ValueError, KeyError):
        return 0


def mtimes(root: Path) -> dict[str, int]:
    """The modification time of everything below root: a run that writes nothing changes none."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def sha256_records(form: str, out: Path) -> None:
    """Rewrite ktq.json as ktq wrote it before XXH3: sha256 of each shard, or over 'path sha256' lines of a folder."""
    manifest = json.loads((out / "ktq.json").read_text())
    for record in manifest["layers"].values():
        del record["xxh3_128"]
        path = out / record["path"]
        if form == "merged":
            record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            files = sorted(f for f in path.rglob("*") if f.is_file())
            lines = "".join(f"{f.relative_to(path)} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
            record["sha256"] = hashlib.sha256(lines.encode()).hexdigest()
    (out / "ktq.json").write_text(json.dumps(manifest))


def rewrite_checkpoint(src: Path, dst: Path, transform, config_transform=None) -> Path:
    """Copy checkpoint src to dst as one shard, passing every (name, array of raw bits, dtype) through transform,
    which returns a list of (name, array, dtype) to write instead (an empty list drops the tensor)."""
    import json
    import shutil

    from ktq.cpu.checkpoint import open_checkpoint
    from ktq.safetensors_io import ShardWriter, TensorReader

    ckpt = open_checkpoint(src)
    dst.mkdir(parents=True)
    with TensorReader() as reader:
        tensors = []
        for name, info in ckpt.tensors.items():
            tensors += transform(name, reader.read(info), info.dtype)
    writer = ShardWriter(dst / "model.safetensors", [(n, d, a.shape, a.nbytes) for n, a, d in tensors])
    for name, array, _ in tensors:
        writer.write(name, array)
    writer.finish()
    for aux in src.iterdir():
        if aux.is_file() and not aux.name.startswith("model"):
            shutil.copy(aux, dst / aux.name)
    if config_transform:
        config = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config_transform(config)))
    return dst


def convert_in_process(source: Path, out: Path, *extra: str) -> Path:
    """`ktq cpu` with 2 NUMA parts, quietly, in this process; fails the test when it fails."""
    from ktq.cli import main

    with pytest.raises(SystemExit) as done:
        main(["cpu", "-i", str(source), "-o", str(out), "--threadpool-count", "2", "--quiet", *extra])
    assert done.value.code == 0
    return out


@pytest.fixture(scope="session")
def moe_sample(tmp_path_factory) -> Path:
    """3 MoE layers (1..3) after a dense one, 4 experts, hidden 256, moe_intermediate 256, in 2 shards."""
    from ktq.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("moe-sample") / "src", layers=4, experts=4, hidden=256,
                        moe_intermediate=256, dense_layers=1, shards=2)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, moe_sample) -> dict[str, Path]:
    """Clean conversions of moe_sample (2 NUMA parts): INT4 merged, INT4 .kt tree, INT8 .kt tree. Read-only."""
    base = tmp_path_factory.mktemp("converted")
    return {"merged": convert_in_process(moe_sample, base / "merged"),
            "kt": convert_in_process(moe_sample, base / "kt", "--no-merge-safetensor"),
            "int8": convert_in_process(moe_sample, base / "int8", "--quant-method", "int8", "--no-merge-safetensor")}


@pytest.fixture
def two_numa_nodes(monkeypatch):
    """This machine looks like one of 2 NUMA nodes to `ktq cpu` and `ktq inspect`, so that converting into 2 parts
    (the shared sample conversions) and inspecting the result bring no warning into the streams a test checks."""
    import ktq.commands.cpu
    import ktq.inspect

    monkeypatch.setattr(ktq.commands.cpu, "numa_nodes", lambda: 2)
    monkeypatch.setattr(ktq.inspect, "numa_nodes", lambda: 2)


@pytest.fixture(scope="session")
def gpu_outputs(tmp_path_factory, moe_sample):
    """gpu_outputs(kind) -> a `ktq gpu` checkpoint of moe_sample (W4A16, on the CPU), made once per session, with
    the lines it printed: "gptq32" (GPTQ in groups of 32, with calibrated AMXINT4 CPU experts in 1 NUMA part beside
    it, in gptq32-cpu), "rtn32" and "rtn128" (round to nearest in groups of 32 and 128). Read-only."""
    from gpu_models import chat_rows, run_ktq_capture, write_jsonl

    base = tmp_path_factory.mktemp("gpu-outputs")
    chat = write_jsonl(base / "chat.jsonl", chat_rows(8))
    options = {"gptq32": ("--dataset", chat, "--num_calibration_samples", 8, "--max_sequence_length", 32,
                          "--cpu-output", base / "gptq32-cpu", "--threadpool-count", 1),
               "rtn32": ("--quant_method", "RTN"), "rtn128": ("--quant_method", "RTN", "--group_size", 128)}
    made: dict[str, tuple[Path, str]] = {}

    def get(kind: str) -> tuple[Path, str]:
        if kind not in made:
            out = base / kind
            code, stdout, stderr = run_ktq_capture("gpu", "--model_id", moe_sample, "--output_dir", out,
                                                   "--quant_type", "W4A16", "--force_cpu", *options[kind])
            assert code == 0, stderr
            made[kind] = (out, stdout + stderr)
        return made[kind]

    return get
