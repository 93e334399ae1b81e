"""ktq gpu: GPTQ / RTN W4A16 and W8A16 of a MoE checkpoint's routed experts through llm-compressor.

Modules, in the order a run uses them:

    options   the command's options, validated, without heavy imports
    devices   hiding GPUs for --force_cpu, what the accelerator offers
    layout    which Linear layers are routed experts and which are kept (pure Python, from config.json)
    plan      memory estimate and device map from config.json alone, shown before any weight is read
    data      calibration samples: local files, saved datasets or hub ids; chat rendered by the tokenizer
    recipe    the llm-compressor modifier for the chosen method and scheme
    observe   hooks during calibration: routed-token counts, GPTQ losses, progress over layers
    report    the JSON report and its printed summary
    run       the stages in order, output written to a staging folder and renamed when complete
"""
