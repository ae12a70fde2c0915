"""Training throughput on a GPU (or, as a smoke test, the CPU) against the device's own GEMM
bound, with a per-phase breakdown, peak memory, sparsify on the same device, and the
microbenchmarks the step is made of. Writes JSON + markdown.

    python benchmarks/gpu_train_throughput.py                       # CUDA, the reference size
    python benchmarks/gpu_train_throughput.py --batch 32768         # where Adam amortises
    python benchmarks/gpu_train_throughput.py --device cpu --small  # smoke test anywhere
    python benchmarks/gpu_train_throughput.py --store runs/acts     # batches from a store (bf16 on disk)

Workload: TopK and ReLU at d_in 2304 (Gemma-2-2B's residual), d_sae 65536, k 64, batch 8192,
bf16 GEMMs with fp32 master weights (the default precision on CUDA), synthetic LM-like data
made on the device (`--store`: real batches through the trainer's input pipeline instead). Our
number is the trainer's real step (`Trainer.train_step`). The bound is measured on the same
device in the same run (`sae_train/train/roofline.py`): the encoder GEMM for TopK, the five
GEMMs for ReLU; `bound_fraction` = bound / step. The phase breakdown times the SAE's forward,
its backward and the optimizer step separately (CUDA events, one synchronisation per step), and
calls the rest of `train_step` (statistics, dead-latent tracking, input) "trainer".
Microbenchmarks: `torch.topk` (k of d_sae 65k/131k, fp32 and bf16), `F.embedding_bag` forward
and backward (the sparse decode), torch's fused Adam at 300M parameters. `--small` scales every
size down (CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from sae_train.sae import SAEConfig
from sae_train.train import TrainConfig, Trainer
from sae_train.train.dist import Dist
from sae_train.train.roofline import best_time, step_gemm_seconds
from sae_train.train.update import update

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import FixedBatch, sparsify_step  # noqa: E402  (the sibling benchmark's pieces)

FULL = {
    "d_in": 2304,
    "d_sae": 65536,
    "k": 64,
    "batch": 8192,
    "topk_widths": [65536, 131072],
    "adam_params": 300_000_000,
}
SMALL = {"d_in": 256, "d_sae": 4096, "k": 32, "batch": 1024, "topk_widths": [4096, 8192], "adam_params": 3_000_000}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Marks:
    """Named points in a stream of work: CUDA events on a GPU (no synchronisation until
    `seconds`), wall-clock times on a CPU (where every op is synchronous anyway)."""

    def __init__(self, device: torch.device):
        self.cuda, self.points = device.type == "cuda", []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def seconds(self) -> dict[str, float]:
        """Seconds from each mark to the next, summed by the later mark's name."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.points, self.points[1:]):
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def peak_memory(device: torch.device) -> float:
    """Peak bytes: allocated by torch on a GPU (since the last reset), process RSS on a CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def synthetic(batch: int, d_in: int, device: torch.device) -> torch.Tensor:
    """LM-like activations made on the device: offset mean, heavy-tailed norms, a few massive dims."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, d_in, generator=gen, device=device)
    x *= torch.empty(batch, 1, device=device).exponential_(1.0, generator=gen)
    x[:, :4] *= 20
    return x + torch.randn(d_in, generator=gen, device=device)


def make_trainer(arch: str, size: dict, dtype: str, device: torch.device, tmp: Path, store: str | None) -> Trainer:
    """The trainer on a fixed synthetic batch made on the device, or on a store's first site
    (then d_in is the store's)."""
    dist = Dist(device=device)
    if store:
        from sae_train.train.sources import StoreSource

        source = StoreSource(store, [], size["batch"], dist, seed=0, window_shards=8)
        source.sites = source.sites[:1]
    else:
        source = FixedBatch(synthetic(size["batch"], size["d_in"], device))
    sae = SAEConfig(architecture=arch, k=size["k"], d_sae=size["d_sae"], l1_coefficient=1e-3)
    cfg = TrainConfig(
        store=store or "-",
        out_dir=str(tmp / arch),
        n_tokens=10**12,
        batch_size=size["batch"],
        dtype=dtype,
        device=device.type,
        progress=False,
        resume=False,
        init_tokens=size["batch"],
        dead_after_tokens=10**15,
        sae=sae,
    )  # no dead latents: AuxK off, as in sparsify's step
    return Trainer(cfg, source, dist)


