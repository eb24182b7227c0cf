"""Child process for tests/test_clean_exit.py: use nzrt one way, then end without any cleanup
(no ``release``, no ``__exit__`` where the case says "open"); the parent checks the exit status.

    python _exit_child.py CASE [MODEL_DIR]

CASE: from_pretrained (MODEL_DIR: a Llama written by save_pretrained; a forward and a 4-token
generate) | managed_open | managed_closed | training_open | fused_open (a torch-only stack of
Linears, hidden 4096: the child starts fast and a decode lasts long enough to be in flight when
the script ends; without the exit-time stop this aborted 2 runs in 8 here).
"""
import functools
import sys

import torch

import nzrt


def mlp(hidden=4096, layers=3):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(hidden, hidden, bias=False), torch.nn.GELU()]
    return torch.nn.Sequential(*mods).to(torch.bfloat16)


def main(case: str, model_dir: str | None = None) -> None:
    if case == "from_pretrained":
        model = nzrt.from_pretrained(model_dir)
        ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids)
            model.generate(ids, max_new_tokens=4, do_sample=False)
        return
    model = mlp(layers=2 if case == "training_open" else 3)
    x = torch.randn(1, model[0].in_features).to(torch.bfloat16)
    if case == "training_open":
        model.requires_grad_(True)
        nzrt.managed(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3)).__enter__()
        for _ in range(2):
            model(x).float().square().mean().backward()
        return
    if case == "fused_open":
        from nzrt.policies import Fused
        nzrt.managed(model, policy=Fused()).__enter__()
    elif case == "managed_open":
        nzrt.managed(model).__enter__()
    elif case == "managed_closed":
        with nzrt.managed(model):
            with torch.no_grad():
                for _ in range(3):
                    model(x)
    else:
        raise SystemExit(f"unknown case {case!r}")
    with torch.no_grad():
        for _ in range(4):
            model(x)


if __name__ == "__main__":
    main(*sys.argv[1:])
    print("ok", flush=True)
