"""`sae-train inspect`: the streaming statistics against a brute-force recomputation, contexts
against the stored tokens, the logit lens against a hand computation, the records against
their schema, the browser in a real headless Chromium, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from sae_train import cache
from sae_train.data import DataConfig, TextConfig
from sae_train.errors import UserError
from sae_train.inspect import InspectConfig, run
from sae_train.inspect.circuit_tracer import cantor
from sae_train.inspect.records import RecordBuilder, schema
from sae_train.inspect.rows import store_rows
from sae_train.inspect.stream import LatentStats
from sae_train.lm import LanguageModel, ModelConfig
from sae_train.sae import SAEConfig, create_sae, save_sae
from sae_train.store import ActivationStore, StoreWriter
from sae_train.store.manifest import MANIFEST
from tests.json_schema import validate
from tests.synthetic import sample, true_directions
from tests.test_eval import save_checkpoint
from tests.tiny import write_corpus

SITE, D_IN, CONTEXT = "synthetic", 16, 12


def windowed_store(root: Path, n_shards: int = 3, windows: int = 9, seed: int = 0) -> Path:
    """A store whose shards hold windows of CONTEXT positions (position 0, the BOS, left out like
    the cache does, and one more position dropped per window as an excluded separator)."""
    gen = torch.Generator().manual_seed(seed)
    dirs = true_directions(24, D_IN)
    with StoreWriter(root, {"synthetic": "windows"}, {SITE: D_IN}, torch.float32) as writer:
        for index in range(n_shards):
            positions = []
            for _ in range(windows + index):  # uneven shards
                dropped = int(torch.randint(2, CONTEXT, (1,), generator=gen))
                positions += [p for p in range(1, CONTEXT) if p != dropped]
            n = len(positions)
            tokens = torch.randint(3, 300, (n,), generator=gen, dtype=torch.int32)
            acts = {SITE: sample(n, dirs, 0.15, 0.05, gen)}
            writer.write_shard(index, acts, tokens, torch.tensor(positions, dtype=torch.int32))
    return root


def random_sae(arch: str = "topk", d_sae: int = 40, seed: int = 0):
    sae = create_sae(SAEConfig(architecture=arch, k=4, d_sae=d_sae, seed=seed).resolved(D_IN))
    with torch.no_grad():
        sae.b_enc.add_(0.05 * torch.randn(d_sae, generator=torch.Generator().manual_seed(seed)))
        if arch == "jumprelu":
            sae.threshold.fill_(0.3)
    return sae.fold(1.0).eval()


def all_rows(store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activations, token ids, window id) of every row, in the store's row order."""
    acts, tokens, windows, offset = [], [], [], 0
    for i in range(store.n_shards):
        shard = store.shard(i)
        acts.append(shard[SITE].float())
        tokens.append(shard["token_ids"].long())
        pos = shard["position"]
        starts = torch.ones(len(pos), dtype=torch.long)
        starts[1:] = (pos[1:] <= pos[:-1]).long()
        windows.append(starts.cumsum(0) + offset)
        offset = int(windows[-1][-1]) + 1
    return torch.cat(acts), torch.cat(tokens), torch.cat(windows)


