"""ktq gpu: GPTQ / RTN W4A16 and W8A16 of a MoE checkpoint's routed experts, streamed one decoder layer at a time.

Modules, in the order a run uses them:

    options          the command's options, validated, without heavy imports
    devices          hiding GPUs for --force_cpu, what the accelerator offers
    layout           which Linear layers are routed experts and which are kept (pure Python, from config.json)
    source           the source checkpoint one decoder layer at a time: tensors by layer, FP8 decoded
    plan             per-layer memory on GPU and host, disk and time, before any weight is read
    data             calibration samples: local files, saved datasets or hub ids; chat rendered by the tokenizer
    engine           the layer loop: transformers' decoder layer, calibration pass, GPTQ, shard, propagation pass
    streamed_experts the routed experts inside that layer: Hessians while calibrating, the routed forward after
    gptq             llm-compressor's solver against one shared gate/up Hessian, compressed-tensors' packing
    output           the staging folder: one committed shard per layer, the manifest that lets a run resume
    progress         the progress bar or lines
    report           the JSON report and its printed summary
    run              the stages in order, the staging folder renamed into place when complete
    distributed      --nproc: samples and GPTQ problems shared out between ranks over torch.distributed
"""
