"""nzrt.kernels.triton with its kernels made for the interpreter, shared by the Triton test modules."""
import importlib
import os
import sys


def _interpreted_triton():
    """nzrt.kernels.triton with its kernels made for the interpreter: reloaded in place (so every
    reference to its modules sees the new kernels) when an earlier test imported it compiled."""
    os.environ["TRITON_INTERPRET"] = "1"  # an earlier module's teardown may have removed it
    common = sys.modules.get("nzrt.kernels.triton.common")
    if common is not None and not common.INTERPRET:
        for name in ("common", "decode", "encode", "fused", ""):
            mod = sys.modules.get("nzrt.kernels.triton" + ("." + name if name else ""))
            if mod is not None:
                importlib.reload(mod)
    import nzrt.kernels.triton as package
    assert package.INTERPRET
    return package
