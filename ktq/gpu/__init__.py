"""The streaming engine and `ktq gpu`: GPTQ / RTN W4A16 and W8A16 of a MoE checkpoint's routed experts, streamed
one decoder layer at a time; the same engine writes ktq.calibrated's CPU experts.

Modules, in the order a run uses them:

    options          the command's options, validated, without heavy imports
    launch           --nproc and torchrun: the worker processes started, each one running `run`
    devices          hiding GPUs for --force_cpu, what the accelerator offers
    layout           which Linear layers are routed experts and which are kept (pure Python, from config.json)
    model            the model on the meta device: decoder layers, routed experts, Linears, where each weight goes
    source           the source checkpoint one decoder layer at a time: tensors by layer, FP8 decoded
    plan             the plan before any weight is read: what fits, every problem, what would fit instead
    budget           one layer's memory terms on the device and the host, and the sizes that fit a budget
    timing           the time a plan takes here or on a GPU class (datasheet rates)
    data             calibration samples: local files, saved datasets or hub ids; chat rendered by the tokenizer
    run              the stages in order, the output folders decided, the artifacts opened and completed in turn
    world            the processes of a run: rank, and what they sum and broadcast over torch.distributed
    engine           the layer loop: read, calibration pass, each artifact's solve and write, propagation pass
    capture          the calibration samples at the first decoder layer
    layer_experts    a layer's experts on the host (read ahead, FP8 as stored) and on the device in chunks
    streamed_experts the routed experts inside that layer: samples recorded, the experts' output injected
    checkpoint       the GPU checkpoint artifact: GPTQ of a layer shared out between ranks, its shard, its config
    serving          that config as sglang-kt, vLLM and transformers read it (FP8 Linears, the NextN draft's names)
    gptq             llm-compressor's solver against one shared gate/up Hessian, compressed-tensors' packing
    output           the GPU output folder: one committed shard per layer, ktq_gpu.json, config.json last
    progress         the progress bar or lines
    report           the JSON report and its printed summary
"""
