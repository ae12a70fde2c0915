"""Quality of our defaults against SAELens's and sparsify's on the same activation rows.

    python benchmarks/quality_vs_others.py --store runs/demo/acts --tc-store runs/acts2 --out runs/quality
        [--tokens 1000000] [--eval-tokens 20000] [--pairs matryoshka batchtopk topk transcoder]

Quick check: `--tokens 50000 --eval-tokens 1024`. The transcoder pair needs a store holding both
of its sites: `sae-train cache sites=[blocks.8.mlp.hook_in,blocks.8.hook_mlp_out] n_tokens=1000000
out_dir=runs/acts2`. The clt pair (not in the default set) needs a store of every layer's MLP
input and output (`sae-train cache 'sites=[blocks.*.mlp.hook_in,blocks.*.hook_mlp_out]'
model.n_layers=8 n_tokens=400000 out_dir=runs/acts-mlp`, or the layers you want) and
`--clt-training DIR`, a checkout of EleutherAI/clt-training at e2f04ed with `triton` importable:

    python benchmarks/quality_vs_others.py --pairs clt --clt-store runs/acts-mlp \
        --clt-training DIR --tokens 397312 --eval-tokens 8192 --out runs/quality

Each pair trains dictionaries of the same width (d_sae) and sparsity (k) on the same rows -- the
same tokens in the same order, in batches of the same size -- each with its own library's defaults
for everything else, then evaluates all of them in one `sae-train eval` call (FVU, L0, dead
latents on held-out text, CE with the dictionary spliced in, CE recovered, KL):

  matryoshka  ours `sae=matryoshka` vs SAELens's Matryoshka BatchTopK (same prefix widths)
  batchtopk   ours `sae=batchtopk`  vs SAELens's BatchTopK
  topk        ours `sae=topk`       vs sparsify's SparseCoder (TopK)
  transcoder  ours `sae=batchtopk` / `sae=batchtopk sae.skip=true` / `sae=topk`, each with
              `sae.target=blocks.8.hook_mlp_out` at sites=[blocks.8.mlp.hook_in], vs sparsify's
              transcoder (SparseCoder transcode=True; no skip connection, its default)
  clt         ours `sae=clt sites=[blocks.*.mlp.hook_in] sae.expansion_factor=2 batch_size=2048`
              vs EleutherAI clt-training's CLT (the sparsify fork that trains CLTs; cross_layer
              over every layer, everything else its defaults)

Ours: `sae-train train store=... sae=<arch> n_tokens=N out_dir=...`, nothing else set, exactly
as a user runs it. Its d_sae, k and prefix widths are read from the checkpoint it writes and given
to the other library, so both are the same size.

The harness's part in the other libraries' training: the rows (our trainer's stream,
`sae_train.train.build_source` with the same store, sites, seed, shuffle window, batch size and
token count: the same batches in the same order; checked against the run's recorded config),
`torch.manual_seed(0)` before their SAE is built, and the conversion of the trained weights into
our checkpoint format (`from_saelens`, `from_sparsify`; tests/test_foreign_conversions.py pins
both to the libraries' own forwards), with our run's recorded metadata (site, model, data) so
eval runs them on the same text.

SAELens 6.54 (everything else SAELens's): its training SAE built from its own config class with
only d_in, d_sae, k (and matryoshka_widths) set, so apply_b_dec_to_input, decoder_init_norm 0.1,
rescale_acts_by_decoder_norm, aux_loss_coefficient 1, topk_threshold_lr 0.01 and
normalize_activations "none" are its defaults; its own `SAETrainer.fit` loop, configured by
`LanguageModelSAERunnerConfig(...).to_sae_trainer_config()` (Adam lr 3e-4, betas 0.9/0.999,
constant schedule, gradient clipping at 1, dead_feature_window 1000 steps for AuxK, fp32); the
harness only hands it the rows as its data provider. The inference SAE is what SAELens saves
(`save_inference_model`: a JumpReLU with its EMA threshold, decoder norms folded in), loaded
as our `jumprelu`.

sparsify 1.3.3 (its `Trainer` drives the model's forward hooks, so the harness reproduces its step
loop, `Trainer.fit` with loss_fn "fvu", on the rows): `SparseCoder` built from `SparseCoderConfig`
with only num_latents, k (and transcode) set; TrainConfig's defaults -- the signum optimizer
(`ScheduleFreeWrapper(SignSGD, momentum=0.95)`, lr 5e-3 / sqrt(d_sae / 2^14)), auxk_alpha 0 (no
AuxK), no k decay; on the first batch b_dec = the target's mean (and, for a transcoder, the
encoder bias centres the pre-activations); every step the decoder rows are set to unit norm and
the gradient parallel to them removed (autoencoders only), loss = FVU over the batch; the weights
saved are the schedule-free average (`optimizer.eval()`, as its checkpoint does). sparsify's own
batch size is 32 sequences of 2048 tokens; here it gets our 4096-token batches, like the others.

EleutherAI clt-training at e2f04ed, the commit titled "Train final CLT versions" (the next,
998af17, only adds an off-by-default dead-latent penalty; the newest, cf9821f, fails a CLT's
step: a previous layer's decode builds ForwardOutput with 7 arguments for its 5 fields), the same replay of its `Trainer.fit` step on the rows (loss_fn "fvu"):
one `SparseCoder` per layer built as its Trainer builds them (`cross_layer` = the number of
layers, so each layer's decoders write it and every later layer; seed 0 before each), with
only num_latents, k and transcode set; its defaults otherwise -- TopK per token and layer, a
trained post-encoder bias per (source, target), no skip connection, no input/output
normalisation, the signum optimizer as above, no AuxK, no k decay; on the first batch each
layer's encoder bias centres its pre-activations and its own decoder bias is its output's mean;
per layer, as its forward hook does, `CrossLayerRunner` encodes, decodes the sum of that layer's
and the earlier layers' contributions, and the layer's FVU is backpropagated (the loss summed
over layers); the schedule-free average is kept. It runs on its CPU path (eager embedding-bag
decoder, no torch.compile), the encoder gradient's Triton kernel replaced by the same sum in
torch (`import_clt_training`). Its TopK and post-encoder biases have no checkpoint format of
ours, so the harness evaluates both CLTs itself, through the eval stage's own
`CrossLayerEvaluator` on the windows `sae-train eval` reads, clt-training's by its own inference
code (`ForeignCLT`); `sae-train eval` on ours must give the same FVU, CE and KL.

Prints one table per pair and writes OUT/summary.json. Run outputs live under OUT.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from sae_train.sae import SAE, SAEConfig, load_sae_cfg, save_sae
from sae_train.sae.saelens import from_saelens
from sae_train.sae.sparsify import from_sparsify
from sae_train.train import TrainConfig, build_source
from sae_train.train.dist import Dist

SITE = "blocks.8.hook_resid_post"
TC_SOURCE, TC_TARGET = "blocks.8.mlp.hook_in", "blocks.8.hook_mlp_out"
CLT_SOURCES = "blocks.*.mlp.hook_in"


@dataclass(frozen=True)
class Pair:
    name: str
    ours: dict[str, list[str]]
    """label -> our `sae-train train` overrides (besides store, n_tokens, out_dir)."""
    other: str
    """"saelens-matryoshka", "saelens-batchtopk", "sparsify", "sparsify-transcoder" or "clt-training"."""
    store: str = "store"
    """The command-line option naming its store: store, tc_store or clt_store."""


PAIRS = {
    p.name: p
    for p in (
        Pair("matryoshka", {"ours": ["sae=matryoshka"]}, "saelens-matryoshka"),
        Pair("batchtopk", {"ours": ["sae=batchtopk"]}, "saelens-batchtopk"),
        Pair("topk", {"ours": ["sae=topk"]}, "sparsify"),
        Pair(
            "transcoder",
            {
                f"ours-{label}": [f"sites=[{TC_SOURCE}]", f"sae.target={TC_TARGET}", *extra]
                for label, extra in (
                    ("batchtopk", ["sae=batchtopk"]),
                    ("batchtopk-skip", ["sae=batchtopk", "sae.skip=true"]),
                    ("topk", ["sae=topk"]),
                )
            },
            "sparsify-transcoder",
            store="tc_store",
        ),
        Pair(
            "clt",
            {"ours": ["sae=clt", f"sites=[{CLT_SOURCES}]", "sae.expansion_factor=2", "batch_size=2048"]},
            "clt-training",
            store="clt_store",
        ),
    )
}


def cli(*args: str, log: Path) -> float:
    """Run `sae-train <args>` (this interpreter, this checkout), output into `log`; its wall time."""
    started = time.perf_counter()
    print("$ sae-train " + " ".join(args), flush=True)
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "sae_train.cli", *args], check=True, stdout=out, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def rows(recorded: dict) -> Iterator[dict]:
    """Our trainer's batches ({site: rows [batch_size, d]}, fp32) for the run whose config (its
    run_state.json) is `recorded`: the same rows in the same order as it trained on."""
    if recorded["source"] != "store":
        raise SystemExit(f"our run read source={recorded['source']}; the harness replays store runs")
    cfg = TrainConfig(
        store=recorded["store"],
        sites=recorded["sites"],
        sae=SAEConfig(target=recorded["sae"]["target"]),
        n_tokens=recorded["n_tokens"],
        batch_size=recorded["batch_size"],
        seed=recorded["seed"],
        shuffle_window=recorded["shuffle_window"],
    )
    batches = build_source(cfg, Dist()).batches(0)
    for _ in range(cfg.n_steps):
        yield next(batches)


# ------------------------------------------------------------------------------------ SAELens


def train_saelens(kind: str, ours: dict, batches: Iterator[dict], n_steps: int, batch_size: int, out: Path) -> SAE:
    """SAELens's (Matryoshka) BatchTopK trained by its own SAETrainer on `batches`; returns it as our SAE."""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.training.sae_trainer import SAETrainer

    size = {"d_in": ours["d_in"], "d_sae": ours["d_sae"], "k": ours["k"]}
    torch.manual_seed(0)
    if kind == "saelens-matryoshka":
        widths = [round(p * ours["d_sae"]) if p <= 1 else int(p) for p in ours["matryoshka_prefixes"]]
        sae_cfg: Any = MatryoshkaBatchTopKTrainingSAEConfig(**size, matryoshka_widths=widths)
        sae: Any = MatryoshkaBatchTopKTrainingSAE(sae_cfg)
    else:
        sae_cfg = BatchTopKTrainingSAEConfig(**size)
        sae = BatchTopKTrainingSAE(sae_cfg)
    runner = LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        training_tokens=n_steps * batch_size,
        train_batch_size_tokens=batch_size,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
    )
    site = ours["site"]
    SAETrainer(cfg=runner.to_sae_trainer_config(), sae=sae, data_provider=(b[site] for b in batches)).fit()
    folder = out / "saelens-inference"
    sae.save_inference_model(str(folder))
    cfg = json.loads((folder / "cfg.json").read_text())
    return from_saelens(cfg, load_file(folder / "sae_weights.safetensors"), source=str(folder))