def time_ours(
    arch: str, size: dict, dtype: str, device: torch.device, tmp: Path, store: str | None, steps: int, warmup: int
) -> dict:
    """The trainer's step: tokens/s over `steps` back-to-back steps, peak memory, phases."""
    trainer = make_trainer(arch, size, dtype, device, tmp, store)
    batches = trainer.source.batches(0)
    for _ in range(warmup):
        trainer.train_step(next(batches), 0)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches), 0)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    peak = peak_memory(device)
    phases = time_phases(trainer, next(batches), steps, device)
    phases["trainer"] = max(step_s - sum(phases.values()), 0.0)
    return {
        "step_s": step_s,
        "tokens_per_s": size["batch"] / step_s,
        "peak_bytes": peak,
        "phases_s": phases,
        "d_in": trainer.runs[0].sae.cfg.d_in,
    }


def time_phases(trainer: Trainer, batch: dict[str, torch.Tensor], steps: int, device: torch.device) -> dict[str, float]:
    """Mean seconds of the SAE's forward, backward and optimizer step, marked on the stream."""
    run = trainer.runs[0]
    x = batch[run.site].to(device, non_blocking=True).float() * run.scale
    marks = Marks(device)
    for _ in range(steps):
        marks.mark("start")
        out = run.sae(x, dead_mask=run.dead_mask(trainer.cfg.dead_after_tokens))
        marks.mark("forward")
        out.losses["loss"].backward()
        marks.mark("backward")
        update(run.sae, run.optimizer, trainer.cfg.grad_clip)
        run.optimizer.zero_grad(set_to_none=True)
        marks.mark("optimizer")
    seconds = marks.seconds()
    return {name: seconds.get(name, 0.0) / steps for name in ("forward", "backward", "optimizer")}


def time_sparsify(size: dict, dtype: str, device: torch.device, steps: int, warmup: int) -> dict | None:
    """sparsify's SparseCoder (TopK): forward, backward, its gradient projection, Adam, norm."""
    x = synthetic(size["batch"], size["d_in"], device)
    step = sparsify_step(x / x.norm(dim=1).mean(), size["d_sae"], size["k"], dtype, fused_adam=True)
    if step is None:
        return None

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    return {"step_s": step_s, "tokens_per_s": size["batch"] / step_s}


