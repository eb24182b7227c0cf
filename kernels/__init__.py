"""Codec and fused kernels (installed as ``nzrt.kernels``): spec, references, numba, Triton."""
if __name__ == "kernels":  # the project root is on sys.path: `import kernels` means the installed package
    import os as _os, runpy as _runpy  # nzrt/_step_aside.py by path: importing nzrt here could recurse
    _runpy.run_path(_os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "nzrt", "_step_aside.py"))[
        "step_aside"](__name__, __file__)
