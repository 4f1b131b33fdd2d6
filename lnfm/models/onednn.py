"""oneDNN's 3D convolutions inside jitted JAX on the CPU, through XLA's FFI.

XLA:CPU has no fast 3D convolution: its best form here (`conv_forms.slice_conv`) runs the fine
head's full-resolution block at about half PyTorch's speed, and PyTorch's speed is oneDNN's.
`onednn_conv.cc` calls oneDNN's JIT kernels on the channels-last arrays JAX already holds, for the
forward, the input gradient and the kernel gradient. It needs the system's oneDNN
(Debian/Ubuntu: `apt install libdnnl-dev`) and is built by `python -m lnfm.models.onednn build`
(`make dev-install` does it where oneDNN is installed). Without it, or with `LNFM_ONEDNN=0`,
convolutions keep their XLA forms; both compute the same function (tests/models/test_onednn.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger("lnfm.models")

SOURCE = Path(__file__).with_name("onednn_conv.cc")
_TARGETS = {  # FFI target name -> the handler symbol in onednn_conv.cc
    "lnfm_conv3d_forward": "LnfmConv3dForward",
    "lnfm_conv3d_input_grad": "LnfmConv3dInputGrad",
    "lnfm_conv3d_kernel_grad": "LnfmConv3dKernelGrad",
}


def library_path() -> Path:
    """The built library, named by a digest of its source and of jaxlib's version (the FFI
    headers it compiled against), so a stale build is never loaded."""
    import jaxlib

    digest = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()).hexdigest()[:12]
    return SOURCE.with_name(f"_onednn_conv-{digest}.so")


def build() -> Path:
    """Compile `onednn_conv.cc` against jaxlib's FFI headers and the system's oneDNN; written to a
    temporary name and renamed, so a failed build leaves no library behind."""
    out = library_path()
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [os.environ.get("CXX", "g++"), "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
           "-I", jax.ffi.include_dir(), str(SOURCE), "-ldnnl", "-o", str(tmp)]
    try:
        subprocess.run(cmd, check=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


@functools.cache
def available() -> bool:
    """The library is built and loaded, and `LNFM_ONEDNN=0` does not turn it off."""
    if os.environ.get("LNFM_ONEDNN", "1") == "0" or not library_path().exists():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(library_path()))
    except OSError as e:  # built, but the system's oneDNN has gone since
        log.warning("oneDNN convolutions off: %s", e)
        return False
    for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return True


_OFF = contextvars.ContextVar("lnfm_onednn_off", default=False)
_KEPT_OFF = [False]


def keep_off() -> None:
    """XLA's own forms for the rest of this process; its subprocesses are not affected. For a process that also
    trains PyTorch models (the demo's and the benchmarks' U-Nets): oneDNN's OpenMP teams, kept by XLA's threads,
    share libgomp with PyTorch and made its step 2x slower, an unfair equal-time race."""
    _KEPT_OFF[0] = True


@contextlib.contextmanager
def disabled():
    """Trace convolutions in XLA's own forms: a serialized function (jax.export) must not hold a
    custom call that only this machine's build provides."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def usable(x: jax.Array, w: jax.Array) -> bool:
    """oneDNN takes this convolution: float32 on a one-device CPU run, with the library built.
    (On several devices XLA's partitioner cannot split a custom call by the mesh.)"""
    return (not _OFF.get() and not _KEPT_OFF[0] and x.size > 0 and x.dtype == w.dtype == jnp.float32
            and jax.default_backend() == "cpu" and jax.device_count() == 1 and available())


def _call(target: str, shape, *args) -> jax.Array:
    out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args)


@jax.custom_vjp
def onednn_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """'SAME' stride-1 conv of (B, X, Y, Z, Cin) with a (k, k, k, Cin, Cout) kernel by oneDNN."""
    return _call("lnfm_conv3d_forward", x.shape[:4] + w.shape[-1:], x, w)


def _fwd(x, w):
    return onednn_conv(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    return (_call("lnfm_conv3d_input_grad", x.shape, dy, w),
            _call("lnfm_conv3d_kernel_grad", w.shape, x, dy))


onednn_conv.defvjp(_fwd, _bwd)


def headers_found() -> bool:
    """The C++ compiler finds oneDNN's header (the libdnnl-dev package)."""
    try:
        probe = subprocess.run([os.environ.get("CXX", "g++"), "-E", "-x", "c++", "-", "-o", os.devnull],
                               input=b"#include <dnnl.hpp>\n", capture_output=True)
    except FileNotFoundError:
        return False
    return probe.returncode == 0


def main(argv: list[str]) -> int:
    """`build`: compile the library; `build --if-available`: only where oneDNN is installed and the
    library for this source and jaxlib is not built yet (make's install, test and demo targets)."""
    if argv not in (["build"], ["build", "--if-available"]):
        print("usage: python -m lnfm.models.onednn build [--if-available]", file=sys.stderr)
        return 2
    if "--if-available" in argv:
        if library_path().exists():
            return 0
        if not headers_found():
            print("oneDNN not found (Debian/Ubuntu: apt install libdnnl-dev): 3D convolutions keep XLA's forms")
            return 0
    try:
        print(f"built {build().name}")
    except (OSError, subprocess.CalledProcessError) as e:  # no compiler, or oneDNN's library or headers incomplete
        print(f"oneDNN kernels not built ({e}): 3D convolutions keep XLA's forms")
        return 0 if "--if-available" in argv else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
