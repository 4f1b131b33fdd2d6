"""Writers and readers of the four export formats (see `lnfm.jobs.export` for the folder layout).

Every writer is deterministic: the same parameters give byte-identical files.
Orbax's own metadata carries wall-clock timestamps and the commit path; they
are reset to fixed values after saving (Orbax ignores them on restore).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from lnfm.errors import LnfmError, WeightsMismatch
from lnfm.models import onednn
from lnfm.models.interop import to_monai_vit

PARAMS_DIR = "params"  # orbax: the parameter tree
SAFETENSORS_FILE = "model.safetensors"  # safetensors: full model (or encoder) under flat dotted names
STABLEHLO_FILE = "inference.stablehlo"  # stablehlo: serialized jax.export inference function
MONAI_PT = "encoder_monai.pt"  # monai: torch.save of a dict of tensors
MONAI_SAFETENSORS = "encoder_monai.safetensors"  # monai: the same state dict without pickle

# Platforms the StableHLO function is lowered for; the runtime picks the one it runs on.
STABLEHLO_PLATFORMS = ("cpu", "cuda")


def flat_params(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """nnx.Param values by dotted path ('encoder.blocks.0.attn.qkv.kernel'), as float32/int numpy."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[prefix + ".".join(str(p) for p in path)] = np.ascontiguousarray(np.asarray(var[...]))
    return dict(sorted(out.items()))


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict (e.g. nnx.to_pure_dict) -> {dotted name: numpy array}."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_tree(value, name + "."))
        else:
            out[name] = np.ascontiguousarray(np.asarray(value))
    return dict(sorted(out.items()))


def module_from_flat(build, flat: dict[str, np.ndarray], where: str, prefix: str = "") -> nnx.Module:
    """`build()` traced abstractly (no random init, nothing compiled), then every nnx.Param
    taken from `flat` (names as `flat_params` gives them, after `prefix`). Shapes and
    names must match exactly."""
    import jax.numpy as jnp

    graphdef, state = nnx.split(nnx.eval_shape(build))
    leaves, used = [], set()
    for path, var in nnx.to_flat_state(state):
        key = prefix + ".".join(str(p) for p in path)
        if isinstance(var, nnx.Param):
            if key not in flat:
                raise WeightsMismatch(f"{where}: the weights do not fit the architecture in model.json (no '{key}')")
            value = np.asarray(flat[key])
            if value.shape != tuple(var.shape):
                raise WeightsMismatch(f"{where}: '{key}' has shape {value.shape}, the architecture expects "
                                 f"{tuple(var.shape)}")
            used.add(key)
            value = jnp.asarray(value, var.dtype)
        elif jnp.issubdtype(var.dtype, jax.dtypes.prng_key):
            value = jax.random.key(0)
        else:
            value = jnp.zeros(var.shape, var.dtype)
        leaves.append((path, var.replace(value)))
    extra = sorted(k for k in flat if k.startswith(prefix) and k not in used)
    if extra:
        raise WeightsMismatch(f"{where}: the weights do not fit the architecture in model.json "
                              f"(unexpected '{extra[0]}')")
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


# ----------------------------------------------------------------------------- orbax


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


def write_orbax(out: Path, flat: dict[str, np.ndarray]) -> None:
    """Parameters as a nested tree of plain zarr arrays (no OCDBT: its file names are random)."""
    ocp = _orbax()
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    target = out / PARAMS_DIR
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False)) as ckpt:
        ckpt.save(target.absolute(), args=ocp.args.PyTreeSave(tree))
    # Orbax records the save time and path; fix them so exports are byte-identical.
    (target / "commit_success.txt").unlink(missing_ok=True)
    meta = target / "_CHECKPOINT_METADATA"
    if meta.is_file():
        data = json.loads(meta.read_text())
        for key in ("init_timestamp_nsecs", "commit_timestamp_nsecs"):
            if key in data:
                data[key] = 0
        meta.write_text(json.dumps(data, sort_keys=True))


