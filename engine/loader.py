"""Build a model from an HF directory: pick the class by architecture, stream safetensors into it.

Every failure is one ``ModelLoadError`` naming the file, the tensor and what was expected: an
unknown architecture, a missing or unexpected tensor, a shape that does not fit.

Tensor parallel: every rank reads the whole checkpoint tensors and its parameters' loaders keep
its slice (``engine.layers.linear``); shapes are checked against the whole tensor. Dummy weights are
drawn whole from the same seeded generator on every rank and loaded the same way, so N ranks of
dummy weights compute what one rank does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import ModelConfig
from engine.distributed import TPGroup
from engine.layers.kernels import LayerOps
from engine.layers.linear import ShapeMismatch, default_weight_loader
from engine.models import model_class

# Tensors some checkpoints carry that have no parameter (recomputed at init).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ModelLoadError(ValueError):
    pass


def load_model(
    cfg: ModelConfig,
    model_dir: str | Path,
    device: torch.device | str,
    dummy: bool = False,
    ops: LayerOps | None = None,
    tp: TPGroup | None = None,
) -> nn.Module:
    """``dummy``: fill parameters with seeded random values instead of reading the checkpoint.
    ``ops``: the layers' elementwise implementation (``engine.layers.kernels``); None: torch.
    ``tp``: this rank's tensor-parallel group (its slice of every weight is loaded); None: one rank."""
    try:
        cls = model_class(cfg.architecture)
    except ValueError as e:
        raise ModelLoadError(f"{Path(model_dir) / 'config.json'}: {e}") from None
    with _default_dtype(cfg.torch_dtype), torch.device(device):
        model = cls(cfg, ops, tp=tp)  # type: ignore[call-arg]
    if dummy:
        init_dummy_weights(model)
    else:
        load_weights(model, model_dir)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of realistic scale (std 0.02; norms 1) for benchmarks: numbers, not words.
    A matrix is drawn whole (its checkpoint shape; a packed one as its parts stacked) and goes
    through the parameter's loader, so every tensor-parallel rank keeps its slice of one tensor."""
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed + i)
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            shapes: dict[str | None, tuple[int, ...]]
            shapes = getattr(p, "checkpoint_shapes", {None: tuple(p.shape)})
            rows = [shape[0] for shape in shapes.values()]
            trailing = next(iter(shapes.values()))[1:]  # the same for every part
            whole = torch.empty(sum(rows), *trailing, dtype=p.dtype, device=p.device)
            whole.normal_(0.0, 0.02, generator=g)
            loader = getattr(p, "weight_loader", default_weight_loader)
            for part, rows_of_part in zip(shapes, whole.split(rows), strict=True):
                loader(p, rows_of_part, part)


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_weights", {})
    tied = model.config.tie_word_embeddings  # type: ignore[union-attr]
    expected = {(name, part) for name, p in params.items() for part in getattr(p, "packed_parts", (None,))}
    loaded: set[tuple[str, str | None]] = set()
    for file, name, tensor in _iter_tensors(Path(model_dir)):
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, part = _map_name(name, packed)
        if target not in params:
            raise ModelLoadError(
                f"{file}: unexpected tensor {name!r}: {type(model).__name__} has no such parameter"
            )
        param = params[target]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            with torch.no_grad():
                loader(param, tensor, part)
        except ShapeMismatch as e:
            raise ModelLoadError(f"{file}: tensor {name!r}: {e}") from None
        loaded.add((target, part))
    checkpoint_name = {(module, part): fragment for fragment, (module, part) in packed.items()}
    missing = sorted(
        name if part is None else name.replace(f".{module}.", f".{checkpoint_name[module, part]}.")
        for name, part in expected - loaded
        for module in [name.split(".")[-2]]
    )
    if missing:
        raise ModelLoadError(
            f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:5])}"
        )


def _map_name(name: str, packed: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    for fragment, (module, part) in packed.items():
        if f".{fragment}." in name:
            return name.replace(f".{fragment}.", f".{module}."), part
    return name, None


def _iter_tensors(model_dir: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    for file in _weight_files(model_dir):
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file}: not a readable safetensors file ({e})") from None
        with f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield file, name, f.get_tensor(name)


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names shard {f.name!r}, which does not exist")
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no model.safetensors, no index, no *.safetensors files")
    return files


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the target dtype: no float32 copy of an 8B model first.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
