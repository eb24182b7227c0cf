"""The ``nzrt`` command line. It only parses arguments and calls library functions; everything
heavy is imported inside the commands so ``nzrt --help`` and ``import nzrt.cli`` stay fast."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..kernels import env as settings

app = typer.Typer(
    name="nzrt",
    help="Keep a PyTorch model's weights compressed and decode each layer just in time.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_STATE = {"debug": bool(settings.get("NZRT_DEBUG"))}  # any non-empty value

MODEL_ARG_HELP = ("a transformers directory, a .gguf file, a .nzrt checkpoint, package.module:factory, "
                  "'minilm', or nothing for the embedded SmolLM2-135M")


BUDGET_HELP = ('Memory budget for the weights on the device (compressed, decoded layers, uncompressed '
               'parameters): bytes, "6GiB" or "80%". Too small: the error names the smallest that works '
               '(rounded up) and a policy that needs less, if any.')


# -- errors ------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    """What is wrong and what to do, on one line."""
    from ..loading.errors import ModelError

    msg = " ".join(str(e).split()) or type(e).__name__
    name = type(e).__name__
    if isinstance(e, ModelError):
        return msg
    if name == "FormatError":
        return f"{msg}; the file is not a valid .nzrt: re-create it with `nzrt compress`"
    if name == "BudgetError":
        needed = getattr(e, "needed", None)
        hint = f"; pass --budget {_human(needed, up=True)} or more" if needed else ""
        return f"{msg}{hint}"
    if isinstance(e, ImportError) and getattr(e, "name", None):
        pkg = {"gguf": "gguf", "matplotlib": "matplotlib", "transformers": "transformers",
               "safetensors": "safetensors", "psutil": "psutil"}.get(e.name.split(".")[0], e.name.split(".")[0])
        return f"this needs the Python package {pkg!r}, which is not installed: pip install {pkg}"
    if isinstance(e, FileNotFoundError):
        return f"{msg}; check the path"
    if isinstance(e, PermissionError):
        return f"{msg}; check the permissions or pick another path"
    if isinstance(e, (TypeError, ValueError)):
        return msg
    if isinstance(e, MemoryError):
        return "out of memory; pass a smaller --budget, use --policy offload, or a smaller model"
    if name.lower() in ("error", "exception"):  # struct.error, zlib.error ...: name the module too
        name = f"{type(e).__module__}.{name}"
    return f"{name}: {msg} (run with --debug for the traceback)"


def _human(n, up: bool = False) -> str:
    """Bytes as "12.34MiB" (``up``: rounded up, so that the text passed back as --budget is never
    less than ``n``: budget.format_bytes(n, up=True) without the space)."""
    from ..budget import format_bytes

    return format_bytes(n, up=up).replace(" ", "")


@contextlib.contextmanager
def _errors():
    """Turn exceptions into one line on stderr and exit code 2 (``--debug`` re-raises)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if _STATE["debug"]:
            raise
        typer.echo(f"error: {_one_line(e)}", err=True)
        raise typer.Exit(2) from None


def _progress():
    """A rich progress bar on stderr; returns (context manager, callback(done, total, what))."""
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn)

    console = Console(stderr=True)
    prog = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[what]}", style="dim"), console=console, transient=True,
                    disable=not console.is_terminal and not settings.get("NZRT_PROGRESS"))
    tasks = {}

    def make(label):
        def cb(done, total, what=""):
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total, what="")
            prog.update(tasks[label], completed=done, total=total, what=str(what)[-40:])
        return cb

    return prog, make


def _status(text: str):
    from rich.console import Console

    console = Console(stderr=True)
    if not console.is_terminal:
        return contextlib.nullcontext()
    return console.status(text)


def _load(model: Optional[str], dtype: Optional[str] = None):
    from . import model_arg

    with _status(f"loading {model or 'the embedded SmolLM2-135M'} ..."):
        return model_arg.resolve(model, dtype=dtype)


