"""ktq.json: what an output folder holds, rewritten atomically after every committed layer.

It records what kt-kernel cannot tell from the files (the NUMA count the output must be served with, the method,
the source it came from) and each committed layer's file or folder with its size and digest (ktq.digest), so an
interrupted run resumes after its last committed layer and `ktq inspect --verify` can re-hash everything. Its name
must not end in .safetensors: that would switch kt-kernel's loader mode.

The file is read into a Manifest (layers keyed by int) and written back from it; JSON exists only in
`Manifest.from_json` and `Manifest.to_json`, which keep the key order of every file ktq has written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ktq import __version__, digest
from ktq.atomic import write_json_atomic
from ktq.cpu.layout import FORMS, Layout, geometry_problem
from ktq.errors import KtqError
from ktq.kernels import ktformat as fmt

MANIFEST_NAME = "ktq.json"
FORMAT = "ktq-cpu/1"
# A merged output's committed shards keep their name + this until the output is complete: kt-kernel loads every
# top-level *.safetensors, so an unfinished output must hold none that it could serve by mistake.
PENDING_SUFFIX = ".pending"

# Fields that must agree for a run to continue an existing output: anything that changes a single output byte.
IDENTITY_FIELDS = ("format", "form", "method", "numa", "hidden", "intermediate", "experts", "moe_layers",
                   "input_type", "input_fingerprint", "calibration")


@dataclass(frozen=True)
class LayerRecord:
    """One committed layer: its file (merged) or folder (kt) relative to the output folder, bytes and digest; for a
    calibrated output also the calibration tokens the router sent to each expert."""

    path: str
    bytes: int
    algorithm: str  # digest.KEY; "sha256" in outputs of ktq versions before XXH3
    digest: str
    routed: tuple[int, ...] | None = None

    def to_json(self) -> dict:
        record = {"path": self.path, "bytes": self.bytes, self.algorithm: self.digest}
        if self.routed is not None:
            record["routed"] = list(self.routed)
        return record

    @classmethod
    def from_json(cls, record: dict) -> "LayerRecord":
        algorithm, value = digest.recorded(record)
        if not isinstance(record["path"], str) or not isinstance(record["bytes"], int):
            raise TypeError("path or bytes")
        routed = record.get("routed")
        if routed is not None and not (isinstance(routed, list) and all(type(n) is int and n >= 0 for n in routed)):
            raise TypeError("routed")
        return cls(record["path"], record["bytes"], algorithm, value, tuple(routed) if routed is not None else None)


@dataclass
class Manifest:
    """What one output is (its layout and source: the identity a run must match to continue it) and what of it
    is done."""

    layout: Layout
    input_type: str
    input_fingerprint: str
    layers: dict[int, LayerRecord] = field(default_factory=dict)  # the committed layers
    complete: bool = False
    ktq_version: str | None = __version__  # of the ktq that wrote the file
    # codes chosen against calibration data (ktq cpu --calibrate, ktq gpu --cpu-output): with what; None for RTN
    calibration: dict | None = None

    def fresh(self, layers: dict[int, LayerRecord] | None = None) -> "Manifest":
        """This identity, written by this ktq, not complete, holding `layers`."""
        return Manifest(self.layout, self.input_type, self.input_fingerprint, dict(layers or {}),
                        calibration=self.calibration)

    @property
    def output_bytes(self) -> int:
        return sum(record.bytes for record in self.layers.values())

    def identity(self) -> dict:
        layout = self.layout
        return {"format": FORMAT, "form": layout.form, "method": layout.method.name,
                "kt_method": layout.method.kt_method, "numa": layout.numa, "hidden": layout.hidden,
                "intermediate": layout.intermediate, "experts": layout.experts, "input_type": self.input_type,
                "input_fingerprint": self.input_fingerprint, "moe_layers": list(layout.layers),
                **({"calibration": self.calibration} if self.calibration is not None else {})}

    def to_json(self) -> dict:
        """Layers in layer order, whatever order they were committed in, so that resumed and uninterrupted runs
        write the same bytes."""
        return {**self.identity(), "ktq_version": self.ktq_version, "complete": self.complete,
                "layers": {str(layer): self.layers[layer].to_json() for layer in sorted(self.layers)}}

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        try:
            # sizes as they are, not coerced to int ("2", true): geometry_problem below checks them
            layout = Layout(data["form"], fmt.METHODS[data["method"]], data["numa"], data["hidden"],
                            data["intermediate"], data["experts"], tuple(data["moe_layers"]))
            layers = {int(key): LayerRecord.from_json(record) for key, record in data["layers"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise KtqError(f"{MANIFEST_NAME} lacks a valid {exc} entry: it was not written by this version of "
                           "ktq") from exc
        if layout.form not in FORMS:
            raise KtqError(f"{MANIFEST_NAME} names an unknown output form {layout.form!r}")
        problem = geometry_problem(layout)
        if problem:
            raise KtqError(f"{MANIFEST_NAME} describes an output kt-kernel cannot have ({problem}): it is damaged")
        if not isinstance(data.get("input_type"), str) or not isinstance(data.get("input_fingerprint"), str):
            raise KtqError(f"{MANIFEST_NAME} lacks a valid input_type or input_fingerprint entry: it was not written "
                           "by this version of ktq")
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise KtqError(f"{MANIFEST_NAME} holds a calibration entry that is not an object: it is damaged")
        return cls(layout, data["input_type"], data["input_fingerprint"], layers, bool(data.get("complete")),
                   data.get("ktq_version"), calibration)


def identity_mismatch(existing: Manifest, wanted: Manifest) -> str | None:
    """A readable list of the identity fields that differ, or None."""
    def show(value: object) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    old, new = existing.identity(), wanted.identity()
    diffs = [f"{key} {show(old.get(key))} -> {show(new.get(key))}" for key in IDENTITY_FIELDS
             if old.get(key) != new.get(key)]
    return ", ".join(diffs) or None


def load_manifest(out: Path) -> Manifest | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KtqError(f"{path} is damaged ({exc}); delete the output folder and convert again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), dict):
        raise KtqError(f"{path} is not a ktq manifest of format {FORMAT}")
    return Manifest.from_json(data)


def save_manifest(out: Path, manifest: Manifest) -> None:
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
