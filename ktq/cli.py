"""Console entry point: the command list of `ktq`. Each command lives in ktq/commands/ and imports its heavy
dependencies inside its body, so `ktq cpu` never pays for torch or transformers."""

from ktq.app import app, main
from ktq.commands import cpu, doctor, gpu, inspect, merge, sample

app.command("cpu")(cpu.cpu)
app.command("gpu")(gpu.gpu)
app.command("sample")(sample.sample)
app.command("merge")(merge.merge)
app.command("inspect")(inspect.inspect)
app.command("doctor")(doctor.doctor)

__all__ = ["app", "main"]
