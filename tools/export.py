#!/usr/bin/env python3
"""Export a PyTorch vision model as a loupe model: a TorchScript file plus a JSON sidecar.

The exported model's forward(x) takes RGB in [0, 1], shaped [N, 3, H, W], applies the
model's input normalisation itself, and returns Dict[str, Tensor] with one entry per
chosen layer, each [N, C, H, W] or [N, C]. See docs/models.md for the full contract.
"""

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

EPILOG = """\
examples:
  python tools/export.py --model torchvision:googlenet --layers inception4a,inception4b --out googlenet.pt
  python tools/export.py --model torchvision:resnet50 --weights default --out resnet50.pt
  python tools/export.py --model torchvision:vit_b_16 --layers encoder.layers.encoder_layer_6 --out vit.pt
  python tools/export.py --model lucent:inceptionv1 --weights default --out inceptionv1.pt
  python tools/export.py --model mypkg.nets:build_net --preprocess none --input-size 128 --out net.pt
  python tools/export.py --model torchvision:resnet50 --list-layers

--model forms:
  torchvision:NAME   torchvision.models.get_model(NAME, weights=...)
  lucent:inceptionv1 lucent's InceptionV1 (needs `pip install torch-lucent`)
  MODULE:CALLABLE    import MODULE (the current directory is on the path), call CALLABLE()
                     with no arguments; it must return an nn.Module

--preprocess auto means imagenet for torchvision, inceptionv1 for lucent, none otherwise:
  imagenet     (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  inceptionv1  x * 255 - 117
  none         x unchanged

The sidecar is written next to --out with .pt replaced by .json.
"""

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# name -> (per-channel scale, per-channel shift, description); the model computes x * scale + shift.
PREPROCESS: Dict[str, Tuple[List[float], List[float], str]] = {
    "imagenet": (
        [1.0 / s for s in IMAGENET_STD],
        [-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
        "imagenet: RGB in [0,1], then (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225] inside the model",
    ),
    "inceptionv1": (
        [255.0] * 3,
        [-117.0] * 3,
        "inceptionv1: RGB in [0,1], then x * 255 - 117 inside the model (lucid/lucent InceptionV1)",
    ),
    "none": ([1.0] * 3, [0.0] * 3, "none: RGB in [0,1] passed to the model unchanged"),
}

LUCENT_LAYERS = [
    "conv2d0", "conv2d1", "conv2d2",
    "mixed3a", "mixed3b",
    "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e",
    "mixed5a", "mixed5b",
    "softmax2_pre_activation_matmul",
]


class ExportError(Exception):
    pass


def note(msg: str) -> None:
    print(f"export.py: {msg}", file=sys.stderr)


# ---------------------------------------------------------------------------------------
# The exported module
# ---------------------------------------------------------------------------------------

def to_nchw(t: Tensor, name: str) -> Tensor:
    """[N,C,H,W] and [N,C] pass through; ViT-style tokens [N, 1+h*h, C] become [N, C, h, h]
    (class token dropped, patch tokens in row-major order)."""
    if t.dim() == 4 or t.dim() == 2:
        return t
    if t.dim() == 3:
        tokens = t.size(1) - 1
        side = int(math.sqrt(float(max(tokens, 0))) + 0.5)
        if tokens > 0 and side * side == tokens:
            return t[:, 1:, :].transpose(1, 2).reshape(t.size(0), t.size(2), side, side)
        raise RuntimeError(
            "layer '" + name + "' gives a 3-D output whose token count minus one ("
            + str(tokens) + ") is not a square; cannot map it to a patch grid"
        )
    raise RuntimeError(
        "layer '" + name + "' gives a " + str(t.dim()) + "-D output; only [N,C,H,W], [N,C] "
        "and ViT tokens [N,1+h*w,C] are supported"
    )


class LoupeModel(nn.Module):
    """forward(x) = {layer: to_nchw(body(x * pre_scale + pre_shift)[layer]) for layer in layers}."""

    layers: List[str]

    def __init__(self, body: nn.Module, layers: List[str], scale: List[float], shift: List[float]):
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.register_buffer("pre_scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pre_shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats = self.body(x * self.pre_scale + self.pre_shift)
        out: Dict[str, Tensor] = {}
        for name in self.layers:
            out[name] = to_nchw(feats[name], name)
        return out


class TappedLoupeModel(LoupeModel):
    """LoupeModel plus tap(x, layer): `taps` holds one truncated extractor per layer, sharing
    the body's weights, so a layer's activation costs only the network up to it."""

    def __init__(self, body: nn.Module, layers: List[str], scale: List[float], shift: List[float],
                 taps: nn.ModuleList):
        super().__init__(body, layers, scale, shift)
        self.taps = taps

    @torch.jit.export
    def tap(self, x: Tensor, layer: str) -> Tensor:
        """The activation of one layer (as in forward), computing only what it needs."""
        x = x * self.pre_scale + self.pre_shift
        for i, m in enumerate(self.taps):
            if self.layers[i] == layer:
                return to_nchw(m(x)[layer], layer)
        if layer not in self.layers:
            raise RuntimeError("unknown layer '" + layer + "'")
        return to_nchw(self.body(x)[layer], layer)


class HookBody(nn.Module):
    """Fallback body for models torch.fx cannot trace: runs the whole model and collects the
    chosen submodules' outputs with a global forward hook (module-level hooks would make
    torch.jit.trace try to compile them). Only usable with torch.jit.trace."""

    def __init__(self, model: nn.Module, layers: List[str]):
        super().__init__()
        self.model = model
        self.layers = list(layers)

    def forward(self, x):
        modules = dict(self.model.named_modules())
        wanted = {id(modules[name]): name for name in self.layers}
        store = {}

        def hook(module, _inputs, output):
            name = wanted.get(id(module))
            if name is not None:
                if not isinstance(output, torch.Tensor):
                    raise ExportError(f"layer '{name}' returns {type(output).__name__}, not a Tensor")
                store[name] = output

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            self.model(x)
        finally:
            handle.remove()
        missing = [n for n in self.layers if n not in store]
        if missing:
            raise ExportError(f"layer(s) {missing} were not called by the model's forward")
        return {name: store[name] for name in self.layers}


# ---------------------------------------------------------------------------------------
# Building the source model
# ---------------------------------------------------------------------------------------

def build_model(spec: str, weights: str):
    """Returns (model, kind, short name, default input size or None, source description)."""
    if ":" not in spec:
        raise ExportError(f"--model '{spec}' must look like torchvision:NAME, lucent:inceptionv1 or module:callable")
    prefix, name = spec.split(":", 1)
    pretrained = weights == "default"
    if prefix == "torchvision":
        import torchvision
        from torchvision import models
        if name not in models.list_models():
            raise ExportError(f"torchvision has no model '{name}' (see torchvision.models.list_models())")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet/inception: init_weights chatter
            model = models.get_model(name, weights="DEFAULT" if pretrained else None)
        size = None
        try:
            crop = models.get_model_weights(name).DEFAULT.transforms().crop_size
            size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
        except Exception:
            pass
        source = f"torchvision:{name} (weights={weights}, torchvision {torchvision.__version__}, torch {torch.__version__})"
        return model, "torchvision", name, size, source
    if prefix == "lucent":
        if name.lower() != "inceptionv1":
            raise ExportError(f"only lucent:inceptionv1 is supported, not lucent:{name}")
        try:
            from lucent.modelzoo import inceptionv1
        except ImportError as e:
            raise ExportError(f"lucent:inceptionv1 needs lucent (pip install torch-lucent): {e}")
        # redirected_ReLU=False: lucent's redirected ReLU is a Python autograd.Function,
        # which TorchScript cannot save; the plain ReLU has the same forward.
        model = inceptionv1(pretrained=pretrained, redirected_ReLU=False)
        return model, "lucent", "inceptionv1", 224, f"lucent:inceptionv1 (weights={weights}, torch {torch.__version__})"
    # module:callable
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(prefix)
    except ImportError as e:
        raise ExportError(f"cannot import module '{prefix}': {e}")
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ExportError(f"module '{prefix}' has no attribute '{name}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExportError(f"'{spec}' is not callable")
    if weights != "none":
        note(f"--weights {weights} is ignored for {spec}: the callable decides its own weights")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ExportError(f"'{spec}()' returned {type(model).__name__}, not an nn.Module")
    return model, "custom", name.split(".")[-1], None, f"{spec} (torch {torch.__version__})"


def prepare(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # In-place activations would overwrite an exported layer's output (e.g. a conv followed
    # by ReLU(inplace=True) would come out rectified); the exported tensor must be the
    # module's own output.
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return model


# ---------------------------------------------------------------------------------------
# Layer names
# ---------------------------------------------------------------------------------------

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_SKIP = (
    nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Identity, nn.Flatten,
)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def default_layers(model: nn.Module, available: List[str]) -> List[str]:
    """A sensible default: the model's blocks (composite modules), plain Conv/Linear layers,
    descending into plain containers (Sequential, ModuleList) and into modules that are mostly
    one stack of repeated blocks (e.g. a ViT's encoder). Only names present in the traced graph, in graph order."""
    picked = []

    def is_container(m: nn.Module) -> bool:
        # Exact types only: Sequential subclasses (e.g. torchvision's Conv2dNormActivation) are blocks.
        return type(m) in _CONTAINERS

    def is_stage(m: nn.Module, total: int) -> bool:
        # A container of >= 4 same-class blocks holding most of its parent's weights,
        # e.g. a ViT encoder's `layers`.
        kids = list(m.children())
        return (is_container(m) and len(kids) >= 4 and len({type(k) for k in kids}) == 1
                and total > 0 and _n_params(m) > 0.9 * total)

    def visit(prefix: str, module: nn.Module):
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if is_container(child):
                visit(name + ".", child)
            elif isinstance(child, _SKIP):
                continue
            elif any(True for _ in child.children()):
                total = _n_params(child)
                if any(is_stage(c, total) for c in child.children()):
                    visit(name + ".", child)
                else:
                    picked.append(name)
            elif isinstance(child, (nn.modules.conv._ConvNd, nn.Linear)):
                picked.append(name)

    visit("", model)
    order = {n: i for i, n in enumerate(available)}
    picked = [n for n in picked if n in order]
    return sorted(picked, key=lambda n: order[n])


def module_level_names(nodes: List[str]) -> List[str]:
    """Every node name and every dotted prefix of one (a module's output is its last node),
    in graph order of the module's last node."""
    last: Dict[str, int] = {}
    for i, n in enumerate(nodes):
        parts = n.split(".")
        for k in range(1, len(parts) + 1):
            last[".".join(parts[:k])] = i
    return sorted(last, key=lambda n: (last[n], -n.count(".")))


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

def fx_nodes(model: nn.Module) -> Optional[List[str]]:
    from torchvision.models.feature_extraction import get_graph_node_names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train, evaln = get_graph_node_names(model)
        model.eval()
        return evaln
    except Exception as e:  # not fx-traceable
        model.eval()
        note(f"torch.fx cannot trace this model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "falling back to forward hooks + torch.jit.trace, with module names as layer names")
        return None


def extractor(model: nn.Module, layers: List[str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fe = create_feature_extractor(model, return_nodes={n: n for n in layers}, suppress_diff_warning=True)
    # Use the eval-mode graph only, and drop shape assertions (torch._assert, e.g. in every ViT
    # encoder block): they count as side effects, so dead-code elimination would keep every
    # block up to the last assertion, and all their weights, for an early layer.
    from torch import fx
    graph = fe.eval_graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in (torch._assert, torch._assert_async) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()
    # TorchScript is stricter than Python about int-for-float arguments; lucent's InceptionV1
    # calls F.local_response_norm(..., k=1).
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.local_response_norm:
            node.kwargs = {k: float(v) if k in ("alpha", "beta", "k") and isinstance(v, int) else v
                           for k, v in node.kwargs.items()}
    gm = fx.GraphModule(fe, graph, type(model).__name__)
    return gm.eval()


def export(args) -> None:
    model, kind, short_name, native_size, source = build_model(args.model, args.weights)
    model = prepare(model)

    nodes = fx_nodes(model)
    if nodes is not None:
        available = module_level_names(nodes)
    else:
        available = [n for n, _ in model.named_modules() if n]
    if kind == "lucent":
        defaults = [n for n in LUCENT_LAYERS if n in available]
    else:
        defaults = default_layers(model, available)

    if args.list_layers:
        dset = set(defaults)
        print(f"# layers of {args.model}; '*' marks the --layers all selection", file=sys.stderr)
        for n in available:
            print(f"{n} *" if n in dset else n)
        return

    if args.layers.strip() == "all":
        layers = defaults
        if not layers:
            raise ExportError("found no default layers for this model; pass --layers (see --list-layers)")
    else:
        layers = [l.strip() for l in args.layers.split(",") if l.strip()]
        if not layers:
            raise ExportError("--layers is empty")
        aset = set(available)
        unknown = [l for l in layers if l not in aset]
        if unknown:
            raise ExportError(
                "unknown layer" + ("s " if len(unknown) > 1 else " ") + ", ".join(f"'{u}'" for u in unknown)
                + f" for {args.model}; run with --list-layers to see the names")
        if len(set(layers)) != len(layers):
            raise ExportError("--layers names a layer twice")

    preprocess = args.preprocess
    if preprocess == "auto":
        preprocess = {"torchvision": "imagenet", "lucent": "inceptionv1"}.get(kind, "none")
    scale, shift, pre_desc = PREPROCESS[preprocess]
    size = args.input_size or native_size or 224
    if size <= 0:
        raise ExportError("--input-size must be positive")

    body = extractor(model, layers) if nodes is not None else HookBody(model, layers)
    wrapper = LoupeModel(body, layers, scale, shift).eval()
    dummy = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            ref = wrapper(dummy)
        except RuntimeError as e:
            raise ExportError(f"forward on a [1,3,{size},{size}] input failed: {e}")

    scripted = None
    if nodes is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's remarks on torch.fx internals
                if args.no_tap:
                    scripted = torch.jit.script(LoupeModel(body, layers, scale, shift).eval())
                else:
                    # With one layer, tap just runs the body.
                    taps = nn.ModuleList([extractor(model, [l]) for l in layers] if len(layers) > 1 else [])
                    scripted = torch.jit.script(TappedLoupeModel(body, layers, scale, shift, taps).eval())
        except Exception as e:
            note(f"torch.jit.script failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                 "falling back to torch.jit.trace(strict=False) on a dummy input (no tap method; "
                 f"shape-dependent code is frozen for [N,3,{size},{size}] inputs)")
    if scripted is None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                scripted = torch.jit.trace(wrapper, dummy, strict=False, check_trace=False)
            except ExportError:
                raise
            except Exception as e:
                raise ExportError(f"torch.jit.trace failed too: {type(e).__name__}: {e}")
    scripted = scripted.eval()
    for p in scripted.parameters():
        p.requires_grad_(False)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    torch.jit.save(scripted, args.out)

    # Check what was written: it must load and agree with the eager model.
    try:
        loaded = torch.jit.load(args.out)
        with torch.no_grad():
            got = loaded(dummy)
        if list(got.keys()) != layers:
            raise ExportError(f"saved model returns keys {list(got.keys())}, expected {layers}")
        for name in layers:
            if not torch.allclose(got[name], ref[name], rtol=1e-4, atol=1e-4):
                raise ExportError(f"saved model disagrees with the eager model on layer '{name}'")
    except Exception:
        os.remove(args.out)
        raise

    shapes = {name: list(got[name].shape[1:]) for name in layers}
    sidecar = {
        "name": args.name or short_name,
        "input_size": size,
        "layers": layers,
        "shapes": shapes,
        "preprocessing": pre_desc,
        "source": source,
    }
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    for name in layers:
        print(f"{name}\t{'x'.join(str(d) for d in got[name].shape[1:])}")
    note(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) and {json_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a vision model as a loupe TorchScript model (.pt) plus sidecar (.json).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="torchvision:NAME, lucent:inceptionv1 or module:callable")
    p.add_argument("--layers", default="all", help="comma-separated layer names, or 'all' (default)")
    p.add_argument("--out", help="output .pt path (required unless --list-layers)")
    p.add_argument("--weights", choices=["none", "default"], default="none",
                   help="none: random weights (default); default: the library's pretrained weights")
    p.add_argument("--input-size", type=int, default=None,
                   help="side in px the model expects (default: the weights' crop size, else 224)")
    p.add_argument("--preprocess", choices=["auto", "imagenet", "inceptionv1", "none"], default="auto",
                   help="input normalisation baked into the model (default: auto)")
    p.add_argument("--name", help="model name for the sidecar (default: from --model)")
    p.add_argument("--no-tap", action="store_true", help="do not add the per-layer tap(x, layer) method")
    p.add_argument("--list-layers", action="store_true", help="print the accepted layer names and exit")
    args = p.parse_args(argv)
    if not args.list_layers:
        if not args.out:
            p.error("--out is required")
        if not args.out.endswith(".pt"):
            p.error("--out must end in .pt (the sidecar goes next to it with .json)")
    try:
        with torch.no_grad():
            export(args)
    except ExportError as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
