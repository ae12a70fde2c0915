"""Caching throughput and memory on the embedded default model.

    python benchmarks/cache_throughput.py [--tokens 131072] [--rss 50000 400000]

1. Throughput: the cache stage (capture + store writes) against the model's plain forward
   truncated after the site's layer, on the same windows in the same batches. Storage should
   cost under 10%: cache tokens/s >= 0.9x the plain forward.
2. Roofline: the forward's FLOPs per token against this machine's measured GEMM rate in the
   model dtype, so the absolute speed means something.
3. Memory: peak RSS of whole cache runs of different sizes (separate processes); it must not
   grow with the number of tokens cached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from sae_train import cache
from sae_train.cache import CacheConfig
from sae_train.data import TokenSpec, iter_documents, iter_windows
from sae_train.lm import LanguageModel
from sae_train.train.roofline import best_time

SITE = "blocks.8.hook_resid_post"


def plain_forward_seconds(lm: LanguageModel, windows: torch.Tensor, layer: int, batch: int) -> float:
    """Time of the decoder stack cut after `layer` (embeddings + layers 0..layer), no hooks."""
    base = lm.model.get_submodule("model")
    full = base.layers
    base.layers = full[: layer + 1]
    base.config.num_hidden_layers = layer + 1
    try:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(windows), batch):
                base(input_ids=windows[i : i + batch], use_cache=False)
        return time.perf_counter() - start
    finally:
        base.layers = full
        base.config.num_hidden_layers = len(full)


def flops_per_token(lm: LanguageModel, layers: int, context: int) -> float:
    """Matmul FLOPs per token of `layers` decoder layers: 2 x weights + attention scores/values."""
    per_layer = sum(p.numel() for p in lm.layers[0].parameters() if p.dim() == 2)
    attention = 2 * 2 * context * lm.d_model / 2  # QK^T and AV, causal (half the positions)
    return layers * (2 * per_layer + attention)


def peak_rss_child(tokens: int, out: Path) -> dict:
    """Run one cache job in a fresh process; return its peak RSS and throughput."""
    code = (
        "import json, resource, sys\n"
        "from sae_train import cache\n"
        "from sae_train.cache import CacheConfig\n"
        f"s = cache.run(CacheConfig(sites=['{SITE}'], n_tokens={tokens}, out_dir='{out}', progress=False))\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print(json.dumps({'tokens': s.n_tokens, 'peak_rss_mib': rss, 'tok_s': s.tokens_per_second}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131_072, help="tokens for the throughput comparison")
    parser.add_argument("--rss", type=int, nargs="*", default=[50_000, 400_000], help="cache sizes for the RSS check")
    parser.add_argument("--batch", type=int, default=CacheConfig.batch_size, help="tokens per forward (whole windows)")
    args = parser.parse_args()

    cfg = CacheConfig(sites=[SITE], n_tokens=args.tokens, batch_size=args.batch, progress=False)
    lm = LanguageModel.load(cfg.model)
    layer = lm.site(SITE).layer
    spec = TokenSpec.from_tokenizer(lm.tokenizer, cfg.text)
    windows = torch.stack(
        list(
            islice(
                iter_windows(iter_documents(cfg.data), lm.tokenizer, cfg.text, spec),
                args.tokens // cfg.text.context_size,
            )
        )
    )
    tokens = windows.numel()
    per_forward = max(1, args.batch // cfg.text.context_size)
    print(
        f"model {lm.identity['name']} ({lm.identity['dtype']}), site {SITE}, {tokens:,} tokens, "
        f"context {cfg.text.context_size}, {per_forward} windows/forward, {torch.get_num_threads()} threads"
    )

    plain_forward_seconds(lm, windows[:per_forward], layer, per_forward)  # warm-up
    plain = tokens / plain_forward_seconds(lm, windows, layer, per_forward)
    with tempfile.TemporaryDirectory() as tmp:
        summary = cache.run(
            CacheConfig(
                sites=[SITE], n_tokens=args.tokens, batch_size=args.batch, out_dir=f"{tmp}/acts", progress=False
            ),
            lm,
        )
    # The store drops BOS/separator rows; compare on tokens run through the model.
    cached = tokens / summary.seconds

    # The model's own widest GEMM shape (d_model x MLP width) in its dtype.
    a = torch.randn(4096, lm.d_model).to(lm.dtype)
    b = torch.randn(lm.d_model, lm.model.config.intermediate_size).to(lm.dtype)
    gemm_flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / best_time(lambda: a @ b, torch.device("cpu"), 5)
    model_flops = flops_per_token(lm, layer + 1, cfg.text.context_size)
    print(
        f"plain forward (layers 0..{layer})  {plain:10,.0f} tok/s   {plain * model_flops / gemm_flops:5.1%} of GEMM roofline"
    )
    print(
        f"cache stage (capture + store)   {cached:10,.0f} tok/s   {cached * model_flops / gemm_flops:5.1%} of GEMM roofline"
    )
    print(f"cache / plain                   {cached / plain:10.3f}   (target >= 0.9)")
    print(
        f"GEMM roofline: {gemm_flops / 1e9:,.0f} GFLOP/s ({lm.identity['dtype']}), {model_flops / 1e6:,.1f} MFLOP/token"
    )

    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rss:
            row = peak_rss_child(n, Path(tmp) / f"acts-{n}")
            print(
                f"cache {row['tokens']:>8,} tokens: peak RSS {row['peak_rss_mib']:7,.0f} MiB  ({row['tok_s']:,.0f} tok/s)"
            )


if __name__ == "__main__":
    main()