def _topk_seconds(batch: int, width: int, k: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    z = torch.randn(batch, width, device=device).to(dtype)
    return best_time(lambda: z.topk(k, dim=1, sorted=False), device, repeats)


def _embedding_bag_seconds(
    batch: int, k: int, d_sae: int, d_in: int, device: torch.device, repeats: int
) -> tuple[float, float]:
    """(forward, forward + backward) of the sparse decode: k rows of a bf16 [d_sae, d_in] table per token."""
    table = torch.randn(d_sae, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, d_sae, (batch, k), device=device)
    vals = torch.rand(batch, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, d_in, device=device, dtype=torch.bfloat16)

    def forward_backward() -> torch.Tensor:
        y = F.embedding_bag(idx, table, per_sample_weights=vals, mode="sum")
        y.backward(grad)
        table.grad = vals.grad = None
        return y

    forward = best_time(lambda: F.embedding_bag(idx, table, per_sample_weights=vals, mode="sum"), device, repeats)
    return forward, best_time(forward_backward, device, repeats)


def _adam_seconds(n: int, device: torch.device, repeats: int) -> float:
    param = torch.nn.Parameter(torch.randn(n, device=device))
    param.grad = torch.randn(n, device=device)
    adam = torch.optim.Adam([param], lr=1e-4, fused=True)
    return best_time(lambda: adam.step(), device, repeats)


def micro(size: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of the step's building blocks at this size (best of `repeats`)."""
    out: dict[str, float] = {}
    batch, d_in, d_sae, k = size["batch"], size["d_in"], size["d_sae"], size["k"]
    for width in size["topk_widths"]:
        for dtype in (torch.float32, torch.bfloat16):
            out[f"topk {batch}x{width} k{k} {str(dtype)[6:]}"] = _topk_seconds(batch, width, k, dtype, device, repeats)
    forward, both = _embedding_bag_seconds(batch, k, d_sae, d_in, device, repeats)
    out[f"embedding_bag forward {batch}x{k} of {d_sae}x{d_in} bf16"] = forward
    out[f"embedding_bag forward+backward {batch}x{k} of {d_sae}x{d_in} bf16"] = both
    n = size["adam_params"]
    out[f"fused Adam step, {n / 1e6:.0f}M fp32 parameters"] = _adam_seconds(n, device, repeats)
    return out


def markdown(report: dict) -> str:
    size, lines = report["size"], []
    lines.append(f"# GPU training throughput: {report['device_name']} ({report['device']})")
    lines.append("")
    lines.append(
        f"{report['date']}, torch {report['torch']}, {report['dtype']} GEMMs, d_in {size['d_in']}, "
        f"d_sae {size['d_sae']}, k {size['k']}, batch {size['batch']}, data {report['data']}."
    )
    lines.append(f"Command: `{report['command']}`")
    lines.append("")
    lines.append(
        "| arch | step ms | tok/s | bound ms | bound fraction | peak GiB | forward ms | backward ms | optimizer ms | trainer ms |"
    )
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch, r in report["results"].items():
        p = r["phases_s"]
        lines.append(
            f"| {arch} | {r['step_s'] * 1e3:.2f} | {r['tokens_per_s']:,.0f} | {r['bound_s'] * 1e3:.2f} | "
            f"{r['bound_fraction']:.1%} | {r['peak_bytes'] / 2**30:.2f} | {p['forward'] * 1e3:.2f} | "
            f"{p['backward'] * 1e3:.2f} | {p['optimizer'] * 1e3:.2f} | {p['trainer'] * 1e3:.2f} |"
        )
    if report.get("sparsify"):
        s = report["sparsify"]
        ours = report["results"].get("topk")
        ratio = f", ours {ours['tokens_per_s'] / s['tokens_per_s']:.1f}x" if ours else ""
        lines += [
            "",
            f"sparsify SparseCoder (TopK, same size and device): {s['step_s'] * 1e3:.2f} ms/step, "
            f"{s['tokens_per_s']:,.0f} tok/s{ratio}.",
        ]
    if report.get("micro"):
        lines += ["", "| microbenchmark | ms |", "| --- | ---: |"]
        lines += [f"| {name} | {seconds * 1e3:.3f} |" for name, seconds in report["micro"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda | cuda:N | cpu | auto (cuda when present)")
    parser.add_argument(
        "--arch", nargs="*", default=["topk", "relu"], choices=["topk", "batchtopk", "relu", "jumprelu"]
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--small", action="store_true", help="scaled-down sizes (a CPU smoke test)")
    for name in ("d_in", "d_sae", "k", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override {name}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--store", default=None, help="take batches from this activation store (first site)")
    parser.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--others", action=argparse.BooleanOptionalAction, default=True, help="also time sparsify")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON and markdown reports")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    size = dict(SMALL if args.small else FULL)
    size.update({k: getattr(args, k) for k in ("d_in", "d_sae", "k", "batch") if getattr(args, k) is not None})
    report = {
        "benchmark": "gpu_train_throughput",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "size": size,
        "data": f"store {args.store}" if args.store else "synthetic, on the device",
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(["python", __file__, *argv]),
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            result = time_ours(arch, size, args.dtype, device, Path(tmp), args.store, args.steps, args.warmup)
            bound = step_gemm_seconds(
                arch, size["batch"], result["d_in"], size["d_sae"], getattr(torch, args.dtype), device
            )
            result.update(bound_s=bound, bound_fraction=bound / result["step_s"])
            report["results"][arch] = result
            print(
                f"{arch:9s} {result['step_s'] * 1e3:8.2f} ms/step  {result['tokens_per_s']:12,.0f} tok/s  "
                f"{result['bound_fraction']:6.1%} of the bound  peak {result['peak_bytes'] / 2**30:.2f} GiB",
                flush=True,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.others and "topk" in args.arch:
        report["sparsify"] = time_sparsify(size, args.dtype, device, args.steps, args.warmup)
    if args.micro:
        report["micro"] = micro(size, device, max(3, args.steps // 4))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in report["device_name"]).strip("-").lower()
    stem = out / f"gpu_train_throughput-{device.type}-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    return report


if __name__ == "__main__":
    main()
