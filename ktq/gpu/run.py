"""The stages of a streaming run (`ktq gpu`, `ktq cpu --calibrate`): plan, load, dataset, quantize, save; each
timed in the report. The artifacts the options ask for (the GPU checkpoint, the calibrated CPU experts) are opened
here and handed to the engine, which writes them layer by layer.

Each artifact is written into its own output folder by the rule every output folder follows (ktq.output_folder),
one committed layer at a time: a run killed midway and started again with the same command continues each from its
last committed layer; one whose outputs are all complete writes nothing. The GPU checkpoint is marked complete once
its model, index, config, tokenizer files and report are all there.

Only rank 0 of a distributed run (world.py) prints, shows progress and writes; every rank calibrates on its share of
the samples.
"""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from loguru import logger
from rich.console import Console

from ktq import hfformat
from ktq.calibrated.artifact import CalibratedExperts, refuse_misaligned
from ktq.errors import KtqError
from ktq.gpu.data import calibration_dataset
from ktq.gpu.devices import available_cpu_memory, detect_device
from ktq.gpu.layout import MoeLayout, ignore_rules, stores_fused_experts
from ktq.gpu.model import ModelMap, meta_model
from ktq.gpu.options import GpuOptions, jsonable
from ktq.gpu.plan import Plan, check_source, make_plan, plan_json, plan_table
from ktq.gpu.report import LOG_FILE, Report
from ktq.gpu.serving import refuse_partial_ignores
from ktq.gpu.world import World
from ktq.serving import cpu_output_serve, gpu_checkpoint_serves, serve_lines

# warnings that ktq's own choices cause, left out of the report: --force_cpu or a CPU-only machine is what the plan
# table already says
_EXPECTED_WARNINGS = ("No accelerator available",)


def run(opts: GpuOptions, console: Console | None = None, debug: bool = False, world: World = World()) -> Report:
    """A streaming run: the GPU checkpoint (--output_dir), the calibrated CPU experts (opts.cpu_experts), or both."""
    console = console or Console(stderr=True)
    quiet = opts.quiet or not world.is_main
    refuse_unconvertible(Path(opts.model_id).expanduser() / "config.json")
    report = Report(model_id=opts.model_id, output_dir=str(opts.output_dir), quant_method=opts.quant_method,
                    quant_type=opts.quant_type, options=jsonable(asdict(opts)), plan={}, ignore_patterns=[],
                    world_size=world.size)
    with report.stage("plan"):
        # the shards' headers, the index and config.json's values checked as ktq cpu checks them (num_hidden_layers
        # bounded by the layers the shards hold), before transformers reads the config
        source = check_source(opts.model_id)
        config_object = read_config(opts)
        config = config_object.to_dict()
        layout = MoeLayout.from_config(config, source=f"{opts.model_id}/config.json")
        rules = ignore_rules(layout, opts.ignore_patterns)
        if source is not None and opts.cpu_experts is not None:
            refuse_misaligned(opts.cpu_experts.method, opts.cpu_experts.numa, source.experts.geometry)
        skeleton = meta_model(config_object, opts.torch_dtype, opts.trust_remote_code)
        if opts.output_dir is not None:
            refuse_partial_ignores(skeleton, hfformat.text_config(config), rules)
        plan = make_plan(opts, config, skeleton, layout, rules, detect_device(), available_cpu_memory(), source)
    report.ignore_patterns, report.plan = [r.pattern for r in rules], plan.as_dict()
    if opts.dry_run:
        _show_plan(plan, opts, console, quiet, world)
        return report
    if source is None:
        raise KtqError(f"{opts.model_id} holds no *.safetensors shards (only config.json): a plan needs no more, a "
                       "run needs the weights")
    if plan.planned_gpu:
        raise KtqError(f"--max_gpu_memory plans for {plan.device.name}, and this machine has none: add --dry_run "
                       "to see that plan, or --force_cpu to calibrate on the CPU")
    try:
        wrote = _quantize_and_save(opts, source, skeleton, plan, rules, report, console, quiet, debug, world)
    finally:
        source.close()
    if world.is_main and wrote and not quiet:
        for line in report.summary_lines() + written_lines(opts, source.experts.input_type):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    return report


