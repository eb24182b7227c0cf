"""One rank of a 2-process FSDP2 run (gloo, CPU) for tests/test_fsdp.py.

    python tests/_fsdp_child.py RANK WORLD PORT CASE OUT_DIR

Trains the same Llama (hidden 1024, 2 layers, vocab 8192, untied; 64 tokens a step, each rank its
own data) with plain FSDP2 and under ``nzrt.managed``, from the same weights, and writes
OUT_DIR/rank{RANK}.json: for each run the loss of every step (its float32 bits) and a SHA-256 of
every final local shard's integer view; nzrt's run also what it held (which local shards were
compressed, the report's fsdp2 line, the bytes it put into all-gathers against the dense bytes).

CASE: adamw (optimizer in the backward) | sgd (SGD with momentum, activation checkpointing) |
accumulate (two micro-batches a step, ``in_backward=False``, ``run.step()``; an odd vocabulary,
so FSDP2 shards the embedding and the head unevenly and nzrt keeps them dense) | save (adamw, then
``run.save`` against the single-process save of the same weights, and ``run.state_dict()`` through
torch.distributed.checkpoint) | misuse (entry failing half-way, writes into a compressed shard: the
model is left as it was) | raise (rank 1 raises in its second step: both must end, none hang).
The plain reference of the in-backward cases is PyTorch's optimizer-in-backward: one
``AdamW(foreach=False)`` per sharded parameter, stepped in its post-accumulate-grad hook.
"""
import datetime
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TOKENS = 64
STEPS = 3
# NZRT_FSDP_DEVICE=cuda: the same on GPUs over NCCL (tools/gpu_all.sh fsdp runs it with one rank)
DEVICE = os.environ.get("NZRT_FSDP_DEVICE", "cpu")
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1, foreach=False)
SGD = functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9, foreach=False)


def digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.is_floating_point():
        t = t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]


def loss_bits(loss) -> int:
    return int(loss.detach().float().cpu().view(torch.int32))


VOCAB = 8192


def config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False)


MIXED = False  # fp32 weights, bf16 compute (FSDP2's MixedPrecisionPolicy)


def build(mesh, checkpointing=False):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    dtype = torch.float32 if MIXED else torch.bfloat16
    model = LlamaForCausalLM._from_config(config(), dtype=dtype).to(DEVICE)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if MIXED else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def batches(rank, steps, micro=1):
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, VOCAB, (1, TOKENS), generator=g).to(DEVICE) for _ in range(steps * micro)]


def shards(model) -> dict:
    return {n: digest(p.to_local()) for n, p in model.named_parameters()}


def eval_loss(model) -> int:
    """A forward through FSDP2's own all-gathers (after nzrt's exit: its default path again)."""
    ids = batches(7, 1)[0]
    with torch.no_grad():
        loss = loss_bits(model(input_ids=ids, labels=ids).loss)
    model.reshard()  # FSDP2 keeps the root's weights gathered after a forward: shard them again
    return loss


def _step_in_backward(opt, _param) -> None:
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_run(mesh, rank, factory, checkpointing=False, micro=1):
    model = build(mesh, checkpointing)
    before = eval_loss(model)
    losses = []
    if micro == 1:  # PyTorch's optimizer-in-backward
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(functools.partial(_step_in_backward, factory([p])))
        for ids in batches(rank, STEPS):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss_bits(loss))
    else:  # the user's ordinary loop with accumulation: one optimizer, one step per `micro` batches
        opt = factory(list(model.parameters()))
        for i, ids in enumerate(batches(rank, STEPS, micro)):
            loss = model(input_ids=ids, labels=ids).loss
            (loss / micro).backward()
            losses.append(loss_bits(loss))
            if (i + 1) % micro == 0:
                opt.step()
                opt.zero_grad(set_to_none=True)
    return {"losses": losses, "shards": shards(model), "eval_after": eval_loss(model), "eval_before": before}


