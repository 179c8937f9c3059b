#!/usr/bin/env python3
"""What a torch.export path for loupe would rest on (docs/models.md "TorchScript's future").

loupe needs the gradient of an objective with respect to the input image. TorchScript
models carry autograd with them; a torch.export program run from C++ (an AOTInductor
package) does not. This probe checks, on a small random CNN on the CPU, the steps of the
route docs/models.md describes:

1. the obvious exports of a module that differentiates itself (torch.autograd.grad inside
   forward, strict and non-strict) -- expected to fail in torch 2.11;
2. the vector-Jacobian product `vjp(x, v) -> (activation, dx)` traced with make_fx into
   an aten graph, then torch.export of that graph;
3. that graph compiled into an AOTInductor package (.pt2), the format libtorch's C++
   `AOTIModelPackageLoader` runs, timed, and its gradient compared with eager autograd.

Run: .venv/bin/python tools/probe-torch-export.py   (about a minute and a half on 2 cores)
"""
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx


def main() -> int:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x, v = torch.rand(2, 3, 16, 16), torch.rand(2, 4, 16, 16)
    xr = x.clone().requires_grad_(True)
    net(xr).backward(v)
    want = xr.grad

    class SelfDifferentiating(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, v):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                a = self.m(x)
                (g,) = torch.autograd.grad(a, x, v)
            return a.detach(), g

    for strict in (False, True):
        try:
            torch.export.export(SelfDifferentiating(net), (x, v), strict=strict)
            print(f"1. export of autograd.grad inside forward (strict={strict}): ok")
        except Exception as e:
            print(f"1. export of autograd.grad inside forward (strict={strict}): fails: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    def vjp(x, v):
        a, pullback = torch.func.vjp(net, x)
        return a, pullback(v)[0]

    graph = make_fx(vjp)(x, v)
    program = torch.export.export(graph, (x, v))
    same = torch.allclose(program.module()(x, v)[1], want, atol=1e-5)
    print(f"2. make_fx(func.vjp) then torch.export: ok, {len(program.graph.nodes)} nodes; gradient equals eager autograd: {same}")

    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        path = torch._inductor.aoti_compile_and_package(program, package_path=f"{d}/vjp.pt2")
        seconds = time.time() - t
        loaded = torch._inductor.aoti_load_package(path)
        same = torch.allclose(loaded(x, v)[1], want, atol=1e-5)
        print(f"3. AOTInductor package: compiled in {seconds:.1f} s; gradient equals eager autograd: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
