"""Child-process checks for tests/test_managed_safety.py (a crash here fails the parent test)."""
import copy
import io
import json
import os
import sys
import threading

import torch

import nzrt
from nzrt.runtime import ManagedError
from test_runtime import assert_restored, bits, same, snapshot, tiny_llama  # this script's folder


def llama(hidden=64, vocab=1000, layers=2, tied=True):
    return tiny_llama(hidden=hidden, vocab=vocab, layers=layers, tied=tied)


READS = {
    "repr": lambda w, ref, m: repr(w) == "Parameter containing:\n" + repr(ref),
    "str": lambda w, ref, m: str(w) == "Parameter containing:\n" + str(ref),
    "sum": lambda w, ref, m: same(w.sum(), ref.sum()),
    "clone": lambda w, ref, m: same(w.clone(), ref),
    "equal": lambda w, ref, m: torch.equal(w, ref),
    "cpu": lambda w, ref, m: same(w.cpu(), ref),
    "detach": lambda w, ref, m: same(w.detach(), ref),
    "data": lambda w, ref, m: same(w.data, ref) and same(w.data.clone(), ref),
    "float": lambda w, ref, m: same(w.float(), ref.float()),
    "to": lambda w, ref, m: same(w.to(torch.float32), ref.to(torch.float32)),
    "t": lambda w, ref, m: same(w.t().contiguous(), ref.t().contiguous()),
    "T": lambda w, ref, m: same(w.T.contiguous(), ref.T.contiguous()),
    "index": lambda w, ref, m: same(w[3], ref[3]) and same(w[:, 1:5], ref[:, 1:5]),
    "numpy": lambda w, ref, m: (w.float().numpy() == ref.float().numpy()).all()
    and w.view(torch.int16).numpy().tobytes() == bits(ref).numpy().tobytes(),
    "matmul": lambda w, ref, m: same(w @ torch.ones(w.shape[1], dtype=w.dtype), ref @ torch.ones(ref.shape[1], dtype=ref.dtype)),
    "linear": lambda w, ref, m: same(torch.nn.functional.linear(torch.ones(2, w.shape[1], dtype=w.dtype), w),
                                     torch.nn.functional.linear(torch.ones(2, ref.shape[1], dtype=ref.dtype), ref)),
    "eq_all": lambda w, ref, m: bool((w == ref).all()),
    "norm": lambda w, ref, m: same(w.float().norm(), ref.float().norm()),
    "tolist": lambda w, ref, m: w[:2].tolist() == ref[:2].tolist(),
    "state_dict": lambda w, ref, m: same(m.state_dict()["model.layers.0.mlp.up_proj.weight"], ref),
    "state_dict_keep_vars": lambda w, ref, m: same(m.state_dict(keep_vars=True)["model.layers.0.mlp.up_proj.weight"].clone(), ref),
    "torch_save_state_dict": lambda w, ref, m: _saved(m.state_dict(), ref),
    "torch_save_keep_vars": lambda w, ref, m: _saved(m.state_dict(keep_vars=True), ref),
    "torch_save_param": lambda w, ref, m: _saved({"model.layers.0.mlp.up_proj.weight": w}, ref),
    "deepcopy": lambda w, ref, m: same(copy.deepcopy(m).model.layers[0].mlp.up_proj.weight, ref),
    "metadata": lambda w, ref, m: (w.shape == ref.shape and w.dtype == ref.dtype and w.device == ref.device
                                   and w.dim() == 2 and w.numel() == ref.numel() and w.is_leaf
                                   and isinstance(w, torch.nn.Parameter) and len(w) == len(ref)),
    "data_ptr": lambda w, ref, m: isinstance(w.data_ptr(), int),
    "parameters_to_vector": lambda w, ref, m: same(
        torch.nn.utils.parameters_to_vector([w]), ref.reshape(-1)),
}


def _saved(sd, ref):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    t = back["model.layers.0.mlp.up_proj.weight"]
    return type(t) in (torch.Tensor, torch.nn.Parameter) and same(t, ref)