def nzrt_run(mesh, rank, factory, checkpointing=False, micro=1, fail_rank=None, save_dir=None):
    import nzrt
    from nzrt.runtime.shard_tensor import CompressedShard
    model = build(mesh, checkpointing)
    before = shards(model)
    losses, out = [], {}
    with nzrt.managed(model):  # inference only: compressed shards, compressed all-gathers
        out["eval_compressed"] = sum(isinstance(p._local_tensor, CompressedShard) for p in model.parameters())
        out["eval_before"] = eval_loss(model)
    optimizer = factory if micro == 1 else nzrt.OptimizerConfig(factory, in_backward=False)
    with nzrt.managed(model, optimizer=optimizer) as run:
        out["compressed"] = sorted(n for n, p in model.named_parameters()
                                   if isinstance(p._local_tensor, CompressedShard))
        for i, ids in enumerate(batches(rank, STEPS, micro)):
            if fail_rank == rank and i == 1:
                raise RuntimeError("a deliberate failure on this rank")
            loss = model(input_ids=ids, labels=ids).loss
            (loss / micro if micro > 1 else loss).backward()
            losses.append(loss_bits(loss))
            if micro > 1 and (i + 1) % micro == 0:
                run.step()
                run.zero_grad()
        w = run.shared.sharded.weights
        out["sent"] = sum(x.sent_bytes for x in w)
        out["sent_dense"] = sum(x.gathers * x.dense_bytes for x in w)
        out["report"] = run.report().sharded
        out["summary"] = run.report().summary()
        out["warnings"] = list(run.warnings)
        out["inside"] = shards(model)  # read through the compressed shards (decoded on demand)
        if save_dir is not None:
            out.update(save_checks(run, model, mesh, rank, save_dir))
    out["losses"] = losses
    out["shards"] = shards(model)
    out["moved"] = sum(before[n] != d for n, d in out["shards"].items())
    out["after_exit_local"] = sorted({type(p._local_tensor).__name__ for p in model.parameters()})
    out["eval_after"] = eval_loss(model)
    return out


