#!/usr/bin/env python
"""Step-level training throughput and MFU: blockft_jax against PyTorch (torchvision), on a GPU.

  python scripts/gpu_check.py                       # both models, rows 'top' and 'all', 224 px,
                                                    # batch 256, bfloat16, on the GPU if any
  python scripts/gpu_check.py --device cpu --batch 4 --size 64 --steps 2 --width 0.35 \
      --python-torch /tmp/torchvenv/bin/python      # a smoke test on CPU

Rows: for each model of `--models` and each trained set of `--trainable`:
  top   the top block + the classifier head: mobilenet_v2 -> Keras `block_16*` (torchvision
        `features[17]`; Keras `Conv_1` = torchvision `features[18]` stays frozen), resnet50_v2 ->
        Keras `conv5_block3*` (torchvision `layer4[2]`)
  all   full fine-tuning (every layer)
  or a Keras layer-name prefix (e.g. block_16), as scripts/benchmark.py's --trainable.

blockft_jax  one run of the package's real engine (a cohort of one: cohort.Cohort(engine, 1)),
             set up by blockft_jax.benchmarking as scripts/benchmark.py's at `--no-cache` (the
             step level): models.create(..., dtype=bfloat16) (params stay float32),
             layer_table, random variables, groups' mask and BN modes, Adam 1e-3,
             train.Engine(..., cached=False): every step runs the frozen units below the lowest
             trained unit too. One batch, placed on the device once (cohort.feed), is reused
             every step (cohort.train_step), so the host loop is not measured. FLOPs per step:
             XLA's cost analysis of the compiled train step (`compiled.cost_analysis()`; the
             lowered, pre-optimisation count is printed too and used where the compiled one is
             missing or under half of it: XLA:GPU has under-counted library calls before).
blockft_jax_cohort  the same, for `--cohort` K runs (seeds 0..K-1) in one vmapped step, the
             search's main path: each run its own batch. images/s is all runs' (K x batch per
             step), printed per run too; FLOPs and MFU are the whole step's. Timed on every row
             but `all` (a search trains many top-of-network candidates in cohorts, one full).
torch        torchvision's model (mobilenet_v2; torchvision has no ResNet50V2: resnet50, i.e. v1
             post-activation bottlenecks: slightly different layers), a new Linear head of 5
             classes (no dropout, as blockft_jax's default), random weights, channels_last,
             torch.autocast(bfloat16), torch.compile of the model (uint8 -> [-1, 1]
             preprocessing included, as blockft_jax does it inside its step), Adam 1e-3 (fused on
             CUDA), frozen params requires_grad=False, BatchNorm of frozen layers in eval mode
             (Keras's rule), cudnn.benchmark on CUDA. Synthetic uint8 data on the device. FLOPs
             per step: torch.utils.flop_counter.FlopCounterMode over one eager step (convolutions
             and matmuls only).

All: a warm-up of `--warmup` steps (the first compiles; reported as compile_s), then `--steps`
steps timed (synchronised at both ends only): images/s = steps x batch / seconds. MFU = achieved
FLOP/s / the card's peak dense bf16 FLOP/s, from a small table by device name (or
`--peak-flops`); the assumed peak is printed. Each framework runs in its own subprocess, one after
the other, with its own interpreter (`--python-jax`, `--python-torch`; default this one); under
`--time-limit` each gets an equal share of what is left of its row.

The output ends, per row, with parseable lines:
  gpu_check model=M trainable=T framework=F images_per_s=X mfu=Y step_ms=... compile_s=... ...
                 (blockft_jax*: ... runs=K per_run_images_per_s=X ok=yes|no)
  ratio model=M trainable=T blockft_jax/torch=R target=1.2 met=yes|no
  cohort model=M trainable=T runs=K aggregate/single=R per_run/single=R
(`nan` where a framework failed or timed out; its error is printed above).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, installed or not
from blockft_jax import benchmarking as bench  # noqa: E402  (standard library only: torch's too)

# Run in this order: the cohort, an addition beside the comparison, gets what time is left.
FRAMEWORKS = ("blockft_jax", "torch", "blockft_jax_cohort")
MODELS = ("mobilenet_v2", "resnet50_v2")
TOP = {"mobilenet_v2": "block_16", "resnet50_v2": "conv5_block3"}
TORCH_ARCH = {"mobilenet_v2": "mobilenet_v2", "resnet50_v2": "resnet50"}
TORCH_TOP = {"mobilenet_v2": "features[17]", "resnet50_v2": "layer4[2]"}
TARGET_RATIO = 1.2


# Peak dense (no sparsity) bf16 tensor-core FLOP/s by device name: (lower-case substring of the
# name, label, FLOP/s). Order matters: the first match wins.
PEAK_BF16_DENSE = (
    ("gh200", "GH200", 989e12),
    ("h200", "H200", 989e12),
    ("h100 nvl", "H100 NVL", 835e12),
    ("h100 pcie", "H100 PCIe", 756e12),
    ("h100", "H100 SXM", 989e12),
    ("h800", "H800", 989e12),
    ("b200", "B200", 2250e12),
    ("a100", "A100", 312e12),
    ("l40s", "L40S", 362e12),
    ("l40", "L40", 181e12),
    ("l4", "L4", 121e12),
)


def peak_flops(device_name: str, override: float | None):
    """(FLOP/s or None, label) for a device name."""
    if override:
        return override, "--peak-flops"
    lowered = device_name.lower()
    for key, label, flops in PEAK_BF16_DENSE:
        if key in lowered:
            return flops, f"{label} bf16 dense"
    return None, "unknown device (no MFU)"


_T0 = time.perf_counter()


def _progress(message: str):
    """A worker's progress, on stderr: shown by the parent when the worker fails or times out."""
    print(f"[{time.perf_counter() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def _flops(cost) -> float:
    """'flops' from a cost analysis: a dict, a list of dicts (older JAX), or None."""
    if cost is None:
        return float("nan")
    if isinstance(cost, dict):
        cost = [cost]
    total = sum(float(c.get("flops", 0.0)) for c in cost if c)
    return total if total > 0 else float("nan")


# --- blockft_jax worker -----------------------------------------------------------------------

def run_blockft(a: dict, k: int) -> dict:
    """`k` runs of the row's candidate in one cohort (1: the single run), each stepping on
    its own batch placed on the device once."""
    import jax

    started = time.perf_counter()
    job = bench.setup(a["model"], a["trainable"], size=a["size"], width=a["width"],
                      seed=a["seed"], dtype=a["dtype"], cache=False)
    runs = job.start(k)
    images, labels = bench.synthetic_data(k * a["batch"], a["size"], a["seed"])
    fed = runs.feed(images.reshape(k, a["batch"], *images.shape[1:]),
                    labels.reshape(k, a["batch"]))
    jax.block_until_ready((runs.state, fed))
    setup_s = time.perf_counter() - started
    _progress(f"blockft_jax set up ({k} run(s), from_unit={job.from_unit}, "
              f"{len(job.layers)} layers) on {jax.devices()[0]}; compiling the train step ...")

    # Compile (ahead of time, for the cost analysis; the jitted step reuses the executable).
    t0 = time.perf_counter()
    lowered = runs.lower(fed)
    compiled = lowered.compile()
    lower_compile_s = time.perf_counter() - t0
    _progress(f"compiled in {lower_compile_s:.1f} s; warm-up steps ...")
    flops_compiled = _flops(compiled.cost_analysis())
    try:
        flops_lowered = _flops(lowered.cost_analysis())
    except Exception:  # not every JAX has it
        flops_lowered = float("nan")
    if math.isfinite(flops_compiled) and not (flops_compiled < 0.5 * flops_lowered):
        flops, flops_source = flops_compiled, "XLA cost_analysis (compiled)"
    else:
        flops, flops_source = flops_lowered, "XLA cost_analysis (lowered; compiled count " \
                                             f"{flops_compiled:.3g} looked wrong)"
    memory = {}
    try:
        m = compiled.memory_analysis()
        memory = {field: int(getattr(m, field)) for field in (
            "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
            if hasattr(m, field)}
    except Exception:
        pass

    t0 = time.perf_counter()
    for _ in range(a["warmup"]):
        metrics = runs.step(fed)
    jax.block_until_ready((runs.state, metrics))
    warmup_s = time.perf_counter() - t0
    _progress(f"warm-up {warmup_s:.1f} s; timing {a['steps']} steps ...")

    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        metrics = runs.step(fed)
    jax.block_until_ready(runs.state)
    wall = time.perf_counter() - t0
    loss = float(jax.device_get(metrics["loss"])[0])

    device = jax.devices()[0]
    name = getattr(device, "device_kind", str(device))
    peak, peak_label = peak_flops(name, a.get("peak_flops"))
    step_s = wall / a["steps"]
    per_run = a["steps"] * a["batch"] / wall
    return {"images_per_s": k * per_run, "per_run_images_per_s": per_run, "runs": k,
            "step_ms": 1e3 * step_s,
            "compile_s": lower_compile_s + warmup_s, "lower_compile_s": lower_compile_s,
            "warmup_s": warmup_s, "setup_s": setup_s, "timed_s": wall,
            "flops_per_step": flops, "flops_source": flops_source,
            "flops_compiled": flops_compiled, "flops_lowered": flops_lowered,
            "mfu": flops / step_s / peak if peak and math.isfinite(flops) else float("nan"),
            "peak_flops": peak, "peak_label": peak_label, "device_name": name,
            "loss": loss, "level": "step (no prefix cache)", "from_unit": job.from_unit,
            "units": job.units, "compilations": runs.compilations,
            "trained_layers": list(job.layers), "batch_stat_bn": job.batch_stat_bn,
            "trainable_params": job.trainable_params, "memory": memory,
            "versions": {"jax": jax.__version__, "backend": jax.default_backend(),
                         "device": str(device), "device_count": jax.device_count()}}


# --- torch worker -----------------------------------------------------------------------------

def torch_keras_names(arch: str, net) -> dict[str, list[str]]:
    """{torchvision module with parameters of its own: the Keras layers it stands for}. Raises
    if a module with parameters is left unmapped (the mapping must cover the whole model)."""
    names: dict[str, list[str]] = {}
    if arch == "mobilenet_v2":
        names["features.0.0"], names["features.0.1"] = ["Conv1"], ["bn_Conv1"]
        p, f = "expanded_conv_", "features.1.conv."  # Keras block 0: no expansion
        names.update({f + "0.0": [p + "depthwise"], f + "0.1": [p + "depthwise_BN"],
                      f + "1": [p + "project"], f + "2": [p + "project_BN"]})
        for i in range(1, 17):  # Keras block_i = torchvision features[i + 1]
            p, f = f"block_{i}_", f"features.{i + 1}.conv."
            names.update({f + "0.0": [p + "expand"], f + "0.1": [p + "expand_BN"],
                          f + "1.0": [p + "depthwise"], f + "1.1": [p + "depthwise_BN"],
                          f + "2": [p + "project"], f + "3": [p + "project_BN"]})
        names["features.18.0"], names["features.18.1"] = ["Conv_1"], ["Conv_1_bn"]
        names["classifier"] = ["head"]
    elif arch == "resnet50":
        # v1 (torchvision) vs v2 (Keras): v1's stem BN and each bottleneck's bn3 (after conv3)
        # and shortcut BN have no v2 counterpart; they go with the conv they follow. v2's
        # preact_bn and post_bn have no v1 counterpart.
        names["conv1"], names["bn1"] = ["conv1_conv"], ["conv1_conv"]
        for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3)):
            for b in range(1, blocks + 1):
                p, f = f"conv{stage}_block{b}_", f"layer{stage - 1}.{b - 1}."
                names.update({f + "conv1": [p + "1_conv"], f + "bn1": [p + "1_bn"],
                              f + "conv2": [p + "2_conv"], f + "bn2": [p + "2_bn"],
                              f + "conv3": [p + "3_conv"], f + "bn3": [p + "3_conv"]})
                if b == 1:
                    names[f + "downsample.0"] = [p + "0_conv"]
                    names[f + "downsample.1"] = [p + "0_conv"]
        names["fc"] = ["head"]
    else:
        raise ValueError(f"No torch mapping for {arch!r}")
    owners = {n for n, m in net.named_modules() if list(m.parameters(recurse=False))}
    if owners != set(names):
        raise RuntimeError(f"torch mapping out of date: unmapped {sorted(owners - set(names))[:5]}"
                           f", missing {sorted(set(names) - owners)[:5]}")
    return names