def _out_write(w):
    torch.add(torch.zeros_like(w.detach()), 1, out=w)


WRITES = {
    "mul_": lambda w: w.mul_(2),
    "copy_": lambda w: w.copy_(torch.zeros(w.shape, dtype=w.dtype)),
    "zero_": lambda w: w.zero_(),
    "setitem": lambda w: w.__setitem__(0, 1.0),
    "iadd": lambda w: w.__iadd__(1),
    "data_assign": lambda w: setattr(w, "data", torch.zeros(w.shape, dtype=w.dtype)),
    "data_mul_": lambda w: w.data.mul_(2),
    "init_normal_": lambda w: torch.nn.init.normal_(w),
    "out=": _out_write,
    "fill_": lambda w: w.fill_(0),
}


def reads_and_writes(policy):
    m = llama()
    w0 = m.model.layers[0].mlp.up_proj.weight
    ref = w0.detach().clone()
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_out = m(x).logits
    res = {"reads": {}, "writes": {}}
    with nzrt.managed(m, policy=policy) as run:
        w = m.model.layers[0].mlp.up_proj.weight
        assert w is w0
        with torch.inference_mode():
            m(x)  # traced: the plan holds what it holds from now on
            m(x)  # one pass under the plan: the slot pool's steady state (its cap may free buffers)
        dense_before = run.held_bytes()["dense_slots"]
        with torch.no_grad():
            for name, check in READS.items():
                try:
                    res["reads"][name] = bool(check(w, ref, m))
                except Exception as e:  # an error is a failure too
                    res["reads"][name] = f"{type(e).__name__}: {e}"
            for name, write in WRITES.items():
                try:
                    write(w)
                    res["writes"][name] = "no error"
                except ManagedError as e:
                    res["writes"][name] = "ManagedError" if "model.layers.0.mlp.up_proj.weight" in str(e) else str(e)
                except Exception as e:
                    res["writes"][name] = f"{type(e).__name__}: {e}"
            res["after_writes_exact"] = same(w, ref)
        with torch.inference_mode():
            res["forward_exact"] = same(m(x).logits, ref_out)
            res["dense_after_reads"] = [dense_before, run.held_bytes()["dense_slots"]]
    res["restored"] = same(m.model.layers[0].mlp.up_proj.weight, ref) and type(w0) is torch.nn.Parameter
    return res


def threads(policy, n=40):
    m = llama()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randint(0, 1000, (1, 8 + i % 5), generator=gen) for i in range(8)]
    with torch.inference_mode():
        refs = [m(x).logits for x in xs]
    bad, errors = [], []
    with nzrt.managed(m, policy=policy):
        def worker(tid):
            try:
                for i in range(n):
                    j = (tid * 3 + i) % len(xs)
                    with torch.inference_mode():
                        out = m(xs[j]).logits
                    if not same(out, refs[j]):
                        bad.append((tid, i))
            except BaseException as e:
                errors.append(f"{type(e).__name__}: {e}")
        ts = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return {"bad": len(bad), "errors": errors[:3], "calls": 2 * n}