def stream(store: ActivationStore, sae, n_tokens: int, batch_size: int, **kw) -> LatentStats:
    settings = dict(top_k=5, sample_size=6, histogram_bins=8, before=3, after=2, seed=0) | kw
    stats = LatentStats(sae.cfg.d_sae, device=torch.device("cpu"), **settings)
    with torch.no_grad():
        for acts, chunk in store_rows(store, [SITE], n_tokens, batch_size, torch.device("cpu")):
            stats.update(sae.encode(acts[SITE]), chunk)
    return stats


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_streaming_statistics_equal_a_brute_force_recomputation(tmp_path, arch):
    store = ActivationStore(windowed_store(tmp_path / "store"))
    sae = random_sae(arch)
    n = store.n_tokens - 7  # stop inside the last shard
    stats = stream(store, sae, n, batch_size=25)  # many chunks, several per shard
    x, tokens, windows = all_rows(store)
    with torch.no_grad():
        f = sae.encode(x[:n])
    assert stats.n_tokens == n
    assert torch.equal(stats.count, (f > 0).sum(0))
    assert torch.allclose(stats.act_max, f.max(0).values)
    assert (stats.count > 3).sum() > 10 and (stats.count > 30).any()  # the comparison means something

    for latent in range(sae.cfg.d_sae):
        fired = torch.nonzero(f[:, latent] > 0).squeeze(1)
        vals = f[fired, latent]
        # Brute force: largest first, ties to the earlier row.
        order = sorted(range(len(fired)), key=lambda i: (-float(vals[i]), int(fired[i])))[:5]
        kept = stats.top.value[latent] > float("-inf")
        assert stats.top.row[latent][kept].tolist() == [int(fired[i]) for i in order]
        assert torch.allclose(stats.top.value[latent][kept], vals[order])

        # Histogram: exact counts in bins of the final width.
        if len(fired):
            width = float(stats.bin_width[latent])
            assert float(vals.max()) < 8 * width
            bins = (vals.double() / width).long().clamp(max=7)
            assert torch.equal(stats.histogram[latent], torch.bincount(bins, minlength=8))

        # The sample: min(firings, size) distinct firings, with their true values.
        in_sample = stats.sample.value[latent] > float("-inf")
        rows = stats.sample.row[latent][in_sample]
        assert len(rows) == min(len(fired), 6) and len(set(rows.tolist())) == len(rows)
        assert torch.allclose(stats.sample.value[latent][in_sample], f[rows, latent])

        # Contexts: the stored tokens of the same window around the row, and the latent's activations.
        for part, ok in ((stats.top, kept), (stats.sample, in_sample)):
            for slot in torch.nonzero(ok).squeeze(1).tolist():
                row = int(part.row[latent, slot])
                around = [r for r in range(row - 3, row + 3) if 0 <= r < n and windows[r] == windows[row]]
                context = part.tokens[latent, slot]
                assert context[context >= 0].tolist() == tokens[around].tolist()
                assert torch.allclose(part.acts[latent, slot][context >= 0], f[around, latent])
                assert int(context[3]) == int(tokens[row])  # the example's own token sits at `before`


def test_the_sample_is_uniform_over_the_firings(tmp_path):
    """Algorithm R across chunks: each firing of an always-on latent lands in the sample equally often."""
    store = ActivationStore(windowed_store(tmp_path / "store", n_shards=1, windows=4))
    sae = random_sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
        sae.b_enc[0] = 1e4  # latent 0 fires on every row
    n = store.n_tokens
    hits = torch.zeros(n)
    for seed in range(300):
        stats = stream(store, sae, n, batch_size=11, seed=seed, sample_size=4)
        hits[stats.sample.row[0]] += 1
    expected = 300 * 4 / n
    assert hits.sum() == 1200
    assert (hits - expected).abs().max() < 5 * expected**0.5  # no position is favoured


def test_records_validate_and_carry_the_stream(tmp_path):
    store = ActivationStore(windowed_store(tmp_path / "store"))
    sae = random_sae()
    stats = stream(store, sae, store.n_tokens, batch_size=30)
    records = list(RecordBuilder(stats, lambda ids: [f"t{i}" for i in ids], None, n_quantiles=3, quantile_examples=2))
    for record in records:
        validate(record, schema())
    fired = [r for r in records if r["n_firings"]]
    assert fired and any(len(r["examples_quantiles"]) == 4 for r in fired)
    for r in fired:
        top = r["examples_quantiles"][0]["examples"]
        assert [e["activation"] for e in top] == sorted((e["activation"] for e in top), reverse=True)
        assert top[0]["activation"] == pytest.approx(r["act_max"])
        assert sum(r["histogram"]) == r["n_firings"] and len(r["histogram_edges"]) == len(r["histogram"]) + 1
        assert r["quantile_values"][-1] == pytest.approx(r["act_max"], abs=1e-4)
        assert all(a <= b + 1e-9 for a, b in zip(r["quantile_values"], r["quantile_values"][1:]))
        for group in r["examples_quantiles"]:
            for e in group["examples"]:
                assert e["tokens"][e["train_token_ind"]] == f"t{e['token_ids'][e['train_token_ind']]}"
                assert e["tokens_acts_list"][e["train_token_ind"]] == pytest.approx(e["activation"], abs=1e-4)
        bands = [g for g in r["examples_quantiles"][1:]]
        lows = [min(e["activation"] for e in g["examples"]) for g in bands]
        assert lows == sorted(lows, reverse=True)  # highest band first