def read_orbax(folder: Path) -> dict[str, np.ndarray]:
    ocp = _orbax()
    target = (folder / PARAMS_DIR).absolute()
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
            meta = ckpt.metadata(target) if target.is_dir() else None
            if meta is None:
                raise OSError("no parameter tree found")
            tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = ckpt.restore(target, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except (ValueError, KeyError, OSError, TypeError) as e:  # a damaged or foreign params/ tree
        raise _unreadable(folder / PARAMS_DIR, "Orbax parameter", e) from None
    flat = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk(restored, "")
    return flat


# ----------------------------------------------------------------------------- safetensors


def write_safetensors(path: Path, flat: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """One metadata entry at most: the package keeps metadata in a hash map whose order varies
    between processes, which would break byte-identical exports."""
    from safetensors.numpy import save

    if len(metadata) > 1:
        raise ValueError("write_safetensors takes at most one metadata entry (deterministic header)")

    # The package writes an array's raw buffer: a transposed (Fortran-ordered) view would be scrambled.
    arrays = {k: np.ascontiguousarray(v) for k, v in sorted(flat.items())}
    path.write_bytes(save(arrays, metadata=dict(metadata)))


class FormatError(LnfmError, ValueError):
    """An export file that cannot be parsed; one line naming the file."""


def _unreadable(path: Path, what: str, e: Exception) -> FormatError:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return FormatError(f"{path}: not a readable {what} file ({reason[:200]})")


def check_safetensors(path: Path) -> None:
    """Parse only the header (names, shapes, offsets): a damaged file fails here, cheaply."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            list(f.keys())
    except Exception as e:  # the Rust parser raises its own SafetensorError
        raise _unreadable(path, "safetensors", e) from None


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    data = path.read_bytes()
    try:
        return dict(load(data))
    except Exception as e:  # the Rust parser raises its own SafetensorError, struct.error and others
        raise _unreadable(path, "safetensors", e) from None


# ----------------------------------------------------------------------------- stablehlo


def write_stablehlo(path: Path, model: nnx.Module, patch: tuple[int, int, int], channels: int) -> dict:
    """Serialize probabilities = softmax(model(x)) for x of shape (B, *patch, C), B symbolic.

    The parameters are constants inside the function, so running it needs only jax."""
    graphdef, state = nnx.split(model)

    def infer(x):
        out = nnx.merge(graphdef, state)(x)
        logits = out[0] if isinstance(out, tuple) else out
        return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, *patch, channels), np.float32)
    # Source locations would record the caller's stack: drop them so the bytes depend on the model only.
    limit = jax.config.jax_traceback_in_locations_limit
    jax.config.update("jax_traceback_in_locations_limit", 0)
    try:
        with onednn.disabled():  # XLA's own convolutions: the file must run wherever jax does
            exported = jax.export.export(jax.jit(infer), platforms=STABLEHLO_PLATFORMS)(spec)
    finally:
        jax.config.update("jax_traceback_in_locations_limit", limit)
    path.write_bytes(exported.serialize())
    return {"input_shape": ["B", *patch, channels], "input_dtype": "float32", "platforms": list(STABLEHLO_PLATFORMS),
            "output": "softmax probabilities (B, X, Y, Z, num_classes), float32"}


def read_stablehlo(path: Path):
    """The deserialized jax.export.Exported; call it with `.call(x)`."""
    data = bytearray(path.read_bytes())
    try:
        return jax.export.deserialize(data)
    except Exception as e:  # a damaged flatbuffer fails anywhere in the parser
        raise _unreadable(path, "StableHLO", e) from None


# ----------------------------------------------------------------------------- monai


def write_monai(out: Path, encoder: nnx.Module) -> list[str]:
    """MONAI ViT state dict: a pickle-free safetensors file and torch.save of tensors."""
    sd = dict(sorted(to_monai_vit(encoder).items()))
    write_safetensors(out / MONAI_SAFETENSORS, sd, {"format": "pt"})
    try:
        import torch  # optional (the dev extra): only this format needs it
    except ImportError:
        raise LnfmError("the monai format writes encoder_monai.pt with torch, which is not installed "
                         "(pip install torch)") from None
    buf = io.BytesIO()  # saving to a buffer names the archive 'archive', not after the file: same bytes every time
    torch.save({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}, buf)
    (out / MONAI_PT).write_bytes(buf.getvalue())
    return [MONAI_PT, MONAI_SAFETENSORS]
