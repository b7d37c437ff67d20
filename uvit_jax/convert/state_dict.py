"""Reading PyTorch-style state dicts from the files users have, and checking them.

Every converter in `uvit_jax.convert` takes a flat `{official key: numpy array}` mapping. This
module turns `.pth` / `.pt` / `.ckpt` / `.bin` (torch pickles, read with `weights_only=True`, or
TorchScript archives, whose tensors are read without running their code), `.npz` and
`.safetensors` files into that mapping, and gives the converters one way to report
keys and shapes that do not fit.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from uvit_jax.errors import MissingFile, UserError

StateDict = dict[str, np.ndarray]

_TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


class ConversionError(UserError, ValueError):
    """A checkpoint does not fit the model it is converted into."""


class MissingCheckpointFile(MissingFile):
    """The checkpoint file to convert is not there."""


def load_state_dict(path: str | os.PathLike, *, prefix: str | None = None) -> StateDict:
    """Reads a state dict as float32/int numpy arrays.

    Args:
      path: a `.pth`/`.pt`/`.ckpt`/`.bin` torch file or TorchScript archive (needs
        `pip install uvit_jax[torch]`), an `.npz` or a `.safetensors` file. Torch files that
        wrap the weights in `state_dict` (Lightning `.ckpt`) or `model` are unwrapped.
      prefix: if given, keep only keys starting with it and strip it
        (e.g. `"first_stage_model."` for a Stable Diffusion checkpoint).

    Returns:
      `{key: np.ndarray}` with the file's dtypes (bf16/fp16 tensors become float32).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingCheckpointFile(f"checkpoint file not found: {path}")
    kind = _format_of(path)
    try:
        state = _READERS[kind](path)
    except (ConversionError, ImportError):
        raise
    except Exception as e:  # each reader fails its own way on a file of another kind
        # `from None`: torch's and numpy's messages suggest loading the file unsafely.
        raise ConversionError(
            f"{path}: not a {kind} checkpoint (expected {_EXPECTED[kind]}; "
            f"reading it failed with {type(e).__name__})"
        ) from None
    if prefix is not None:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise ConversionError(f"{path}: no key starts with the prefix {prefix!r}")
    return {k: _to_numpy_dtype(v) for k, v in state.items()}


def _format_of(path: str) -> str:
    """The format `path`'s suffix names: "PyTorch", "NumPy .npz" or "safetensors"."""
    lower = path.lower()
    if lower.endswith(_TORCH_SUFFIXES):
        return "PyTorch"
    if lower.endswith(".npz"):
        return "NumPy .npz"
    if lower.endswith(".safetensors"):
        return "safetensors"
    raise ConversionError(
        f"{path}: unknown checkpoint format; expected one of "
        f"{', '.join(_TORCH_SUFFIXES + ('.npz', '.safetensors'))}"
    )


def _load_npz(path: str) -> StateDict:
    with np.load(path, allow_pickle=False) as f:
        return {k: np.asarray(f[k]) for k in f.files}


def _load_safetensors(path: str) -> StateDict:
    from safetensors.numpy import load_file

    try:
        return dict(load_file(path))
    except KeyError as e:  # a dtype numpy lacks (bf16): torch reads it
        return _load_safetensors_via_torch(path, e)


def _to_numpy_dtype(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "f" and x.dtype != np.float64:
        return x.astype(np.float32)
    return x


def _import_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch: pip install 'uvit_jax[torch]' "
            "(or convert the file to .npz/.safetensors elsewhere)"
        ) from e
    return torch


def _tensor_to_numpy(torch, v) -> np.ndarray:
    if v.dtype in (torch.bfloat16, torch.float16):
        v = v.float()
    return v.detach().cpu().numpy()


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether `path` is a TorchScript archive (`torch.jit.save`): a zip holding compiled code
    (`<name>/code/...`) and `constants.pkl`, where a plain state dict holds only `data.pkl`."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _load_torch(path: str) -> StateDict:
    torch = _import_torch(path)
    if is_torchscript(path):
        module = torch.jit.load(path, map_location="cpu")
        return {k: _tensor_to_numpy(torch, v) for k, v in module.state_dict().items()}
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: _tensor_to_numpy(torch, v) for k, v in obj.items() if hasattr(v, "detach")}


def _load_safetensors_via_torch(path: str, cause: Exception) -> StateDict:
    torch = _import_torch(path)
    from safetensors.torch import load_file

    del cause
    return {k: _tensor_to_numpy(torch, v) for k, v in load_file(path).items()}


_READERS = {"PyTorch": _load_torch, "NumPy .npz": _load_npz, "safetensors": _load_safetensors}
_EXPECTED = {
    "PyTorch": "a state dict of tensors saved with torch.save, or a TorchScript archive",
    "NumPy .npz": "arrays saved with numpy.savez, no Python objects",
    "safetensors": "a safetensors file",
}


def check_keys(
    expected: Iterable[str], found: Iterable[str], *, source: str, ignore: Iterable[str] = ()
) -> None:
    """Raises ConversionError listing missing and unexpected keys by name."""
    expected, found, ignore = set(expected), set(found), set(ignore)
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - ignore)
    if missing or unexpected:
        lines = [f"{source}: the checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        raise ConversionError("\n".join(lines))


def check_shape(key: str, array: np.ndarray, expected: tuple[int, ...], *, source: str) -> None:
    """Raises ConversionError naming the key and both shapes when they differ."""
    if tuple(array.shape) != tuple(expected):
        raise ConversionError(
            f"{source}: key {key!r} has shape {tuple(array.shape)}, expected {tuple(expected)}"
        )
