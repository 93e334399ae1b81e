"""The stages of `ktq gpu`: plan, load, dataset, quantise, save; each timed in the report.

The checkpoint is written into a hidden staging folder beside --output_dir and renamed into place only when the
model, tokenizer files and report are all there, so a folder at --output_dir is always complete.

The process layout is kept in `World` (this process's rank among how many); a single process is rank 0 of 1. Only
rank 0 prints, shows progress and writes, which is what a distributed run (torchrun, llm-compressor's DDP path)
needs; the calibration samples are chosen deterministically, so every rank builds the same set and llm-compressor
splits it between ranks.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from compressed_tensors.utils import patch_attr
from loguru import logger
from rich.console import Console

from ktq import hfformat
from ktq.errors import KtqError
from ktq.gpu.data import calibration_dataset
from ktq.gpu.devices import available_cpu_memory, detect_device
from ktq.gpu.layout import MoeLayout, ignore_reason, ignore_rules, stores_fused_experts
from ktq.gpu.options import GpuOptions
from ktq.gpu.plan import (
    SAVE_SHARD,
    Plan,
    auto_model_class,
    decoder_layers,
    make_plan,
    meta_model,
    plan_json,
    plan_table,
)
from ktq.gpu.recipe import build_recipe
from ktq.gpu.report import LOG_FILE, Report

# files of a source checkpoint that the quantised one replaces rather than copies
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_REPLACED = {"config.json", "generation_config.json", hfformat.INDEX_NAME, "pytorch_model.bin.index.json",
             "recipe.yaml"}
# warnings that ktq's own choices cause, left out of the report: linearising after load is deliberate (see
# load_model), --force_cpu or a CPU-only machine is what the plan table already says, and the RAM for saving
# offloaded modules is in the plan (shards of SAVE_SHARD bytes, not the 50 GB the warning assumes)
_EXPECTED_WARNINGS = ("MoE is being linearized after loading", "No accelerator available",
                      "Attempting to save a model with offloaded modules")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """A member of a torch.distributed process group (even of one process, with --nproc 1)."""
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def run_gpu(opts: GpuOptions, console: Console | None = None, debug: bool = False,
            world: World = World()) -> Report:
    console = console or Console(stderr=True)
    quiet = opts.quiet or not world.is_main
    config_object = read_config(opts)
    config = config_object.to_dict()
    layout = MoeLayout.from_config(config, source=f"{opts.model_id}/config.json")
    rules = ignore_rules(layout, opts.ignore_patterns)
    report = Report(model_id=opts.model_id, output_dir=str(opts.output_dir), quant_method=opts.quant_method,
                    quant_type=opts.quant_type, options=_jsonable(asdict(opts)), plan={},
                    ignore_patterns=[r.pattern for r in rules], world_size=world.size)
    with report.stage("plan"):
        meta = meta_model(config_object, opts.torch_dtype, opts.trust_remote_code)
        plan = make_plan(opts, config, meta, layout, rules, detect_device(), available_cpu_memory())
        del meta
    report.plan = plan.as_dict()
    if opts.as_json and world.is_main:
        print(json.dumps(plan_json(plan, opts), indent=2))  # stdout, for scripts; --quiet or not
    elif not quiet:
        console.print(plan_table(plan, opts))
    if plan.problems:
        if not opts.no_memory_check:
            raise KtqError(f"{plan.problems[0]} (--force runs anyway)")
        if not quiet:
            console.print("[yellow]warning:[/] " + "; ".join(plan.problems), highlight=False)
    if opts.dry_run:
        return report

    staging = _staging_folder(opts.output_dir) if world.is_main else None
    try:
        _quantize_and_save(opts, config_object, plan, rules, report, staging, console, quiet, debug, world)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if world.is_main:
        report.write(staging)
        _commit(staging, opts.output_dir)
        if not quiet:
            for line in report.summary_lines():
                console.print(line, highlight=False, markup=False, soft_wrap=True)
            console.print(f"wrote {opts.output_dir}", highlight=False)
    return report


def _quantize_and_save(opts: GpuOptions, config_object, plan: Plan, rules, report: Report, staging: Path | None,
                       console: Console, quiet: bool, debug: bool, world: World) -> None:
    from ktq.gpu.observe import CalibrationObserver, GpuProgress  # imports llm-compressor: not needed for a plan

    with _llmcompressor_logs(staging, report, debug), GpuProgress(quiet, console) as progress:
        if plan.device.is_gpu:
            torch.cuda.reset_peak_memory_stats(0)
        with report.stage("load"):
            model = load_model(opts, plan, config_object, world)
            tokenizer = load_tokenizer(opts)
        dataset = None
        if opts.calibrated:
            with report.stage("dataset"):
                dataset = calibration_dataset(opts.dataset, opts.split, opts.text_column, tokenizer,
                                              opts.num_calibration_samples, opts.max_sequence_length,
                                              opts.random_seed)
            report.calibration_samples = len(dataset)
            report.calibration_tokens = sum(len(ids) for ids in dataset["input_ids"])
            if world.distributed:
                from ktq.gpu.distributed import rank_share

                dataset = rank_share(dataset, world)
        observer = CalibrationObserver(model, progress)
        with report.stage("quantize"):
            quantize(model, tokenizer, dataset, opts, plan, rules, observer, progress, world)
        if world.distributed:
            from ktq.gpu.distributed import gather_results

            gather_results(observer, report)
        report.gptq_loss = observer.losses
        report.routed_tokens = observer.routed
        report.unrouted_experts = observer.unrouted()
        report.count_modules(_linear_reasons(model, rules))
        if stores_fused_experts(opts.model_id):
            report.warnings.append(
                "the source checkpoint stores each layer's experts fused in 3-D tensors; the output stores one "
                "tensor per expert projection, as llm-compressor 0.14 saves quantised experts (compressed-tensors "
                "0.19 cannot pack fused experts); transformers 5.17 reads that layout back only for architectures "
                "with a per-expert loading rule (qwen2/3_moe, deepseek, ...), not e.g. qwen3_vl_moe")
        # every rank takes part in a distributed save (compression is shared out, offloaded weights live in memory
        # shared between the ranks); only rank 0 writes
        with report.stage("save"):
            save(model, tokenizer, opts, staging or _staging_path(opts.output_dir), world)
        if plan.device.is_gpu:
            report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(0))


def read_config(opts: GpuOptions):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(opts.model_id, trust_remote_code=opts.trust_remote_code)
    except Exception as exc:  # unknown model_type, remote code refused, offline hub, malformed json
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KtqError(f"cannot read the config of --model_id {opts.model_id}: {first}") from exc


def load_model(opts: GpuOptions, plan: Plan, config, world: World = World()):
    """The weights on the planned devices, fused experts split into one Linear per expert projection. In a
    distributed run rank 0 reads the checkpoint, the other ranks start on the meta device and receive the weights
    from it (compressed-tensors' load_offloaded_model)."""
    from contextlib import nullcontext

    from compressed_tensors.offload import from_accelerate, load_offloaded_model
    from llmcompressor.modeling.moe.linearize import linearize_moe

    kwargs = {"dtype": getattr(torch, opts.torch_dtype), "trust_remote_code": opts.trust_remote_code}
    if plan.device_map is not None:
        kwargs["device_map"] = plan.device_map
    model_class = auto_model_class(config)
    if world.distributed:
        # the plan's budgets; without them load_offloaded_model asks for an accelerator, which the CPU lacks
        kwargs["max_memory"] = {"cpu": plan.cpu_budget} | ({0: plan.gpu_budget} if plan.device.is_gpu else {})
    with load_offloaded_model(model_class) if world.distributed else nullcontext():
        model = model_class.from_pretrained(opts.model_id, **kwargs)
    if hasattr(model, "hf_device_map"):
        # before linearising: compressed-tensors' offloading onloads a CPU-resident expert when it is read,
        # accelerate's hooks only around forward
        from_accelerate(model)
    # Linearising after load, not through load_quantizable_moe: the latter patches transformers classes in a way that
    # imports every model's image processor, torchvision included, which many installs lack.
    linearize_moe(model)
    return model


def load_tokenizer(opts: GpuOptions):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(opts.model_id, trust_remote_code=opts.trust_remote_code)


def quantize(model, tokenizer, dataset, opts: GpuOptions, plan: Plan, rules, observer, progress,
             world: World = World()) -> None:
    from llmcompressor import oneshot

    recipe = build_recipe(opts.quant_method, opts.quant_type, rules, opts.dampening_frac,
                          plan.gptq_batch if plan.device.is_gpu else 1)
    layers = [module for _, module in decoder_layers(model)]
    samples = len(dataset) if dataset is not None else 0  # this rank's share in a distributed run
    # GPTQ modules are counted only in a single process: which rank quantises which is decided after calibration
    progress.start(layers=len(layers) if samples else 0, samples=samples,
                   modules=plan.quantized if opts.calibrated and world.size == 1 else 0)
    if not opts.calibrated:
        progress.note(f"quantising {plan.quantized} Linears with round-to-nearest")
    with observer.watching(layers):
        oneshot(model=model, processor=tokenizer, recipe=recipe, dataset=dataset,
                num_calibration_samples=max(samples, 1), max_seq_length=opts.max_sequence_length,
                shuffle_calibration_samples=False, moe_calibrate_all_experts=True,
                sequential_offload_device=plan.cache_device,
                trust_remote_code_model=opts.trust_remote_code)


def _linear_reasons(model, rules) -> list[str | None]:
    """For each Linear: None if llm-compressor attached a weight scheme to it, else why it was kept."""
    reasons = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                reasons.append(None)
            else:
                classes = [c.__name__ for c in type(module).__mro__]
                reasons.append(ignore_reason(rules, name, classes) or "not targeted")
    return reasons


def save(model, tokenizer, opts: GpuOptions, staging: Path, world: World = World()) -> None:
    model.save_pretrained(staging, save_compressed=True, max_shard_size=SAVE_SHARD)
    if not world.is_main:
        return
    source = Path(opts.model_id).expanduser()
    if source.is_dir():
        _copy_side_files(source, staging)
    else:
        tokenizer.save_pretrained(staging)


def _copy_side_files(source: Path, staging: Path) -> None:
    """Tokenizer, chat template, processor and remote-code files, byte for byte: what the checkpoint needs
    besides the weights and config that save_pretrained wrote."""
    for path in sorted(source.iterdir()):
        if (path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name not in _REPLACED
                and not (staging / path.name).exists()):
            shutil.copy2(path, staging / path.name)


def _staging_path(output_dir: Path) -> Path:
    output_dir = output_dir.expanduser()
    return output_dir.parent / f".{output_dir.name}.ktq-partial"


def _staging_folder(output_dir: Path) -> Path:
    staging = _staging_path(output_dir)
    if staging.exists():  # left by an interrupted run
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _commit(staging: Path, output_dir: Path) -> None:
    """Put the finished folder in place; an older output (with --overwrite) is removed only after that."""
    output_dir = output_dir.expanduser()
    old = None
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.ktq-old"
        if old.exists():
            shutil.rmtree(old)
        output_dir.rename(old)
    staging.rename(output_dir)
    if old is not None:
        shutil.rmtree(old)


class _llmcompressor_logs:
    """During a run, llm-compressor's loguru records go to ktq_gpu.log in the output folder (and to stderr with
    --debug); its warnings and Python warnings are kept for the report."""

    def __init__(self, staging: Path | None, report: Report, debug: bool) -> None:
        self.staging, self.report, self.debug = staging, report, debug
        self._ids: list[int] = []
        self._python_warnings = warnings.catch_warnings(record=True)
        self._caught: list = []
        self._patches = ExitStack()

    def __enter__(self):
        import llmcompressor  # noqa: F401  (registers loguru's METRIC level and its stdout sink, removed next)
        import llmcompressor.entrypoints.utils as entrypoints
        import transformers

        # in a distributed run oneshot would replace every loguru sink with its own, on stdout, for every rank
        self._patches.enter_context(patch_attr(entrypoints, "configure_distributed_logger", lambda *a, **k: None))
        if not self.debug:
            _silence_distributed_tqdm(self._patches)
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
            logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # a deprecation note per trace
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
        self._patches.close()


def _silence_distributed_tqdm(patches: ExitStack) -> None:
    """compressed-tensors shows these bars in a distributed run whatever TQDM_DISABLE says (it passes disable=);
    ktq draws its own progress, on rank 0 only."""
    from compressed_tensors.distributed import module_parallel
    from compressed_tensors.offload import dispatch
    from compressed_tensors.quantization.lifecycle import apply
    from tqdm import tqdm

    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    for module in (module_parallel, apply, dispatch):
        patches.enter_context(patch_attr(module, "tqdm", silent))


def _jsonable(options: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in options.items()}