def written_lines(opts: GpuOptions, source_type: str) -> list[str]:
    """What the run wrote and the sglang-kt lines that serve it (ktq.serving)."""
    from ktq.gpu.budget import WEIGHT_BITS
    from ktq.kernels.ktformat import METHODS
    from ktq.progress import counted

    lines, cpu = [], None
    source = Path(opts.model_id).expanduser().resolve()
    gpu = opts.output_dir.expanduser().resolve() if opts.output_dir is not None else None
    if opts.cpu_experts is not None:
        out, method = opts.cpu_experts.output.expanduser().resolve(), METHODS[opts.cpu_experts.method]
        lines.append(f"wrote {out} (calibrated {method.kt_method}, {counted(opts.cpu_experts.numa, 'NUMA part')})")
        cpu = cpu_output_serve(str(gpu or source), out, method.kt_method, opts.cpu_experts.numa)
    notes: list[str] = []
    serves = [cpu] if cpu is not None else []
    if gpu is not None:
        lines.append(f"wrote {gpu} ({opts.quant_method} {opts.quant_type}, "
                     + (f"groups of {opts.group_size})" if opts.group_size > 0 else "one scale per channel)"))
        serves, notes = gpu_checkpoint_serves(gpu, WEIGHT_BITS[opts.quant_type], opts.group_size, str(source),
                                              source_type, cpu)
    return lines + serve_lines(*serves) + [f"note: {note}" for note in notes]


def _show_plan(plan: Plan, opts: GpuOptions, console: Console, quiet: bool, world: World) -> None:
    """The plan as a table (or JSON on stdout); a run that would not fit is refused, unless --force."""
    if opts.as_json and world.is_main:
        print(json.dumps(plan_json(plan, opts), indent=2))  # stdout, for scripts; --quiet or not
    elif not quiet:
        console.print(plan_table(plan, opts))
    if plan.problems:
        if not opts.no_memory_check:
            raise KtqError(f"{'; '.join(plan.problems)} (--force runs anyway)")
        if not quiet:
            console.print("[yellow]warning:[/] " + "; ".join(plan.problems), highlight=False)


def _quantize_and_save(opts: GpuOptions, source, skeleton, plan: Plan, rules, report: Report, console: Console,
                       quiet: bool, debug: bool, world: World) -> bool:
    """Calibrate, quantise and write what is not written yet. False when every output was complete already (the
    run then wrote nothing and said so)."""
    from ktq.gpu.checkpoint import GpuCheckpoint
    from ktq.gpu.output import GpuOutput
    from ktq.gpu.progress import GpuProgress

    with report.stage("load"):
        model = ModelMap(skeleton, source.logical)
        tokenizer = load_tokenizer(opts)
    dataset = None
    if opts.calibrated:
        with report.stage("dataset"):
            dataset = calibration_dataset(opts.dataset, opts.split, opts.text_column, tokenizer,
                                          opts.num_calibration_samples, opts.max_sequence_length, opts.random_seed)
        report.calibration_samples = len(dataset)
        report.calibration_tokens = sum(len(ids) for ids in dataset["input_ids"])
    fingerprint = _run_fingerprint(opts, source, dataset, plan, world)
    # every output folder is decided (continued, started over, left complete, or refused) before any is written
    gpu_output = world.open_output(lambda: GpuOutput(opts.output_dir.expanduser(), fingerprint, len(model.layers) + 1,
                                                     opts.overwrite)) if opts.output_dir is not None else None
    cpu = _open_cpu_experts(opts, source, dataset, fingerprint, len(model.layers), plan) if opts.cpu_experts else None
    outputs = [output for output in (gpu_output, cpu.output if cpu else None) if output is not None]
    if all(output.complete for output in outputs):
        if world.is_main and not quiet:
            for output in outputs:
                console.print(f"{output.folder} is complete already: nothing to do", highlight=False,
                              soft_wrap=True)
        return False
    _show_plan(plan, opts, console, quiet, world)
    for output in outputs:
        note = f"{output.folder} is complete already: kept as it is" if output.complete else output.start_note()
        if note and not quiet:
            console.print(note, highlight=False, soft_wrap=True)
    if plan.device.is_gpu:
        torch.cuda.reset_peak_memory_stats(0)
    if world.distributed and dataset is not None:
        dataset = world.share_of(dataset)
    writing = [output for output in outputs if not output.complete] if world.is_main else []
    with ExitStack() as held:  # the folders being written, locked until the run ends
        for output in writing:
            held.enter_context(output)
        artifacts = []
        gpu = None
        if gpu_output is not None:
            gpu = GpuCheckpoint(opts, source, model, rules, world, gpu_output, plan.device.torch_device)
            artifacts.append(gpu)
        if cpu is not None:
            artifacts.append(cpu)
        gpu_folder = gpu_output.folder if gpu_output in writing else None
        with _run_logs(gpu_folder, report, debug), GpuProgress(quiet, console) as progress:
            _quantize(opts, source, model, skeleton, plan, report, world, progress, dataset, artifacts, gpu)
        # each artifact complete in turn (the GPU checkpoint with its report, which holds the logs' warnings): a
        # run killed in between continues the other one
        if gpu_folder is not None:
            report.write(gpu_folder)
            gpu_output.mark_complete()
        if cpu is not None and cpu.output in writing:
            cpu.finish(Path(opts.model_id).expanduser())
    return True