def _flop_counter():
    """torch's FlopCounterMode, with the weight gradient of grouped (depthwise) convolutions
    counted right: its formula ignores `groups` there, counting a depthwise conv's weight
    gradient `channels` times over."""
    import torch
    from torch.utils import flop_counter as fc

    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding,
                           _dilation, transposed, _output_padding, groups, output_mask,
                           out_shape=None, **kwargs) -> int:
        flops = 0
        if output_mask[0]:  # grad_input: a (transposed) conv with the grouped weight: exact
            flops += fc.conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
        if output_mask[1]:  # grad_weight: counted as a dense conv; only 1/groups of it is real
            if transposed:
                dense = fc.conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), False)
            else:
                dense = fc.conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), False)
            flops += dense // max(int(groups), 1)
        return flops

    try:
        return fc.FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten.convolution_backward: conv_backward_flop})
    except TypeError:  # an older torch without custom_mapping
        return fc.FlopCounterMode(display=False)


def run_torch(a: dict) -> dict:
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn

    started = time.perf_counter()
    if a["device"] == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:  # random weights + frozen BN: tiny activations; denormals crawl on CPUs (not GPUs)
        torch.set_flush_denormal(True)
    torch.manual_seed(a["seed"])
    arch = TORCH_ARCH[a["model"]]
    if arch == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=a["width"])
        net.classifier = nn.Linear(net.last_channel, bench.NUM_CLASSES)
    else:
        if a["width"] != 1.0:
            print("note: --width does not apply to resnet50", file=sys.stderr)
        net = torchvision.models.resnet50(weights=None)
        net.fc = nn.Linear(net.fc.in_features, bench.NUM_CLASSES)
    keras_names = torch_keras_names(arch, net)
    head = "classifier" if arch == "mobilenet_v2" else "fc"
    trained = [n for n, ks in keras_names.items()
               if n == head or any(bench.in_trained_set(k, a["trainable"]) for k in ks)]
    for p in net.parameters():
        p.requires_grad_(False)
    for n in trained:
        for p in net.get_submodule(n).parameters(recurse=False):
            p.requires_grad_(True)
    net.train()
    batch_stat_bn = []
    for n, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if n in trained:
                batch_stat_bn.append(n)
            else:
                m.eval()  # Keras's rule: BN of frozen layers runs in inference mode

    class Preprocessed(nn.Module):
        """uint8 NHWC -> [-1, 1] NCHW (channels_last strides) -> the network."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(images.permute(0, 3, 1, 2).float() / 127.5 - 1.0)

    model = Preprocessed(net).to(device, memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {"fused": True} if cuda else {}
    opt = torch.optim.Adam(params, lr=1e-3, **opt_kwargs)
    images = torch.randint(0, 256, (a["batch"], a["size"], a["size"], 3), dtype=torch.uint8,
                           device=device)
    labels = torch.randint(0, bench.NUM_CLASSES, (a["batch"],), device=device)
    amp = a["dtype"] == "bfloat16"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def loss_of(m):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = m(images)
        return F.cross_entropy(logits.float(), labels)

    # FLOPs of one step (eager; convolutions and matmuls), then gradients dropped.
    counter = _flop_counter()
    with counter:
        loss_of(model).backward()
    flops = float(counter.get_total_flops())
    opt.zero_grad(set_to_none=True)
    sync()
    setup_s = time.perf_counter() - started
    _progress(f"torch set up on {device} ({len(trained)} trained modules, {flops:.3g} FLOPs/step)"
              f"; first step{' (torch.compile)' if a['torch_compile'] else ''} ...")

    compiled_model = torch.compile(model) if a["torch_compile"] else model

    def step():
        loss = loss_of(compiled_model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - t0
    _progress(f"first step {first_step_s:.1f} s; warm-up ...")
    for _ in range(a["warmup"] - 1):
        step()
    sync()
    compile_s = time.perf_counter() - t0

    try:  # idle compile workers would only compete for the CPU with the timed steps
        from torch._inductor.async_compile import shutdown_compile_workers
        shutdown_compile_workers()
    except Exception:
        pass

    _progress(f"warm-up done ({compile_s:.1f} s); timing {a['steps']} steps ...")
    t0 = time.perf_counter()
    for _ in range(a["steps"]):
        loss = step()
    sync()
    wall = time.perf_counter() - t0
    loss = float(loss.detach().float().cpu())

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak, peak_label = peak_flops(name, a.get("peak_flops"))
    step_s = wall / a["steps"]
    memory = {"max_allocated_bytes": int(torch.cuda.max_memory_allocated(device))} if cuda else {}
    keras_trained = sorted({k for n in trained if n != head for k in keras_names[n]})
    return {"images_per_s": a["steps"] * a["batch"] / wall, "step_ms": 1e3 * step_s,
            "compile_s": compile_s, "first_step_s": first_step_s, "setup_s": setup_s,
            "timed_s": wall, "flops_per_step": flops,
            "flops_source": "torch FlopCounterMode (conv/matmul only; grouped-conv fix)",
            "mfu": flops / step_s / peak if peak else float("nan"),
            "peak_flops": peak, "peak_label": peak_label, "device_name": name, "loss": loss,
            "torch_model": f"torchvision.models.{arch}", "torch_compile": a["torch_compile"],
            "adam": "fused" if opt_kwargs else "default",
            "trained_modules": [n for n in trained],
            "trained_keras_layers": keras_trained,
            "batch_stat_bn": batch_stat_bn,
            "trainable_params": int(sum(p.numel() for p in params)),
            "memory": memory,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "cuda": torch.version.cuda, "device": name}}


def worker(fw: str, a: dict):
    if fw == "torch":
        bench.report(lambda: run_torch(a))
    else:
        bench.report(lambda: run_blockft(a, a["cohort"] if fw == "blockft_jax_cohort" else 1))


# --- parent -----------------------------------------------------------------------------------

def launch(fw: str, a: dict, python: str, timeout: float) -> dict:
    """Runs one framework in its own subprocess (own session: killed whole on timeout)."""
    # JAX on the device asked for ('cpu' or 'cuda'); with 'auto', as this environment says.
    platforms = {"JAX_PLATFORMS": a["device"]} if fw != "torch" and a["device"] != "auto" else {}
    cmd = [python, os.path.abspath(__file__), "--worker", fw, "--worker-args", json.dumps(a)]
    print(f"[{a['model']} {a['trainable']}] running {fw} ({python}, time limit {timeout:.0f} s)"
          " ...", file=sys.stderr, flush=True)
    return bench.launch(cmd, env=bench.worker_env(**platforms), timeout=timeout)


def _g(value, spec=".4g"):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "nan"
    return format(value, spec)


def print_row(model, trainable, frameworks, results, args):
    print(f"## {model} trainable={trainable}  (batch {args.batch}, {args.size} px, {args.dtype}, "
          f"width {args.width}, {args.steps} timed steps after {args.warmup} warm-up)")
    if "torch" in frameworks:
        where = TORCH_TOP.get(model) if trainable == TOP.get(model) else None
        print(f"   torch model: torchvision.models.{TORCH_ARCH[model]}"
              + (f"; Keras {trainable}* ~ torchvision {where}" if where else ""))
        if model == "resnet50_v2":
            print("   NOTE: torchvision has no ResNet50V2; torch runs torchvision resnet50 (v1, "
                  "post-activation bottlenecks, stride in the first block of a stage, BN "
                  "instead of conv biases): the architecture differs slightly.")
    for fw in frameworks:
        r = results[fw]
        if not r.get("ok"):
            print(f"   {fw} FAILED: {r.get('error')}")
            for line in r.get("log", "").strip().splitlines()[-20:]:
                print(f"      | {line}")
            continue
        print(f"   {fw}: {r['images_per_s']:.1f} images/s, {r['step_ms']:.2f} ms/step, "
              f"compile (warm-up) {r['compile_s']:.1f} s, setup {r['setup_s']:.1f} s, "
              f"process {r['process_s']:.1f} s, final loss {r['loss']:.4f}")
        print(f"      device {r['device_name']!r}; peak {_g(r['peak_flops'])} FLOP/s "
              f"({r['peak_label']}); versions {r['versions']}")
        images_per_step = args.batch * r.get("runs", 1)
        print(f"      FLOPs/step {_g(r['flops_per_step'])} ({r['flops_source']}), "
              f"{_g(r['flops_per_step'] / images_per_step / 1e9)} GFLOP/image; "
              f"MFU {_g(r['mfu'])}"
              + (f"; memory {r['memory']}" if r.get("memory") else ""))
        if fw == "blockft_jax_cohort":
            print(f"      {r['runs']} runs in one vmapped step: "
                  f"{r['per_run_images_per_s']:.1f} images/s per run, "
                  f"{r['images_per_s']:.1f} in all")
        if fw != "torch":
            print(f"      engine: from_unit={r['from_unit']} of {r['units']} units, "
                  f"{r['level']}, compilations={r['compilations']}, lower+compile "
                  f"{r['lower_compile_s']:.1f} s + {args.warmup} warm-up steps "
                  f"{r['warmup_s']:.1f} s; flops compiled {_g(r['flops_compiled'])}, lowered "
                  f"{_g(r['flops_lowered'])}")
            layers = r["trained_layers"]
            print(f"      trained Keras layers ({len(layers)} + head): "
                  + (", ".join(layers) if len(layers) <= 12 else
                     ", ".join(layers[:6]) + ", ..., " + ", ".join(layers[-4:])))
        else:
            mods = r["trained_modules"]
            print(f"      {r['torch_model']}, torch.compile={r['torch_compile']}, "
                  f"adam={r['adam']}, first step {r['first_step_s']:.1f} s")
            print(f"      trained torch modules ({len(mods)}, head included): "
                  + (", ".join(mods) if len(mods) <= 12 else
                     ", ".join(mods[:6]) + ", ..., " + ", ".join(mods[-4:])))
        print(f"      trainable params {r['trainable_params']:,}; BN with batch statistics: "
              f"{len(r['batch_stat_bn'])}")
    ours, theirs = results.get("blockft_jax", {}), results.get("torch", {})
    if ours.get("ok") and theirs.get("ok"):
        a, b = set(ours["trained_layers"]), set(theirs["trained_keras_layers"])
        if a == b:
            print(f"   parity: the same {len(a)} Keras layers (+ head) train on both sides")
        else:
            print(f"   parity: trained Keras layers differ: only blockft_jax {sorted(a - b)[:8]}"
                  f"{' ...' if len(a - b) > 8 else ''}, only torch (mapped) {sorted(b - a)[:8]}"
                  f"{' ...' if len(b - a) > 8 else ''}"
                  + (" (expected for resnet50 v1 vs v2)" if model == "resnet50_v2" else ""))
        print(f"   parity: trainable params blockft_jax {ours['trainable_params']:,} vs torch "
              f"{theirs['trainable_params']:,}")
        if math.isfinite(ours["flops_per_step"]) and ours.get("peak_flops"):
            # the same model-FLOP count for both: utilisation comparable across frameworks
            cross = ours["flops_per_step"] / args.batch * theirs["images_per_s"] \
                / ours["peak_flops"]
            print(f"   torch MFU at blockft_jax's XLA FLOP count: {_g(cross)}")
        if math.isfinite(theirs["flops_per_step"]) and ours.get("peak_flops"):
            cross = theirs["flops_per_step"] / args.batch * ours["images_per_s"] \
                / ours["peak_flops"]
            print(f"   blockft_jax MFU at torch's FLOP count (conv/matmul only): {_g(cross)}")
    for fw in frameworks:
        r = results[fw]
        ok = r.get("ok")
        get = lambda k, spec=".4g": _g(r.get(k) if ok else None, spec)
        extra = (f" torch_model={TORCH_ARCH[model]}" if fw == "torch" else
                 f" runs={r.get('runs', 'nan') if ok else 'nan'} "
                 f"per_run_images_per_s={get('per_run_images_per_s', '.2f')}")
        print(f"gpu_check model={model} trainable={trainable} framework={fw} "
              f"images_per_s={get('images_per_s', '.2f')} mfu={get('mfu')} "
              f"step_ms={get('step_ms', '.3f')} compile_s={get('compile_s', '.1f')} "
              f"trainable_params={r.get('trainable_params', 'nan') if ok else 'nan'} "
              f"flops_per_step={get('flops_per_step')} batch={args.batch} size={args.size} "
              f"dtype={args.dtype}{extra} ok={'yes' if ok else 'no'}")
    rate = lambda r, key="images_per_s": r[key] if r.get("ok") else float("nan")
    if {"blockft_jax", "torch"} <= set(frameworks):
        ratio = rate(ours) / rate(theirs)
        met = "nan" if not math.isfinite(ratio) else ("yes" if ratio >= TARGET_RATIO else "no")
        print(f"ratio model={model} trainable={trainable} blockft_jax/torch={_g(ratio, '.3f')} "
              f"target={TARGET_RATIO} met={met}")
    if {"blockft_jax", "blockft_jax_cohort"} <= set(frameworks):
        cohort = results["blockft_jax_cohort"]
        print(f"cohort model={model} trainable={trainable} runs={args.cohort} "
              f"aggregate/single={_g(rate(cohort) / rate(ours), '.3f')} "
              f"per_run/single={_g(rate(cohort, 'per_run_images_per_s') / rate(ours), '.3f')}")
    print(flush=True)


def row_frameworks(frameworks, trainable: str, cohort: int) -> list[str]:
    """The frameworks a row runs, in FRAMEWORKS order. Full fine-tuning ('all') gets no cohort
    row: a search trains many top-of-network candidates in cohorts but one full candidate, and
    K full runs would take most of the check's time."""
    return [fw for fw in FRAMEWORKS if fw in frameworks and (
        fw != "blockft_jax_cohort" or cohort > 0 and trainable != "all")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--trainable", default="top,all",
                        help="comma-separated: 'top' (the model's top block), 'all', 'head', or "
                             "a Keras layer-name prefix (block_16, conv5_block3)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps (the first compiles)")
    parser.add_argument("--width", type=float, default=1.0, help="MobileNetV2's alpha/width_mult")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--cohort", type=int, default=8,
                        help="runs in blockft_jax_cohort's vmapped step (rows other than "
                             "'all'); 0: no cohort row")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--python-jax", default=sys.executable)
    parser.add_argument("--python-torch", default=sys.executable)
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="eager PyTorch (for a CPU try without a working compiler only)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="override the peak FLOP/s used for MFU")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for this whole invocation; each worker gets what is left")
    parser.add_argument("--worker-timeout", type=float, default=1800.0,
                        help="seconds allowed to each framework's subprocess")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return worker(args.worker, json.loads(args.worker_args))

    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS))
    if unknown or not frameworks:
        parser.error(f"--frameworks: unknown {unknown}; choose from {','.join(FRAMEWORKS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = sorted(set(models) - set(MODELS))
    if bad or not models:
        parser.error(f"--models: unknown {bad}; choose from {','.join(MODELS)}")
    for value, name in ((args.batch, "--batch"), (args.size, "--size"), (args.steps, "--steps"),
                        (args.warmup, "--warmup")):
        if value < 1:
            parser.error(f"{name} must be >= 1")
    if args.cohort < 0:
        parser.error("--cohort must be >= 0")
    trainables = [t.strip() for t in args.trainable.split(",") if t.strip()]

    rows = [(model, TOP[model] if t == "top" else t) for model in models for t in trainables]
    for index, (model, trainable) in enumerate(rows):
        row_deadline = None
        if deadline is not None:  # an equal share of what is left to each row left
            row_deadline = time.monotonic() + (deadline - time.monotonic()) / (len(rows) - index)
        row = row_frameworks(frameworks, trainable, args.cohort)
        results = {}
        for position, fw in enumerate(row):
            a = {"model": model, "trainable": trainable, "batch": args.batch,
                 "size": args.size, "steps": args.steps, "warmup": args.warmup,
                 "width": args.width, "dtype": args.dtype, "device": args.device,
                 "torch_compile": not args.no_torch_compile, "peak_flops": args.peak_flops,
                 "seed": args.seed, "cohort": args.cohort}
            timeout = args.worker_timeout
            if row_deadline is not None:  # an equal share of what is left of the row
                left = row_deadline - time.monotonic() - 1.0
                timeout = min(timeout, left / (len(row) - position))
            if timeout < 5:
                results[fw] = {"ok": False, "error": "skipped: --time-limit used up"}
                continue
            python = args.python_torch if fw == "torch" else args.python_jax
            results[fw] = launch(fw, a, python, timeout)
        print_row(model, trainable, row, results, args)


if __name__ == "__main__":
    main()
