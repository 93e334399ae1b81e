"""Calibrated CPU experts: kt-kernel's AMXINT4 / AMXINT8 format with codes chosen by GPTQ on the tokens the router
sends each expert, written by the streaming engine of ktq.gpu (ktq cpu --calibrate; ktq gpu --cpu-output writes
them beside the GPU checkpoint in the same pass) into a ktq cpu output.

Modules, in the order a run uses them:

    artifact  the engine's artifact: the output opened, what a layer takes from the calibration pass, solve,
              write, restore on resume
    routed    what the calibration pass collects: every token's input to a layer's experts and its routing
    solve     one layer's experts: Hessians of their routed tokens, chunk by chunk on the solve device
    ktgrid    GPTQ onto kt-kernel's own grid (codes in its served range, fp32 scales per row and NUMA part)
    output    the codes packed into a ktq cpu output (ktq.cpu.sinks), committed layer by layer; read back

Dependencies run one way: ktq.gpu drives this package, which writes through ktq.cpu.
"""