def _quantize(opts: GpuOptions, source, model, skeleton, plan: Plan, report: Report, world: World, progress,
              dataset, artifacts: list, gpu) -> None:
    """The engine over every decoder layer, then the GPU checkpoint's last files (unless it was complete)."""
    from ktq.gpu.engine import Engine

    text = skeleton.config.get_text_config()
    engine = Engine(source, model, artifacts, getattr(text, "hidden_act", None) or "silu",
                    getattr(torch, opts.torch_dtype), plan.device.torch_device, plan.cache_device,
                    plan.sizes, world, progress)
    progress.start(len(model.layers), len(dataset) if dataset is not None else 0,
                   "calibrating" if dataset is not None else "rounding")
    with report.stage("quantize"), torch.no_grad():
        engine.run(dataset)
    if world.distributed:
        report.rank_stages = world.gather(dict(report.stages))
    report.routed_tokens = engine.routed
    report.layer_seconds = engine.layer_seconds
    report.unrouted_experts = {name: [e for e, n in enumerate(counts) if n == 0]
                               for name, counts in engine.routed.items() if 0 in counts}
    if gpu is not None:
        report.gptq_loss = dict(sorted(gpu.losses.items()))
        report.count_modules(gpu.module_reasons())
        if gpu.fallbacks:
            report.warnings.append(f"the Hessian of {len(gpu.fallbacks)} expert projections was not positive "
                                   f"definite; they were rounded to nearest (e.g. {gpu.fallbacks[0]})")
    if stores_fused_experts(opts.model_id):
        report.warnings.append(
            "the source checkpoint stores each layer's experts fused in 3-D tensors; the output stores one "
            "tensor per expert projection, as llm-compressor 0.14 saves quantised experts (compressed-tensors "
            "0.19 cannot pack fused experts); transformers 5.17 reads that layout back only for architectures "
            "with a per-expert loading rule (qwen2/3_moe, deepseek, ...), not e.g. qwen3_vl_moe")
    if world.is_main and gpu is not None and not gpu.output.complete:
        with report.stage("save"):
            gpu.finish(engine.routed_by_layer())
    if plan.device.is_gpu:
        report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(0))