def save_checks(run, model, mesh, rank, save_dir) -> dict:
    """run.save against the single-process save of the same weights; run.state_dict through DCP."""
    import nzrt
    from transformers import LlamaForCausalLM
    save_dir = Path(save_dir)
    with torch.no_grad():  # FSDP2 keeps the root's weights gathered after this: save reshards
        model(input_ids=batches(9, 1)[0])
    run.save(save_dir / "fsdp.nzrt")
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # collectives: every rank
    res = {}
    if rank == 0:
        torch.manual_seed(0)
        single = LlamaForCausalLM._from_config(config(), dtype=torch.bfloat16)
        with torch.no_grad():
            for n, p in single.named_parameters():
                p.copy_(full[n])
        with nzrt.managed(single) as r1:
            r1.save(save_dir / "single.nzrt")
        a, b = nzrt.load(save_dir / "fsdp.nzrt"), nzrt.load(save_dir / "single.nzrt")
        diffs = sorted(set(a) ^ set(b))
        for n in set(a) & set(b):
            x, y = a[n], b[n]
            if type(x) is not type(y):
                diffs.append(n)
            elif isinstance(x, torch.Tensor):
                if x.dtype != y.dtype or x.shape != y.shape or digest(x) != digest(y):
                    diffs.append(n)
            elif x.header != y.header or not torch.equal(x.data, y.data):
                diffs.append(n)
        from nzrt.format.checkpoint import load_metadata
        res["save_metadata_equal"] = load_metadata(save_dir / "fsdp.nzrt") == load_metadata(save_dir / "single.nzrt")
        res["save_entries"] = len(a)
        res["save_diffs"] = diffs
    del full
    # DCP: save run.state_dict(); train a step (weights and states move); load it back
    import torch.distributed.checkpoint as dcp
    sd = run.state_dict()
    dcp.save(sd, checkpoint_id=str(save_dir / "dcp"))
    saved = state_digests(sd)
    del sd
    ids = batches(50 + rank, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    moved = state_digests(run.state_dict())
    target = run.state_dict()
    dcp.load(target, checkpoint_id=str(save_dir / "dcp"))
    run.load_state_dict(target)
    res["dcp_tensors"] = len(saved)
    res["dcp_moved"] = sum(moved[k] != v for k, v in saved.items())
    res["dcp_restored"] = state_digests(run.state_dict()) == saved
    return res


def state_digests(sd) -> dict:
    """{key: digest} of every tensor of a run.state_dict() (DTensors by their local shard)."""
    out = {f"model/{n}": digest(v.to_local()) for n, v in sd["model"].items()}
    for n, o in sd["optimizers"].items():
        for k, v in o.get("state", {}).get(0, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"{n}/{k}"] = digest(v.to_local() if hasattr(v, "to_local") else v)
    return out


def misuse_run(mesh, rank) -> dict:
    """Entry failing half-way and a write into a compressed shard: the model is left as it was."""
    import nzrt
    from nzrt.runtime import fsdp
    from nzrt.runtime.errors import ManagedError
    model = build(mesh)
    before, eval_before = shards(model), eval_loss(model)
    real, made = fsdp.ShardWeight, []

    def failing(*args, **kwargs):  # the 5th shard's compression fails
        if len(made) == 4:
            raise RuntimeError("injected failure at entry")
        made.append(real(*args, **kwargs))
        return made[-1]

    out = {}
    fsdp.ShardWeight = failing
    try:
        with nzrt.managed(model, optimizer=ADAMW):
            out["entered"] = True
    except RuntimeError as e:
        out["entry_error"] = str(e)
    finally:
        fsdp.ShardWeight = real
    out["after_failed_entry"] = shards(model) == before
    out["locals_after_failed_entry"] = sorted({type(p._local_tensor).__name__ for p in model.parameters()})
    out["eval_after_failed_entry"] = eval_loss(model) == eval_before
    with nzrt.managed(model, optimizer=ADAMW):
        p = model.lm_head.weight
        for name, write in (("add_", lambda: p.add_(1)), ("data.mul_", lambda: p.data.mul_(2)),
                            ("copy_", lambda: p.copy_(p.detach().clone()))):
            try:
                with torch.no_grad():
                    write()
                out[f"write_{name}"] = "allowed"
            except ManagedError as e:
                out[f"write_{name}"] = "refused" if "cannot be written in place" in str(e) else str(e)
    out["after_refused_writes"] = shards(model) == before
    out["eval_after_refused_writes"] = eval_loss(model) == eval_before
    return out


def main():
    rank, world, port, case, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(DEVICE, (world,))
    res = {}
    try:
        if case == "adamw":
            res["plain"] = plain_run(mesh, rank, ADAMW)
            res["nzrt"] = nzrt_run(mesh, rank, ADAMW)
        elif case == "sgd":
            res["plain"] = plain_run(mesh, rank, SGD, checkpointing=True)
            res["nzrt"] = nzrt_run(mesh, rank, SGD, checkpointing=True)
        elif case == "accumulate":  # and an odd vocabulary: FSDP2 pads the embedding and the head
            global VOCAB
            VOCAB = 8193
            res["plain"] = plain_run(mesh, rank, ADAMW, micro=2)
            res["nzrt"] = nzrt_run(mesh, rank, ADAMW, micro=2)
        elif case == "save":
            res["nzrt"] = nzrt_run(mesh, rank, ADAMW, save_dir=out_dir)
        elif case == "mixed":  # fp32 master weights gathered as bf16
            global MIXED
            MIXED = True
            res["plain"] = plain_run(mesh, rank, ADAMW)
            res["nzrt"] = nzrt_run(mesh, rank, ADAMW)
        elif case == "misuse":
            res["nzrt"] = misuse_run(mesh, rank)
        elif case == "raise":
            res["nzrt"] = nzrt_run(mesh, rank, ADAMW, fail_rank=1)
        else:
            raise SystemExit(f"unknown case {case!r}")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
