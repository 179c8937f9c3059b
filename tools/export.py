#!/usr/bin/env python3
"""Export a PyTorch vision model as a loupe model: a TorchScript file plus a JSON sidecar.

The exported model's forward(x) takes RGB in [0, 1], shaped [N, 3, H, W], applies the
model's input normalisation itself, and returns Dict[str, Tensor] with one entry per
chosen layer, each [N, C, H, W] or [N, C]. See docs/models.md for the full contract.
"""

import argparse
import copy
import importlib
import json
import math
import os
import sys
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

EPILOG = """\
examples:
  python tools/export.py --model torchvision:googlenet --layers inception4a,inception4b --out googlenet.pt
  python tools/export.py --model torchvision:resnet50 --weights default --out resnet50.pt
  python tools/export.py --model timm:vit_base_patch16_224 --layers blocks.6,blocks.6.mlp.act --out vit.pt
  python tools/export.py --model open_clip:ViT-B-32 --weights default --out clip.pt
  python tools/export.py --model lucent:inceptionv1 --weights default --out inceptionv1.pt
  python tools/export.py --model mypkg.nets:build_net --preprocess none --input-size 128 --out net.pt
  python tools/export.py --model timm:swin_tiny_patch4_window7_224 --list-layers

--model forms:
  torchvision:NAME   torchvision.models.get_model(NAME, weights=...)
  timm:NAME          timm.create_model(NAME, pretrained=...)
  open_clip:NAME     the image tower (model.visual) of open_clip.create_model(NAME, pretrained=...)
  lucent:inceptionv1 lucent's InceptionV1 (needs `pip install torch-lucent`)
  MODULE:CALLABLE    import MODULE (the current directory is on the path), call CALLABLE()
                     with no arguments; it must return an nn.Module

--preprocess auto means the library's own normalisation: imagenet for torchvision, the
model config's mean/std for timm and open_clip, inceptionv1 for lucent, none otherwise:
  imagenet     (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  inceptionv1  x * 255 - 117
  none         x unchanged

Layer names are module names (see --list-layers). Outputs [N,C,H,W], channels-last
[N,H,W,C], tokens [N,T,C] (prefix tokens dropped, patch tokens onto their grid) and [N,C]
vectors are detected and exported as [N,C,H,W] or [N,C]; the sidecar's "layouts" says how.

The sidecar is written next to --out with .pt replaced by .json.
"""


def normalisation(label: str, mean: List[float], std: List[float], origin: str) -> Tuple[List[float], List[float], str]:
    """(per-channel scale, per-channel shift, description) such that x * scale + shift = (x - mean) / std."""
    nums = lambda v: "[" + ", ".join(f"{float(a):.8g}" for a in v) + "]"
    return ([1.0 / s for s in std], [-m / s for m, s in zip(mean, std)],
            f"{label}: RGB in [0,1], then (x - {nums(mean)}) / {nums(std)} inside the model{origin}")


# name -> (per-channel scale, per-channel shift, description); the model computes x * scale + shift.
PREPROCESS: Dict[str, Tuple[List[float], List[float], str]] = {
    "imagenet": normalisation("imagenet", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], ""),
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

def to_nchw(t: Tensor, name: str, layout: str, prefix: int) -> Tensor:
    """One layer's output in loupe's shapes, by the layout export detected for it:
    nchw and vector pass through, nhwc is permuted, tokens [N, prefix+h*h, C] drop their
    prefix (class, register, distillation) tokens and put the patch tokens, row-major,
    onto their h x h grid as [N, C, h, h]."""
    if layout == "nchw" or layout == "vector":
        return t
    if layout == "nhwc":
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":
        patches = t.size(1) - prefix
        side = int(math.sqrt(float(max(patches, 0))) + 0.5)
        if patches <= 0 or side * side != patches:
            raise RuntimeError("layer '" + name + "' gives " + str(patches) + " patch tokens after its "
                               + str(prefix) + " prefix tokens, not a square grid (loupe feeds square images)")
        return t[:, prefix:, :].transpose(1, 2).reshape(t.size(0), t.size(2), side, side)
    raise RuntimeError("layer '" + name + "' has unknown layout '" + layout + "'")