def exactness(policy, hidden, tokens):
    m = llama(hidden=hidden, vocab=8192, layers=2, tied=False)
    x = torch.randint(0, 8192, (1, tokens), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = m(x).logits
    with nzrt.managed(m, policy=policy):
        with torch.inference_mode():
            outs = [m(x).logits for _ in range(3)]
    return {"exact": [same(o, ref) for o in outs]}


def restored(model, snap) -> bool:
    try:
        assert_restored(model, snap)
        return True
    except AssertionError:
        return False


class Injector:
    """Raises ``exc`` at the ``at``-th call of any patched step (counting from 0)."""

    def __init__(self):
        import nzrt.codec
        import nzrt.memory
        import nzrt.runtime.accounting
        import nzrt.runtime.entry
        import nzrt.runtime.handle
        import nzrt.runtime.placement
        import nzrt.runtime.restore
        self.points = [(nzrt.codec, "compress"), (nzrt.codec, "decode_into"), (nzrt.codec, "decompress"),
                       (nzrt.runtime.accounting, "build_report"), (nzrt.runtime.placement, "place"),
                       (nzrt.runtime.placement, "initial_plan"), (nzrt.memory.MemoryTracker, "sample"),
                       (nzrt.runtime.handle, "Scheduler"), (nzrt.runtime.entry, "make_placeholder"),
                       (nzrt.runtime.entry, "register"), (nzrt.runtime.entry, "set_data"),
                       (nzrt.runtime.restore, "set_data")]
        self.calls = 0
        self.at = None
        self.exc = None
        self.hit = None
        for obj, name in self.points:
            orig = getattr(obj, name)
            setattr(obj, name, self._wrap(orig, name))

    def _wrap(self, orig, name):
        inj = self

        def step(*a, **k):
            i = inj.calls
            inj.calls += 1
            if inj.at is not None and i == inj.at:
                inj.hit = name
                if inj.exc == "SIGINT":  # a real Ctrl-C, delivered by the OS
                    import os
                    import signal
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise inj.exc()
            return orig(*a, **k)
        return step

    def arm(self, at, exc):
        self.calls, self.at, self.exc, self.hit = 0, at, exc, None

    def disarm(self):
        self.at = None


def inject(policy, exc_name):
    exc = {"KeyboardInterrupt": KeyboardInterrupt, "MemoryError": MemoryError, "SIGINT": "SIGINT"}[exc_name]
    if exc == "SIGINT":
        # Ctrl-C as an interactive Python has it: a process started in the background by a
        # non-interactive shell inherits SIGINT ignored, and then no KeyboardInterrupt ever comes
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.manual_seed(0)
    m = llama()
    # a large embedding so entry compresses it in several row chunks
    m.model.embed_tokens = torch.nn.Embedding(4000, 64).to(torch.bfloat16)
    m.config.tie_word_embeddings = False
    m.lm_head = torch.nn.Linear(64, 4000, bias=False).to(torch.bfloat16)
    m.config.vocab_size = 4000
    x = torch.randint(0, 4000, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = m(x).logits
    snap = snapshot(m)
    inj = Injector()
    kw = dict(policy=policy, chunk_bytes=64 * 1024)
    out = {"entry": [], "exit": []}
    for phase in ("entry", "exit"):
        at = 0
        while True:
            run = nzrt.managed(m, **kw)
            if phase == "exit":
                inj.disarm()
                run.attach()
                with torch.inference_mode():
                    m(x)
                    m(x)
            inj.arm(at, exc)
            raised = None
            try:
                if phase == "entry":
                    run.attach()
                    inj.disarm()
                    run.detach()
                else:
                    run.detach()
            except BaseException as e:
                raised = type(e).__name__
            inj.disarm()
            ok = restored(m, snap)
            again = False
            try:  # manageable again, and exact
                with nzrt.managed(m, **kw):
                    with torch.inference_mode():
                        again = same(m(x).logits, ref)
                again = again and restored(m, snap)
            except BaseException as e:
                again = f"{type(e).__name__}: {e}"
            out[phase].append({"at": at, "hit": inj.hit, "raised": raised, "restored": ok, "again": again})
            if os.environ.get("NZRT_DEBUG"):
                print(phase, out[phase][-1], file=sys.stderr)
            if inj.hit is None:
                break
            at += 1
    return out


if __name__ == "__main__":
    kind, policy = sys.argv[1], sys.argv[2]
    if kind == "rw":
        out = reads_and_writes(policy)
    elif kind == "inject":
        out = inject(policy, sys.argv[3])
    elif kind == "threads":
        out = threads(policy)
    else:
        out = exactness(policy, int(sys.argv[3]), int(sys.argv[4]))
    print("RESULT " + json.dumps(out))