def _check_device(device: Optional[str]) -> Optional[str]:
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: there are {torch.cuda.device_count()} GPUs; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: nzrt runs on cpu or cuda")
    return device


FUSED_HELP = ("Fused generation: each generated token multiplies straight from the compressed "
              "weights (no dense copy; CPU only for now, a GPU keeps decode-then-matmul). Exact weights, "
              "but the sums run in the fused kernel's fixed order, so outputs are not bit-identical "
              "to plain PyTorch's; prompts (more than 16 rows) keep the bit-identical path.")


COMPRESS_FUSED_HELP = ("Write the exponent code the fused CPU kernel reads fastest (the window code, "
                       "for --fused / policy=\"fused\" generation): ~12 bits a bf16 weight instead of "
                       "~10.7. Loses nothing of its own (only --mantissa-bits rounds); loading the file with any "
                       "policy is exact.")


def _fused_name(name: str) -> str:
    key = name.strip().lower()
    return key if key == "fused" or key.startswith("fused:") else f"fused:{key}"


def _check_policies(names) -> None:
    from ..policies import get_policy

    for name in names:
        get_policy(name)  # ValueError naming the choices


def _parse_budget(budget: Optional[str]):
    """--budget checked before any model loads: bytes (int), or a percentage string the runtime
    resolves against the free memory. InvalidBudgetError (one line) for anything else."""
    from ..budget import check_budget

    return check_budget(None if budget is None else budget.strip())


def _parse_mantissa_bits(text: Optional[str]) -> Optional[int]:
    """--mantissa-bits as an int (None: lossless); the range for the model's dtype is checked by
    _check_mantissa_bits once the model is loaded."""
    if text is None:
        return None
    from ..kernels.spec import LAYOUTS  # the dtypes' mantissa widths, not a copy of them

    ranges = ", ".join(f"0..{lay.man_bits} for {name}" for name, lay in LAYOUTS.items())
    t = text.strip()
    if not t.lstrip("+-").isdigit() or not t.isascii():
        raise ValueError(f"--mantissa-bits must be a whole number of mantissa bits to keep "
                         f"({ranges}), got {text!r}")
    k = int(t)
    if not 0 <= k <= max(lay.man_bits for lay in LAYOUTS.values()):
        raise ValueError(f"--mantissa-bits must be in {ranges}, got {k}")
    return k