class LoupeModel(nn.Module):
    """forward(x) = {layer: to_nchw(body(x * pre_scale + pre_shift)[layer]) for layer in layers}."""

    layers: List[str]
    layouts: List[str]
    prefixes: List[int]

    def __init__(self, body: nn.Module, layers: List[str], layouts: List[str], prefixes: List[int],
                 scale: List[float], shift: List[float]):
        super().__init__()
        self.body = body
        self.layers = list(layers)
        self.layouts = list(layouts)
        self.prefixes = list(prefixes)
        self.register_buffer("pre_scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("pre_shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats = self.body(x * self.pre_scale + self.pre_shift)
        out: Dict[str, Tensor] = {}
        for i, name in enumerate(self.layers):
            out[name] = to_nchw(feats[name], name, self.layouts[i], self.prefixes[i])
        return out


class TappedLoupeModel(LoupeModel):
    """LoupeModel plus tap(x, layer): `taps` holds one truncated extractor per layer, sharing
    the body's weights, so a layer's activation costs only the network up to it."""

    def __init__(self, body: nn.Module, layers: List[str], layouts: List[str], prefixes: List[int],
                 scale: List[float], shift: List[float], taps: nn.ModuleList):
        super().__init__(body, layers, layouts, prefixes, scale, shift)
        self.taps = taps

    @torch.jit.export
    def tap(self, x: Tensor, layer: str) -> Tensor:
        """The activation of one layer (as in forward), computing only what it needs."""
        x = x * self.pre_scale + self.pre_shift
        for i, m in enumerate(self.taps):
            if self.layers[i] == layer:
                return to_nchw(m(x)[layer], layer, self.layouts[i], self.prefixes[i])
        for i, name in enumerate(self.layers):
            if name == layer:
                return to_nchw(self.body(x)[layer], layer, self.layouts[i], self.prefixes[i])
        raise RuntimeError("unknown layer '" + layer + "'")


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
                store[name] = output

        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            self.model(x)
        finally:
            handle.remove()
        return {name: store[name] for name in self.layers}


# ---------------------------------------------------------------------------------------
# Building the source model
# ---------------------------------------------------------------------------------------

class Source(NamedTuple):
    model: nn.Module
    kind: str                   # torchvision, timm, open_clip, lucent or custom
    name: str                   # short name for the sidecar
    size: Optional[int]         # the library's input side, if it says
    preprocess: Optional[Tuple[List[float], List[float], str]]  # the library's normalisation, if it says
    description: str


def square_side(size, what: str) -> int:
    side = size if isinstance(size, int) else size[-1]
    if not isinstance(size, int) and size[-2] != size[-1]:
        raise ExportError(f"{what} expects {size[-2]}x{size[-1]} inputs; loupe feeds square images")
    return int(side)


def build_model(spec: str, weights: str) -> Source:
    if ":" not in spec:
        raise ExportError(f"--model '{spec}' must look like torchvision:NAME, timm:NAME, open_clip:NAME, "
                          "lucent:inceptionv1 or module:callable")
    prefix, name = spec.split(":", 1)
    pretrained = weights == "default"
    versions = f"torch {torch.__version__}"
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
        return Source(model, "torchvision", name, size, PREPROCESS["imagenet"],
                      f"torchvision:{name} (weights={weights}, torchvision {torchvision.__version__}, {versions})")
    if prefix == "timm":
        try:
            import timm
            from timm.data import resolve_data_config
        except ImportError as e:
            raise ExportError(f"timm:{name} needs timm (pip install timm): {e}")
        if not timm.is_model(name):
            raise ExportError(f"timm has no model '{name}' (see timm.list_models())")
        model = timm.create_model(name, pretrained=pretrained)
        cfg = resolve_data_config(model=model)
        return Source(model, "timm", name, square_side(cfg["input_size"], f"timm:{name}"),
                      normalisation("timm", cfg["mean"], cfg["std"], f" (timm:{name} pretrained_cfg)"),
                      f"timm:{name} (weights={weights}, timm {timm.__version__}, {versions})")
    if prefix == "open_clip":
        try:
            import open_clip
        except ImportError as e:
            raise ExportError(f"open_clip:{name} needs open_clip (pip install open_clip_torch): {e}")
        if name not in open_clip.list_models():
            raise ExportError(f"open_clip has no model '{name}' (see open_clip.list_models())")
        tag = None
        if pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if not tags:
                raise ExportError(f"open_clip has no pretrained weights for '{name}'")
            tag = tags[0]
        visual = open_clip.create_model(name, pretrained=tag).visual
        cfg = getattr(visual, "preprocess_cfg", None) or {"mean": visual.image_mean, "std": visual.image_std}
        return Source(visual, "open_clip", name, square_side(visual.image_size, f"open_clip:{name}"),
                      normalisation("open_clip", cfg["mean"], cfg["std"], f" (open_clip:{name} preprocess_cfg)"),
                      f"open_clip:{name} image tower (weights={tag or 'none'}, open_clip {open_clip.__version__}, {versions})")
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
        return Source(model, "lucent", "inceptionv1", 224, PREPROCESS["inceptionv1"],
                      f"lucent:inceptionv1 (weights={weights}, {versions})")
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
    return Source(model, "custom", name.split(".")[-1], None, None, f"{spec} ({versions})")


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


def mlp_neurons(model: nn.Module) -> Dict[str, str]:
    """The activation inside each transformer MLP (timm's `blocks.N.mlp.act`, open_clip's
    `...mlp.gelu`): its outputs are the block's hidden neurons, where a transformer's
    interpretable units usually live (the residual stream mixes them)."""
    found = {}
    for name, m in model.named_modules():
        parent = name.rpartition(".")[0]
        if parent.split(".")[-1] == "mlp" and not any(True for _ in m.children()) and (
                isinstance(m, (nn.GELU, nn.ReLU, nn.SiLU)) or type(m).__name__.lower().endswith("gelu")):
            found[name] = "MLP hidden neurons"
    return found


# ---------------------------------------------------------------------------------------
# Module outputs in the traced graph
# ---------------------------------------------------------------------------------------

def trace_modules(model: nn.Module):
    """torch.fx tracing that records, for every module call, the graph node holding what the
    module returned: (graph, {module name: output node}), the last call winning for a module
    called twice. Layers are found by that record, not by node names: torchvision's
    feature-extraction node names drop a `_N` suffix they take for a repeated call, so a
    module named `dense6_1` would become the node `dense6` and its sibling `dense6_2` the
    node `dense6_1`."""
    from torch import fx
    leaf_modules, autowrap = (), ()
    if type(model).__module__.startswith("timm."):
        # timm marks the modules and functions fx cannot trace through.
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
        leaf_modules, autowrap = tuple(get_notrace_modules()), tuple(get_notrace_functions())
    outputs: Dict[str, fx.Node] = {}

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            out = super().call_module(m, forward, args, kwargs)
            if isinstance(out, fx.Proxy):  # a module returning a tuple or a dict is no layer
                outputs[self.path_of_module(m)] = out.node
            return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = Tracer(autowrap_functions=autowrap).trace(model)
    return graph, outputs


def traced_layers(model: nn.Module) -> Optional[List[str]]:
    """The module names whose output is a node of the traced graph, in the order they are
    computed; None when torch.fx cannot trace the model."""
    try:
        graph, outputs = trace_modules(model)
    except Exception as e:
        note(f"torch.fx cannot trace this model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "falling back to forward hooks + torch.jit.trace (no tap method; Python control flow and "
             "shape-dependent code are frozen as they ran on the export's dummy input)")
        return None
    order = {node: i for i, node in enumerate(graph.nodes)}
    return sorted((n for n in outputs if n), key=lambda n: (order[outputs[n]], -n.count(".")))


def extractor(model: nn.Module, layers: List[str]) -> nn.Module:
    """A GraphModule returning {layer: that module's output}, keeping only the part of the
    network the layers need."""
    from torch import fx
    graph, outputs = trace_modules(model)
    # The GraphModule owns `graph` (not a copy): dead-code elimination checks purity against it.
    gm = fx.GraphModule(model, graph, type(model).__name__)
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
    graph.output({name: outputs[name] for name in layers})
    # Drop shape assertions (torch._assert, e.g. in every ViT encoder block): they count as
    # side effects, so dead-code elimination would keep every block up to the last
    # assertion, and all their weights, for an early layer.
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
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def module_outputs(model: nn.Module, layers: List[str], x: Tensor) -> Dict[str, Tensor]:
    """What each named module returns in an eager forward pass (forward hooks): what a layer
    of that name must export."""
    modules = dict(model.named_modules())
    store: Dict[str, object] = {}
    # Clone: the value as the module returned it, before any later in-place op changes it.
    keep = lambda _m, _i, out, name: store.__setitem__(name, out.clone() if isinstance(out, Tensor) else out)
    handles = [modules[name].register_forward_hook(lambda m, i, out, name=name: keep(m, i, out, name))
               for name in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    for name in layers:
        if name not in store:
            raise ExportError(f"layer '{name}' is not called by the model's forward")
        if not isinstance(store[name], Tensor):
            raise ExportError(f"layer '{name}' returns {type(store[name]).__name__}, not a Tensor")
    return store


# ---------------------------------------------------------------------------------------
# Output layouts
# ---------------------------------------------------------------------------------------

def probe_model(model: nn.Module, size: int) -> nn.Module:
    """The model made ready for inputs of `size`: timm models fix their input size at
    creation (patch grid, windows, position embeddings) and can change it on a copy."""
    if hasattr(model, "set_input_size"):
        probe = copy.deepcopy(model)
        probe.set_input_size(img_size=size)
        return probe
    return model


def declared_prefix(model: nn.Module) -> int:
    """The number of tokens before the patch tokens, as the model declares it: timm's
    num_prefix_tokens (class, register and distillation tokens), else one class token if
    the model has one (torchvision's class_token, open_clip's class_embedding)."""
    if isinstance(getattr(model, "num_prefix_tokens", None), int):
        return model.num_prefix_tokens
    return int(any(isinstance(getattr(model, a, None), Tensor) for a in ("class_token", "class_embedding", "cls_token")))


def layout_of(name: str, small: List[int], large: Optional[List[int]], prefix: int) -> Tuple[str, int, str]:
    """(layout, prefix tokens, description) of one layer from its output shape at the export
    size (`small`) and, when the model runs at twice that side, there (`large`): the dims
    that grow are the spatial or token dims, the one that stays is the channel dim. Without
    `large`, the model's declared prefix and a square grid decide, and a 4-D shape only
    when its square side tells the channel dim apart."""
    dims = len(small)
    if dims == 2:
        return "vector", 0, "vector"
    if dims == 4:
        _n, a, b, c = small
        if large is not None:
            grows = [i for i in (1, 2, 3) if large[i] != small[i]]
            if grows == [2, 3] or (not grows and (b, c) == (1, 1)):
                return "nchw", 0, "nchw"
            if grows == [1, 2] or (not grows and (a, b) == (1, 1)):
                return "nhwc", 0, "nhwc"
            raise ExportError(f"layer '{name}' gives a 4-D output {small[1:]} ({large[1:]} at twice the input "
                              "side): neither [N,C,H,W] nor [N,H,W,C]")
        if b == c and a != b:
            return "nchw", 0, "nchw"
        if a == b and b != c:
            return "nhwc", 0, "nhwc"
        raise ExportError(f"layer '{name}' gives a 4-D output {small[1:]} that could be [N,C,H,W] or [N,H,W,C], "
                          "and the model does not run at a second input size to tell")
    if dims == 3:
        tokens = small[1]
        if large is not None:
            grown = large[1] - small[1]
            if large[2] != small[2] or grown <= 0 or grown % 3:
                raise ExportError(f"layer '{name}' gives a 3-D output {small[1:]} ({large[1:]} at twice the input "
                                  "side): not tokens [N,T,C] whose patch grid grows with the image")
            # Doubling the side gives four times the patch tokens: T2 - T1 = 3 * patches.
            prefix = tokens - grown // 3
        patches = tokens - prefix
        side = int(math.sqrt(max(patches, 0)) + 0.5)
        if patches <= 0 or side * side != patches or prefix < 0:
            raise ExportError(f"layer '{name}' gives a 3-D output {small[1:]} whose tokens are not {max(prefix, 0)} "
                              "prefix token(s) plus a square grid of patch tokens")
        return "tokens", prefix, f"tokens(prefix={prefix}, grid={side}x{side})"
    raise ExportError(f"layer '{name}' gives a {dims}-D output; only [N,C,H,W], [N,H,W,C], tokens [N,T,C] "
                      "and [N,C] are supported")


def detect_layouts(model: nn.Module, layers: List[str], size: int, outputs: Dict[str, Tensor]):
    """[(layout, prefix, description)] of the layers, whose outputs at the export size are `outputs`."""
    large = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            x = torch.rand(1, 3, 2 * size, 2 * size)
            large = {k: list(v.shape) for k, v in module_outputs(probe_model(model, 2 * size), layers, x).items()}
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        note(f"the model does not run at {2 * size} px ({type(e).__name__}: {why}); layouts come from the "
             "output shapes at one size and the model's declared prefix tokens")
    prefix = declared_prefix(model)
    return [layout_of(name, list(outputs[name].shape), large[name] if large else None, prefix) for name in layers]


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------

def export(args) -> None:
    src = build_model(args.model, args.weights)
    model = prepare(src.model)

    traced = traced_layers(model)
    available = traced if traced is not None else [n for n, _ in model.named_modules() if n]
    if src.kind == "lucent":
        defaults = [n for n in LUCENT_LAYERS if n in available]
    else:
        defaults = default_layers(model, available)

    if args.list_layers:
        dset, neurons = set(defaults), mlp_neurons(model)
        print(f"# module names of {args.model}; '*' marks the --layers all selection", file=sys.stderr)
        for n in available:
            print(n + (" *" if n in dset else "") + (f"  # {neurons[n]}" if n in neurons else ""))
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

    if args.preprocess == "auto":
        scale, shift, pre_desc = src.preprocess or PREPROCESS["none"]
    else:
        scale, shift, pre_desc = PREPROCESS[args.preprocess]
    size = args.input_size or src.size or 224
    if size <= 0:
        raise ExportError("--input-size must be positive")

    dummy = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    normalised = dummy * torch.tensor(scale).view(1, -1, 1, 1) + torch.tensor(shift).view(1, -1, 1, 1)
    # The eager model's own module outputs: what each layer must export, and its layout.
    try:
        truth = module_outputs(model, layers, normalised)
    except RuntimeError as e:
        raise ExportError(f"forward on a [1,3,{size},{size}] input failed: {e}")
    layouts = detect_layouts(model, layers, size, truth)
    kinds, prefixes = [k for k, _, _ in layouts], [p for _, p, _ in layouts]

    body = extractor(model, layers) if traced is not None else HookBody(model, layers)
    raw = body(normalised)
    for name in layers:
        if raw[name].shape != truth[name].shape or not torch.allclose(raw[name], truth[name], rtol=1e-4, atol=1e-5):
            raise ExportError(f"layer '{name}': the traced graph gives {list(raw[name].shape[1:])}, not the module's own "
                              f"output {list(truth[name].shape[1:])} (as its forward hook sees it); not exporting it under that name")
    wrapper = LoupeModel(body, layers, kinds, prefixes, scale, shift).eval()
    with torch.no_grad():
        try:
            ref = wrapper(dummy)
        except RuntimeError as e:
            raise ExportError(f"forward on a [1,3,{size},{size}] input failed: {e}")

    scripted = None
    if traced is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's remarks on torch.fx internals
                if args.no_tap:
                    scripted = torch.jit.script(LoupeModel(body, layers, kinds, prefixes, scale, shift).eval())
                else:
                    # With one layer, tap just runs the body.
                    taps = nn.ModuleList([extractor(model, [l]) for l in layers] if len(layers) > 1 else [])
                    scripted = torch.jit.script(TappedLoupeModel(body, layers, kinds, prefixes, scale, shift, taps).eval())
        except Exception as e:
            note(f"torch.jit.script failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                 "falling back to torch.jit.trace(strict=False) on a dummy input (no tap method; Python "
                 f"control flow and shape-dependent code are frozen as they ran on a [1,3,{size},{size}] input)")
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
        "name": args.name or src.name,
        "input_size": size,
        "layers": layers,
        "shapes": shapes,
        "layouts": {name: desc for name, (_, _, desc) in zip(layers, layouts)},
        "preprocessing": pre_desc,
        "source": src.description,
    }
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(sidecar, f, indent=2)
        f.write("\n")
    for name, (_, _, desc) in zip(layers, layouts):
        print(f"{name}\t{'x'.join(str(d) for d in got[name].shape[1:])}\t{desc}")
    note(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB) and {json_path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="export.py",
        description="Export a vision model as a loupe TorchScript model (.pt) plus sidecar (.json).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="torchvision:NAME, timm:NAME, open_clip:NAME, lucent:inceptionv1 or module:callable")
    p.add_argument("--layers", default="all", help="comma-separated module names, or 'all' (default)")
    p.add_argument("--out", help="output .pt path (required unless --list-layers)")
    p.add_argument("--weights", choices=["none", "default"], default="none",
                   help="none: random weights (default); default: the library's pretrained weights")
    p.add_argument("--input-size", type=int, default=None,
                   help="side in px the model expects (default: the library's input size, else 224)")
    p.add_argument("--preprocess", choices=["auto", "imagenet", "inceptionv1", "none"], default="auto",
                   help="input normalisation baked into the model (default: auto)")
    p.add_argument("--name", help="model name for the sidecar (default: from --model)")
    p.add_argument("--no-tap", action="store_true", help="do not add the per-layer tap(x, layer) method")
    p.add_argument("--list-layers", action="store_true", help="print the accepted layer (module) names and exit")
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