def _open_cpu_experts(opts: GpuOptions, source, dataset, fingerprint: dict, num_hidden_layers: int, plan: Plan):
    """The calibrated CPU experts' artifact (a ktq cpu folder, opened, locked when entered); its identity records
    the calibration, so a run with other data or settings does not continue it."""
    cpu = opts.cpu_experts
    local = Path(opts.dataset).expanduser()
    dataset_name = str(local.resolve()) if local.exists() else opts.dataset  # the same file from any folder
    calibration = {"method": "gptq", "dataset": dataset_name, "split": opts.split, "text_column": opts.text_column,
                   "samples": len(dataset), "tokens": sum(len(ids) for ids in dataset["input_ids"]),
                   "max_sequence_length": opts.max_sequence_length, "random_seed": opts.random_seed,
                   "tokens_fingerprint": fingerprint["calibration_tokens"], "device": fingerprint["device"],
                   "torch_dtype": opts.torch_dtype}
    return CalibratedExperts.open(cpu, source, calibration, num_hidden_layers, Path(opts.model_id).expanduser(),
                                  opts.no_memory_check, plan.sizes.cpu_chunk, plan.device.torch_device)


def _run_fingerprint(opts: GpuOptions, source, dataset, plan: Plan, world: World) -> dict:
    """Everything that changes an output byte: a staging folder made with anything else is started over."""
    import hashlib

    tokens = hashlib.sha256(json.dumps(list(dataset["input_ids"]) if dataset is not None else []).encode())
    return {"source": source.ckpt.fingerprint(), "quant_method": opts.quant_method, "quant_type": opts.quant_type,
            "group_size": opts.group_size, "dampening_frac": opts.dampening_frac, "torch_dtype": opts.torch_dtype,
            "ignore_patterns": list(opts.ignore_patterns), "calibration_tokens": tokens.hexdigest()[:32],
            "device": "cuda" if plan.device.is_gpu else "cpu", "world_size": world.size}


def refuse_unconvertible(config_file: Path) -> None:
    """The families neither pipeline converts (hfformat.refusal), refused from config.json as ktq cpu does, before
    transformers parses it: its warnings about the config would come before the one-line error."""
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError):
            return  # read_config reports an unreadable config in its own words
        refused = hfformat.refusal(config) if isinstance(config, dict) else None
        if refused is not None:
            raise KtqError(f"{config_file}: {refused}")


def read_config(opts: GpuOptions):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(opts.model_id, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:  # unknown model_type, remote code refused, offline hub, malformed json
        raise KtqError(f"cannot read the config of --model_id {opts.model_id}: {_first_line(exc)}") from exc


def load_tokenizer(opts: GpuOptions):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(opts.model_id, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:  # no tokenizer files, a tokenizer needing a package that is missing, remote code refused
        raise KtqError(f"cannot load the tokenizer of --model_id {opts.model_id}: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    """What a library's exception says, on one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _run_logs:
    """During a run, loguru's records (ktq's per-layer lines, llm-compressor's) go to ktq_gpu.log in the output
    folder (and to stderr with --debug); warnings of both kinds are kept for the report."""

    def __init__(self, staging: Path | None, report: Report, debug: bool) -> None:
        self.staging, self.report, self.debug = staging, report, debug
        self._ids: list[int] = []
        self._python_warnings = warnings.catch_warnings(record=True)
        self._caught: list = []

    def __enter__(self):
        import llmcompressor  # noqa: F401  (registers loguru's METRIC level and its stdout sink, removed next)
        import transformers

        logger.remove()
        fmt = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {function} | {level} - {message}"
        if self.staging is not None:
            self._ids.append(logger.add(self.staging / LOG_FILE, level="DEBUG", format=fmt))
        if self.debug:
            self._ids.append(logger.add(sys.stderr, level="INFO", format=fmt))
        self._ids.append(logger.add(self._warning, level="WARNING", format="{message}",
                                    filter=lambda record: record["level"].name != "METRIC"))
        if not self.debug:
            transformers.logging.set_verbosity_error()
        self._caught = self._python_warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def _warning(self, message) -> None:
        text = " ".join(str(message).split())
        if text not in self.report.warnings and not any(expected in text for expected in _EXPECTED_WARNINGS):
            self.report.warnings.append(text)

    def __exit__(self, *exc: object) -> None:
        self._python_warnings.__exit__(*exc)
        for caught in self._caught:
            self._warning(f"{caught.category.__name__}: {caught.message}")
        for handler in self._ids:
            logger.remove(handler)
