"""Child process for tests/test_training.py: train a model plainly and under nzrt, print digests.

    python tests/_train_child.py CASE MODEL STEPS

Prints one JSON line: for "plain" and "nzrt", the loss of every step (its float32 bits), a
SHA-256 of every final weight's integer view and of every optimizer state tensor, so that the
parent compares them bit for bit. CASE: adamw | sgd | checkpointing | lora | accumulate |
resume. MODEL: tied1024 (a Llama, hidden 1024, tied head), untied1024 (its embedding row-chunked
and trained), smollm2 (the embedded SmolLM2-135M in bf16).
"""
import copy
import functools
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

import nzrt
from nzrt.runtime import handle_of

TOKENS = 64
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
SGD = functools.partial(torch.optim.SGD, lr=1e-2, momentum=0.9)


def digest(t: torch.Tensor) -> str:
    t = t.detach()
    if t.is_floating_point():
        t = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def eval_ids():
    from nzrt.cli import model_arg
    lm = model_arg.resolve(None)
    text = (Path(nzrt.__file__).parent / "data" / "eval.txt").read_text()
    return lm, lm.tokenizer(text, return_tensors="pt")["input_ids"][0]


def build(model_name: str, lm):
    if model_name == "smollm2":
        return copy.deepcopy(lm.model).to(torch.bfloat16).requires_grad_(True)
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=model_name == "tied1024")
    return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)


def batches(ids, vocab, steps, micro=1):
    out = []
    for i in range(steps * micro):
        a = (i * TOKENS) % (ids.numel() - TOKENS - 1)
        out.append((ids[a:a + TOKENS] % vocab).unsqueeze(0))
    return out


def bits(loss) -> int:
    return int(loss.detach().float().view(torch.int32).item())


def in_backward(params, factory):
    """PyTorch's optimizer step in backward: one optimizer per parameter, stepped from its hook."""
    opts = {p: factory([p]) for p in params}

    def hook(p):
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)
    handles = [p.register_post_accumulate_grad_hook(hook) for p in opts]
    return opts, handles


def weights(model) -> dict:
    return {n: digest(p) for n, p in model.named_parameters()}


def plain_states(model, opts) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(p)]}.{k}": digest(v) for p, o in opts.items() for k, v in o.state[p].items()
            if isinstance(v, torch.Tensor)}


def nzrt_states(model, run) -> dict:
    """Digests as plain_states names them: a weight stepped in row chunks (optimizers named
    NAME[a:b]) has its chunks' states put back together in row order (a scalar, e.g. the step
    count, is the same in every chunk: the first is taken)."""
    import re
    parts: dict = {}
    for n, sd in run.state_dict()["optimizers"].items():
        m = re.fullmatch(r"(.*)\[(\d+):(\d+)\]", n)
        base, first = (m.group(1), int(m.group(2))) if m else (n, 0)
        for k, v in sd["state"].get(0, {}).items():
            if isinstance(v, nzrt.CompressedTensor):
                v = nzrt.decompress(v)
            if isinstance(v, torch.Tensor):
                parts.setdefault(f"{base}.{k}", []).append((first, v))
    out = {}
    for key, chunks in parts.items():
        chunks.sort(key=lambda c: c[0])
        ts = [t for _, t in chunks]
        out[key] = digest(torch.cat(ts) if ts[0].dim() else ts[0])
    return out


