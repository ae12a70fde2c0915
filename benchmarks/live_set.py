"""Live training of a whole transcoder set (or a CLT) on SmolLM2-135M: tokens/s against its bound.

    python benchmarks/live_set.py [--arch batchtopk|clt] [--tokens 16384] [--batch-size 4096]
                                  [--expansion-factor 2] [--k 16] [--no-skip] [--model NAME]

The run `benchmarks/transcoder_set.py` makes (`sae-train train source=live
sites=[blocks.*.mlp.hook_in] sae.target=blocks.{layer}.hook_mlp_out`: 30 skip transcoders, or
one CLT with --arch clt, from one forward pass over all 30 layers), timed in its parts:

  forward   the model to the last site, recording nothing (`LanguageModel.capture` of that site):
            the language model's own speed;
  block     one live block of `live_buffer_tokens` (8,192) tokens as training gets it: the
            forward recording all 60 sites, special tokens left out, shuffled, fp32
            (`LiveSource._block_rows`);
  steps     one optimizer step of every dictionary on a batch already in memory
            (`Trainer.train_step`);
  train     `Trainer.fit` over --tokens after the one-off initialisation (its final checkpoint
            write included): what a run sustains.

Both parts run one after the other on the same cores, so the bound on train is
1 / (1 / block + 1 / steps) tokens/s; train's fraction of it is the loop's own overhead.
Each part is timed once (the block and the steps after a warm-up): on a shared machine the
numbers are noisy, so compare two versions in the same minute.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from sae_train.lm import ModelConfig
from sae_train.sae import SAEConfig
from sae_train.train import TrainConfig, Trainer, build_source
from sae_train.train.dist import Dist


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="batchtopk", choices=["batchtopk", "clt"])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens trained in the timed run")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--expansion-factor", type=int, default=2, help="d_sae / 576 (per layer)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--no-skip", action="store_true", help="transcoders without W_skip (a CLT has none)")
    parser.add_argument("--model", default=ModelConfig().name, help="model.name (default: the embedded SmolLM2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            source="live",
            model=ModelConfig(name=args.model),
            sites=["blocks.*.mlp.hook_in"],
            sae=SAEConfig(
                architecture=args.arch,
                target="blocks.{layer}.hook_mlp_out",
                skip=args.arch != "clt" and not args.no_skip,
                k=args.k,
                expansion_factor=args.expansion_factor,
            ),
            n_tokens=args.tokens,
            batch_size=args.batch_size,
            live_buffer_tokens=8192,  # as benchmarks/transcoder_set.py: 60 sites x 576 fp32 is 138 KB a token
            init_tokens=args.batch_size,
            out_dir=str(Path(tmp) / "run"),
            progress=False,
        )
        dist = Dist(device=torch.device("cpu"))
        source = build_source(cfg, dist)
        lm = source.lm
        windows = list(islice(source._rank_windows(0, 1), source.windows_per_block))
        block_tokens = len(windows) * cfg.text.context_size
        per_forward = torch.stack(windows[:16])
        last = [lm.site(source.sites[-1])]
        lm.capture(last, per_forward[:1])  # warm-up
        forward = per_forward.numel() / seconds(lambda: lm.capture(last, per_forward))
        started = time.perf_counter()
        rows = source._block_rows(windows, 0, 0)
        block = block_tokens / (time.perf_counter() - started)
        batch = {site: x[: args.batch_size].clone() for site, x in rows.items()}
        del rows

        started = time.perf_counter()
        trainer = Trainer(cfg, source, dist)
        init = time.perf_counter() - started
        trainer.train_step(batch, 0)  # warm-up: first-touch of the optimizer state and buffers
        started = time.perf_counter()
        trainer.train_step(batch, 0)
        steps = args.batch_size / (time.perf_counter() - started)
        del batch, trainer  # its weights and Adam state: 5 GB for a 30-layer CLT at d_sae 1152
        gc.collect()

        trainer = Trainer(cfg, source, dist)  # a fresh run (nothing was saved: no checkpoint to resume)
        train = trainer.fit()

    bound = 1 / (1 / block + 1 / steps)
    n = len(trainer.slots)
    what = f"{n} transcoders" if args.arch != "clt" else f"1 CLT over {len(trainer.slots[0].layers)} layers"
    print(
        f"{what}: d_sae {args.expansion_factor * 576}, k {args.k}, batch {args.batch_size}; "
        f"{lm.identity['dtype']} model, {torch.get_num_threads()} threads"
    )
    print(f"forward   {forward:9,.0f} tok/s  (the model to the last site, recording nothing)")
    print(f"block     {block:9,.0f} tok/s  (forward recording {len(source.sites)} sites, then shuffled to fp32)")
    print(f"steps     {steps:9,.0f} tok/s  (one optimizer step of every dictionary)")
    print(f"bound     {bound:9,.0f} tok/s  (block and steps one after the other)")
    print(
        f"train     {train.tokens_per_second:9,.0f} tok/s  ({train.tokens:,} tokens, {train.tokens_per_second / bound:.0%} "
        f"of the bound; the one-off initialisation took {init:.0f} s more)"
    )


if __name__ == "__main__":
    main()
