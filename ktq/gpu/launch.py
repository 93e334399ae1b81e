"""`ktq gpu` over several processes: their launch (what the processes share is world.py's).

Each rank calibrates on its share of the calibration samples; the statistics of every layer (Hessians, routed
tokens) are summed over the ranks; the GPTQ problems of a layer (chunks of experts) are shared out between them and
each result is broadcast, so every rank then propagates its samples through the same quantised layer. Rank 0
writes. ktq adds the launch:

- `ktq gpu --nproc N` starts N worker processes on this machine through torch's elastic launcher (what torchrun
  runs), with a rendezvous on localhost; the options go to the workers as JSON, validated once here.
- Inside a torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `ktq gpu` joins that job instead of launching one.

Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES set to the LOCAL_RANK-th visible one before CUDA starts),
so the planner finds it as device 0 as in a single-process run. The backend is nccl on GPUs, gloo on the CPU
(--force_cpu or no GPU). A worker that fails writes its one-line error into a folder the launcher reads; the
launcher stops the other workers (the elastic agent does this as soon as one exits non-zero, so no rank is left
waiting in a collective) and reports the first failure as a KtqError.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from ktq.errors import KtqError
from ktq.gpu.options import CpuExpertsOptions, GpuOptions, jsonable
from ktq.gpu.world import TORCHRUN_VARIABLES, join, leave

ERROR_DIR_VARIABLE = "KTQ_DIST_ERROR_DIR"  # where a worker started by `--nproc` leaves its one-line error


def in_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets the torch.distributed variables)."""
    return all(variable in os.environ for variable in TORCHRUN_VARIABLES)


def options_to_json(opts: GpuOptions) -> str:
    return json.dumps(jsonable(asdict(opts)))


def options_from_json(text: str) -> GpuOptions:
    fields = json.loads(text)
    if fields["output_dir"] is not None:
        fields["output_dir"] = Path(fields["output_dir"])
    fields["ignore_patterns"] = tuple(fields["ignore_patterns"])
    if fields["cpu_experts"] is not None:
        cpu = fields["cpu_experts"]
        fields["cpu_experts"] = CpuExpertsOptions(**{**cpu, "output": Path(cpu["output"])})
    return GpuOptions(**fields)


def launch(opts: GpuOptions, nproc: int, debug: bool) -> None:
    """Run `opts` on `nproc` local worker processes; returns when all have finished, raises KtqError if one failed."""
    if nproc < 1:
        raise KtqError("--nproc must be at least 1")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent logs every start, stop and failure; ktq says what matters itself
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL if not debug else logging.INFO)
    with tempfile.TemporaryDirectory(prefix="ktq-dist-") as work:
        # without OMP_NUM_THREADS every worker would start a thread per core
        env = {ERROR_DIR_VARIABLE: work,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))}
        options_file = Path(work) / "options.json"
        options_file.write_text(options_to_json(opts))
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ktq-{uuid.uuid4().hex[:8]}",
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              monitor_interval=0.2, start_method="spawn")
        worker_args = ["-m", "ktq.gpu.launch", str(options_file)] + (["--debug"] if debug else [])
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the workers inherit this process's environment
        try:
            elastic_launch(config, sys.executable)(*worker_args)
        except ChildFailedError as exc:
            raise KtqError(first_failure(Path(work), exc.failures, nproc)) from None
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def first_failure(error_dir: Path, failures: dict, nproc: int) -> str:
    """The error of the rank that failed first; the others were stopped because of it (or failed in its wake)."""
    written = sorted(error_dir.glob("rank*.txt"), key=lambda p: p.stat().st_mtime_ns)
    if written:
        rank = written[0].stem.removeprefix("rank")
        return f"rank {rank} of {nproc} failed: {written[0].read_text().strip()}"
    rank, failure = min(failures.items(), key=lambda kv: kv[1].timestamp)
    return f"rank {rank} ended with exit code {failure.exitcode} without an error message (killed? out of memory?)"


def show_own_gpu() -> None:
    """Leave this rank only the LOCAL_RANK-th visible GPU; before CUDA is first queried."""
    local_rank = int(os.environ["LOCAL_RANK"])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == "":
        return  # --force_cpu or no GPU
    if visible is None:
        import torch

        if torch.cuda.is_initialized():
            raise KtqError("CUDA was initialised before ktq could pick this rank's GPU; run ktq in a fresh process")
        # counted through NVML: this neither initialises CUDA nor caches the count
        ids = [str(i) for i in range(torch.cuda.device_count())]
    else:
        ids = [i.strip() for i in visible.split(",") if i.strip()]
    if ids and local_rank >= len(ids):
        raise KtqError(f"LOCAL_RANK {local_rank} has no GPU: only {len(ids)} visible; start at most {len(ids)} "
                       "processes per machine")
    if ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank]


def run_as_rank(opts: GpuOptions, debug: bool, failed=lambda exc: None):
    """`ktq gpu` as one rank of a torchrun job (started by `launch` or by the user); after prepare_environment.
    `failed(exc)` hears of a failure before this rank leaves the process group, which its peers notice at once."""
    show_own_gpu()
    from ktq.gpu.run import run

    world = join(opts.force_cpu)
    try:
        return run(opts, debug=debug, world=world)
    except BaseException as exc:
        failed(exc)
        raise
    finally:
        leave()


def worker_main(argv: list[str]) -> None:
    """A worker started by `launch`: run the options in argv[0], leave a one-line error for the launcher."""
    from ktq.gpu.devices import prepare_environment

    debug = "--debug" in argv
    opts = options_from_json(Path(argv[0]).read_text())
    error_dir = os.environ.get(ERROR_DIR_VARIABLE)

    def failed(exc: BaseException) -> None:
        """The rank's error for the launcher, written once, before its peers fail in its wake."""
        error_file = Path(error_dir) / f"rank{os.environ.get('RANK', '?')}.txt" if error_dir else None
        if error_file is not None and not error_file.exists():
            text = " ".join(str(exc).split()) or type(exc).__name__
            error_file.write_text((text if isinstance(exc, KtqError) else f"{type(exc).__name__}: {text}") + "\n")

    try:
        prepare_environment(opts.force_cpu, debug)
        run_as_rank(opts, debug, failed)
    except BaseException as exc:
        if debug:
            raise
        failed(exc)  # a failure before the rank joined the group
        time.sleep(0.1)  # the first failure's file is written before the agent stops the others
        sys.exit(2 if isinstance(exc, KtqError) else 1)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