# ---- the stage on a tiny model ------------------------------------------------------------------

TEXT = TextConfig(context_size=32)


@pytest.fixture(scope="module")
def lm(tiny_model_dir) -> LanguageModel:
    return LanguageModel.load(ModelConfig(name=str(tiny_model_dir("llama")), dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> DataConfig:
    return DataConfig(source="files", path=str(write_corpus(tmp_path_factory.mktemp("corpus"))), eval_fraction=0.35)


@pytest.fixture(scope="module")
def inspected(tmp_path_factory, lm, corpus):
    """A tiny model's store, a run dir with an SAE and a transcoder, and inspect's output."""
    root = tmp_path_factory.mktemp("inspect")
    sites = ["blocks.1.hook_resid_post", "blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out"]
    cache.run(
        cache.CacheConfig(
            model=ModelConfig(name=lm.identity["name"], dtype="float32", device="cpu"),
            data=corpus,
            text=TEXT,
            sites=sites,
            n_tokens=24 * 32,
            tokens_per_shard=8 * 32,
            store_dtype="float32",
            out_dir=str(root / "acts"),
            progress=False,
        ),
        lm,
    )
    save_checkpoint(root / "run" / "blocks.1.hook_resid_post", lm, corpus, "blocks.1.hook_resid_post")
    tc = create_sae(SAEConfig(architecture="relu", d_sae=48, target="blocks.2.hook_mlp_out", seed=3).resolved(32, 32))
    with torch.no_grad():
        tc.W_enc.mul_(3.0)
    source = {"source": "live", "model": lm.identity, "data": corpus.describe(), "text": asdict(TEXT)}
    save_sae(
        tc.fold(1.0),
        root / "run" / "transcoder",
        {"site": "blocks.2.mlp.hook_in", "tag": "transcoder", "source": source},
    )
    cfg = InspectConfig(
        checkpoint=str(root / "run"),
        store=str(root / "acts"),
        n_tokens=20 * 31,
        top_k=6,
        context_before=4,
        context_after=3,
        batch_size=64,
        dtype="float32",
        out_dir=str(root / "out"),
        progress=False,
    )
    summary = run(cfg, lm=lm)
    return root, cfg, summary


def read_records(directory: Path) -> list[dict]:
    records = []
    for path in sorted((directory / "features").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    return records


def test_stage_writes_valid_records_whose_contexts_are_the_stored_tokens(inspected, lm):
    root, cfg, summary = inspected
    out = Path(cfg.out_dir)
    assert set(summary.saes) == {"blocks.1.hook_resid_post", "transcoder"}
    store = ActivationStore(root / "acts")
    tokens = torch.cat([store.shard(i)["token_ids"] for i in range(store.n_shards)]).tolist()
    for name, d_sae in (("blocks.1.hook_resid_post", 64), ("transcoder", 48)):
        meta = json.loads((out / name / "inspect.json").read_text())
        assert meta["n_tokens"] == cfg.n_tokens and meta["d_sae"] == d_sae
        records = read_records(out / name)
        assert [r["index"] for r in records] == list(range(d_sae))
        fired = 0
        for r in records:
            validate(r, schema())
            for group in r["examples_quantiles"]:
                for e in group["examples"]:
                    fired += 1
                    start = e["row"] - e["train_token_ind"]
                    assert e["token_ids"] == tokens[start : start + len(e["token_ids"])]
                    assert e["tokens"] == [lm.tokenizer.decode([t]) for t in e["token_ids"]]
        assert fired > 50
    assert (out / "index.html").is_file() and (out / "saes.js").is_file()


def test_logit_lens_equals_a_hand_computation(inspected, lm):
    _, cfg, _ = inspected
    records = read_records(Path(cfg.out_dir) / "blocks.1.hook_resid_post")
    from sae_train.sae import load_sae

    W_dec = load_sae(Path(cfg.checkpoint) / "blocks.1.hook_resid_post").W_dec.detach()
    gamma = lm.model.model.norm.weight.detach()  # Llama's final RMSNorm
    logits = (W_dec * gamma) @ lm.model.lm_head.weight.detach().T
    meta = json.loads((Path(cfg.out_dir) / "blocks.1.hook_resid_post" / "inspect.json").read_text())
    assert "LlamaRMSNorm weight" in meta["logit_lens"]["method"]
    for r in records:
        assert r["top_logits_ids"] == logits[r["index"]].topk(10).indices.tolist()
        assert r["bottom_logits_ids"] == logits[r["index"]].topk(10, largest=False).indices.tolist()
        assert r["top_logits"] == [lm.tokenizer.decode([t]) for t in r["top_logits_ids"]]
        assert r["top_logits_values"][0] == pytest.approx(float(logits[r["index"]].max()), abs=1e-3)


def test_transcoder_features_in_circuit_tracers_layout(inspected):
    _, cfg, summary = inspected
    assert summary.circuit_tracer_scan == "./data/features/run"
    pages = Path(cfg.out_dir) / "circuit_tracer" / "features" / "run"
    records = read_records(Path(cfg.out_dir) / "transcoder")
    assert len(list(pages.glob("*.json"))) == len(records)
    fired = next(r for r in records if r["n_firings"])
    page = json.loads((pages / f"{cantor(2, fired['index'])}.json").read_text())
    # circuit-tracer 0.5.0's frontend/feature_models.py, field for field.
    assert set(page) == {
        "transcoder_id",
        "index",
        "examples_quantiles",
        "top_logits",
        "bottom_logits",
        "act_min",
        "act_max",
        "quantile_values",
        "histogram",
        "activation_frequency",
    }
    example = page["examples_quantiles"][0]["examples"][0]
    assert set(example) == {"tokens_acts_list", "train_token_ind", "is_repeated_datapoint", "tokens"}
    assert page["act_max"] == fired["act_max"] and page["top_logits"] == fired["top_logits"]


INTEROP_PYTHON = (
    Path(os.environ.get("SAE_TRAIN_INTEROP", Path(__file__).parent.parent / ".venv-interop")) / "bin" / "python"
)
"""circuit-tracer 0.5.0's own venv (as in tests/test_circuit_tracer.py: SAE_TRAIN_INTEROP, default .venv-interop)."""
SERVE_AND_READ = """
import json, socket, sys, urllib.request
from circuit_tracer.frontend.feature_models import Model
from circuit_tracer.frontend.local_server import serve
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = serve(data_dir=sys.argv[1], port=port)
try:
    for path in sys.argv[2:]:  # what the viewer fetches for scan ./data/features/<set>
        page = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}"))
        print(Model(**page).index, len(page["examples_quantiles"]))
finally:
    server.stop()
"""


@pytest.mark.skipif(not INTEROP_PYTHON.is_file(), reason=f"no circuit-tracer venv at {INTEROP_PYTHON.parent.parent}")
def test_circuit_tracers_own_server_serves_our_pages_as_its_feature_model(inspected):
    _, cfg, summary = inspected
    records = [r for r in read_records(Path(cfg.out_dir) / "transcoder") if r["n_firings"]][:3]
    paths = [f"{summary.circuit_tracer_scan.removeprefix('./')}/{cantor(2, r['index'])}.json" for r in records]
    graphs = str(Path(cfg.out_dir) / "circuit_tracer")
    done = subprocess.run(
        [str(INTEROP_PYTHON), "-c", SERVE_AND_READ, graphs, *paths], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(v) for r in records for v in (r["index"], len(r["examples_quantiles"]))]


def test_live_mode_reads_held_out_text(lm, corpus, tmp_path):
    save_checkpoint(tmp_path / "sae", lm, corpus, "blocks.1.hook_resid_post", text=TEXT)
    cfg = InspectConfig(
        checkpoint=str(tmp_path / "sae"),
        n_tokens=96,
        top_k=3,
        dtype="float32",
        out_dir=str(tmp_path / "o"),
        progress=False,
    )
    summary = run(cfg, lm=lm)
    assert 80 < summary.n_tokens <= 93  # 3 windows of 32 less BOS and separators, left out like the store does
    records = read_records(tmp_path / "o" / "sae")
    assert any(r["n_firings"] for r in records)
    source = json.loads((tmp_path / "o" / "sae" / "inspect.json").read_text())["source"]
    assert source["live"]["split"] == "eval" and source["live"]["source"] == "files"  # held-out text


# ---- bad input -------------------------------------------------------------------------------------


def test_bad_input_is_a_clear_error(inspected, lm, corpus, tmp_path):
    root, cfg, _ = inspected
    sae_dir = Path(cfg.checkpoint) / "blocks.1.hook_resid_post"
    with pytest.raises(UserError, match=r"n_tokens=100,000 but activation store .* holds [\d,]+ rows"):
        run(replace(cfg, checkpoint=str(sae_dir), n_tokens=100_000, out_dir=str(tmp_path / "a")), lm=lm)

    other = save_checkpoint(tmp_path / "other", lm, corpus, "blocks.0.hook_resid_post")
    with pytest.raises(UserError, match=r"lacks site\(s\) \['blocks.0.hook_resid_post'\]"):
        run(replace(cfg, checkpoint=str(other), out_dir=str(tmp_path / "b")), lm=lm)

    absent = save_checkpoint(tmp_path / "absent", lm, corpus, "blocks.1.hook_resid_post")
    meta = json.loads((absent / "cfg.json").read_text())
    (absent / "cfg.json").write_text(json.dumps(meta | {"site": "blocks.7.hook_resid_post"}))
    with pytest.raises(UserError, match="blocks.7.hook_resid_post.*which model .* lacks"):
        run(replace(cfg, checkpoint=str(absent), store="", out_dir=str(tmp_path / "c")), lm=lm)

    # out_dir is replaced whole: never a directory holding something else (here the run's checkpoints).
    with pytest.raises(UserError, match="is not the output of an earlier `sae-train inspect`"):
        run(replace(cfg, out_dir=str(root)), lm=lm)
    assert (sae_dir / "sae.safetensors").exists()
    for n in (64, 32):  # an earlier output is replaced
        again = run(replace(cfg, checkpoint=str(sae_dir), n_tokens=n, out_dir=str(tmp_path / "e")), lm=lm)
    assert again.n_tokens == 32 and not list(tmp_path.glob(".e.*"))

    # A store whose shards hold no token ids (written by another tool).
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    shutil.copytree(root / "acts", bare)
    manifest = json.loads((bare / MANIFEST).read_text())
    for shard in manifest["shards"]:
        tensors = load_file(bare / shard["file"])
        save_file({k: v for k, v in tensors.items() if k != "token_ids"}, bare / shard["file"])
        shard["n_bytes"] = (bare / shard["file"]).stat().st_size
    (bare / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no token_ids in its shards"):
        run(replace(cfg, checkpoint=str(sae_dir), store=str(bare), out_dir=str(tmp_path / "d")), lm=lm)
    assert not (tmp_path / "d").exists()


# ---- the browser in headless Chromium -----------------------------------------------------------------


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(binary: str, url: str, profile: Path, *extra: str) -> str:
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--window-size=1280,900",
        *extra,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run does)")
def test_browser_from_disk_in_headless_chromium(inspected, tmp_path):
    _, cfg, _ = inspected
    out = Path(cfg.out_dir)
    records = read_records(out / "blocks.1.hook_resid_post")
    latent = max(records, key=lambda r: r["n_firings"])
    index = (out / "index.html").resolve().as_uri()
    binary = chromium()
    assert binary is not None

    dom = render(binary, f"{index}#sae=blocks.1.hook_resid_post&q={latent['index']}", tmp_path / "p1", "--dump-dom")
    assert f'id="panel" data-latent="{latent["index"]}"' in dom
    assert f"latent {latent['index']}" in dom
    n_examples = sum(len(g["examples"]) for g in latent["examples_quantiles"])
    assert dom.count('class="example"') == n_examples
    first = latent["examples_quantiles"][0]["examples"][0]
    assert f'data-row="{first["row"]}"' in dom
    assert dom.count("<rect") == len(latent["histogram"])

    token = first["tokens"][first["train_token_ind"]].strip()
    dom = render(binary, f"{index}#sae=blocks.1.hook_resid_post&q={token}", tmp_path / "p2", "--dump-dom")
    assert f'data-latent="{latent["index"]}"' in dom  # the latent whose top token it is is listed
    assert "matching" in dom

    shot = tmp_path / "browser.png"
    render(
        binary,
        f"{index}#sae=transcoder&latent={next(r['index'] for r in read_records(out / 'transcoder') if r['n_firings'])}",
        tmp_path / "p3",
        f"--screenshot={shot}",
    )
    assert shot.stat().st_size > 10_000