def _check_mantissa_bits(k: Optional[int], lm) -> Optional[int]:
    """``k`` against the loaded model's float dtype (codec.check_mantissa_bits' message)."""
    if k is None or lm.dtype is None:
        return k
    from ..codec import check_mantissa_bits

    try:
        return check_mantissa_bits(k, lm.dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--mantissa-bits {k} does not fit {lm.name or 'the model'}: {e}") from None


# -- commands ----------------------------------------------------------------------------------
@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")):
    _STATE["debug"] = bool(debug or settings.get("NZRT_DEBUG") or _STATE.get("argv_debug"))


@app.command()
def profile(
    model: Optional[str] = typer.Argument(None, help=MODEL_ARG_HELP, show_default=False),
    policy: Optional[List[str]] = typer.Option(None, "--policy", "-p",
                                               help="Policy to run (repeatable): auto, resident, offload, "
                                                    "offload-disk (compressed weights read from the .nzrt "
                                                    "file: the disk tier), belady, lru; default: every "
                                                    "policy that fits."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help=BUDGET_HELP),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu, cuda, cuda:1 ... (default: cuda if any)."),
    mantissa_bits: Optional[str] = typer.Option(None, "--mantissa-bits", "-k", metavar="K",
                                                help="Keep K mantissa bits (lossy); also measures quality."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the table and per-layer reports as JSON."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: memory over time, per-layer phases."),
    tokens: int = typer.Option(128, "--tokens", help="Tokens per forward pass."),
    repeats: int = typer.Option(3, "--repeats", help="Timed forward passes after the first (the best is shown)."),
    gen_tokens: int = typer.Option(6, "--gen-tokens", help="Greedy tokens generated for tok/s (causal LMs)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16, float32 (default: as stored; bf16 for GGUF)."),
    plain: bool = typer.Option(True, "--plain/--no-plain",
                               help="Also run the plain dense model (for a .nzrt this decodes it whole)."),
    fused: bool = typer.Option(False, "--fused", help=FUSED_HELP),
):
    """Run MODEL plainly and under each policy, each run in a process of its own; print one table
    (JSON and PNG on request). Memory per run: its own peak and steady host RSS (anonymous and
    file-backed apart) above a baseline taken after the imports and the codec warm-up, device
    memory from NVML on a GPU; the runtime's fixed overhead on a line of its own; `exact`: the
    output bit-identical to the plain run's. Progress: a bar on a terminal, else one line on
    stderr as each run starts and ends."""
    with _errors():
        from . import profile as prof

        device = _check_device(device)
        _check_policies(policy or [])
        if fused:
            from .profile import available_policies

            policy = [_fused_name(p) for p in (policy or available_policies())]
        budget = _parse_budget(budget)
        mantissa_bits = _parse_mantissa_bits(mantissa_bits)
        if dtype is not None:
            from ..loading.loaded import parse_dtype

            parse_dtype(dtype)  # a bad --dtype is one line before any run starts
        from .model_arg import check_spec

        model = check_spec(model)  # so is a bad MODEL: a missing path, an unknown file, no such module
        prog, make = _run_progress()
        with prog:
            res = prof.profile(model, dtype=dtype, policies=policy or None, budget=budget, device=device,
                               mantissa_bits=mantissa_bits, tokens=tokens, repeats=repeats, gen_tokens=gen_tokens,
                               plain=plain, progress=make("profile"))
        typer.echo(prof.format_table(res))
        if json_out:
            json_out.write_text(res.to_json())
            typer.echo(f"wrote {json_out}")
        if plot_out:
            prof.plot(res, plot_out)
            typer.echo(f"wrote {plot_out}")


def _run_progress():
    """A bar on a terminal; otherwise (a log, a pipe) each call is one line on stderr: as each run
    starts and as it ends."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return _progress()

    def make(label):
        def cb(done, total, what=""):
            print(f"{label} [{done}/{total}] {what}", file=sys.stderr, flush=True)
        return cb

    return contextlib.nullcontext(), make


@app.command()
def compress(
    model: str = typer.Argument(..., help=MODEL_ARG_HELP.replace(", or nothing for", "; 'smollm2' for")),
    out: Path = typer.Argument(..., help="The .nzrt file to write."),
    mantissa_bits: Optional[str] = typer.Option(None, "--mantissa-bits", "-k", metavar="K", help="Keep K mantissa bits (lossy)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Convert the weights first (bfloat16, float16, float32)."),
    fused: bool = typer.Option(False, "--fused", help=COMPRESS_FUSED_HELP),
):
    """Write a compressed checkpoint (weights + config + tokenizer), loadable without the dense weights."""
    with _errors():
        from ..loading.compress import compress_model, compress_transformers_dir
        from ..loading.errors import ModelError

        if out.exists() and out.is_dir():
            raise ModelError(f"{out} is a directory; give the .nzrt file to write")
        mantissa_bits = _parse_mantissa_bits(mantissa_bits)
        widths = None  # the planner's smallest code
        if fused:
            from ..codec import WINDOW4

            widths = WINDOW4
        src = Path(model).expanduser()
        if src.is_file() and src.name == "config.json":
            src = src.parent
        prog, make = _compress_progress()
        st = None
        if src.is_dir() and (src / "config.json").is_file():
            # a transformers directory: streamed tensor by tensor (never resolve(): that loads it whole)
            with prog:
                st = compress_transformers_dir(src, out, mantissa_bits=mantissa_bits, dtype=dtype,
                                               progress=make("compressing"), source=model, widths=widths)
        if st is None:
            lm = _load(model, dtype)
            mantissa_bits = _check_mantissa_bits(mantissa_bits, lm)
            with prog:
                st = compress_model(lm, out, mantissa_bits=mantissa_bits, progress=make("compressing"),
                                    widths=widths)
        mode = "lossless" if mantissa_bits is None else f"lossy, {mantissa_bits} mantissa bits"
        if fused:
            mode += "; window code, for the fused kernel"
        typer.echo(f"{st.name}: {st.tensors} weight tensors, {st.params:,} weights ({mode})")
        typer.echo(f"before: {_human(st.dense_bytes)} dense {st.dtype}")
        typer.echo(f"after:  {_human(st.compressed_bytes)} compressed weights "
                   f"({100 * st.ratio:.1f}%, {st.bits_per_weight:.2f} bits/weight); "
                   f"file {out} {_human(st.file_bytes)}; {st.seconds:.1f} s")
        if fused and (mantissa_bits is not None or st.dtype != "bfloat16"):
            typer.echo("note: the window code's fast path reads lossless bfloat16 only; these weights "
                       f"({st.dtype}{', lossy' if mantissa_bits is not None else ''}) take the fused kernel's "
                       f"general path, where the smaller default code serves as well", err=True)


def _compress_progress():
    """A bar on a terminal; otherwise (a log, a pipe) one line on stderr every ~10%."""
    if sys.stdout.isatty() and sys.stderr.isatty():
        return _progress()
    shown = {}

    def make(label):
        def cb(done, total, what=""):
            step = min(10, 10 * done // max(total, 1))
            if shown.get(label, -1) < step:
                shown[label] = step
                print(f"{label}: {10 * step}% ({done:,}/{total:,}) {str(what)[-60:]}", file=sys.stderr, flush=True)
        return cb

    return contextlib.nullcontext(), make


@app.command("inspect")
def inspect_cmd(
    target: Optional[str] = typer.Argument(None, help="A .nzrt file, or a MODEL (" + MODEL_ARG_HELP + ")."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (with exponent histograms) instead of a table."),
    all_rows: bool = typer.Option(False, "--all", help="Show every tensor (default: the first 40)."),
    mantissa_bits: Optional[str] = typer.Option(None, "--mantissa-bits", "-k", metavar="K",
                                                help="For a MODEL: statistics as compressed with K mantissa bits."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="For a MODEL: convert the weights first."),
):
    """Per tensor: dtype, shape, bits/weight, exponent entropy, tier coverage; totals."""
    with _errors():
        from . import inspect as inspection

        prog, make = _progress()
        path = Path(target).expanduser() if target else None
        is_file = path is not None and path.is_file() and _is_nzrt(path)
        if is_file:
            with prog:
                res = inspection.inspect_file(path, progress=make("reading"))
        else:
            mantissa_bits = _parse_mantissa_bits(mantissa_bits)
            lm = _load(target, dtype)
            mantissa_bits = _check_mantissa_bits(mantissa_bits, lm)
            with prog:
                res = inspection.inspect_model(lm, mantissa_bits=mantissa_bits, progress=make("compressing"))
        if json_out:
            typer.echo(json.dumps(res, indent=1, default=str))
        else:
            typer.echo(inspection.format_table(res, limit=None if all_rows else 40))


def _is_nzrt(path: Path) -> bool:
    from ..format.checkpoint import MAGIC

    with open(path, "rb") as f:
        return f.read(8) == MAGIC


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help=MODEL_ARG_HELP),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    budget: Optional[str] = typer.Option(None, "--budget", "-b", help=BUDGET_HELP),
    policy: str = typer.Option("auto", "--policy", "-p", help="auto, resident, offload, offload-disk (compressed weights read "
                                "from the .nzrt file: the disk tier, for budgets below the compressed "
                                "size), belady, lru; or 'plain' (no nzrt)."),
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cpu, cuda ... (default: cuda if any)."),
    mantissa_bits: Optional[str] = typer.Option(None, "--mantissa-bits", "-k", metavar="K", help="Keep K mantissa bits (lossy)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    report: bool = typer.Option(False, "--report", help="Print a summary of the runtime's report at the end "
                                "(policy, plan, compressed vs dense bytes, bytes held, decodes, stalls, "
                                "peak RSS) on stderr."),
    report_layers: bool = typer.Option(False, "--report-layers", help="Like --report, plus one line per "
                                       "layer (tier, bytes, decodes, stalls)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bfloat16, float16, float32 (default: as stored)."),
    fused: bool = typer.Option(False, "--fused", help=FUSED_HELP),
):
    """Greedy generation under a memory budget; tokens are streamed, tokens/s at the end. MODEL is
    opened as nzrt.from_pretrained opens it (a transformers directory is read one tensor at a time,
    a .nzrt memory-mapped); --policy plain loads it dense, without nzrt."""
    with _errors():
        from ..loading.errors import ModelError
        from . import model_arg
        from .generate import generate as gen

        if max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        device = _check_device(device)
        if fused:
            if policy == "plain":
                raise ValueError("--fused runs under an nzrt policy; --policy plain has none "
                                 "(drop one of the two)")
            policy = _fused_name(policy)
        if policy != "plain":
            _check_policies([policy])
        budget = _parse_budget(budget)
        mantissa_bits = _parse_mantissa_bits(mantissa_bits)
        if policy == "plain":
            lm = _load(model, dtype)
        else:  # nzrt.from_pretrained's path: a meta model whose weights are read as they are compressed
            with _status(f"loading {model or 'the embedded SmolLM2-135M'} ..."):
                lm = model_arg.resolve(model, dtype=dtype, lazy=True)
        mantissa_bits = _check_mantissa_bits(mantissa_bits, lm)
        if lm.kind != "causal-lm" or lm.tokenizer is None:
            raise ModelError(f"{lm.name} is not a causal language model with a tokenizer; "
                             f"`nzrt generate` needs one (try `nzrt profile` for other models)")
        from .profile import default_device

        dev = device or default_device()

        def echo(text):
            typer.echo(text, nl=False)
            sys.stdout.flush()

        rep = None
        if policy == "plain":
            if lm.compressed is not None:
                lm.materialize()
            lm.model.to(dev)
            res = gen(lm.model, lm.tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat, on_text=echo,
                      device=dev)
        else:
            import nzrt
            from ..pretrained import manage_loaded

            m = manage_loaded(lm, policy=policy, budget=budget, mantissa_bits=mantissa_bits, device=dev)
            try:
                res = gen(m, lm.tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat, on_text=echo,
                          device=dev)
                rep = nzrt.report(m)
            finally:
                nzrt.release(m)
        typer.echo("")
        sys.stdout.flush()
        typer.echo(f"[{len(res.new_tokens)} tokens in {res.seconds:.2f} s: {res.tokens_per_s:.1f} tokens/s; "
                   f"prompt {res.prompt_tokens} tokens; policy {policy}]", err=True)
        if (report or report_layers) and rep is not None:
            from ..osmem import rss

            text = rep.summary() if hasattr(rep, "summary") else str(rep)
            peak = rss().get("peak")
            if peak:
                text += f"\n  process peak RSS (VmHWM, loading included): {_human(peak)}"
            if report_layers and hasattr(rep, "layer_lines"):
                text += "\n" + "\n".join(rep.layer_lines())
            typer.echo(text, err=True)
        elif (report or report_layers) and policy == "plain":
            typer.echo("[no report: --policy plain runs without nzrt]", err=True)


@app.command()
def env(json_out: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Versions, GPUs (NVML), the decode backend that will run, CPU threads."""
    with _errors():
        from .env import collect, format_env

        info = collect()
        typer.echo(json.dumps(info, indent=1) if json_out else format_env(info))


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: ``--debug`` is accepted anywhere on the command line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        _STATE["argv_debug"] = True
    app(args=args, prog_name="nzrt")

