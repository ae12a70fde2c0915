"""Hub push up to the network boundary (huggingface_hub's HTTP client answered in-process), and
pulls from local folders and from the hub cache offline."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from sae_train.errors import UserError
from sae_train.export import ExportConfig, run
from sae_train.hub import load_exported, pull, push
from sae_train.sae import load_sae
from sae_train.train import run as train
from tests.conftest import tiny_topk
from tests.fake_hub import FakeHub, _http, httpx

TOKEN = "hf_sEcReT0123456789abcdefTOKEN"
REPO = "test-org/sae-test"
TAG = "synthetic"


@pytest.fixture(scope="module")
def checkpoint(synthetic_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "sae"
    summary = train(tiny_topk(store=str(synthetic_store(8192)), out_dir=str(out), n_tokens=4096))
    return Path(summary.saes[TAG]["checkpoint"])


@pytest.fixture
def hub(monkeypatch):
    """A FakeHub behind huggingface_hub's own client (its request hook included), token in HF_TOKEN."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest keeps the suite offline
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake = FakeHub(REPO)

    def factory():
        return httpx.Client(transport=httpx.MockTransport(fake), event_hooks={"request": [_http.hf_request_event_hook]})

    _http.set_client_factory(factory)
    yield fake
    _http.set_client_factory(_http.default_client_factory)


def test_push_sends_the_export_and_never_shows_the_token(checkpoint, tmp_path, hub, caplog, capsys):
    out = tmp_path / "export"
    caplog.set_level(logging.DEBUG)
    logging.getLogger("huggingface_hub").addHandler(caplog.handler)  # it may not propagate to the root
    try:
        summary = run(
            ExportConfig(checkpoint=str(checkpoint), out_dir=str(out), push_to_hub=True, repo_id=REPO, private=True)
        )
        print(summary.table())
    finally:
        logging.getLogger("huggingface_hub").removeHandler(caplog.handler)

    created = hub.json_of("/api/repos/create")
    assert (created["organization"], created["name"]) == ("test-org", "sae-test")
    assert created.get("visibility") == "private" or created.get("private") is True
    assert {r.url.host for r in hub.requests} == {"huggingface.co"}
    assert [r.url.path for r in hub.requests if r.method == "POST" and "/api/models/" in r.url.path] == [
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]

    expected = {"README.md", f"{TAG}/cfg.json", f"{TAG}/sae_weights.safetensors"}
    files = hub.committed_files()
    assert set(files) == expected == set(summary.files)
    for path, content in files.items():
        assert content == (out / path).read_bytes(), path
    assert not any(name in path for path in files for name in ("trainer_state", "optimizer", "training_weights"))
    assert summary.commit_url.endswith("/commit/" + "0" * 40)

    api_calls = [r for r in hub.requests if r.method == "POST"]  # create, validate-yaml, preupload, commit
    assert len(api_calls) == 4
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    # Elsewhere (huggingface_hub's own best-effort GETs) the token is absent, and it is never in a URL or body.
    assert all(r.headers.get("authorization") in (None, f"Bearer {TOKEN}") for r in hub.requests)
    assert not any(TOKEN in str(r.url) or TOKEN.encode() in r.content for r in hub.requests)
    shown = capsys.readouterr()
    assert caplog.records  # the logs were captured, and hold no token
    for text in (caplog.text, shown.out, shown.err, summary.table(), repr(summary)):
        assert TOKEN not in text and TOKEN[3:15] not in text
    assert not any(TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_push_folder_directly(checkpoint, tmp_path, hub):
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(tmp_path / "export")))
    (tmp_path / "export" / ".hidden").write_text("not uploaded")
    url = push(tmp_path / "export", REPO)
    assert url.endswith("0" * 40)
    assert set(hub.committed_files()) == {"README.md", f"{TAG}/cfg.json", f"{TAG}/sae_weights.safetensors"}
    assert (
        "visibility" not in hub.json_of("/api/repos/create")
        or hub.json_of("/api/repos/create")["visibility"] == "public"
    )


def test_hub_refusal_is_a_user_error_without_the_token(checkpoint, tmp_path, hub):
    hub.fail_status = 401
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(tmp_path / "export")))
    with pytest.raises(UserError, match="Could not create hub repository test-org/sae-test") as err:
        push(tmp_path / "export", REPO)
    assert TOKEN not in str(err.value)


def test_no_token_no_request(checkpoint, tmp_path, hub, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(tmp_path / "export")))
    with pytest.raises(UserError, match="HF_TOKEN"):
        push(tmp_path / "export", REPO)
    assert hub.requests == []


# ------------------------------------------------------------------------------ pull


def test_pull_from_a_local_folder(checkpoint, tmp_path):
    out = tmp_path / "export"
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(out)))
    assert pull(out) == out
    original, loaded = load_sae(checkpoint), load_exported(out)  # one SAE: no folder needed
    assert loaded.cfg == original.cfg
    for name, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(UserError, match="is a file"):
        pull(out / "README.md")


def fake_hub_cache(cache: Path, export: Path, repo_id: str) -> None:
    """The hub cache layout snapshot_download leaves behind (refs/main -> snapshots/<commit>/...)."""
    commit = "a" * 40
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    shutil.copytree(export, storage / "snapshots" / commit)


def test_pull_from_the_hub_cache_offline(checkpoint, tmp_path):
    """HF_HUB_OFFLINE=1 (conftest): a repo id resolves to the cached snapshot, no network."""
    out = tmp_path / "export"
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(out)))
    fake_hub_cache(tmp_path / "cache", out, REPO)
    original = load_sae(checkpoint)
    for loaded in (
        load_exported(REPO, folder=TAG, cache_dir=str(tmp_path / "cache")),
        load_exported(REPO, cache_dir=str(tmp_path / "cache")),
    ):
        assert loaded.cfg == original.cfg
        x = torch.randn(64, 32)
        assert torch.equal(loaded.decode(loaded.encode(x)), original.decode(original.encode(x)))
    with pytest.raises(UserError, match="downloading it as a hub repository failed"):
        load_exported("test-org/not-cached", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="not a hub repository id"):
        load_exported("no/such/dir", cache_dir=str(tmp_path / "cache"))


def test_saelens_from_pretrained_reads_the_pushed_layout(checkpoint, tmp_path, monkeypatch):
    """The model card's `SAE.from_pretrained(repo_id, folder)` works on the repository layout (from the
    hub cache, offline)."""
    sae_lens = pytest.importorskip("sae_lens")
    import huggingface_hub.constants as constants

    out = tmp_path / "export"
    run(ExportConfig(checkpoint=str(checkpoint), out_dir=str(out)))
    fake_hub_cache(tmp_path / "cache", out, REPO)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    theirs = sae_lens.SAE.from_pretrained(REPO, TAG)
    ours = load_sae(checkpoint)
    x = torch.randn(64, 32) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.decode(ours.encode(x)), rtol=1e-5, atol=1e-5)
