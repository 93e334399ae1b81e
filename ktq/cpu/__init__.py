"""ktq cpu: a MoE checkpoint's routed experts -> kt-kernel AMXINT4 / AMXINT8, one expert at a time.

Modules, in the order a run uses them:

    checkpoint  the source folder: config.json, safetensors headers, a fingerprint of the input
    experts     where the routed experts are and how each projection reads as bf16 (key layouts, storage kinds)
    layout      what a complete output holds, file by file and byte by byte, in either form
    manifest    ktq.json: the method, NUMA count and source an output was made with, and every committed layer
    output      the output folder's life: start, continue, start over (--force), check the disk, finish
    measure     short probes on this machine (memory, disk read rate, decode + quantize rate) for the plan
    plan        what the run converts, writes, holds in memory and takes; shown by --dry-run, checked by every run
    pipeline    read -> quantize (ktq.kernels) -> write with bounded buffers, layer by layer
    sinks       merged safetensors shards or the low-memory .kt tree, each layer committed atomically
    scan        what a finished folder holds, read back by name and size (ktq inspect, ktq merge)
"""