# ------------------------------------------------------------------------------------ sparsify


def train_sparsify(ours: dict, batches: Iterator[dict], target: str) -> SAE:
    """sparsify's SparseCoder trained with its Trainer's step on `batches`; returns it as our SAE.
    `target` set: a transcoder reading our site and writing `target` (sparsify's transcode=True)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify import TrainConfig as SparsifyTrainConfig
    from sparsify.sign_sgd import SignSGD

    transcode = bool(target)
    train_cfg = SparsifyTrainConfig(SparseCoderConfig(num_latents=ours["d_sae"], k=ours["k"], transcode=transcode))
    if train_cfg.optimizer != "signum" or train_cfg.k_decay_steps or train_cfg.sae.multi_topk:
        raise SystemExit(f"sparsify's defaults changed ({train_cfg}); update the harness's step loop")
    torch.manual_seed(train_cfg.init_seeds[0])
    coder = SparseCoder(ours["d_in"], train_cfg.sae, "cpu", dtype=torch.float32)
    lr = train_cfg.lr or 5e-3 / (coder.num_latents / 2**14) ** 0.5
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": coder.parameters(), "lr": lr}]), momentum=0.95)
    optimizer.train()
    since_fired = torch.zeros(coder.num_latents, dtype=torch.long)
    did_fire = torch.zeros(coder.num_latents, dtype=torch.bool)
    unit_decoder = train_cfg.sae.normalize_decoder and not transcode
    site = ours["site"]
    for step, batch in enumerate(batches):
        x = batch[site]
        y = batch[target] if transcode else x
        if step == 0:
            if transcode:
                coder.encoder.bias.data = -x.mean(0) @ coder.encoder.weight.data.T
            coder.b_dec.data = y.mean(0)
        if unit_decoder:
            coder.set_decoder_norm_to_unit_norm()
        dead = since_fired > train_cfg.dead_feature_threshold if train_cfg.auxk_alpha > 0 else None
        out = coder(x=x, y=y, dead_mask=dead, total_variance=(y - y.mean(0)).pow(2).sum())
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + train_cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        if unit_decoder:
            coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        since_fired += x.shape[0]
        since_fired[did_fire] = 0
        did_fire.zero_()
    optimizer.eval()  # the schedule-free average: what sparsify's checkpoint saves
    cfg = {**coder.cfg.to_dict(), "d_in": coder.d_in}
    return from_sparsify(cfg, coder.state_dict(), target=target, source="sparsify SparseCoder")


# ------------------------------------------------------------------------------------ clt-training

CLT_TRAINING = "EleutherAI/clt-training"
CLT_TRAINING_COMMIT = "e2f04ed"  # "Train final CLT versions" (the module docstring says why this one)


def import_clt_training(checkout: Path) -> ModuleType:
    """clt-training's `sparsify` package from `checkout`, imported as `clt_sparsify` (eai-sparsify,
    the topk and transcoder pairs' library, owns the name `sparsify`), on its CPU path: its
    eager embedding-bag decoder (SPARSIFY_DISABLE_TRITON) and no torch.compile (speed only). The
    one Triton kernel that path still calls, the encoder weight's gradient (`FusedEncoder.backward`:
    sparse.T @ dense), is replaced by the same sum in torch; `import triton` must work (its
    kernels module imports it; `pip install triton` suffices on a CPU machine)."""
    os.environ["SPARSIFY_DISABLE_TRITON"] = os.environ["SPARSIFY_NO_COMPILE"] = "1"
    package = checkout / "sparsify"
    spec = importlib.util.spec_from_file_location(
        "clt_sparsify", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    if spec is None or spec.loader is None or not (package / "runner.py").is_file():
        raise SystemExit(f"--clt-training {checkout}: not a checkout of {CLT_TRAINING} (no sparsify/runner.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["clt_sparsify"] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        raise SystemExit(f"{CLT_TRAINING} needs {err.name!r} to import: pip install {err.name}") from err

    def sparse_transpose_dense(indices: Tensor, values: Tensor, dense: Tensor, N: int, **_: Any) -> Tensor:
        out = torch.zeros(N, dense.shape[1], dtype=values.dtype)
        rows = values[:, :, None] * dense[:, None, :].to(values.dtype)
        return out.index_add_(0, indices.flatten().long(), rows.flatten(0, 1))

    sys.modules["clt_sparsify.fused_encoder"].triton_sparse_transpose_dense_matmul = sparse_transpose_dense
    return module


class ForeignCLT:
    """clt-training's per-layer SparseCoders as the eval's `CrossLayerEvaluator` reads a CLT
    (`reconstruct`, `encode_layer`, `decode_layer`), computed by its own inference path: its
    `CrossLayerRunner` (TopK per token and layer, each source's decoder and post-encoder bias
    per target, the targets' sums)."""

    def __init__(self, lib: ModuleType, coders: list, d_out: int):
        self.coders = [c.eval() for c in coders]
        self.runner = lib.runner.CrossLayerRunner()
        self.cfg = SimpleNamespace(d_out=d_out, d_sae=coders[0].num_latents)
        self.b_dec = coders[0].b_dec  # the eval reads the device from it

    def encode_layer(self, x: Tensor, layer: int) -> Any:
        if layer == 0:  # a new forward pass
            self.runner.reset()
        return self.runner.encode(x, sparse_coder=self.coders[layer])

    def decode_layer(self, latents: list, layer: int, x: Tensor | None = None) -> Tensor:
        mid = latents[layer]
        zeros = torch.zeros(mid.x.shape[0], self.cfg.d_out)  # its FVU's target, unused here
        return self.runner.decode(mid, zeros, module_name=str(layer)).sae_out.float()

    def reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mids = [self.encode_layer(x[:, i], i) for i in range(len(self.coders))]
        out = torch.stack([self.decode_layer(mids, i) for i in range(len(mids))], dim=1)
        dense = torch.zeros(x.shape[0], len(mids), self.cfg.d_sae)
        for i, mid in enumerate(mids):
            dense[:, i].scatter_(1, mid.latent_indices.long(), mid.latent_acts.float())
        return dense, out


def train_clt_training(lib: ModuleType, ours: dict, batches: Iterator[dict]) -> tuple[list, dict]:
    """clt-training's CLT trained on `batches` by its Trainer's step (`Trainer.fit` with loss_fn
    "fvu", replayed on the rows: its Trainer reads model hooks); returns its SparseCoders in layer
    order and a record of how it trained."""
    from schedulefree import ScheduleFreeWrapper

    L, d_in = ours["n_layers"], ours["d_in"]
    train_cfg = lib.config.TrainConfig(
        lib.config.SparseCoderConfig(num_latents=ours["d_sae"], k=ours["k"], transcode=True), cross_layer=L
    )
    sae_cfg = train_cfg.sae
    if (
        train_cfg.optimizer != "signum"
        or train_cfg.force_lr_warmup
        or train_cfg.k_decay_steps
        or train_cfg.auxk_alpha
        or train_cfg.loss_fn != "fvu"
        or train_cfg.filter_bos
        or sae_cfg.multi_topk
        or sae_cfg.do_coalesce_topk
        or sae_cfg.normalize_io
    ):
        raise SystemExit(
            f"{CLT_TRAINING}'s defaults differ from {CLT_TRAINING_COMMIT}'s; update the harness's step loop"
        )
    coders, reaches = [], []
    for position in range(L):  # Trainer.__init__: each layer's targets and the sources writing it
        torch.manual_seed(train_cfg.init_seeds[0])
        n_targets = min(train_cfg.cross_layer, L - position)
        reaches.append(position + n_targets)
        while reaches[0] < position:
            reaches.pop(0)
        layer_cfg = replace(sae_cfg, n_targets=n_targets, n_sources=len(reaches))
        coders.append(lib.sparse_coder.SparseCoder(d_in, layer_cfg, "cpu", dtype=torch.float32))
    lr = train_cfg.lr or 5e-3 / (coders[0].num_latents / 2**14) ** 0.5
    optimizer = ScheduleFreeWrapper(
        lib.sign_sgd.SignSGD([{"params": c.parameters(), "lr": lr} for c in coders]), momentum=0.95
    )
    optimizer.train()
    runner = lib.runner.CrossLayerRunner()
    sites, targets = ours["sites"], ours["targets"]
    for step, batch in enumerate(batches):
        runner.reset()
        for i, coder in enumerate(coders):  # its forward hook, layer by layer
            x, y = batch[sites[i]], batch[targets[i]]
            if step == 0:
                coder.encoder.bias.data[:] = F.linear(-x.mean(0), coder.encoder.weight.data)
                coder.b_decs[0].data[:] = y.mean(0)  # the layer's own decoder holds its bias
            loss_mask = torch.ones(x.shape[0], dtype=torch.bool)  # filter_bos off: every row counts
            out = runner(x, y, sparse_coder=coder, module_name=str(i), detach_grad=True, loss_mask=loss_mask)
            (out.fvu + out.multi_topk_fvu / 8).backward()
            runner.restore()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # the schedule-free average: what its checkpoint saves
    record = {"optimizer": "signum (schedule-free, momentum 0.95)", "lr": lr, "activation": sae_cfg.activation}
    return coders, record


def evaluate_cross_layer(ours_dir: Path, theirs: ForeignCLT, n_tokens: int) -> tuple[dict[str, dict], int]:
    """Our CLT (its checkpoint) and clt-training's through the eval stage's `CrossLayerEvaluator`
    on the same held-out windows: {label: metrics}, tokens counted. The windows, model, data
    and text are what `sae-train eval checkpoint=ours_dir` reads."""
    from sae_train.data import TokenSpec
    from sae_train.eval.checkpoints import cross_layer_pairs
    from sae_train.eval.config import EvalConfig
    from sae_train.eval.layers import CrossLayerEvaluator
    from sae_train.eval.stage import data_config, evaluate_windows, text_config
    from sae_train.eval.tokens import held_out_windows
    from sae_train.lm import LanguageModel
    from sae_train.lm.model import model_config
    from sae_train.sae.checkpoint import load_checkpoints, recorded

    (ours,) = load_checkpoints(str(ours_dir))
    lm = LanguageModel.load(model_config(recorded([ours], "model"), None))
    text = text_config(recorded([ours], "text"))
    windows = held_out_windows(lm.tokenizer, data_config(recorded([ours], "data")), text, n_tokens)
    pairs = cross_layer_pairs(ours, lm)
    evaluators = {
        "ours": CrossLayerEvaluator(pairs, "ours", ours.sae.eval()),
        "clt-training": CrossLayerEvaluator(pairs, "clt-training", theirs),  # type: ignore[arg-type]
    }
    tokens = TokenSpec.from_tokenizer(lm.tokenizer, text)
    counted_tokens, _ = evaluate_windows(lm, windows, tokens, list(evaluators.values()), EvalConfig.batch_size)
    return {label: e.results(EvalConfig.dense_threshold)[label] for label, e in evaluators.items()}, counted_tokens


# ------------------------------------------------------------------------------------ the pairs


def train_other(pair: Pair, ours_dir: Path, out: Path) -> tuple[SAE, dict, float]:
    """The other library's dictionary for `pair`, trained on the rows our run at `ours_dir` saw:
    (our SAE of it, a record of how it trained, wall seconds)."""
    meta = load_sae_cfg(ours_dir)
    recorded = json.loads((ours_dir.parent / "run_state.json").read_text())["config"]
    batch_size = recorded["batch_size"]
    n_steps = recorded["n_tokens"] // batch_size
    target = meta["target"]
    batches = rows(recorded)
    started = time.perf_counter()
    if pair.other.startswith("saelens"):
        sae = train_saelens(pair.other, meta, batches, n_steps, batch_size, out)
        library = f"sae-lens {version('sae-lens')}"
    else:
        sae = train_sparsify(meta, batches, target)
        library = f"eai-sparsify {version('eai-sparsify')}"
    seconds = time.perf_counter() - started
    return sae, {"library": library, "kind": pair.other, "steps": n_steps, "batch_size": batch_size}, seconds


def train_ours(pair: Pair, store: str, n_tokens: int, out: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Our runs of `pair`, through the CLI: ({label: checkpoint directory}, {label: wall seconds})."""
    seconds: dict[str, float] = {}
    ours_dirs: dict[str, Path] = {}
    for label, overrides in pair.ours.items():
        run = out / pair.name / "ckpts" / label
        seconds[label] = cli(
            "train", f"store={store}", *overrides, f"n_tokens={n_tokens}", f"out_dir={run}", "progress=false",
            log=out / pair.name / "logs" / f"{label}.log",
        )  # fmt: skip
        ours_dirs[label] = next(p.parent for p in sorted(run.glob("*/sae.safetensors")))
    return ours_dirs, seconds


def run_pair(pair: Pair, store: str, n_tokens: int, eval_tokens: int, out: Path) -> dict[str, Any]:
    ckpts = out / pair.name / "ckpts"
    logs = out / pair.name / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ours_dirs, seconds = train_ours(pair, store, n_tokens, out)
    first = next(iter(ours_dirs.values()))
    sae, record, seconds[pair.other] = train_other(pair, first, out / pair.name)
    meta = load_sae_cfg(first)
    keep = {k: v for k, v in meta.items() if k in ("site", "source", "provenance")}
    save_sae(sae, ckpts / pair.other, {**keep, "tag": pair.other, "train": record})
    print(f"{pair.other}: trained in {seconds[pair.other]:.0f} s -> {ckpts / pair.other}", flush=True)
    evals = out / pair.name / "eval"
    seconds["eval"] = cli(
        "eval", f"checkpoint={ckpts}", f"n_tokens={eval_tokens}", f"out_dir={evals}", "progress=false",
        log=logs / "eval.log",
    )  # fmt: skip
    report = json.loads((evals / "eval.json").read_text())
    results = {}
    for name, entry in report["saes"].items():
        label = name.split("/")[0]
        m = entry["metrics"]
        results[label] = {
            "architecture": entry["architecture"],
            "d_sae": entry["d_sae"],
            **{key: m.get(key) for key in ("l0", "fvu", "ce_clean", "ce_sae", "ce_recovered", "kl", "dead_fraction")},
        }
    return {"results": results, "seconds": seconds, "eval_tokens": report["tokens"]["counted"]}


def run_clt_pair(pair: Pair, store: str, n_tokens: int, eval_tokens: int, out: Path, checkout: Path) -> dict[str, Any]:
    """The clt pair: our CLT and clt-training's on the same rows, both evaluated by the harness
    through the eval stage's evaluator (clt-training's CLT has no checkpoint format of ours: its
    TopK and per-target post-encoder biases are not JumpReLU), ours also by `sae-train eval`,
    whose numbers the harness's must reproduce."""
    lib = import_clt_training(checkout)  # fail before training anything
    (out / pair.name / "logs").mkdir(parents=True, exist_ok=True)
    ours_dirs, seconds = train_ours(pair, store, n_tokens, out)
    (ours_dir,) = ours_dirs.values()
    meta = load_sae_cfg(ours_dir)
    recorded = json.loads((ours_dir.parent / "run_state.json").read_text())["config"]
    started = time.perf_counter()
    coders, record = train_clt_training(lib, meta, rows(recorded))
    seconds[pair.other] = time.perf_counter() - started
    print(f"{pair.other}: trained in {seconds[pair.other]:.0f} s", flush=True)
    torch.save([c.state_dict() for c in coders], out / pair.name / "clt-training.pt")
    started = time.perf_counter()
    metrics, counted = evaluate_cross_layer(ours_dir, ForeignCLT(lib, coders, meta["d_out"]), eval_tokens)
    seconds["eval"] = time.perf_counter() - started
    evals = out / pair.name / "eval-ours"
    cli(
        "eval",
        f"checkpoint={ours_dir}",
        f"n_tokens={eval_tokens}",
        f"out_dir={evals}",
        "progress=false",
        log=out / pair.name / "logs" / "eval.log",
    )
    stage = next(iter(json.loads((evals / "eval.json").read_text())["saes"].values()))["metrics"]
    for key in ("fvu", "ce_sae", "kl"):
        if abs(stage[key] - metrics["ours"][key]) > 1e-4 * max(1.0, abs(stage[key])):
            raise SystemExit(
                f"the harness's eval of ours gives {key} {metrics['ours'][key]}, sae-train eval {stage[key]}"
            )
    architecture = {"ours": "clt", pair.other: f"topk ({CLT_TRAINING}@{CLT_TRAINING_COMMIT})"}
    results = {
        label: {
            "architecture": architecture[label],
            "d_sae": meta["d_sae"],
            **{key: m.get(key) for key in ("l0", "fvu", "ce_clean", "ce_sae", "ce_recovered", "kl", "dead_fraction")},
            "fvu_per_layer": [m[f"fvu_{i}"] for i in range(meta["n_layers"])],
        }
        for label, m in metrics.items()
    }
    return {"results": results, "seconds": seconds, "eval_tokens": counted, "trained": record}


def table(name: str, summary: dict[str, Any]) -> str:
    lines = [
        f"{name} (eval on {summary['eval_tokens']:,} held-out tokens)",
        "| dictionary | arch (as evaluated) | L0 | FVU | CE loss (clean) | CE recovered | KL | dead on eval tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in summary["results"].items():
        ce = f"{r['ce_sae']:.4f} (+{r['ce_sae'] - r['ce_clean']:.3f}; {r['ce_clean']:.4f})"
        lines.append(
            f"| {label} | {r['architecture']} | {r['l0']:.1f} | {r['fvu']:.3f} | {ce} | {r['ce_recovered']:.3f} | "
            f"{r['kl']:.3f} | {100 * r['dead_fraction']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="runs/demo/acts", help=f"activation store with {SITE}")
    parser.add_argument("--tc-store", default="runs/acts2", help=f"store with {TC_SOURCE} and {TC_TARGET}")
    parser.add_argument(
        "--clt-store", default="runs/acts-mlp", help="store with blocks.{i}.mlp.hook_in and blocks.{i}.hook_mlp_out"
    )
    parser.add_argument(
        "--clt-training", type=Path, help=f"a checkout of {CLT_TRAINING} at {CLT_TRAINING_COMMIT} (the clt pair)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quality_vs_others"))
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens for sae-train eval")
    parser.add_argument("--pairs", nargs="+", default=[p for p in PAIRS if p != "clt"], choices=list(PAIRS))
    args = parser.parse_args()
    out = args.out.resolve()
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    print(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for name in args.pairs:
        pair = PAIRS[name]
        store = os.path.abspath(getattr(args, pair.store))
        if pair.other == "clt-training":
            if args.clt_training is None:
                raise SystemExit(
                    f"the clt pair needs --clt-training: a checkout of {CLT_TRAINING} at {CLT_TRAINING_COMMIT}"
                )
            result = run_clt_pair(pair, store, args.tokens, args.eval_tokens, out, args.clt_training.resolve())
        else:
            result = run_pair(pair, store, args.tokens, args.eval_tokens, out)
        summary[name] = {"store": store, "tokens": args.tokens, **result}
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(json.dumps(summary, indent=2) + "\n")
        print(table(name, summary[name]), flush=True)
    print(f"summary: {summary_file}")


if __name__ == "__main__":
    main()
