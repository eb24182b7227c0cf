"""Codec and fused kernels (installed as ``nzrt.kernels``): spec, references, numba, Triton."""
import os as _os

if __name__ == "kernels":  # the project root is on sys.path: `import kernels` means the installed package
    import importlib.util as _u
    _s = _u.spec_from_file_location(
        "_nzrt_step_aside", _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "nzrt", "_step_aside.py"))
    _m = _u.module_from_spec(_s)
    _s.loader.exec_module(_m)
    _m.step_aside(__name__, __file__)
