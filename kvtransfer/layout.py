"""What both ends of a KV transfer must agree on, and how a model is fingerprinted (torch-free)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.engine import Engine

_SAMPLE_BYTES = 64 << 10


@dataclass(frozen=True)
class KVLayout:
    """The meaning of KV bytes: same model, dtype, shape of a page, and parallel layout on both sides.

    ``tp_size`` / ``cp_size`` describe how the bytes on the wire are split, not how an instance runs:
    instances of any TP size send and receive whole kv heads (``engine.distributed.kv_shards``), so
    they stay 1 and a tp=2 prefill feeds a tp=1 decode. A backend that moved rank-to-rank shards
    would set them, and then both sides would have to match."""

    model_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    tp_size: int = 1
    cp_size: int = 1

    @classmethod
    def of_engine(cls, engine: Engine) -> KVLayout:
        """The layout of ``engine``'s KV as it travels: whole heads (``num_kv_heads`` of the model,
        not of one rank's pool), so tp = cp = 1 whatever ``engine.cfg.tp`` is; a context-parallel
        engine's rank 0 holds the whole KV in one pool."""
        m = engine.model_config
        return cls(
            model_fingerprint=model_fingerprint(
                engine.cfg.model, engine.cfg.load_format, engine.cfg.device.partition(":")[0]
            ),
            dtype=m.dtype,
            num_layers=m.num_layers,
            num_kv_heads=m.num_kv_heads,
            head_dim=m.head_dim,
            page_size=engine.cfg.page_size,
        )

    def mismatches(self, other: KVLayout) -> list[str]:
        """``field: ours=... theirs=...`` for every field that differs (empty when compatible)."""
        return [
            f"{f.name}: ours={getattr(self, f.name)!r} theirs={getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    @property
    def digest(self) -> str:
        """Short hash of every field; carried by each transfer so a stale peer is caught."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def bytes_per_token_layer(self) -> int:
        """K + V bytes of one token in one layer."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return 2 * self.num_kv_heads * self.head_dim * itemsize


def model_fingerprint(
    model_dir: str | Path, load_format: str = "safetensors", device_type: str = "cpu"
) -> str:
    """A hash that differs between checkpoints whose KV would differ, cheap even for large models.

    Covers config.json, and for every safetensors file its size, its header (names, dtypes, shapes,
    offsets) and 64 KiB samples of the data at the start, middle and end, so two random-weight
    models of one shape but different seeds differ too. Not a full-content hash: reading a 16 GB
    checkpoint at startup would cost more than this guard is worth. ``load_format`` "dummy" (seeded
    random weights of the config's shape) hashes the config, the format and the device type (the
    seeded draws differ between the CPU and CUDA generators).
    """
    root = Path(model_dir)
    h = hashlib.sha256((root / "config.json").read_bytes())
    if load_format != "safetensors":  # dummy weights: the files on disk are not what runs, and
        h.update(f"{load_format}/{device_type}".encode())  # CPU and CUDA generators draw differently
        return h.hexdigest()[:32]
    for path in sorted(root.glob("*.safetensors")):
        size = path.stat().st_size
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(path.name.encode() + struct.pack("<Q", size) + f.read(header_len))
            data_start = 8 + header_len
            for offset in (data_start, (data_start + size) // 2, max(data_start, size - _SAMPLE_BYTES)):
                f.seek(offset)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]