def lora_loop(model, data) -> list:
    """Plain peft training: one AdamW over the adapters, stepped after each backward."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return backward_loop(model, data, after=lambda: (opt.step(), opt.zero_grad(set_to_none=True)))


def backward_loop(model, data, after=None, scale=1) -> list:
    losses = []
    for x in data:
        loss = model(input_ids=x, labels=x).loss / scale
        loss.backward()
        losses.append(bits(loss))
        if after is not None:
            after()
    return losses


def accumulate_loop(model, data, step) -> list:
    """Two micro-batches per step, then global-norm clipping and ``step()``."""
    losses = []
    for i in range(0, len(data), 2):
        losses += backward_loop(model, data[i:i + 2], scale=2)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step()
    return losses


def run_plain(case, model, data, factory):
    if case == "lora":
        return lora_loop(model, data), weights(model), {}
    if case == "accumulate":
        opts = {p: factory([p]) for p in model.parameters()}

        def step():
            for o in opts.values():
                o.step()
                o.zero_grad(set_to_none=True)
        losses = accumulate_loop(model, data, step)
        return losses, weights(model), plain_states(model, opts)
    opts, handles = in_backward(model.parameters(), factory)
    losses = backward_loop(model, data)
    for h in handles:
        h.remove()
    return losses, weights(model), plain_states(model, opts)


def run_nzrt(case, model, data, factory, model_name):
    if case == "lora":
        with nzrt.managed(model) as run:
            assert run.params, "the frozen base must be compressed"
            losses = lora_loop(model, data)
            compressed = len(run.params)
        return losses, weights(model), {}, {"managed": compressed}
    if case == "accumulate":
        with nzrt.managed(model, optimizer=nzrt.OptimizerConfig(factory, in_backward=False)) as run:
            losses = accumulate_loop(model, data, lambda: (run.step(), run.zero_grad()))
            states = nzrt_states(model, run)
        return losses, weights(model), states, {}
    if case == "resume":
        half = len(data) // 2
        with tempfile.TemporaryDirectory() as d:
            with nzrt.managed(model, optimizer=factory) as run:
                losses = backward_loop(model, data[:half])
                run.save(f"{d}/model.nzrt")
                torch.save(run.state_dict(), f"{d}/optim.pt")
            del model, run
            model = nzrt.from_pretrained(f"{d}/model.nzrt", optimizer=factory)
            run = handle_of(model)
            run.load_state_dict(torch.load(f"{d}/optim.pt", weights_only=False))
            losses += backward_loop(model, data[half:])
            states, w = nzrt_states(model, run), weights(model)
            nzrt.release(model)
            return losses, w, states, {}
    with nzrt.managed(model, optimizer=factory) as run:
        losses = backward_loop(model, data)
        states = nzrt_states(model, run)
        info = {"managed": len(run.params), "chunked": sum(mp.chunked for mp in run.params),
                "state_bytes": run.trainer.state_bytes()}
    return losses, weights(model), states, info


def interrupts(steps: int) -> dict:
    """Ctrl-C at random moments of training: after each one, every managed weight's optimizer
    has taken exactly as many steps as the weight has been updated (a step is whole or not at
    all), and the block still exits with every parameter restored."""
    import random
    import signal
    import threading
    import time

    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background child inherits SIG_IGN
    from test_runtime import tiny_llama
    m = tiny_llama(hidden=256, vocab=2048, layers=2).train()
    x = torch.randint(0, 2048, (1, 64), generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    caught, mismatched, completed = 0, [], 0
    with nzrt.managed(m, optimizer=ADAMW) as run:
        t0 = time.perf_counter()
        m(x, labels=x).loss.backward()
        step_s = time.perf_counter() - t0
        for _ in range(steps):
            timer = threading.Timer(rng.uniform(0, step_s), os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                m(x, labels=x).loss.backward()
                completed += 1
                timer.join()
                time.sleep(0.01)  # a signal sent late lands here, not in the next step
            except KeyboardInterrupt:
                caught += 1
            timer.cancel()
            for e in run.trainer.entries.values():
                if e.mp is not None:
                    st = e.opt.state.get(e.shadow, {})
                    n = int(st["step"].item()) if "step" in st else 0
                    if n != e.mp.version:
                        mismatched.append((e.name, n, e.mp.version))
            m.zero_grad(set_to_none=True)
    restored = all(type(p) is torch.nn.Parameter and bool(torch.isfinite(p).all()) for p in m.parameters())
    return {"caught": caught, "completed": completed, "mismatched": mismatched[:5], "restored": restored}


def main():
    if sys.argv[1] == "interrupts":
        print(json.dumps(interrupts(int(sys.argv[3]))))
        return
    case, model_name, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.manual_seed(0)
    lm, ids = eval_ids()
    factory = SGD if case == "sgd" else ADAMW
    micro = 2 if case == "accumulate" else 1
    out = {}
    for who in ("plain", "nzrt"):
        model = build(model_name, lm)
        vocab = model.config.vocab_size
        data = batches(ids, vocab, steps, micro)
        model.train()
        if case == "checkpointing":
            model.gradient_checkpointing_enable()
        if case == "lora":
            import peft
            torch.manual_seed(1)
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=16, lora_alpha=32, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        if who == "plain":
            losses, w, st = run_plain(case, model, data, factory)
            info = {}
        else:
            losses, w, st, info = run_nzrt(case, model, data, factory, model_name)
        out[who] = {"losses": losses, "weights": w, "states": st, "info": info}
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
